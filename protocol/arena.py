"""The context cache arena: llama.cpp sequence states of prompt prefixes in shared memory.

One segment per supervisor instance, created (and fallocated, so a full /dev/shm is an
error at start, not a SIGBUS in a worker later) and unlinked by the supervisor; workers
attach and read and write it; `llmsup top` attaches read-only. Any worker can continue
what another computed: it finds the longest cached prefix of its prompt, restores that
state straight from the segment into one of its sequences (no copy in Python) and reads
only the rest of the prompt. The segment's layout is protocol/arena_layout.py's.

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
import os
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from llmsup.protocol.arena_layout import (
    ALIGN,
    BLOB,
    BLOB_BYTES,
    BLOB_MAGIC,
    ENTRY,
    ENTRY_BYTES_GUESS,
    HEAD_TOKENS,
    HEADER,
    HEADER_BYTES,
    LAYOUT_VERSION,
    MAGIC,
    MAX_ENTRIES,
    MIN_MB,
    VALID,
    WRITING,
    ArenaError,
    as_key,
    state_offset,
    token_hash,
    tokens_in_common,
)
from llmsup.protocol.arena_space import ArenaSpace


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


class Arena(ArenaSpace):
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
        return np.ndarray(
            (int(e["n_tokens"]),), "<i4", buffer=self.shm.buf, offset=int(e["offset"]) + BLOB_BYTES
        )

    def _candidates(self, ctx_key: bytes, tokens: np.ndarray) -> np.ndarray:
        if len(tokens) < HEAD_TOKENS:
            return np.empty(0, dtype=np.intp)
        head = token_hash(tokens[:HEAD_TOKENS], 1)[0]
        e = self.entries
        same_ctx = (e["ctx_key"] == as_key(ctx_key)).all(axis=1)
        return np.flatnonzero((e["state"] == VALID) & same_ctx & (e["head"] == head))

    def common_prefix(self, index: int, tokens: np.ndarray) -> int:
        return tokens_in_common(self.tokens_of(index), tokens)

    def find(
        self, ctx_key: bytes, tokens: np.ndarray, limit: int, row: int
    ) -> tuple[Found | None, int]:
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
            if (
                bytes(blob["magic"]) != BLOB_MAGIC
                or not (blob["ctx_key"] == as_key(ctx_key)).all()
                or int(blob["index"]) != best
                or int(blob["generation"]) != int(e["generation"])
            ):
                e["pins"] &= ~np.uint64(1 << row)
                return None, shared
            n = int(e["n_tokens"])
            found = Found(
                best,
                int(e["generation"]),
                n,
                best_usable,
                self.base + int(e["offset"]) + state_offset(n),
                int(e["state_bytes"]),
            )
            return found, shared

    def unpin(self, found: Found, row: int) -> None:
        with self.locked():
            e = self.entries[found.index]
            if int(e["generation"]) == found.generation:
                e["pins"] &= ~np.uint64(1 << row)

    def _covering(self, ctx_key: bytes, tokens: np.ndarray, reusable_from: int) -> int | None:
        for i in self._candidates(ctx_key, tokens):
            e = self.entries[i]
            if (
                int(e["n_tokens"]) >= len(tokens)
                and int(e["reusable_from"]) <= reusable_from
                and self.common_prefix(i, tokens) == len(tokens)
            ):
                e["last_used"] = self._tick()
                return int(i)
        return None

    # --- writing ------------------------------------------------------------------------------

    def reserve(
        self, ctx_key: bytes, tokens: np.ndarray, reusable_from: int, state_bytes: int, row: int
    ) -> Reservation | None:
        """Room for the state of a sequence holding `tokens`, evicting least recently used
        entries as needed; None if it is already cached or cannot fit."""
        n = len(tokens)
        size = -(-(state_offset(n) + state_bytes) // ALIGN) * ALIGN
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
        return Reservation(index, generation, self.base + offset + state_offset(n), state_bytes)

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
            for i in np.flatnonzero(
                (self.entries["state"] == WRITING) & (self.entries["writer"] == row)
            ):
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
