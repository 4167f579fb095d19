"""Watchdog limits and verdicts: what to do about one worker, given what was measured.

The supervisor's loop samples every live worker once per WATCHDOG_INTERVAL_S and asks
`verdict()`; this module only decides, the loop acts. Kept free of sockets and processes
so every rule can be read (and tested) on its own.
"""

from __future__ import annotations

import enum
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llmsup.supervisor.settings import default

WATCHDOG_INTERVAL_S = 1.0


class Verdict(enum.StrEnum):
    """What to do about a worker, mildest first."""

    OK = "ok"
    RECYCLE = "recycle"  # finish what it has, take nothing new, exit, replace
    KILL = "kill"  # SIGKILL now, replace
    HUNG = "hung"  # capture a py-spy dump, then KILL


@dataclass(frozen=True)
class Limits:
    """The watchdog's thresholds; defaults are the settings' (supervisor/settings.py)."""

    mem_soft_mb: int = default("mem-soft-mb")
    mem_hard_mb: int = default("mem-hard-mb")
    stall_timeout_s: float = default("stall-timeout")
    spin_cpu_percent: float = default("spin-cpu")
    spin_seconds: float = default("spin-seconds")
    max_requests: int = default("max-requests")  # 0: never recycle for age
    max_requests_jitter: float = 0.1
    crash_loop_failures: int = default("crash-loop")[0]
    crash_loop_window_s: float = default("crash-loop")[1]

    def request_budget(self) -> int | None:
        """This worker's age limit, jittered so that workers do not all recycle at once."""
        if self.max_requests <= 0:
            return None
        spread = int(self.max_requests * self.max_requests_jitter)
        return self.max_requests + random.randint(0, spread)


@dataclass
class Sample:
    anon_bytes: int
    cpu_percent: float


def py_spy() -> str:
    """py-spy from this interpreter's environment, which need not be on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def over_hard_limit(limits: Limits, sample: Sample) -> str | None:
    """The one limit that also holds for a worker already recycling: it may go on leaking."""
    mb = sample.anon_bytes / (1 << 20)
    if mb > limits.mem_hard_mb:
        return f"anonymous memory {mb:.0f} MiB over the hard limit {limits.mem_hard_mb} MiB"
    return None


def verdict(
    limits: Limits,
    sample: Sample,
    *,
    busy: bool,
    stalled_for: float,
    idle_spin_for: float,
    served: int,
    request_budget: int | None,
) -> tuple[Verdict, str]:
    """(verdict, reason) for one worker."""
    mb = sample.anon_bytes / (1 << 20)
    if over_hard := over_hard_limit(limits, sample):
        return Verdict.KILL, over_hard
    if busy and stalled_for > limits.stall_timeout_s:
        return (
            Verdict.HUNG,
            f"no token progress for {stalled_for:.1f}s (stall timeout {limits.stall_timeout_s:g}s)",
        )
    if mb > limits.mem_soft_mb:
        return (
            Verdict.RECYCLE,
            f"anonymous memory {mb:.0f} MiB over the soft limit {limits.mem_soft_mb} MiB",
        )
    if idle_spin_for >= limits.spin_seconds:
        return Verdict.RECYCLE, (
            f"idle but using {sample.cpu_percent:.0f}% CPU for {idle_spin_for:.0f}s "
            f"(spin limit {limits.spin_cpu_percent:g}% for {limits.spin_seconds:g}s)"
        )
    if request_budget is not None and served >= request_budget:
        return Verdict.RECYCLE, f"served {served} requests (max-requests {limits.max_requests})"
    return Verdict.OK, ""
