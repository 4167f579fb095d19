"""The prefix cache arena on its own: real shared memory, real processes, fake states.

A "state" here is a run of bytes written where llama.cpp would write one, so the table's
rules (lookup, sliding-window limits, eviction, pins, crashed writers) are
checked without a model; tests/test_prefix_cache.py checks them with real states.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from llmsup.protocol.arena import Arena
from llmsup.protocol.arena_layout import VALID, WRITING, ArenaError

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
MB = 1 << 20


@pytest.fixture
def arena():
    made = Arena.create(f"llmsup-test-{os.getpid()}-{uuid.uuid4().hex[:8]}", 16)
    yield made
    made.close()
    assert not os.path.exists(f"/dev/shm/{made.shm.name.lstrip('/')}")


def tokens(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


def put(
    arena: Arena,
    toks: np.ndarray,
    size: int = MB,
    reusable_from: int = 0,
    key: bytes = KEY,
    fill: int = 7,
) -> bool:
    res = arena.reserve(key, toks, reusable_from, size, row=0)
    if res is None:
        return False
    ctypes.memset(res.state_ptr, fill, size)
    return arena.commit(res)


def state_bytes(arena: Arena, found) -> bytes:
    return ctypes.string_at(found.state_ptr, found.state_bytes)


def test_longest_usable_prefix_is_found_and_read_in_place(arena):
    assert put(arena, tokens(100), fill=1)
    prompt = np.concatenate([tokens(100), tokens(50, 1000)])
    found, shared = arena.find(KEY, prompt, limit=len(prompt) - 1, row=0)
    assert found is not None and found.n_tokens == 100 and found.usable == 100 and shared == 100
    assert state_bytes(arena, found) == b"\x01" * MB
    arena.unpin(found, 0)
    # Diverging at token 61: the first 61 are usable.
    diverging = tokens(100).copy()
    diverging[61] = -5
    found, _ = arena.find(KEY, diverging, limit=99, row=0)
    assert found.usable == 61
    arena.unpin(found, 0)
    # Another model or context: a miss, never a restore.
    assert arena.find(OTHER_KEY, prompt, limit=149, row=0) == (None, 0)
    # The limit (a prompt's last token is always read again) caps what is used.
    found, _ = arena.find(KEY, tokens(100), limit=99, row=0)
    assert found.usable == 99
    arena.unpin(found, 0)


def test_a_state_is_not_cut_back_past_its_sliding_window(arena):
    assert put(arena, tokens(200), reusable_from=150)
    found, shared = arena.find(KEY, np.concatenate([tokens(120), tokens(80, 5000)]), 199, 0)
    assert found is None and shared == 120  # shared, but not usable: worth a state of its own
    found, _ = arena.find(KEY, np.concatenate([tokens(160), tokens(80, 5000)]), 239, 0)
    assert found is not None and found.usable == 160
    arena.unpin(found, 0)


def test_duplicates_are_not_saved_and_longer_entries_supersede_shorter(arena):
    assert put(arena, tokens(100))
    assert arena.reserve(KEY, tokens(100), 0, MB, row=0) is None  # already there
    assert arena.reserve(KEY, tokens(60), 0, MB, row=0) is None  # a prefix of it is too
    assert put(arena, tokens(300))
    stats = arena.stats()
    assert stats["entries"] == 1 and stats["superseded"] == 1
    # A longer entry that cannot be cut back as far does not replace the shorter one ...
    assert put(arena, tokens(400), reusable_from=350)
    assert arena.stats()["entries"] == 2
    # ... nor is a sliding-window state that serves only its own end: a conversation can
    # branch there (two requests continuing it differently).
    assert put(arena, tokens(450), reusable_from=450)
    assert put(arena, tokens(480), reusable_from=480)
    assert arena.stats()["entries"] == 4 and arena.stats()["superseded"] == 1


def test_eviction_keeps_the_bound_and_drops_least_recently_used_first(arena):
    limit = arena.stats()["bytes_limit"]
    for i in range(5):  # 5 x 4 MB do not fit in 16 MB
        assert put(arena, tokens(64, 10_000 * (i + 1)), size=4 * MB)
        if i == 2:  # use the first entry once three fill the arena: it is then not the oldest
            found, _ = arena.find(KEY, tokens(65, 10_000), 64, 0)
            arena.unpin(found, 0)
        assert arena.stats()["bytes_used"] <= limit
    stats = arena.stats()
    assert stats["evictions"] >= 2 and stats["entries"] == 3
    assert arena.find(KEY, tokens(65, 10_000), 64, 0)[0] is not None  # used, so kept
    assert arena.find(KEY, tokens(65, 20_000), 64, 0)[0] is None  # the oldest went


def test_a_chats_earlier_turns_go_before_a_prefix_many_chats_continued(arena):
    system = tokens(64)
    assert put(arena, system, size=4 * MB, reusable_from=64)  # a sliding-window state
    for i in range(2):  # two conversations continue it
        prompt = np.concatenate([system, tokens(8, 1000 * (i + 1))])
        found, _ = arena.find(KEY, prompt, len(prompt) - 1, 0)
        assert found.usable == 64
        arena.unpin(found, 0)
    turn1 = np.concatenate([system, tokens(20, 5000)])
    assert put(arena, turn1, size=4 * MB, reusable_from=84)
    assert put(arena, np.concatenate([turn1, tokens(20, 6000)]), size=4 * MB, reusable_from=104)
    # Full: the new entry takes the place of the chat's first turn (continued, used at most
    # once), not of the older system prompt state that two chats continued.
    assert put(arena, tokens(64, 90_000), size=4 * MB)
    found, _ = arena.find(KEY, np.concatenate([turn1, tokens(5, 7000)]), 88, 0)
    assert found.n_tokens == 64  # the first turn's state went; the system prompt's stayed
    assert arena.stats()["entries"] == 3


def test_a_pinned_entry_is_never_evicted_under_its_reader(arena):
    assert put(arena, tokens(64), size=12 * MB, fill=3)
    found, _ = arena.find(KEY, tokens(65), 64, row=1)
    assert found is not None
    assert not put(arena, tokens(64, 9000), size=12 * MB)  # no room, and none is taken
    assert state_bytes(arena, found) == b"\x03" * (12 * MB)
    arena.unpin(found, 1)
    assert put(arena, tokens(64, 9000), size=12 * MB)


WRITER = """
import ctypes, os, signal, sys
import numpy as np
from llmsup.protocol.arena import Arena
arena = Arena.attach(sys.argv[1])
res = arena.reserve(bytes(range(16)), np.arange(64, dtype=np.int32), 0, 4 << 20, row=3)
ctypes.memset(res.state_ptr, 0xAB, 2 << 20)  # half way
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_half_way_leaves_nothing_readable(arena):
    name = arena.shm.name.lstrip("/")
    proc = subprocess.run([sys.executable, "-c", WRITER, name], timeout=60)
    assert proc.returncode == -9
    entries = arena.entries
    assert list(entries["state"]).count(WRITING) == 1 and VALID not in list(entries["state"])
    assert arena.find(KEY, tokens(65), 64, 0) == (None, 0)
    # The supervisor frees what the dead worker's row was writing ...
    assert arena.release_worker(3) == 1
    assert arena.stats()["entries"] == 0 and arena.stats()["bytes_used"] == 0
    # ... and a writer whose process is gone is reclaimed anyway when room is needed.
    subprocess.run([sys.executable, "-c", WRITER, name], timeout=60)
    assert arena.stats()["entries"] == 1
    for i in range(4):
        assert put(arena, tokens(64, 1000 * (i + 1)), size=4 * MB)
    assert WRITING not in list(arena.entries["state"])


HOLDER = """
import fcntl, sys, time
from llmsup.protocol.arena import Arena
arena = Arena.attach(sys.argv[1])
fcntl.flock(arena.shm._fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_the_supervisor_never_waits_for_a_worker_holding_the_lock(arena):
    # A worker SIGSTOPped (or hung) inside the lock must not stop the supervisor's loop.
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, arena.shm.name.lstrip("/")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "held\n"
        assert arena.release_worker(0) is None  # at once, without waiting
    finally:
        proc.kill()
        proc.wait()
    assert arena.release_worker(0) == 0  # the kernel released the dead holder's lock


def test_a_segment_that_is_not_an_arena_is_refused():
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        with pytest.raises(ArenaError, match="not an llmsup cache arena"):
            Arena.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()


def test_too_small_a_cache_is_refused_with_the_limit():
    with pytest.raises(ArenaError, match="--cache-mb 8 is below the minimum of 16"):
        Arena.create(f"llmsup-test-{os.getpid()}-small", 8)
