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
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection

import psutil

from llmsup.protocol import scoreboard as sb
from llmsup.protocol import workerwire as wire
from llmsup.supervisor.core import watchdog
from llmsup.supervisor.core.watchdog import Limits, Sample
from llmsup.supervisor.core.workerproc import (
    DRAINING,
    DUMP_TIMEOUT_S,
    FAILED,
    FATAL,
    READY,
    STARTING,
    STOP_GRACE_S,
    TERM_GRACE_S,
    Worker,
    respawn_delay,
)
from llmsup.supervisor.host import fds

log = logging.getLogger("llmsup.supervisor")


class Pool:
    """The workers of one supervisor, one per core group, each with a scoreboard row."""

    def __init__(self, *, groups, spawn_args, board: sb.Scoreboard, board_name: str,
                 limits: Limits, send, jobs_on: Callable[[Worker], Collection], log_fd: int,
                 models: dict[str, str], assignment: list[str],
                 arena=None, arena_name=None):  # fmt: skip
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
        self.dumpers: dict[int, Worker] = {}  # pidfd of a py-spy dump -> its worker
        self.respawn_at: dict[int, float] = {}
        self.crashes: dict[int, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self.spawn_counts = collections.Counter()
        self.next_watch = 0.0
        self.replacing: dict | None = None  # a rolling replacement in progress (SIGHUP)

    # --- life cycle ---------------------------------------------------------------------------

    def spawn(self, worker_id: int) -> Worker:
        self.spawn_counts[worker_id] += 1
        cores = self.groups[worker_id]
        model = self.assignment[worker_id]
        worker = Worker(worker_id, cores, self.spawn_counts[worker_id], model)
        worker.request_budget = self.limits.request_budget()
        argv = [
            "--worker-id", str(worker_id),
            "--cores", ",".join(map(str, cores)),
            "--scoreboard", self.board_name,
            *(["--cache", self.arena_name] if self.arena is not None else []),
            "--model", self.models[model],
            *self.spawn_args,
        ]  # fmt: skip
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
        log.info("worker %d spawned: pid %d, cores %s, model %s", worker_id, worker.pid, cores,
                 model)  # fmt: skip
        return worker

    def start_all(self) -> None:
        for worker_id in range(len(self.groups)):
            self.spawn(worker_id)

    # --- the worker socket ----------------------------------------------------------------

    def sender(self, identity: bytes) -> Worker | None:
        """The live worker that proved it is the spawn with this identity, or None."""
        worker = self.by_identity.get(identity)
        return worker if worker is not None and worker.state != STARTING else None

    def hello(self, identity: bytes, report: wire.Ready | wire.Failed) -> Worker | None:
        """A READY or FAILED: taken only from a starting spawn with that spawn's secret."""
        worker = self.by_identity.get(identity)
        if (worker is None or worker.state != STARTING
                or not hmac.compare_digest(report.secret, worker.secret)):  # fmt: skip
            self.drop(identity, "READY/FAILED from no starting worker, or a wrong secret")
            return None
        if isinstance(report, wire.Failed):
            worker.state = FAILED
            worker.exit_reason = report.reason
            log.error("worker %d failed to load: %s", worker.worker_id, report.reason)
            return worker
        worker.state = READY
        worker.slots = report.slots
        worker.n_ctx = report.n_ctx
        worker.step_ms = list(report.step_ms)
        log.info("worker %d ready: pid %d, %d slot(s)", worker.worker_id, worker.pid,
                 worker.slots)  # fmt: skip
        return worker

    def drop(self, identity: bytes, why: str) -> None:
        """Count a message that is not taken; log the first and then every 1000th."""
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.warning("worker socket: message from %r dropped (%s); %d dropped so far",
                        identity[:32], why, self.dropped)  # fmt: skip

    def answered(self, worker: Worker) -> None:
        worker.served += 1

    def reap(self, fd: int, stopping: bool) -> Worker:
        """A worker's pidfd fired: collect it and decide whether and when it comes back."""
        worker = self.by_pidfd.pop(fd)
        was = worker.state
        how = worker.reap()
        self.by_identity.pop(worker.identity, None)
        self.stop_dump(worker)
        if self.arena is not None:
            self.release_cache(worker.worker_id)
        log.log(logging.INFO if worker.intended_exit else logging.WARNING,
                "worker %d (pid %d) %s: %s", worker.worker_id, worker.pid, how,
                worker.exit_reason)  # fmt: skip
        if stopping or (was == FAILED and worker.model == self.assignment[worker.worker_id]):
            # Stopping; or it said it cannot load the model, which a respawn would repeat
            # (unless its group was given another model meanwhile: placement.py).
            self.mark_row_ended(worker)
            return worker
        delay = 0.0
        if not worker.intended_exit and was != FAILED:
            delay = self.crash_delay(worker)
        if worker.state != FATAL:
            self.respawn_at[worker.worker_id] = time.monotonic() + delay
            log.info("worker %d respawns in %.1fs", worker.worker_id, delay)
        self.mark_row_ended(worker)
        return worker

    def crash_delay(self, worker: Worker) -> float:
        """Backoff for a crash; FATAL after too many crashes in the window."""
        crashes = self.crashes[worker.worker_id]
        delay = respawn_delay(crashes, time.monotonic(), self.limits)
        if delay is None:
            worker.state = FATAL
            worker.exit_reason = (
                f"crash loop: {len(crashes)} crashes in {self.limits.crash_loop_window_s:g}s, "
                f"last: {worker.exit_reason}"
            )
            log.error("worker %d is FATAL: %s", worker.worker_id, worker.exit_reason)
            return 0.0
        return delay

    def mark_row_ended(self, worker: Worker) -> None:
        state = sb.FATAL if worker.state in (FATAL, FAILED) else sb.DEAD
        self.board.write_worker(worker.worker_id, state=state, request_id=b"", tokens=0)
        self.board.write_supervisor(
            worker.worker_id, last_exit=(worker.exit_reason or "").encode()[:96]
        )

    def recycle(self, worker: Worker, reason: str) -> None:
        """Graceful: the worker finishes its jobs, takes no new ones, exits; then a new one."""
        if worker.state != READY:
            return
        log.warning("recycling worker %d (pid %d): %s", worker.worker_id, worker.pid, reason)
        worker.intended_exit = True
        worker.exit_reason = f"recycled: {reason}"
        self.drain(worker)

    def move(self, group: int, why: str) -> None:
        """Its assignment changed (placement.py): the worker there drains and exits, and
        the reaper spawns the new model at once; one still loading is killed."""
        worker = self.workers[group]
        if not worker.alive:
            return  # a respawn is due: it takes the new assignment
        log.info("worker %d: %s -> %s (%s)", group, worker.model, self.assignment[group], why)
        worker.intended_exit = True
        worker.exit_reason = f"moved: {why}"
        if worker.state == READY:
            self.drain(worker)
        else:
            worker.kill()

    def drain(self, worker: Worker) -> None:
        """Finish its jobs, take no new ones, exit (tend() escalates once it is idle)."""
        worker.state = DRAINING
        self.send(worker, wire.drain_order())

    def kill(self, worker: Worker, reason: str) -> None:
        log.error("killing worker %d (pid %d): %s", worker.worker_id, worker.pid, reason)
        worker.intended_exit = True
        worker.exit_reason = f"killed: {reason}"
        worker.state = DRAINING
        worker.kill()

    def hung(self, worker: Worker, reason: str) -> None:
        """Capture where it is stuck (bounded in time), then SIGKILL."""
        if worker.dumper is not None:
            return
        log.error("worker %d (pid %d) is hung: %s; py-spy dump follows",
                  worker.worker_id, worker.pid, reason)  # fmt: skip
        worker.intended_exit = True
        worker.exit_reason = f"hung: {reason}"
        worker.state = DRAINING
        try:
            worker.dumper = subprocess.Popen(
                [watchdog.py_spy(), "dump", "--pid", str(worker.pid)],
                stdin=subprocess.DEVNULL, stdout=self.log_fd, stderr=self.log_fd,
            )  # fmt: skip
        except OSError as exc:  # EMFILE too: the kill matters more than the dump
            log.error("py-spy dump failed: %s", exc)
            worker.kill()
            return
        try:
            fd = fds.reserve.call(os.pidfd_open, worker.dumper.pid)
        except OSError as exc:
            log.error("py-spy dump not watched (%s): killing worker %d now", exc, worker.worker_id)
            worker.dumper.kill()
            worker.dumper.wait()
            worker.dumper = None
            worker.kill()
            return
        self.dumpers[fd] = worker
        worker.kill_at = time.monotonic() + DUMP_TIMEOUT_S
        worker.term_sent = True  # after the dump: straight to SIGKILL

    def dump_finished(self, fd: int) -> Worker:
        worker = self.dumpers[fd]
        self.stop_dump(worker)
        worker.kill()
        return worker

    def stop_dump(self, worker: Worker) -> None:
        for fd, w in list(self.dumpers.items()):
            if w is worker:
                del self.dumpers[fd]
                os.close(fd)
        if worker.dumper is not None:
            if worker.dumper.poll() is None:
                worker.dumper.kill()
            worker.dumper.wait()
            worker.dumper = None

    # --- rolling replacement (SIGHUP) -------------------------------------------------------

    def replace_all(self, why: str) -> None:
        """Replace every worker, one core group at a time: the group's worker drains (finishes
        its jobs, takes no new ones, exits), its replacement is spawned at once (an intended
        exit: no backoff), and the next group starts only once the new worker is serving.
        Drain first, then start: a worker owns its group's cores, and two of them there
        would run two llama.cpp thread pools on the same cores. With 2+ groups the others
        serve meanwhile; with one, requests wait in the queue until the new worker serves."""
        groups = list(range(len(self.workers)))
        r = self.replacing
        if r is not None:  # again while one runs: every other group once more after this one
            r["todo"] = [g for g in groups if g != r["group"]]
            log.info("replacing the workers again (%s): after worker %d, workers %s", why,
                     r["group"], r["todo"])  # fmt: skip
            return
        log.info("replacing %d worker(s) one core group at a time (%s)", len(groups), why)
        self.replacing = {"why": why, "group": None, "old": None, "todo": groups, "done": [],
                          "skipped": [], "started_at": time.time()}  # fmt: skip
        self.replace_next()

    def replace_next(self) -> None:
        r = self.replacing
        while r["todo"]:
            group = r["todo"].pop(0)
            worker = self.workers[group]
            r["group"], r["old"] = group, worker
            if worker.state in (FAILED, FATAL) and not worker.alive:
                # It could not load or crash-looped: try again, the file may be fixed now.
                self.crashes[group].clear()
                self.respawn_at[group] = time.monotonic()
                log.info("worker %d was %s: starting it again", group, worker.state)
            elif worker.state in (FAILED, FATAL):
                log.warning("worker %d is %s and still exiting: not replaced", group,
                            worker.state)  # fmt: skip
                r["skipped"].append(group)
                continue
            elif worker.state == READY:
                log.info("replacing worker %d (pid %d): draining it", group, worker.pid)
                worker.intended_exit = True
                worker.exit_reason = f"replaced: {r['why']}"
                self.drain(worker)
            elif worker.alive and worker.state == STARTING:
                log.info("replacing worker %d (pid %d): still loading, killed", group,
                         worker.pid)  # fmt: skip
                worker.intended_exit = True
                worker.exit_reason = f"replaced: {r['why']}"
                worker.kill()
            else:  # draining (recycled, moved) or dead with a respawn due: that one replaces it
                log.info("replacing worker %d: already %s, waiting for its successor", group,
                         worker.state)  # fmt: skip
            return
        took = time.time() - r["started_at"]
        log.info("replaced workers %s in %.1f s (%s)%s", r["done"], took, r["why"],
                 f"; not replaced: {r['skipped']}" if r["skipped"] else "")  # fmt: skip
        self.replacing = None

    def replace_progress(self, stopping: bool) -> None:
        """Once per loop while replacing: is the current group's new worker serving?"""
        r = self.replacing
        if stopping:
            log.info("replacing the workers stopped: llmsup is stopping")
            self.replacing = None
            return
        group = r["group"]
        worker = self.workers[group]
        if worker is r["old"]:
            if worker.alive or group in self.respawn_at:
                return  # still draining, or its successor is due
            log.warning("worker %d was not replaced: it is %s", group, worker.state)
            r["skipped"].append(group)
            self.replace_next()
        elif worker.state == READY:
            log.info("worker %d replaced: pid %s -> %d", group, r["old"].pid, worker.pid)
            r["done"].append(group)
            self.replace_next()
        elif worker.state in (FAILED, FATAL):
            log.error("replacing the workers stopped: the new worker %d is %s (%s); workers %s "
                      "keep their old process", group, worker.state, worker.exit_reason,
                      r["todo"] or "none")  # fmt: skip
            self.replacing = None

    def replacement_status(self) -> dict | None:
        r = self.replacing
        if r is None:
            return None
        return {key: r[key] for key in ("why", "group", "todo", "done", "skipped", "started_at")}

    # --- timers -------------------------------------------------------------------------------

    def next_deadline(self, watching: bool) -> float | None:
        """When the next timer is due; the watchdogs' only while `watching` (the
        supervisor runs them once started: before that, their deadline stays in the past
        and the loop would spin through every worker's start-up)."""
        times = list(self.respawn_at.values())
        times += [w.kill_at for w in self.workers if w.kill_at is not None and w.alive]
        if watching and any(w.alive for w in self.workers):
            times.append(self.next_watch)
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
            if stopping and w.state in (STARTING, FAILED):
                w.kill()  # still loading (or failed to): nothing to drain
            elif stopping and w.state == READY and queue_empty and not self.jobs_on(w):
                self.drain(w)
            if w.state == DRAINING and w.kill_at is None and not self.jobs_on(w):
                w.kill_at = now + STOP_GRACE_S  # then SIGTERM, then SIGKILL
        self.run_timers(now, stopping)
        if self.replacing is not None:
            self.replace_progress(stopping)
        if watching and now >= self.next_watch:
            self.watch(now)

    def run_timers(self, now: float, stopping: bool) -> None:
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
                    log.warning("worker %d not respawned: %s; retrying in 1s", worker_id, exc)
        for w in self.workers:
            if w.kill_at is not None and now >= w.kill_at and w.alive:
                if not w.term_sent:
                    log.warning("worker %d did not exit after STOP; SIGTERM", w.worker_id)
                    w.signal(signal.SIGTERM)
                    w.term_sent = True
                    w.kill_at = now + TERM_GRACE_S
                else:
                    log.warning("worker %d still alive; SIGKILL", w.worker_id)
                    self.stop_dump(w)
                    w.kill()
                    w.kill_at = None

    def watch(self, now: float) -> None:
        """Sample every live worker and act on the watchdogs' verdicts."""
        elapsed = now - (self.next_watch - watchdog.WATCHDOG_INTERVAL_S)
        self.next_watch = now + watchdog.WATCHDOG_INTERVAL_S
        actions = []
        for w in self.workers:
            if not w.alive:
                continue
            try:
                w.process = w.process or psutil.Process(w.pid)
                cpu = w.process.cpu_times()
                anon = watchdog.anon_rss_bytes(w.pid)
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
            if w.state == DRAINING and w.dumper is None and w.kill_at is None:
                # Recycling (finishing its jobs): a soft limit put it here; the hard one
                # still applies while it finishes.
                if over_hard := watchdog.over_hard_limit(self.limits, sample):
                    actions.append((w, watchdog.KILL, over_hard))
                continue
            if w.state != READY:
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
            if verdict != watchdog.OK:
                actions.append((w, verdict, reason))
        for worker, verdict, reason in actions:
            self.act(worker, verdict, reason)

    def act(self, worker: Worker, verdict: str, reason: str) -> None:
        if verdict == watchdog.RECYCLE:
            self.recycle(worker, reason)
        elif verdict == watchdog.KILL:
            self.kill(worker, reason)
        elif verdict == watchdog.HUNG:
            self.hung(worker, reason)

    # --- shut-down ----------------------------------------------------------------------------

    def kill_all(self) -> None:
        for w in self.workers:
            self.stop_dump(w)
            w.kill()

    def reap_all(self) -> None:
        for w in self.workers:
            w.kill()
            if w.alive:
                w.reap()
