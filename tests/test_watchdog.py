"""The watchdog's rules (supervisor/core/watchdog.py) on made-up samples: no processes."""

from __future__ import annotations

from llmsup.supervisor.core.watchdog import Limits, Sample, Verdict, over_hard_limit
from llmsup.supervisor.core.watchdog import verdict as watchdog_verdict

MiB = 1 << 20

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
    assert judge() == (Verdict.OK, "")
    assert judge(busy=True, stalled_for=1.0, cpu=100.0, served=3, request_budget=10) == (
        Verdict.OK,
        "",
    )
    assert judge(anon=0) == (Verdict.OK, "")


def test_verdict_kill_over_the_hard_memory_limit():
    assert judge(anon=300 * MiB) == (
        Verdict.KILL,
        "anonymous memory 300 MiB over the hard limit 200 MiB",
    )
    assert judge(anon=200 * MiB + 1)[0] == Verdict.KILL, "one byte over"
    assert judge(anon=200 * MiB)[0] == Verdict.RECYCLE, (
        "exactly at the hard limit: only over the soft"
    )


def test_verdict_recycle_over_the_soft_memory_limit():
    assert judge(anon=150 * MiB) == (
        Verdict.RECYCLE,
        "anonymous memory 150 MiB over the soft limit 100 MiB",
    )
    assert judge(anon=100 * MiB + 1)[0] == Verdict.RECYCLE, "one byte over"
    assert judge(anon=100 * MiB) == (Verdict.OK, ""), "exactly at the soft limit is allowed"
    assert judge(anon=150 * MiB, busy=True, stalled_for=1.0)[0] == Verdict.RECYCLE


def test_verdict_hung_when_busy_without_progress():
    assert judge(busy=True, stalled_for=7.0) == (
        Verdict.HUNG,
        "no token progress for 7.0s (stall timeout 5s)",
    )
    assert judge(busy=True, stalled_for=5.0) == (Verdict.OK, ""), (
        "exactly at the timeout is allowed"
    )
    assert judge(busy=True, stalled_for=5.01)[0] == Verdict.HUNG
    assert judge(busy=False, stalled_for=1000.0) == (Verdict.OK, ""), (
        "an idle worker makes no progress"
    )


def test_verdict_recycle_for_idle_spin():
    assert judge(cpu=80.0, idle_spin_for=3.0) == (
        Verdict.RECYCLE,
        "idle but using 80% CPU for 3s (spin limit 50% for 3s)",
    ), "exactly at the spin time"
    assert judge(cpu=80.0, idle_spin_for=2.99) == (Verdict.OK, "")
    assert judge(cpu=99.0, idle_spin_for=60.0)[0] == Verdict.RECYCLE


def test_verdict_recycle_for_the_request_budget():
    assert judge(served=10, request_budget=10) == (
        Verdict.RECYCLE,
        "served 10 requests (max-requests 10)",
    ), "exactly at its budget"
    assert judge(served=9, request_budget=10) == (Verdict.OK, "")
    assert judge(served=11, request_budget=11)[0] == Verdict.RECYCLE, "a jittered budget"
    assert judge(served=10, request_budget=11) == (Verdict.OK, "")
    assert judge(served=10**6, request_budget=None) == (Verdict.OK, ""), "no budget: never for age"


def test_verdict_order_worst_first():
    worst = {
        "anon": 300 * MiB,
        "busy": True,
        "stalled_for": 60.0,
        "cpu": 90.0,
        "idle_spin_for": 60.0,
        "served": 50,
        "request_budget": 10,
    }
    assert judge(**worst)[0] == Verdict.KILL, "hard memory before everything"
    worst["anon"] = 150 * MiB
    assert judge(**worst)[0] == Verdict.HUNG, "a hang before a soft recycle (it would never finish)"
    worst["busy"] = False
    assert judge(**worst)[1].startswith("anonymous memory 150 MiB over the soft limit")
    worst["anon"] = 0
    assert judge(**worst)[1].startswith("idle but using 90% CPU")
    worst["idle_spin_for"] = 0.0
    assert judge(**worst) == (Verdict.RECYCLE, "served 50 requests (max-requests 10)")


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
    budgets = {
        Limits(max_requests=100, max_requests_jitter=0.1).request_budget() for _ in range(500)
    }
    # Up only, by at most a tenth: 100 to 110, both ends included (each misses 500 draws
    # with probability (10/11)**500, about 2e-21).
    assert budgets == set(range(100, 111))
    assert {Limits(max_requests=7).request_budget() for _ in range(50)} == {7}, (
        "a tenth of 7 rounds down to no jitter"
    )
    exact = Limits(max_requests=100, max_requests_jitter=0.0)
    assert {exact.request_budget() for _ in range(50)} == {100}
