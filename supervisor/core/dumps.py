"""py-spy dumps of hung workers: where a worker is stuck goes to the log before it is
killed, and the dump itself is bounded in time (DUMP_TIMEOUT_S, then SIGKILL regardless).
A dump's process is watched through its pidfd in the supervisor's poll set (`by_pidfd`)."""

from __future__ import annotations

import logging
import os
import subprocess
import time

from llmsup.supervisor.core import watchdog
from llmsup.supervisor.core.workerproc import DUMP_TIMEOUT_S, Worker, WorkerState
from llmsup.supervisor.host import fds

log = logging.getLogger("llmsup.supervisor")


class HangDumps:
    def __init__(self, log_fd: int):
        self.log_fd = log_fd  # the dumps' output: the supervisor's log
        self.by_pidfd: dict[int, Worker] = {}  # pidfd of a py-spy dump -> its worker

    def start(self, worker: Worker, reason: str) -> None:
        """Mark it hung and start its dump; kill it at once if the dump cannot start or be
        watched (the kill matters more than the dump)."""
        if worker.dumper is not None:
            return
        log.error(
            "worker %d (pid %d) is hung: %s; py-spy dump follows",
            worker.worker_id,
            worker.pid,
            reason,
            extra={"worker": worker.worker_id, "pid": worker.pid},
        )
        worker.intended_exit = True
        worker.exit_reason = f"hung: {reason}"
        worker.state = WorkerState.DRAINING
        try:
            worker.dumper = subprocess.Popen(
                [watchdog.py_spy(), "dump", "--pid", str(worker.pid)],
                stdin=subprocess.DEVNULL,
                stdout=self.log_fd,
                stderr=self.log_fd,
            )
        except OSError as exc:  # EMFILE too
            log.error("py-spy dump failed: %s", exc, extra={"worker": worker.worker_id})
            worker.kill()
            return
        try:
            fd = fds.reserve.call(os.pidfd_open, worker.dumper.pid)
        except OSError as exc:
            log.error(
                "py-spy dump not watched (%s): killing worker %d now",
                exc,
                worker.worker_id,
                extra={"worker": worker.worker_id},
            )
            worker.dumper.kill()
            worker.dumper.wait()
            worker.dumper = None
            worker.kill()
            return
        self.by_pidfd[fd] = worker
        worker.kill_at = time.monotonic() + DUMP_TIMEOUT_S
        worker.term_sent = True  # after the dump: straight to SIGKILL

    def finished(self, fd: int) -> Worker:
        """A dump's pidfd fired: the worker it was of (the pool kills it now)."""
        worker = self.by_pidfd[fd]
        self.stop(worker)
        return worker

    def stop(self, worker: Worker) -> None:
        """End the worker's dump, if it has one, and stop watching it."""
        for fd, w in list(self.by_pidfd.items()):
            if w is worker:
                del self.by_pidfd[fd]
                os.close(fd)
        if worker.dumper is not None:
            if worker.dumper.poll() is None:
                worker.dumper.kill()
            worker.dumper.wait()
            worker.dumper = None
