"""One worker process as the supervisor sees it: its states, its spawn (a fresh
interpreter, its identity and secret on stdin), its pidfd, its exit, its status; and the
crash backoff. The pool (pool.py) decides what happens to it."""

from __future__ import annotations

import collections
import enum
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Collection

import orjson
import psutil

from llmsup.protocol import workerwire as wire
from llmsup.supervisor.core.watchdog import Limits
from llmsup.supervisor.host import fds


class WorkerState(enum.StrEnum):
    """A worker's state, as `status` shows it."""

    STARTING = "starting"
    READY = "ready"  # loaded, taking jobs (its activity: top); SPEC 3.7 names it "ready"
    DRAINING = "draining"  # finishing its jobs, takes no new ones, then exits
    DEAD = "dead"
    FAILED = "failed"  # reported it cannot load the model: never respawned
    FATAL = "fatal"  # crash loop: given up on


RESPAWN_BACKOFF_S = (0.5, 30.0)  # first delay, cap; doubles on each crash in the window
STOP_GRACE_S = 5.0  # after STOP with no jobs left: then SIGTERM
TERM_GRACE_S = 2.0  # after SIGTERM: then SIGKILL
DUMP_TIMEOUT_S = 5.0  # py-spy dump of a hung worker, then SIGKILL regardless


def respawn_delay(crashes: collections.deque[float], now: float, limits: Limits) -> float | None:
    """Count a crash at `now` in a child's recent `crashes`: the delay before it is started
    again (doubling from the first), or None when that makes a crash loop (FATAL)."""
    crashes.append(now)
    while crashes and now - crashes[0] > limits.crash_loop_window_s:
        crashes.popleft()
    if len(crashes) >= limits.crash_loop_failures:
        return None
    first, cap = RESPAWN_BACKOFF_S
    return min(cap, first * 2 ** (len(crashes) - 1))


class Worker:
    def __init__(self, worker_id: int, cores: list[int], spawn_count: int, model: str):
        self.worker_id = worker_id
        self.cores = cores
        self.model = model  # the name of the model it serves
        # Readable in logs, unguessable: see the module docstring.
        self.identity = f"w{worker_id}.{secrets.token_hex(8)}".encode()
        self.secret = secrets.token_bytes(wire.SECRET_BYTES)
        self.state = WorkerState.STARTING
        self.slots = 0  # sequences it decodes at once (its READY said); 0 until then
        self.n_ctx = 0
        self.step_ms: list[float] = []
        self.served = 0
        self.started_at = time.monotonic()
        self.proc: subprocess.Popen | None = None
        self.process: psutil.Process | None = None
        self.pidfd: int | None = None
        self.exit_reason: str | None = None  # why this process ended (or is being ended)
        self.last_exit: str | None = None  # why the previous process in this slot ended
        self.restarts = spawn_count - 1
        self.intended_exit = False  # recycled or killed by a watchdog: not a crash
        self.kill_at: float | None = None  # escalation deadline while stopping it
        self.term_sent = False
        self.dumper: subprocess.Popen | None = None
        self.request_budget: int | None = None
        self.cpu_seconds = 0.0
        self.spin_since: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.pidfd is not None

    def spawn(self, argv: list[str], log_fd: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmsup.worker", *argv],
            stdin=subprocess.PIPE,
            stdout=log_fd,
            stderr=log_fd,
            close_fds=True,
        )
        hello = {"identity": self.identity.decode(), "secret": self.secret.hex()}
        try:
            self.proc.stdin.write(orjson.dumps(hello) + b"\n")  # one line: far below a pipe
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # died at once: its pidfd reports it
        try:  # out of fds: a reserved one; none left: it cannot be watched, so not kept
            self.pidfd = fds.reserve.call(os.pidfd_open, self.proc.pid)
        except OSError:
            self.proc.kill()
            self.proc.wait()
            raise
        try:
            self.process = psutil.Process(self.proc.pid)
        except (psutil.NoSuchProcess, OSError):
            pass  # already gone (the pidfd reports it), or no fd free: sampled later

    def reap(self) -> str:
        """Collect the exit status of a worker whose pidfd fired; returns why it ended."""
        code = self.proc.wait()
        os.close(self.pidfd)
        self.pidfd = None
        how = (
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        )
        self.exit_reason = self.exit_reason or how
        if self.state not in (WorkerState.FAILED, WorkerState.FATAL):
            self.state = WorkerState.DEAD
        return how

    def signal(self, sig: signal.Signals) -> None:
        if self.alive and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def status(self, jobs: Collection) -> dict:
        return {
            "id": self.worker_id,
            "model": self.model,
            "pid": self.pid,
            "cores": self.cores,
            "state": self.state,
            "slots": self.slots,
            "free_slots": max(0, self.slots - sum(j.seqs for j in jobs)),
            "n_ctx": self.n_ctx,
            "step_ms": self.step_ms,
            "served": self.served,
            "running": [j.request_id.decode(errors="replace") for j in jobs],
            "restarts": self.restarts,
            "last_exit": self.exit_reason or self.last_exit,
        }
