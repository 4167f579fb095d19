"""The rolling replacement of every worker (SIGHUP): one core group at a time, the next
only once the new worker serves, so that the others serve meanwhile.

Drain first, then start: a worker owns its group's cores, and two of them there would run
two llama.cpp thread pools on the same cores. With one group, requests wait in the queue
until the new worker serves.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING

from llmsup.supervisor.core.workerproc import Worker, WorkerState

if TYPE_CHECKING:
    from llmsup.supervisor.core.pool import Pool

log = logging.getLogger("llmsup.supervisor")


class Step(enum.Enum):
    """Where the replacement of the current group stands."""

    WAITING = "waiting"  # for the old worker to exit and its successor to serve
    FINISHED = "finished"  # every group done or skipped
    ABANDONED = "abandoned"  # llmsup is stopping, or a new worker could not load


class RollingReplacement:
    def __init__(self, pool: Pool, why: str):
        self.pool = pool
        self.why = why
        self.todo: list[int] = list(range(len(pool.workers)))
        self.done: list[int] = []
        self.skipped: list[int] = []
        self.group: int | None = None  # the group being replaced
        self.old: Worker | None = None  # its worker when its turn came
        self.started_at = time.time()
        self.step = Step.WAITING
        log.info("replacing %d worker(s) one core group at a time (%s)", len(self.todo), why)
        self.next_group()

    @property
    def running(self) -> bool:
        return self.step is Step.WAITING

    def again(self, why: str) -> None:
        """Asked again while one runs: every other group once more after this one."""
        self.todo = [g for g in range(len(self.pool.workers)) if g != self.group]
        log.info(
            "replacing the workers again (%s): after worker %s, workers %s",
            why,
            self.group,
            self.todo,
        )

    def next_group(self) -> None:
        """Start on the next group that can be replaced; finish when none is left."""
        pool = self.pool
        while self.todo:
            group = self.todo.pop(0)
            worker = pool.workers[group]
            self.group, self.old = group, worker
            if worker.state in (WorkerState.FAILED, WorkerState.FATAL) and not worker.alive:
                # It could not load or crash-looped: try again, the file may be fixed now.
                pool.crashes[group].clear()
                pool.respawn_at[group] = time.monotonic()
                log.info(
                    "worker %d was %s: starting it again",
                    group,
                    worker.state,
                    extra={"worker": group},
                )
            elif worker.state in (WorkerState.FAILED, WorkerState.FATAL):
                log.warning(
                    "worker %d is %s and still exiting: not replaced",
                    group,
                    worker.state,
                    extra={"worker": group},
                )
                self.skipped.append(group)
                continue
            elif worker.state is WorkerState.READY:
                log.info(
                    "replacing worker %d (pid %d): draining it",
                    group,
                    worker.pid,
                    extra={"worker": group, "pid": worker.pid},
                )
                worker.intended_exit = True
                worker.exit_reason = f"replaced: {self.why}"
                pool.drain(worker)
            elif worker.alive and worker.state is WorkerState.STARTING:
                log.info(
                    "replacing worker %d (pid %d): still loading, killed",
                    group,
                    worker.pid,
                    extra={"worker": group, "pid": worker.pid},
                )
                worker.intended_exit = True
                worker.exit_reason = f"replaced: {self.why}"
                worker.kill()
            else:  # draining (recycled, moved) or dead with a respawn due: that one replaces it
                log.info(
                    "replacing worker %d: already %s, waiting for its successor",
                    group,
                    worker.state,
                    extra={"worker": group},
                )
            return
        took = time.time() - self.started_at
        log.info(
            "replaced workers %s in %.1f s (%s)%s",
            self.done,
            took,
            self.why,
            f"; not replaced: {self.skipped}" if self.skipped else "",
        )
        self.step = Step.FINISHED

    def check_progress(self, stopping: bool) -> None:
        """Once per loop: is the current group's new worker serving?"""
        if stopping:
            log.info("replacing the workers stopped: llmsup is stopping")
            self.step = Step.ABANDONED
            return
        group = self.group
        worker = self.pool.workers[group]
        if worker is self.old:
            if worker.alive or group in self.pool.respawn_at:
                return  # still draining, or its successor is due
            log.warning(
                "worker %d was not replaced: it is %s", group, worker.state, extra={"worker": group}
            )
            self.skipped.append(group)
            self.next_group()
        elif worker.state is WorkerState.READY:
            log.info(
                "worker %d replaced: pid %s -> %d",
                group,
                self.old.pid,
                worker.pid,
                extra={"worker": group, "pid": worker.pid},
            )
            self.done.append(group)
            self.next_group()
        elif worker.state in (WorkerState.FAILED, WorkerState.FATAL):
            log.error(
                "replacing the workers stopped: the new worker %d is %s (%s); workers %s "
                "keep their old process",
                group,
                worker.state,
                worker.exit_reason,
                self.todo or "none",
                extra={"worker": group, "model": worker.model},
            )
            self.step = Step.ABANDONED

    def status(self) -> dict:
        """For `status`: what the old dict's keys said."""
        return {
            "why": self.why,
            "group": self.group,
            "todo": self.todo,
            "done": self.done,
            "skipped": self.skipped,
            "started_at": self.started_at,
        }
