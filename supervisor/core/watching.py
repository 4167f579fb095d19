"""The watchdogs' side of the pool: once a second, sample every live worker's memory and
CPU (/proc and psutil) and ask watchdog.verdict() about it; the pool acts on the verdicts.
watchdog.py decides from numbers alone; this module gets the numbers."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import psutil

from llmsup.protocol import scoreboard as sb
from llmsup.supervisor.core import watchdog
from llmsup.supervisor.core.watchdog import Limits, Sample, Verdict
from llmsup.supervisor.core.workerproc import Worker, WorkerState
from llmsup.supervisor.host import fds


def anon_rss_bytes(pid: int) -> int:
    """Anonymous resident memory: RSS without the file-backed (mmap'd) model weights."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Watch:
    def __init__(
        self, board: sb.Scoreboard, limits: Limits, jobs_on: Callable[[Worker], Collection]
    ):
        self.board = board
        self.limits = limits
        self.jobs_on = jobs_on  # the ledger's: the jobs a worker holds
        self.next_at = 0.0

    def judge(self, now: float, workers: list[Worker]) -> list[tuple[Worker, Verdict, str]]:
        """Sample every live worker; what the watchdogs say should happen to which."""
        elapsed = now - (self.next_at - watchdog.WATCHDOG_INTERVAL_S)
        self.next_at = now + watchdog.WATCHDOG_INTERVAL_S
        actions = []
        for w in workers:
            if not w.alive:
                continue
            try:
                w.process = w.process or psutil.Process(w.pid)
                cpu = w.process.cpu_times()
                anon = anon_rss_bytes(w.pid)
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue  # exiting: its pidfd will tell
            except (OSError, psutil.Error) as exc:  # out of fds (EMFILE/ENFILE): next sample
                if not fds.exhausted(exc) and not fds.exhausted(exc.__cause__ or exc):
                    raise
                continue
            seconds = cpu.user + cpu.system
            percent = 100.0 * (seconds - w.cpu_seconds) / max(elapsed, 1e-3)
            w.cpu_seconds = seconds
            self.board.write_supervisor(w.worker_id, anon_bytes=anon, cpu_percent=percent)
            sample = Sample(anon_bytes=anon, cpu_percent=percent)
            if w.state == WorkerState.DRAINING and w.dumper is None and w.kill_at is None:
                # Recycling (finishing its jobs): a soft limit put it here; the hard one
                # still applies while it finishes.
                if over_hard := watchdog.over_hard_limit(self.limits, sample):
                    actions.append((w, Verdict.KILL, over_hard))
                continue
            if w.state != WorkerState.READY:
                continue
            jobs = self.jobs_on(w)
            spinning = not jobs and percent >= self.limits.spin_cpu_percent
            if not spinning:
                w.spin_since = None
            elif w.spin_since is None:
                w.spin_since = now
            row = self.board.read_row(w.worker_id)
            oldest = min((j.dispatched_at for j in jobs), default=now)
            verdict, reason = watchdog.verdict(
                self.limits,
                sample,
                busy=bool(jobs),
                stalled_for=now - max(row["progress_at"], oldest),
                idle_spin_for=now - w.spin_since if w.spin_since is not None else 0.0,
                served=w.served,
                request_budget=w.request_budget,
            )
            if verdict != Verdict.OK:
                actions.append((w, verdict, reason))
        return actions
