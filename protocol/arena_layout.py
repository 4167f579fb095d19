"""The context cache arena: llama.cpp sequence states of prompt prefixes in shared memory.

One segment per supervisor instance, created (and fallocated, so a full /dev/shm is an
error at start, not a SIGBUS in a worker later) and unlinked by the supervisor; workers
attach and read and write it; `llmsup top` attaches read-only. Any worker can continue
what another computed: it finds the longest cached prefix of its prompt, restores that
state straight from the segment into one of its sequences (no copy in Python) and reads
only the rest of the prompt.

Layout (little-endian; the numpy dtypes below are the source of truth):

| part    | field          | type     | meaning                                                |
|---------|----------------|----------|--------------------------------------------------------|
| header  | magic          | 8 bytes  | b"LLMSUPCA"                                            |
| header  | version        | u32      | layout version (1)                                     |
| header  | n_entries      | u32      | rows in the entry table                                |
| header  | data_offset    | u64      | where blobs start (after the table)                    |
| header  | data_bytes     | u64      | bytes for blobs: the bound that --cache-mb sets         |
| header  | clock          | u64      | bumped on every use: entries' last_used come from it   |
| header  | hits_slot      | u64      | prompts continued in a sequence that still held them   |
| header  | hits_shared    | u64      | prompts continued from a state restored from here      |
| header  | misses         | u64      | prompts with no usable cached prefix                   |
| header  | tokens_reused  | u64      | prompt tokens not read again, over all hits            |
| header  | saves          | u64      | states written                                         |
| header  | evictions      | u64      | entries dropped to make room (least recently used)     |
| header  | superseded     | u64      | entries dropped because a longer one serves them       |
| header  | bytes_used     | u64      | sum of the entries' sizes                              |
| header  | entries_used   | u32      | entries writing or valid                               |
| entry   | state          | u8       | FREE, WRITING (not readable), VALID                    |
| entry   | writer         | i16      | worker row writing it, -1                              |
| entry   | writer_pid     | i32      | its pid: a dead writer's entry is reclaimed            |
| entry   | pins           | u64      | bit per worker row restoring from it: not evictable    |
| entry   | generation     | u32      | bumped whenever the entry is freed                     |
| entry   | ctx_key        | 2 x u64  | model and context settings the state needs             |
| entry   | head           | u64      | hash of its first HEAD_TOKENS tokens: candidate filter |
| entry   | key            | 2 x u64  | hash of all the tokens it covers                       |
| entry   | n_tokens       | u32      | tokens it covers (positions 0..n_tokens-1)             |
| entry   | reusable_from  | u32      | shortest prefix it can be cut back to: 0, or n_tokens  |
|         |                |          | for a sliding-window state that holds only its window  |
| entry   | offset, size   | u64, u64 | its blob in the data region                            |
| entry   | state_bytes    | u64      | the llama.cpp state in the blob                        |
| entry   | last_used      | u64      | header clock at its last save or use                   |
| entry   | uses           | u32      | restores and in-place continuations from it            |
| entry   | continued      | u8       | 1 once a longer entry starts with all of its tokens    |
| blob    | BLOB header    | 64 bytes | magic b"LLMSUPKV", ctx_key, n_tokens, state_bytes,     |
|         |                |          | entry index and generation: checked before a restore   |
| blob    | tokens         | i32 x n  | the tokens it covers                                   |
| blob    | state          | bytes    | llama_state_seq_get_data_ext of one sequence           |

Every change to the table happens under an exclusive flock on the segment's own file
descriptor (released by the kernel if the holder dies), and in an order that a SIGKILL at
any point leaves consistent: a state is written outside the lock into an entry marked
WRITING, which no reader takes; it becomes VALID only once the write is complete. A
restore pins its entry, so it cannot be evicted under the reader. The supervisor clears
the pins and WRITING entries of a worker that died (release_worker).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

MAGIC = b"LLMSUPCA"
BLOB_MAGIC = b"LLMSUPKV"
LAYOUT_VERSION = 1
HEAD_TOKENS = 16  # entries shorter than this are not worth keeping
ALIGN = 64  # blob alignment in the data region

FREE, WRITING, VALID = 0, 1, 2

HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("n_entries", "<u4"),
        ("data_offset", "<u8"),
        ("data_bytes", "<u8"),
        ("clock", "<u8"),
        ("hits_slot", "<u8"),
        ("hits_shared", "<u8"),
        ("misses", "<u8"),
        ("tokens_reused", "<u8"),
        ("saves", "<u8"),
        ("evictions", "<u8"),
        ("superseded", "<u8"),
        ("bytes_used", "<u8"),
        ("entries_used", "<u4"),
    ],
    align=True,
)
ENTRY = np.dtype(
    [
        ("state", "u1"),
        ("writer", "<i2"),
        ("writer_pid", "<i4"),
        ("pins", "<u8"),
        ("generation", "<u4"),
        ("ctx_key", "<u8", (2,)),
        ("head", "<u8"),
        ("key", "<u8", (2,)),
        ("n_tokens", "<u4"),
        ("reusable_from", "<u4"),
        ("offset", "<u8"),
        ("size", "<u8"),
        ("state_bytes", "<u8"),
        ("last_used", "<u8"),
        ("uses", "<u4"),
        ("continued", "u1"),
    ],
    align=True,
)
BLOB = np.dtype(
    [
        ("magic", "S8"),
        ("ctx_key", "<u8", (2,)),
        ("n_tokens", "<u4"),
        ("index", "<u4"),
        ("generation", "<u4"),
        ("state_bytes", "<u8"),
    ],
    align=True,
)
HEADER_BYTES = 256
BLOB_BYTES = 64
assert HEADER.itemsize <= HEADER_BYTES and BLOB.itemsize <= BLOB_BYTES

MIN_MB = 16  # below this nothing useful fits (a 600-token Gemma 3 state is ~10 MB)
ENTRY_BYTES_GUESS = 256 << 10  # the entry table gets a row per this many data bytes
MAX_ENTRIES = 4096


class ArenaError(Exception):
    """The segment cannot be created or is not an llmsup cache arena."""


def default_cache_mb() -> int:
    """A sixteenth of the machine's memory, at most 1 GiB: room for ~100 chat prefixes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(1024, total // 16 >> 20))


