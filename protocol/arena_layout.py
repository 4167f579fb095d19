"""The context cache arena's layout in shared memory, and the hashes and sizes of what it holds
(protocol/arena.py reads and writes it).

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
"""

from __future__ import annotations

import hashlib
import os

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


def tokens_in_common(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens two token arrays share from the start."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


def state_offset(n_tokens: int) -> int:
    return -(-(BLOB_BYTES + 4 * n_tokens) // ALIGN) * ALIGN
