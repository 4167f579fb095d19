"""Worker processes as the supervisor sees them: spawn, watch, recycle, reap, respawn.

A worker is a fresh interpreter (never a fork of the supervisor, which has threads and
sockets). Its death is seen at once through a pidfd in the supervisor's poll set. The
pool owns the workers' life cycle and the watchdogs: it decides, acts, and is the only
writer of a worker's state; requests belong to the ledger (ledger.py), which the pool
asks only how many jobs a worker holds.

Identity: each spawn gets a random ZeroMQ identity and a random secret, written to its
stdin (argv is readable by every user); the supervisor takes a worker's messages only
from an identity it spawned, and job events only after a READY or FAILED carrying that
spawn's secret. Anything else is dropped and counted (`dropped`).
"""

from __future__ import annotations

import collections
import hmac
import logging
import signal
import time
from collections.abc import Callable, Collection

from llmsup.protocol import scoreboard as sb
from llmsup.protocol import workerwire as wire
from llmsup.supervisor.core.dumps import HangDumps
from llmsup.supervisor.core.rollout import RollingReplacement
from llmsup.supervisor.core.watchdog import Limits, Verdict
from llmsup.supervisor.core.watching import Watch
from llmsup.supervisor.core.workerproc import (
    STOP_GRACE_S,
    TERM_GRACE_S,
    Worker,
    WorkerState,
    respawn_delay,
)
from llmsup.supervisor.host import fds

log = logging.getLogger("llmsup.supervisor")


