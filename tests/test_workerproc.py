"""A worker process's crash backoff (supervisor/core/workerproc.py: respawn_delay)."""

from __future__ import annotations

import collections

from llmsup.supervisor.core.watchdog import Limits


def respawn():
    """workerproc.respawn_delay and its (first, cap)."""
    from llmsup.supervisor.core.workerproc import RESPAWN_BACKOFF_S, respawn_delay

    return respawn_delay, RESPAWN_BACKOFF_S


def test_respawn_delay_doubles_then_crash_loop():
    respawn_delay, (first, _) = respawn()
    limits = Limits(crash_loop_failures=5, crash_loop_window_s=60.0)
    crashes: collections.deque[float] = collections.deque()
    delays = [respawn_delay(crashes, now, limits) for now in (100.0, 101.0, 102.0, 103.0)]
    assert delays == [first, 2 * first, 4 * first, 8 * first]
    assert respawn_delay(crashes, 104.0, limits) is None, "the 5th crash in 60s: FATAL"
    assert list(crashes) == [100.0, 101.0, 102.0, 103.0, 104.0]


def test_respawn_delay_is_capped():
    respawn_delay, (first, cap) = respawn()
    limits = Limits(crash_loop_failures=1000, crash_loop_window_s=1e9)
    crashes: collections.deque[float] = collections.deque()
    delays = [respawn_delay(crashes, float(i), limits) for i in range(40)]
    assert delays[0] == first
    assert all(b == min(cap, 2 * a) for a, b in zip(delays, delays[1:], strict=False))
    assert delays[-1] == cap and max(delays) == cap


def test_respawn_delay_forgets_crashes_outside_the_window():
    respawn_delay, (first, _) = respawn()
    limits = Limits(crash_loop_failures=3, crash_loop_window_s=60.0)
    crashes: collections.deque[float] = collections.deque()
    assert respawn_delay(crashes, 0.0, limits) == first
    assert respawn_delay(crashes, 60.0, limits) == 2 * first, "exactly 60s apart: same window"
    assert respawn_delay(crashes, 100.0, limits) == 2 * first, "the crash at 0 has expired"
    assert list(crashes) == [60.0, 100.0]
    assert respawn_delay(crashes, 200.0, limits) == first, "all earlier ones expired"
    assert list(crashes) == [200.0]
    # Three within the window, however slowly: a crash loop.
    assert respawn_delay(crashes, 230.0, limits) == 2 * first
    assert respawn_delay(crashes, 259.0, limits) is None