def token_hash(tokens: np.ndarray, words: int) -> np.ndarray:
    """blake2b of tokens as `words` little-endian u64s (numpy compares them in bulk)."""
    data = np.ascontiguousarray(tokens, "<i4").tobytes()
    return np.frombuffer(hashlib.blake2b(data, digest_size=8 * words).digest(), "<u8")


def as_key(ctx_key: bytes) -> np.ndarray:
    return np.frombuffer(ctx_key, "<u8", count=2)


@dataclass
class Found:
    """A cached state whose first `usable` tokens a prompt can continue from (pinned)."""

    index: int
    generation: int
    n_tokens: int
    usable: int
    state_ptr: int  # address of the llama.cpp state in this process
    state_bytes: int


@dataclass
class Reservation:
    """Room for a state being written: readable by nobody until commit()."""

    index: int
    generation: int
    state_ptr: int
    state_bytes: int


class Arena:
    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self.shm = shm
        self.owner = owner
        self.header = np.ndarray((), HEADER, buffer=shm.buf, offset=0)
        n = int(self.header["n_entries"])
        self.entries = np.ndarray((n,), ENTRY, buffer=shm.buf, offset=HEADER_BYTES)
        self.data_offset = int(self.header["data_offset"])
        self.data_bytes = int(self.header["data_bytes"])
        # One ctypes view of the whole segment: llama.cpp reads and writes states in place.
        self._c_view = (ctypes.c_char * shm.size).from_buffer(shm.buf)
        self.base = ctypes.addressof(self._c_view)

    # --- life cycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, size_mb: int) -> Arena:
        """Create the segment (the supervisor only), exclusively: an existing one of that
        name is an error, never reused or removed.

        The whole size is allocated now (posix_fallocate): tmpfs hands out pages lazily,
        and a write into a page it cannot back kills the writer with SIGBUS."""
        if size_mb < MIN_MB:
            raise ArenaError(f"--cache-mb {size_mb} is below the minimum of {MIN_MB} (0: off)")
        size = size_mb << 20
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except (PermissionError, FileExistsError) as exc:
            raise ArenaError(
                f"cannot create the prefix cache /dev/shm/{name}: {exc.strerror} "
                "(or start with --cache-mb 0)"
            ) from None
        try:
            os.posix_fallocate(shm._fd, 0, size)
        except OSError as exc:
            shm.close()
            shm.unlink()
            raise ArenaError(
                f"cannot allocate a {size_mb} MB cache in /dev/shm: {exc.strerror} "
                "(free space in /dev/shm, or start with a smaller --cache-mb, or 0)"
            ) from None
        n_entries = int(min(MAX_ENTRIES, max(64, size // ENTRY_BYTES_GUESS)))
        table_end = HEADER_BYTES + ENTRY.itemsize * n_entries
        data_offset = -(-table_end // ALIGN) * ALIGN
        header = np.ndarray((), HEADER, buffer=shm.buf, offset=0)
        header["version"] = LAYOUT_VERSION
        header["n_entries"] = n_entries
        header["data_offset"] = data_offset
        header["data_bytes"] = size - data_offset
        entries = np.ndarray((n_entries,), ENTRY, buffer=shm.buf, offset=HEADER_BYTES)
        entries["writer"] = -1
        header["magic"] = MAGIC  # last: a reader never sees a half-made header
        del header, entries
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Attach without ownership (see Scoreboard.attach: cpython gh-82300)."""
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")
        ok = shm.size >= HEADER_BYTES
        if ok:
            header = np.ndarray((), HEADER, buffer=shm.buf, offset=0)
            ok = bytes(header["magic"]) == MAGIC and int(header["version"]) == LAYOUT_VERSION
            del header
        if not ok:
            shm.close()
            raise ArenaError(
                f"shared memory segment {name} is not an llmsup cache arena v{LAYOUT_VERSION}"
            )
        return cls(shm, owner=False)

    def close(self) -> None:
        del self.header, self.entries, self._c_view  # release buffer exports first
        self.shm.close()
        if self.owner:
            self.shm.unlink()

    @contextmanager
    def locked(self):
        fcntl.flock(self.shm._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.shm._fd, fcntl.LOCK_UN)

    # --- reading ------------------------------------------------------------------------------

    def tokens_of(self, index: int) -> np.ndarray:
        e = self.entries[index]
        return np.ndarray((int(e["n_tokens"]),), "<i4", buffer=self.shm.buf,
                          offset=int(e["offset"]) + BLOB_BYTES)  # fmt: skip

    def _candidates(self, ctx_key: bytes, tokens: np.ndarray) -> np.ndarray:
        if len(tokens) < HEAD_TOKENS:
            return np.empty(0, dtype=np.intp)
        head = token_hash(tokens[:HEAD_TOKENS], 1)[0]
        e = self.entries
        same_ctx = (e["ctx_key"] == as_key(ctx_key)).all(axis=1)
        return np.flatnonzero((e["state"] == VALID) & same_ctx & (e["head"] == head))

    def common_prefix(self, index: int, tokens: np.ndarray) -> int:
        return tokens_in_common(self.tokens_of(index), tokens)

    def find(self, ctx_key: bytes, tokens: np.ndarray, limit: int,
             row: int) -> tuple[Found | None, int]:  # fmt: skip
        """The entry that lets a prompt skip the most tokens (at most `limit`, and no fewer
        than the entry's reusable_from), pinned for `row` until unpin(), or None; and the
        longest prefix the prompt shares with any entry, usable or not."""
        with self.locked():
            best, best_usable, shared = None, 0, 0
            for i in self._candidates(ctx_key, tokens):
                e = self.entries[i]
                common = self.common_prefix(i, tokens)
                shared = max(shared, common)
                usable = min(common, limit)
                if usable < int(e["reusable_from"]) or usable <= best_usable:
                    continue
                best, best_usable = int(i), usable
            if best is None:
                return None, shared
            e = self.entries[best]
            e["pins"] |= np.uint64(1 << row)
            e["last_used"] = self._tick()
            e["uses"] += 1
            blob = np.ndarray((), BLOB, buffer=self.shm.buf, offset=int(e["offset"]))
            if (bytes(blob["magic"]) != BLOB_MAGIC
                    or not (blob["ctx_key"] == as_key(ctx_key)).all()
                    or int(blob["index"]) != best
                    or int(blob["generation"]) != int(e["generation"])):  # fmt: skip
                e["pins"] &= ~np.uint64(1 << row)
                return None, shared
            n = int(e["n_tokens"])
            found = Found(best, int(e["generation"]), n, best_usable,
                          self.base + int(e["offset"]) + _state_offset(n),
                          int(e["state_bytes"]))  # fmt: skip
            return found, shared

    def unpin(self, found: Found, row: int) -> None:
        with self.locked():
            e = self.entries[found.index]
            if int(e["generation"]) == found.generation:
                e["pins"] &= ~np.uint64(1 << row)

    def _covering(self, ctx_key: bytes, tokens: np.ndarray, reusable_from: int) -> int | None:
        for i in self._candidates(ctx_key, tokens):
            e = self.entries[i]
            if (int(e["n_tokens"]) >= len(tokens) and int(e["reusable_from"]) <= reusable_from
                    and self.common_prefix(i, tokens) == len(tokens)):  # fmt: skip
                e["last_used"] = self._tick()
                return int(i)
        return None

    # --- writing ------------------------------------------------------------------------------

    def reserve(self, ctx_key: bytes, tokens: np.ndarray, reusable_from: int, state_bytes: int,
                row: int) -> Reservation | None:  # fmt: skip
        """Room for the state of a sequence holding `tokens`, evicting least recently used
        entries as needed; None if it is already cached or cannot fit."""
        n = len(tokens)
        size = -(-(_state_offset(n) + state_bytes) // ALIGN) * ALIGN
        if n < HEAD_TOKENS or size > self.data_bytes:
            return None
        with self.locked():
            if self._covering(ctx_key, tokens, reusable_from) is not None:
                return None
            index = self._free_entry()
            offset = self._room(size) if index is not None else None
            if offset is None:
                return None
            e = self.entries[index]
            e["writer"] = row
            e["writer_pid"] = os.getpid()
            e["pins"] = 0
            e["ctx_key"] = as_key(ctx_key)
            e["head"] = token_hash(tokens[:HEAD_TOKENS], 1)[0]
            e["key"] = token_hash(tokens, 2)
            e["n_tokens"] = n
            e["reusable_from"] = reusable_from
            e["offset"] = offset
            e["size"] = size
            e["state_bytes"] = state_bytes
            e["last_used"] = self._tick()
            e["uses"] = 0
            e["continued"] = 0
            e["state"] = WRITING
            self.header["bytes_used"] += size
            self.header["entries_used"] += 1
            generation = int(e["generation"])
        blob = np.ndarray((), BLOB, buffer=self.shm.buf, offset=offset)
        blob["magic"] = BLOB_MAGIC
        blob["ctx_key"] = as_key(ctx_key)
        blob["n_tokens"] = n
        blob["index"] = index
        blob["generation"] = generation
        blob["state_bytes"] = state_bytes
        self.tokens_of(index)[:] = tokens
        return Reservation(index, generation, self.base + offset + _state_offset(n), state_bytes)

    def commit(self, res: Reservation) -> bool:
        """Make a written state readable, and drop the entries it makes redundant."""
        with self.locked():
            e = self.entries[res.index]
            if int(e["generation"]) != res.generation or int(e["state"]) != WRITING:
                return False  # reclaimed meanwhile (its writer was taken for dead)
            e["state"] = VALID
            e["writer"] = -1
            self.header["saves"] += 1
            self._drop_superseded(res.index)
            return True

    def abandon(self, res: Reservation) -> None:
        with self.locked():
            e = self.entries[res.index]
            if int(e["generation"]) == res.generation and int(e["state"]) == WRITING:
                self._free(res.index)

    def release_worker(self, row: int) -> int | None:
        """A worker row's process is gone: clear its pins, free what it was writing. None if
        another process holds the lock: the supervisor never waits for a worker (one that
        is SIGSTOPped inside its few microseconds under the lock would stop it), it retries."""
        freed = 0
        try:
            fcntl.flock(self.shm._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            bit = np.uint64(1 << row)
            for i in np.flatnonzero(self.entries["pins"] & bit):
                self.entries[i]["pins"] &= ~bit
            for i in np.flatnonzero((self.entries["state"] == WRITING)
                                    & (self.entries["writer"] == row)):  # fmt: skip
                self._free(int(i))
                freed += 1
        finally:
            fcntl.flock(self.shm._fd, fcntl.LOCK_UN)
        return freed

    def clear(self) -> None:
        """Drop every entry that is not being read or written (benchmarks start empty)."""
        with self.locked():
            for i in np.flatnonzero((self.entries["state"] == VALID) & (self.entries["pins"] == 0)):
                self._free(int(i))

    def count(self, hit: str | None, tokens: int = 0) -> None:
        """Tally one prompt: hit "slot", hit "shared", or a miss (None)."""
        with self.locked():
            field = {"slot": "hits_slot", "shared": "hits_shared", None: "misses"}[hit]
            self.header[field] += 1
            self.header["tokens_reused"] += tokens

    # --- under the lock -----------------------------------------------------------------------

    def _tick(self) -> int:
        self.header["clock"] += 1
        return int(self.header["clock"])

    def _free(self, index: int) -> None:
        e = self.entries[index]
        e["state"] = FREE  # first: nobody takes it from here on
        e["generation"] += 1
        e["pins"] = 0
        e["writer"] = -1
        self.header["bytes_used"] -= int(e["size"])
        self.header["entries_used"] -= 1

    def _evictable(self) -> np.ndarray:
        """Unpinned valid entries, and entries whose writer process is gone, least valuable
        first: entries that a longer one continues and that served at most one prompt (a
        chat's earlier turns: its next turn continues the newest), then the least recently
        used. A prefix that many prompts continued (a system prompt) outlives them."""
        e = self.entries
        ok = (e["state"] == VALID) & (e["pins"] == 0)
        for i in np.flatnonzero(e["state"] == WRITING):
            if not _alive(int(e["writer_pid"][i])):
                ok[i] = True
        order = np.flatnonzero(ok)
        spent = (e["continued"][order] == 1) & (e["uses"][order] <= 1)
        return order[np.lexsort((e["last_used"][order], ~spent))]

    def _free_entry(self) -> int | None:
        free = np.flatnonzero(self.entries["state"] == FREE)
        if len(free):
            return int(free[0])
        victims = self._evictable()
        if not len(victims):
            return None
        self._evict(int(victims[0]))
        return int(victims[0])

    def _evict(self, index: int) -> None:
        self._free(index)
        self.header["evictions"] += 1

    def _room(self, size: int) -> int | None:
        """Offset of a gap of `size` bytes (first fit), evicting oldest entries until one
        opens; None if pinned or unfinished entries leave no such gap."""
        while True:
            offset = self._gap(size)
            if offset is not None:
                return offset
            victims = self._evictable()
            if not len(victims):
                return None
            self._evict(int(victims[0]))

    def _gap(self, size: int) -> int | None:
        e = self.entries
        used = np.flatnonzero(e["state"] != FREE)
        spans = sorted(zip(e["offset"][used].tolist(), e["size"][used].tolist(), strict=True))
        at = self.data_offset
        for offset, length in spans:
            if offset - at >= size:
                return at
            at = max(at, offset + length)
        return at if self.data_offset + self.data_bytes - at >= size else None

    def _drop_superseded(self, index: int) -> None:
        """Entries the new entry `index` continues and can stand in for: every prefix they
        serve, it serves too. (A sliding-window state serves only its own end, so it stays:
        a conversation can branch there, as when two requests continue it differently.)"""
        new = self.entries[index]
        tokens = self.tokens_of(index)
        for i in self._candidates(new["ctx_key"].tobytes(), tokens):
            e = self.entries[i]
            n = int(e["n_tokens"])
            reusable_from = int(e["reusable_from"])
            if i == index or n > int(new["n_tokens"]) or self.common_prefix(int(i), tokens) < n:
                continue
            if int(e["pins"]) == 0 and int(new["reusable_from"]) <= reusable_from:
                self._free(int(i))
                self.header["superseded"] += 1
            else:
                e["continued"] = 1

    # --- for status and top -------------------------------------------------------------------

    def stats(self) -> dict:
        h = self.header.copy()
        hits = int(h["hits_slot"]) + int(h["hits_shared"])
        return {
            "bytes_limit": int(h["data_bytes"]),
            "bytes_used": int(h["bytes_used"]),
            "entries": int(h["entries_used"]),
            "entry_limit": int(h["n_entries"]),
            "hits": hits,
            "hits_slot": int(h["hits_slot"]),
            "hits_shared": int(h["hits_shared"]),
            "misses": int(h["misses"]),
            "tokens_reused": int(h["tokens_reused"]),
            "saves": int(h["saves"]),
            "evictions": int(h["evictions"]),
            "superseded": int(h["superseded"]),
        }


def tokens_in_common(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens two token arrays share from the start."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


def _state_offset(n_tokens: int) -> int:
    return -(-(BLOB_BYTES + 4 * n_tokens) // ALIGN) * ALIGN


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
