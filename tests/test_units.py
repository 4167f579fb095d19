"""Unit tests of the supervisor's pure parts: no model, no processes, no sockets.

The admission queue (fairqueue), the watchdog's rules (watchdog), the crash backoff
(workerproc.respawn_delay) and the split of cores into worker groups (layout).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import pytest

from llmsup.supervisor.core.watchdog import HUNG, KILL, OK, RECYCLE, Limits, Sample, over_hard_limit
from llmsup.supervisor.core.watchdog import verdict as watchdog_verdict
from llmsup.supervisor.host import layout

MiB = 1 << 20

# --- the admission queue -------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity: two jobs with equal fields stay two jobs
class Item:
    """All FairQueue reads of a job: its client and its estimated prompt tokens."""

    name: str
    client: bytes
    prompt_tokens: int = 0


A, B, C = b"client-a", b"client-b", b"client-c"


def fairqueue():
    """The module, imported per test: an import error fails the queue's tests, not the file's."""
    from llmsup.supervisor.core import fairqueue

    return fairqueue


def queue(limit: int = 100, per_client: int = 100, token_limit: int = 10_000):
    return fairqueue().FairQueue(limit=limit, per_client=per_client, token_limit=token_limit)


def names(items) -> list[str]:
    return [item.name for item in items]


def drain(q) -> list[str]:
    popped = []
    while q:
        popped.append(q.pop().name)
    return popped


def test_fairqueue_serves_clients_round_robin():
    q = queue()
    for item in [Item("a1", A), Item("a2", A), Item("a3", A), Item("b1", B),
                 Item("c1", C), Item("c2", C)]:  # fmt: skip
        q.push(item)
    # A flooded first, yet waits behind itself: one job of each client in turn.
    assert drain(q) == ["a1", "b1", "c1", "a2", "c2", "a3"]


def test_fairqueue_client_that_comes_back_takes_the_last_turn():
    q = queue()
    q.push(Item("a1", A))
    q.push(Item("b1", B))
    assert q.pop().name == "a1"  # A has nothing left: it leaves the turns
    q.push(Item("a2", A))  # and comes back behind B
    q.push(Item("c1", C))
    assert drain(q) == ["b1", "a2", "c1"]


def test_fairqueue_len_bool_iter_and_of_client():
    q = queue()
    assert len(q) == 0 and not q and list(q) == [] and q.of_client(A) == []
    for item in [Item("a1", A, 5), Item("b1", B, 7), Item("a2", A, 11)]:
        q.push(item)
    assert len(q) == 3 and q
    assert sorted(names(q)) == ["a1", "a2", "b1"]  # every waiting job, once
    assert names(q.of_client(A)) == ["a1", "a2"]  # in its client's order
    assert names(q.of_client(B)) == ["b1"] and q.of_client(C) == []
    copy = q.of_client(A)
    copy.clear()
    assert len(q.of_client(A)) == 2, "of_client returns a copy"
    assert q.count == 3 and q.tokens == 23


def test_fairqueue_refuses_when_full():
    q = queue(limit=3)
    for item in [Item("a1", A), Item("b1", B)]:
        q.push(item)
    assert q.refusal(C, 1) is None
    q.push(Item("c1", C))
    assert q.refusal(C, 1) == "the queue is full (3 requests waiting)"
    assert q.refusal(b"new", 0) is not None, "a full queue refuses a new client too"
    q.pop()
    assert q.refusal(b"new", 0) is None


def test_fairqueue_refuses_a_client_over_its_own_limit():
    q = queue(limit=10, per_client=2)
    q.push(Item("a1", A))
    assert q.refusal(A, 1) is None
    q.push(Item("a2", A))
    assert q.refusal(A, 1) == "this client already has 2 requests waiting (limit 2)"
    assert q.refusal(B, 1) is None, "other clients still have room"
    q.pop()
    assert q.refusal(A, 1) is None


def test_fairqueue_total_limit_is_checked_before_the_client_limit():
    q = queue(limit=2, per_client=2, token_limit=10)
    q.push(Item("a1", A, 5))
    q.push(Item("a2", A, 5))
    assert q.refusal(A, 50).startswith("the queue is full")


def test_fairqueue_token_limit():
    q = queue(token_limit=100)
    q.push(Item("a1", A, 60))
    assert q.refusal(B, 40) is None, "exactly at the limit fits"
    assert q.refusal(B, 41) == (
        "the queue holds about 60 prompt tokens; this request's 41 would pass the limit of 100"
    )
    q.push(Item("b1", B, 40))
    assert q.tokens == 100
    assert q.refusal(C, 1) is not None
    assert q.refusal(C, 0) is None


def test_fairqueue_token_limit_never_refuses_into_an_empty_queue():
    q = queue(token_limit=100)
    assert q.refusal(A, 10**9) is None, "a prompt larger than the bound still gets in alone"
    q.push(Item("a1", A, 10**9))
    assert q.tokens == 10**9
    assert q.refusal(B, 1) is not None, "and then nothing more until it leaves"
    q.pop()
    assert q.tokens == 0 and q.refusal(B, 10**9) is None
    # Only the token bound gives way: a queue (or client) limit of 0 refuses even when empty.
    assert queue(limit=0).refusal(A, 1).startswith("the queue is full")
    assert queue(per_client=0).refusal(A, 1).startswith("this client already has 0")
    assert queue(token_limit=0).refusal(A, 1) is None


def test_fairqueue_push_front_goes_first_within_its_client():
    q = queue()
    for item in [Item("a1", A), Item("b1", B), Item("a2", A)]:
        q.push(item)
    q.push(Item("a0", A), front=True)  # a retried job of a client that has jobs waiting
    assert names(q.of_client(A)) == ["a0", "a1", "a2"]
    # The client keeps its place in the turns: A was first already.
    assert drain(q) == ["a0", "b1", "a1", "a2"]


def test_fairqueue_push_front_of_a_new_client_takes_the_first_turn():
    q = queue()
    for item in [Item("a1", A), Item("b1", B)]:
        q.push(item)
    q.push(Item("c0", C), front=True)
    assert drain(q) == ["c0", "a1", "b1"]


def test_fairqueue_push_front_moves_a_waiting_clients_turn_first():
    # A retried job has waited already: its client takes the next turn.
    q = queue()
    for item in [Item("a1", A), Item("b1", B)]:
        q.push(item)
    q.push(Item("b0", B), front=True)
    assert drain(q) == ["b0", "a1", "b1"]


def test_fairqueue_remove_from_the_middle():
    q = queue()
    a1, a2, a3 = Item("a1", A, 1), Item("a2", A, 2), Item("a3", A, 4)
    b1 = Item("b1", B, 8)
    for item in (a1, a2, b1, a3):
        q.push(item)
    assert q.remove(a2) is True
    assert names(q.of_client(A)) == ["a1", "a3"]
    assert len(q) == 3 and q.tokens == 13
    assert q.remove(a2) is False, "a second remove finds nothing"
    assert len(q) == 3 and q.tokens == 13
    assert drain(q) == ["a1", "b1", "a3"]


def test_fairqueue_remove_the_last_job_of_a_client():
    q = queue()
    a1, b1, c1, a2 = Item("a1", A, 1), Item("b1", B, 2), Item("c1", C, 4), Item("a2", A, 8)
    for item in (a1, b1, c1, a2):
        q.push(item)
    assert q.remove(b1) is True
    assert q.of_client(B) == [] and B not in q.by_client and B not in q.turns
    assert drain(q) == ["a1", "c1", "a2"], "round-robin goes on without B"
    assert q.remove(b1) is False


def test_fairqueue_remove_of_a_job_never_queued():
    q = queue()
    q.push(Item("a1", A, 3))
    twin = Item("a1", A, 3)  # equal fields, another job
    assert q.remove(twin) is False and q.remove(Item("z", b"nobody")) is False
    assert len(q) == 1 and q.tokens == 3


def test_fairqueue_counts_and_tokens_return_to_zero():
    q = queue(limit=50, per_client=50, token_limit=10_000)
    items = [Item(f"{c.decode()}{i}", c, 10 * i + 1) for i in range(5) for c in (A, B, C)]
    for item in items:
        q.push(item)
    assert len(q) == 15 and q.tokens == sum(item.prompt_tokens for item in items)
    for item in items[::3]:  # a third removed, from every client
        assert q.remove(item)
    q.push(items[0], front=True)  # and one back in
    popped = drain(q)
    assert len(popped) == 11
    assert len(q) == 0 and q.count == 0 and q.tokens == 0 and not q
    assert q.by_client == {} and not q.turns
    assert q.refusal(A, 10_000) is None


def test_estimate_prompt_tokens():
    from llmsup.protocol.messages import Chat, Complete, Message, Tokenize, estimate_prompt_tokens

    # UTF-8 bytes / 4, plus 1 (so that no prompt counts as 0).
    assert estimate_prompt_tokens(Complete("")) == 1
    assert estimate_prompt_tokens(Complete("abc")) == 1
    assert estimate_prompt_tokens(Complete("abcd")) == 2
    assert estimate_prompt_tokens(Complete("x" * 400)) == 101
    assert estimate_prompt_tokens(Complete("é" * 4)) == 3, "bytes, not characters"
    # Chat: each message's content plus 8 bytes for its turn markers.
    chat = Chat((Message("user", "x" * 12), Message("assistant", "")))
    assert estimate_prompt_tokens(chat) == (12 + 8 + 0 + 8) // 4 + 1
    assert estimate_prompt_tokens(Tokenize("x" * 40)) == 11


# --- watchdog verdicts ---------------------------------------------------------------------------

LIMITS = Limits(
    mem_soft_mb=100,
    mem_hard_mb=200,
    stall_timeout_s=5.0,
    spin_cpu_percent=50.0,
    spin_seconds=3.0,
    max_requests=10,
)


def judge(
    *,
    anon: int = 10 * MiB,
    cpu: float = 0.0,
    busy: bool = False,
    stalled_for: float = 0.0,
    idle_spin_for: float = 0.0,
    served: int = 0,
    request_budget: int | None = None,
    limits: Limits = LIMITS,
) -> tuple[str, str]:
    return watchdog_verdict(
        limits,
        Sample(anon_bytes=anon, cpu_percent=cpu),
        busy=busy,
        stalled_for=stalled_for,
        idle_spin_for=idle_spin_for,
        served=served,
        request_budget=request_budget,
    )


def test_verdict_ok_for_a_healthy_worker():
    assert judge() == (OK, "")
    assert judge(busy=True, stalled_for=1.0, cpu=100.0, served=3, request_budget=10) == (OK, "")
    assert judge(anon=0) == (OK, "")


def test_verdict_kill_over_the_hard_memory_limit():
    assert judge(anon=300 * MiB) == (
        KILL,
        "anonymous memory 300 MiB over the hard limit 200 MiB",
    )
    assert judge(anon=200 * MiB + 1)[0] == KILL, "one byte over"
    assert judge(anon=200 * MiB)[0] == RECYCLE, "exactly at the hard limit: only over the soft"


def test_verdict_recycle_over_the_soft_memory_limit():
    assert judge(anon=150 * MiB) == (
        RECYCLE,
        "anonymous memory 150 MiB over the soft limit 100 MiB",
    )
    assert judge(anon=100 * MiB + 1)[0] == RECYCLE, "one byte over"
    assert judge(anon=100 * MiB) == (OK, ""), "exactly at the soft limit is allowed"
    assert judge(anon=150 * MiB, busy=True, stalled_for=1.0)[0] == RECYCLE


def test_verdict_hung_when_busy_without_progress():
    assert judge(busy=True, stalled_for=7.0) == (
        HUNG,
        "no token progress for 7.0s (stall timeout 5s)",
    )
    assert judge(busy=True, stalled_for=5.0) == (OK, ""), "exactly at the timeout is allowed"
    assert judge(busy=True, stalled_for=5.01)[0] == HUNG
    assert judge(busy=False, stalled_for=1000.0) == (OK, ""), "an idle worker makes no progress"


def test_verdict_recycle_for_idle_spin():
    assert judge(cpu=80.0, idle_spin_for=3.0) == (
        RECYCLE,
        "idle but using 80% CPU for 3s (spin limit 50% for 3s)",
    ), "exactly at the spin time"
    assert judge(cpu=80.0, idle_spin_for=2.99) == (OK, "")
    assert judge(cpu=99.0, idle_spin_for=60.0)[0] == RECYCLE


def test_verdict_recycle_for_the_request_budget():
    assert judge(served=10, request_budget=10) == (
        RECYCLE,
        "served 10 requests (max-requests 10)",
    ), "exactly at its budget"
    assert judge(served=9, request_budget=10) == (OK, "")
    assert judge(served=11, request_budget=11)[0] == RECYCLE, "a jittered budget"
    assert judge(served=10, request_budget=11) == (OK, "")
    assert judge(served=10**6, request_budget=None) == (OK, ""), "no budget: never for age"


def test_verdict_order_worst_first():
    worst = {"anon": 300 * MiB, "busy": True, "stalled_for": 60.0, "cpu": 90.0,
             "idle_spin_for": 60.0, "served": 50, "request_budget": 10}  # fmt: skip
    assert judge(**worst)[0] == KILL, "hard memory before everything"
    worst["anon"] = 150 * MiB
    assert judge(**worst)[0] == HUNG, "a hang before a soft recycle (it would never finish)"
    worst["busy"] = False
    assert judge(**worst)[1].startswith("anonymous memory 150 MiB over the soft limit")
    worst["anon"] = 0
    assert judge(**worst)[1].startswith("idle but using 90% CPU")
    worst["idle_spin_for"] = 0.0
    assert judge(**worst) == (RECYCLE, "served 50 requests (max-requests 10)")


def test_over_hard_limit():
    assert over_hard_limit(LIMITS, Sample(anon_bytes=200 * MiB, cpu_percent=0.0)) is None
    assert over_hard_limit(LIMITS, Sample(anon_bytes=0, cpu_percent=100.0)) is None
    assert over_hard_limit(LIMITS, Sample(anon_bytes=512 * MiB, cpu_percent=0.0)) == (
        "anonymous memory 512 MiB over the hard limit 200 MiB"
    )
    assert over_hard_limit(LIMITS, Sample(anon_bytes=200 * MiB + 1, cpu_percent=0.0))


def test_request_budget_jitter_range():
    assert Limits(max_requests=0).request_budget() is None
    assert Limits(max_requests=-5).request_budget() is None
    budgets = {Limits(max_requests=100, max_requests_jitter=0.1).request_budget()
               for _ in range(500)}  # fmt: skip
    # Up only, by at most a tenth: 100 to 110, both ends included (each misses 500 draws
    # with probability (10/11)**500, about 2e-21).
    assert budgets == set(range(100, 111))
    assert {Limits(max_requests=7).request_budget() for _ in range(50)} == {7}, (
        "a tenth of 7 rounds down to no jitter"
    )
    exact = Limits(max_requests=100, max_requests_jitter=0.0)
    assert {exact.request_budget() for _ in range(50)} == {100}


# --- crash backoff -------------------------------------------------------------------------------


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


# --- core layout ---------------------------------------------------------------------------------

FOUR = [[0], [1], [2], [3]]
FOUR_SMT = [[0, 4], [1, 5], [2, 6], [3, 7]]  # 2-way SMT: siblings N and N+4
ONE_CORE = [[0]]


@pytest.fixture
def topology(monkeypatch):
    def use(cores: list[list[int]]) -> None:
        monkeypatch.setattr(layout, "physical_cores", lambda: [list(c) for c in cores])

    return use


def test_physical_cores_covers_the_allowed_cpus():
    import os

    cores = layout.physical_cores()
    assert cores and all(cores)
    assert sorted(cpu for core in cores for cpu in core) == sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "cores, expected",
    [
        (FOUR, [[0, 1], [2, 3]]),
        (FOUR_SMT, [[0, 4, 1, 5], [2, 6, 3, 7]]),  # whole cores: siblings stay together
        (ONE_CORE, [[0]]),  # a smaller machine: all of it to one worker
        ([[0, 1]], [[0, 1]]),
        ([[0], [1], [2]], [[0, 1]]),  # 2 cores per worker: the third is left over
    ],
)
def test_core_groups_default(topology, cores, expected):
    topology(cores)
    assert layout.DEFAULT_CORES_PER_WORKER == 2
    assert layout.core_groups(None, None) == expected


@pytest.mark.parametrize(
    "cores, workers, per_worker, expected",
    [
        # --workers alone: the cores shared out evenly, whole cores each.
        (FOUR, 1, None, [[0, 1, 2, 3]]),
        (FOUR, 2, None, [[0, 1], [2, 3]]),
        (FOUR, 3, None, [[0], [1], [2]]),
        (FOUR, 4, None, [[0], [1], [2], [3]]),
        (FOUR_SMT, 4, None, [[0, 4], [1, 5], [2, 6], [3, 7]]),
        (ONE_CORE, 1, None, [[0]]),
        # --cores-per-worker alone: as many workers as fit.
        (FOUR, None, 1, [[0], [1], [2], [3]]),
        (FOUR, None, 3, [[0, 1, 2]]),
        (FOUR, None, 4, [[0, 1, 2, 3]]),
        (FOUR_SMT, None, 1, [[0, 4], [1, 5], [2, 6], [3, 7]]),
        (ONE_CORE, None, 1, [[0]]),
        # Both.
        (FOUR, 2, 1, [[0], [1]]),
        (FOUR, 1, 2, [[0, 1]]),
        (FOUR, 2, 2, [[0, 1], [2, 3]]),
        (FOUR_SMT, 2, 2, [[0, 4, 1, 5], [2, 6, 3, 7]]),
        (FOUR_SMT, 3, 1, [[0, 4], [1, 5], [2, 6]]),
    ],
)
def test_core_groups_with_flags(topology, cores, workers, per_worker, expected):
    topology(cores)
    groups = layout.core_groups(workers, per_worker)
    assert groups == expected
    flat = [cpu for group in groups for cpu in group]
    assert len(flat) == len(set(flat)), "no CPU in two groups"


@pytest.mark.parametrize(
    "cores, workers, per_worker, message",
    [
        (FOUR, 5, None, "--workers 5 x --cores-per-worker 1 needs 5 physical cores; "
                        "this process may use 4"),
        (FOUR, 3, 2, "--workers 3 x --cores-per-worker 2 needs 6 physical cores; "
                     "this process may use 4"),
        (FOUR, None, 5, "--workers 1 x --cores-per-worker 5 needs 5 physical cores; "
                        "this process may use 4"),
        (FOUR_SMT, 5, 1, "--workers 5 x --cores-per-worker 1 needs 5 physical cores; "
                         "this process may use 4"),  # SMT siblings are not cores
        (ONE_CORE, 2, None, "--workers 2 x --cores-per-worker 1 needs 2 physical cores; "
                            "this process may use 1"),
        (ONE_CORE, None, 2, "--workers 1 x --cores-per-worker 2 needs 2 physical cores; "
                            "this process may use 1"),
        (FOUR, 0, None, "--workers is 0; it must be at least 1"),
        (FOUR, -1, None, "--workers is -1; it must be at least 1"),
        (FOUR, 0, 1, "--workers is 0; it must be at least 1"),
        (FOUR, None, 0, "--cores-per-worker is 0; it must be at least 1"),
        (FOUR, 2, -1, "--cores-per-worker is -1; it must be at least 1"),
    ],
)  # fmt: skip
def test_core_groups_errors_name_the_flag(topology, cores, workers, per_worker, message):
    topology(cores)
    with pytest.raises(layout.LayoutError) as info:
        layout.core_groups(workers, per_worker)
    assert str(info.value) == message
