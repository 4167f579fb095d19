"""Worker processes as the supervisor sees them: spawn, state, credits, jobs, death.

A worker is a fresh interpreter (never a fork of the supervisor, which has threads and
sockets). Its death is seen at once through a pidfd in the supervisor's poll set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

STARTING = "starting"
READY = "ready"
DRAINING = "draining"
DEAD = "dead"
FAILED = "failed"


@dataclass
class Job:
    """One request in flight: who asked, under what id, and where it runs."""

    job_id: bytes
    client: bytes
    request_id: bytes
    verb: bytes
    body: dict
    accepted_at: float = field(default_factory=time.monotonic)
    worker: Worker | None = None
    tokens_sent: int = 0


class Worker:
    def __init__(self, worker_id: int, cores: list[int], spawn_count: int):
        self.worker_id = worker_id
        self.cores = cores
        self.identity = f"w{worker_id}.{spawn_count}".encode()
        self.state = STARTING
        self.credits = 0  # free slots the worker has granted us
        self.slots = 0
        self.n_ctx = 0
        self.jobs: dict[bytes, Job] = {}
        self.served = 0
        self.started_at = time.monotonic()
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.exit_reason: str | None = None
        self.last_exit: str | None = None  # why the previous process in this slot ended
        self.restarts = spawn_count - 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def spawn(self, *, endpoint: str, model: str, ctx_size: int, log_fd: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "llmsup.worker",
            "--worker-id",
            str(self.worker_id),
            "--cores",
            ",".join(map(str, self.cores)),
            "--identity",
            self.identity.decode(),
            "--endpoint",
            endpoint,
            "--model",
            model,
            "--ctx-size",
            str(ctx_size),
            "--supervisor-pid",
            str(os.getpid()),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, close_fds=True
        )
        self.pidfd = os.pidfd_open(self.proc.pid)

    def mark_ready(self, info: dict) -> None:
        self.state = READY
        self.slots = self.credits = int(info["slots"])
        self.n_ctx = int(info["n_ctx"])

    def reap(self) -> str:
        """Collect the exit status of a worker whose pidfd fired; returns why it ended."""
        code = self.proc.wait()
        os.close(self.pidfd)
        self.pidfd = None
        if code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
        else:
            reason = f"exited with status {code}"
        self.exit_reason = self.exit_reason or reason
        self.state = DEAD if self.state != FAILED else FAILED
        return reason

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def status(self) -> dict:
        return {
            "id": self.worker_id,
            "pid": self.pid,
            "cores": self.cores,
            "state": self.state,
            "slots": self.slots,
            "free_slots": self.credits,
            "n_ctx": self.n_ctx,
            "served": self.served,
            "running": [j.request_id.decode(errors="replace") for j in self.jobs.values()],
            "restarts": self.restarts,
            "last_exit": self.exit_reason or self.last_exit,
        }