class Pool:
    """The workers of one supervisor, one per core group, each with a scoreboard row."""

    def __init__(
        self,
        *,
        groups,
        spawn_args,
        board: sb.Scoreboard,
        board_name: str,
        limits: Limits,
        send,
        jobs_on: Callable[[Worker], Collection],
        log_fd: int,
        models: dict[str, str],
        assignment: list[str],
        arena=None,
        arena_name=None,
    ):
        self.groups = groups
        self.spawn_args = spawn_args  # argv shared by every worker (endpoint, ...)
        self.models = models  # name -> GGUF path
        self.assignment = assignment  # the placement's: the model each group should run
        self.board = board
        self.board_name = board_name
        self.arena = arena  # the prefix cache: what a dead worker pinned or half wrote is freed
        self.arena_name = arena_name
        self.cache_releases: set[int] = set()  # dead workers' rows still to release
        self.limits = limits
        self.send = send  # send(worker, frames) on the worker socket
        self.jobs_on = jobs_on  # the ledger's: the jobs a worker holds
        self.dropped = 0  # worker-socket messages from no worker we spawned, or malformed
        self.log_fd = log_fd
        self.workers: list[Worker] = []
        self.by_identity: dict[bytes, Worker] = {}
        self.by_pidfd: dict[int, Worker] = {}
        self.dumps = HangDumps(log_fd)  # py-spy dumps of hung workers
        self.respawn_at: dict[int, float] = {}
        self.crashes: dict[int, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self.spawn_counts = collections.Counter()
        self.watch = Watch(board, limits, jobs_on)  # the watchdogs' samples and verdicts
        self.replacing: RollingReplacement | None = None  # in progress (SIGHUP)

    # --- life cycle ---------------------------------------------------------------------------

    def spawn(self, worker_id: int) -> Worker:
        self.spawn_counts[worker_id] += 1
        cores = self.groups[worker_id]
        model = self.assignment[worker_id]
        worker = Worker(worker_id, cores, self.spawn_counts[worker_id], model)
        worker.request_budget = self.limits.request_budget()
        argv = [
            "--worker-id",
            str(worker_id),
            "--cores",
            ",".join(map(str, cores)),
            "--scoreboard",
            self.board_name,
            *(["--cache", self.arena_name] if self.arena is not None else []),
            "--model",
            self.models[model],
            *self.spawn_args,
        ]
        worker.spawn(argv, self.log_fd)
        if worker_id < len(self.workers):
            worker.last_exit = self.workers[worker_id].exit_reason
            self.workers[worker_id] = worker
        else:
            self.workers.append(worker)
        self.by_identity[worker.identity] = worker
        self.by_pidfd[worker.pidfd] = worker
        self.board.write_supervisor(
            worker_id,
            cores=",".join(map(str, cores)).encode(),
            restarts=worker.restarts,
            last_exit=(worker.last_exit or "").encode()[:96],
            model=model.encode()[:64],
            anon_bytes=0,
            cpu_percent=0.0,
        )
        log.info(
            "worker %d spawned: pid %d, cores %s, model %s",
            worker_id,
            worker.pid,
            cores,
            model,
            extra={"worker": worker_id, "pid": worker.pid, "model": model},
        )
        return worker

    def start_all(self) -> None:
        for worker_id in range(len(self.groups)):
            self.spawn(worker_id)

    # --- the worker socket ----------------------------------------------------------------

    def sender(self, identity: bytes) -> Worker | None:
        """The live worker that proved it is the spawn with this identity, or None."""
        worker = self.by_identity.get(identity)
        return worker if worker is not None and worker.state != WorkerState.STARTING else None

    def hello(self, identity: bytes, report: wire.Ready | wire.Failed) -> Worker | None:
        """A READY or FAILED report: taken only from a starting spawn with that spawn's secret."""
        worker = self.by_identity.get(identity)
        if (
            worker is None
            or worker.state != WorkerState.STARTING
            or not hmac.compare_digest(report.secret, worker.secret)
        ):
            self.drop(identity, "READY/FAILED from no starting worker, or a wrong secret")
            return None
        if isinstance(report, wire.Failed):
            worker.state = WorkerState.FAILED
            worker.exit_reason = report.reason
            log.error(
                "worker %d failed to load: %s",
                worker.worker_id,
                report.reason,
                extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model},
            )
            return worker
        worker.state = WorkerState.READY
        worker.slots = report.slots
        worker.n_ctx = report.n_ctx
        worker.step_ms = list(report.step_ms)
        log.info(
            "worker %d ready: pid %d, %d slot(s)",
            worker.worker_id,
            worker.pid,
            worker.slots,
            extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model},
        )
        return worker

    def drop(self, identity: bytes, why: str) -> None:
        """Count a message that is not taken; log the first and then every 1000th."""
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.warning(
                "worker socket: message from %r dropped (%s); %d dropped so far",
                identity[:32],
                why,
                self.dropped,
            )

    def answered(self, worker: Worker) -> None:
        worker.served += 1

    def reap(self, fd: int, stopping: bool) -> Worker:
        """A worker's pidfd fired: collect it and decide whether and when it comes back."""
        worker = self.by_pidfd.pop(fd)
        was = worker.state
        how = worker.reap()
        self.by_identity.pop(worker.identity, None)
        self.dumps.stop(worker)
        if self.arena is not None:
            self.release_cache(worker.worker_id)
        log.log(
            logging.INFO if worker.intended_exit or stopping else logging.WARNING,
            "worker %d (pid %d) %s: %s",
            worker.worker_id,
            worker.pid,
            how,
            worker.exit_reason,
            extra={"worker": worker.worker_id, "pid": worker.pid, "model": worker.model},
        )
        if stopping or (
            was == WorkerState.FAILED and worker.model == self.assignment[worker.worker_id]
        ):
            # Stopping; or it said it cannot load the model, which a respawn would repeat
            # (unless its group was given another model meanwhile: placement.py).
            self.mark_row_ended(worker)
            return worker
        delay = 0.0
        if not worker.intended_exit and was != WorkerState.FAILED:
            delay = self.crash_delay(worker)
        if worker.state != WorkerState.FATAL:
            self.respawn_at[worker.worker_id] = time.monotonic() + delay
            log.info(
                "worker %d respawns in %.1fs",
                worker.worker_id,
                delay,
                extra={"worker": worker.worker_id},
            )
        self.mark_row_ended(worker)
        return worker

    def crash_delay(self, worker: Worker) -> float:
        """Backoff for a crash; FATAL after too many crashes in the window."""
        crashes = self.crashes[worker.worker_id]
        delay = respawn_delay(crashes, time.monotonic(), self.limits)
        if delay is None:
            worker.state = WorkerState.FATAL
            worker.exit_reason = (
                f"crash loop: {len(crashes)} crashes in {self.limits.crash_loop_window_s:g}s, "
                f"last: {worker.exit_reason}"
            )
            log.error(
                "worker %d is FATAL: %s",
                worker.worker_id,
                worker.exit_reason,
                extra={"worker": worker.worker_id, "model": worker.model},
            )
            return 0.0
        return delay

    def mark_row_ended(self, worker: Worker) -> None:
        state = sb.FATAL if worker.state in (WorkerState.FATAL, WorkerState.FAILED) else sb.DEAD
        self.board.write_worker(worker.worker_id, state=state, request_id=b"", tokens=0)
        self.board.write_supervisor(
            worker.worker_id, last_exit=(worker.exit_reason or "").encode()[:96]
        )

    def recycle(self, worker: Worker, reason: str) -> None:
        """Graceful: the worker finishes its jobs, takes no new ones, exits; then a new one."""
        if worker.state != WorkerState.READY:
            return
        log.warning(
            "recycling worker %d (pid %d): %s",
            worker.worker_id,
            worker.pid,
            reason,
            extra={"worker": worker.worker_id, "pid": worker.pid},
        )
        worker.intended_exit = True
        worker.exit_reason = f"recycled: {reason}"
        self.drain(worker)

    def move(self, group: int, why: str) -> None:
        """Its assignment changed (placement.py): the worker there drains and exits, and
        the reaper spawns the new model at once; one still loading is killed."""
        worker = self.workers[group]
        if not worker.alive:
            return  # a respawn is due: it takes the new assignment
        log.info(
            "worker %d: %s -> %s (%s)",
            group,
            worker.model,
            self.assignment[group],
            why,
            extra={"worker": group, "model": self.assignment[group]},
        )
        worker.intended_exit = True
        worker.exit_reason = f"moved: {why}"
        if worker.state == WorkerState.READY:
            self.drain(worker)
        else:
            worker.kill()

    def drain(self, worker: Worker) -> None:
        """Finish its jobs, take no new ones, exit (tend() escalates once it is idle)."""
        worker.state = WorkerState.DRAINING
        self.send(worker, wire.drain_order())

    def kill(self, worker: Worker, reason: str) -> None:
        log.error(
            "killing worker %d (pid %d): %s",
            worker.worker_id,
            worker.pid,
            reason,
            extra={"worker": worker.worker_id, "pid": worker.pid},
        )
        worker.intended_exit = True
        worker.exit_reason = f"killed: {reason}"
        worker.state = WorkerState.DRAINING
        worker.kill()

    def hung(self, worker: Worker, reason: str) -> None:
        """Capture where it is stuck (bounded in time: dumps.py), then SIGKILL."""
        self.dumps.start(worker, reason)

    def dump_finished(self, fd: int) -> Worker:
        worker = self.dumps.finished(fd)
        worker.kill()
        return worker

    # --- rolling replacement (SIGHUP) -------------------------------------------------------

    def replace_all(self, why: str) -> None:
        """Replace every worker, one core group at a time (rollout.py)."""
        if self.replacing is not None:
            self.replacing.again(why)
        else:
            self.replacing = RollingReplacement(self, why)
            self.forget_finished_replacement()

    def forget_finished_replacement(self) -> None:
        if self.replacing is not None and not self.replacing.running:
            self.replacing = None

    def replacement_status(self) -> dict | None:
        return self.replacing.status() if self.replacing is not None else None

    # --- timers -------------------------------------------------------------------------------

    def next_deadline(self, watching: bool) -> float | None:
        """When the next timer is due; the watchdogs' only while `watching` (the
        supervisor runs them once started: before that, their deadline stays in the past
        and the loop would spin through every worker's start-up)."""
        times = list(self.respawn_at.values())
        times += [w.kill_at for w in self.workers if w.kill_at is not None and w.alive]
        if watching and any(w.alive for w in self.workers):
            times.append(self.watch.next_at)
        return min(times) if times else None

    def release_cache(self, worker_id: int) -> None:
        """Free what a dead worker pinned or half wrote in the prefix cache; if a worker
        holds the cache's lock just now, again at the next timer."""
        if self.arena.release_worker(worker_id) is None:
            self.cache_releases.add(worker_id)
        else:
            self.cache_releases.discard(worker_id)

    def tend(self, now: float, *, stopping: bool, watching: bool, queue_empty: bool) -> None:
        """Everything the pool does on its own, once per loop: stop what is idle while
        stopping, the timers (respawn, stop escalation, cache releases), the watchdogs."""
        for w in self.workers:
            if not w.alive:
                continue
            if stopping and w.state in (WorkerState.STARTING, WorkerState.FAILED):
                w.kill()  # still loading (or failed to): nothing to drain
            elif stopping and w.state == WorkerState.READY and queue_empty and not self.jobs_on(w):
                self.drain(w)
            if w.state == WorkerState.DRAINING and w.kill_at is None and not self.jobs_on(w):
                w.kill_at = now + STOP_GRACE_S  # then SIGTERM, then SIGKILL
        self.respawn_and_escalate(now, stopping)
        if self.replacing is not None:
            self.replacing.check_progress(stopping)
            self.forget_finished_replacement()
        if watching and now >= self.watch.next_at:
            for worker, verdict, reason in self.watch.judge(now, self.workers):
                self.act(worker, verdict, reason)

    def respawn_and_escalate(self, now: float, stopping: bool) -> None:
        """What is due: prefix-cache releases to retry, respawns, and a stop's SIGTERM or
        SIGKILL for a worker that did not exit."""
        for worker_id in list(self.cache_releases):
            self.release_cache(worker_id)
        for worker_id, at in list(self.respawn_at.items()):
            if stopping:
                del self.respawn_at[worker_id]
            elif now >= at:
                del self.respawn_at[worker_id]
                try:
                    self.spawn(worker_id)
                except OSError as exc:
                    if not fds.exhausted(exc):
                        raise
                    self.respawn_at[worker_id] = now + 1.0  # out of fds: again in a second
                    log.warning(
                        "worker %d not respawned: %s; retrying in 1s",
                        worker_id,
                        exc,
                        extra={"worker": worker_id},
                    )
        for w in self.workers:
            if w.kill_at is not None and now >= w.kill_at and w.alive:
                if not w.term_sent:
                    log.warning(
                        "worker %d did not exit after STOP; SIGTERM",
                        w.worker_id,
                        extra={"worker": w.worker_id, "pid": w.pid},
                    )
                    w.signal(signal.SIGTERM)
                    w.term_sent = True
                    w.kill_at = now + TERM_GRACE_S
                else:
                    log.warning(
                        "worker %d still alive; SIGKILL",
                        w.worker_id,
                        extra={"worker": w.worker_id, "pid": w.pid},
                    )
                    self.dumps.stop(w)
                    w.kill()
                    w.kill_at = None

    def act(self, worker: Worker, verdict: Verdict, reason: str) -> None:
        if verdict == Verdict.RECYCLE:
            self.recycle(worker, reason)
        elif verdict == Verdict.KILL:
            self.kill(worker, reason)
        elif verdict == Verdict.HUNG:
            self.hung(worker, reason)

    # --- shut-down ----------------------------------------------------------------------------

    def kill_all(self) -> None:
        for w in self.workers:
            self.dumps.stop(w)
            w.kill()

    def reap_all(self) -> None:
        for w in self.workers:
            w.kill()
            if w.alive:
                w.reap()
