"""The supervisor: one event loop that routes client requests to model workers.

Routing is zguide's load-balancing broker with credits: a worker grants one credit per
free slot (in READY, and again with every DONE or ERROR), and a job is sent only against
a credit. Requests that find no credit wait in a bounded queue; when that is full the
client gets an immediate `overloaded` error. The loop sleeps in one poll on the client
socket, the worker socket, a pidfd per worker (death is seen at once) and the signal
wakeup pipe, with a timeout from the nearest timer; it never busy-polls.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass

import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol.codec import ProtocolError
from llmsup.supervisor.pool import DEAD, DRAINING, FAILED, READY, STARTING, Job, Worker
from llmsup.supervisor.statedir import StateDir

log = logging.getLogger("llmsup.supervisor")

EXIT_DRAINED = 0
EXIT_STARTUP_FAILED = 2
EXIT_FORCED = 3

RESPAWN_BACKOFF_S = (0.5, 30.0)  # first delay, cap; doubles on each quick failure
STABLE_AFTER_S = 60.0  # a worker that lived this long resets its backoff
WORKER_EXIT_GRACE_S = 5.0  # after STOP, how long a worker may take to exit


@dataclass
class Config:
    model: str
    groups: list[list[int]]
    ctx_size: int
    endpoint: str
    queue_size: int
    startup_timeout: float
    drain_timeout: float


class Supervisor:
    def __init__(self, config: Config, state: StateDir, on_ready=None):
        self.config = config
        self.state = state
        self.on_ready = on_ready  # called once with (ok, info_or_error)
        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.poller = zmq.Poller()
        self.workers: list[Worker] = []
        self.by_identity: dict[bytes, Worker] = {}
        self.by_pidfd: dict[int, Worker] = {}
        self.spawn_counts = collections.Counter()
        self.respawn_at: dict[int, float] = {}  # worker id -> monotonic time
        self.backoff: dict[int, float] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.inflight: dict[tuple[bytes, bytes], Job] = {}
        self.job_ids = itertools.count(1)
        self.service_ms = 1000.0  # moving average of a job's time in a worker
        self.accepted = 0
        self.rejected = 0
        self.started = False
        self.startup_deadline = 0.0
        self.stopping = False
        self.drain_deadline: float | None = None
        self.exit_deadline: float | None = None
        self.forced = False
        self.failed_on_stop = 0
        self.log_fd = 2
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        self.bind_sockets()
        self.startup_deadline = time.monotonic() + self.config.startup_timeout
        for worker_id, cores in enumerate(self.config.groups):
            self.spawn_worker(worker_id, cores)
        try:
            while not self.finished():
                events = dict(self.poller.poll(self.poll_timeout_ms()))
                if self.signal_r in events:
                    self.handle_signals()
                for fd in [fd for fd in events if fd in self.by_pidfd]:
                    self.reap_worker(self.by_pidfd.pop(fd))
                if self.backend in events:
                    self.handle_worker_messages()
                if self.frontend in events:
                    self.handle_client_messages()
                self.run_timers()
                self.dispatch_jobs()
        finally:
            self.shut_down()
        if not self.started:
            return EXIT_STARTUP_FAILED
        return EXIT_FORCED if self.forced else EXIT_DRAINED

    def finished(self) -> bool:
        if not self.stopping:
            return False
        return all(w.state in (DEAD, FAILED) for w in self.workers)

    def poll_timeout_ms(self) -> int | None:
        timers = list(self.respawn_at.values())
        if not self.started:
            timers.append(self.startup_deadline)
        timers += [t for t in (self.drain_deadline, self.exit_deadline) if t is not None]
        if not timers:
            return None
        return max(0, int((min(timers) - time.monotonic()) * 1000) + 1)

    # --- start-up and shut-down ----------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        # Handlers do nothing: the wakeup fd carries the signal number into the loop.
        signal.set_wakeup_fd(self.signal_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, lambda *_: None)
        self.poller.register(self.signal_r, zmq.POLLIN)

    def bind_sockets(self) -> None:
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises
        self.frontend.setsockopt(zmq.MAXMSGSIZE, C.MAX_FRAME_BYTES)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(self.state.worker_endpoint)
        self.frontend.bind(self.config.endpoint)
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)

    def spawn_worker(self, worker_id: int, cores: list[int]) -> Worker:
        self.spawn_counts[worker_id] += 1
        worker = Worker(worker_id, cores, self.spawn_counts[worker_id])
        worker.spawn(
            endpoint=self.state.worker_endpoint,
            model=self.config.model,
            ctx_size=self.config.ctx_size,
            log_fd=self.log_fd,
        )
        if worker_id < len(self.workers):
            worker.last_exit = self.workers[worker_id].exit_reason
            self.workers[worker_id] = worker
        else:
            self.workers.append(worker)
        self.by_identity[worker.identity] = worker
        self.by_pidfd[worker.pidfd] = worker
        self.poller.register(worker.pidfd, zmq.POLLIN)
        log.info("worker %d spawned: pid %d, cores %s", worker_id, worker.pid, cores)
        return worker

    def report_ready(self) -> None:
        self.started = True
        info = {
            "pid": os.getpid(),
            "endpoint": self.config.endpoint,
            "model": self.config.model,
            "workers": [w.status() for w in self.workers],
        }
        self.state.write_json(self.state.info_file, info)
        log.info("ready: %d workers, endpoint %s", len(self.workers), self.config.endpoint)
        self.announce(True, info)

    def announce(self, ok: bool, detail) -> None:
        on_ready, self.on_ready = self.on_ready, None  # start-up ends once, either way
        if on_ready:
            on_ready(ok, detail)

    def fail_startup(self, reason: str) -> None:
        log.error("start-up failed: %s", reason)
        self.announce(False, reason)
        self.stopping = True
        self.forced = True
        for w in self.workers:
            w.kill()

    def begin_stop(self, drain_timeout: float) -> None:
        now = time.monotonic()
        deadline = now + drain_timeout
        if not self.stopping:
            log.info(
                "stopping: draining %d running and %d queued requests",
                len(self.inflight) - len(self.queue),
                len(self.queue),
            )
        self.stopping = True
        self.drain_deadline = min(deadline, self.drain_deadline or deadline)
        self.stop_idle_workers()

    def stop_idle_workers(self) -> None:
        """While stopping, tell each worker with nothing left to do to exit."""
        if self.queue:
            return
        for w in self.workers:
            if w.state == READY and not w.jobs:
                w.state = DRAINING
                self.send_to_worker(w, [C.S_STOP])
                self.exit_deadline = time.monotonic() + WORKER_EXIT_GRACE_S

    def force_stop(self) -> None:
        """Drain time is up: every request still open gets its terminal error now."""
        self.forced = True
        for job in list(self.inflight.values()):
            self.fail_job(job, C.E_SHUTTING_DOWN, "llmsup stopped before this request finished")
            self.failed_on_stop += 1
        for w in self.workers:
            w.kill()
        self.drain_deadline = None

    def shut_down(self) -> None:
        for w in self.workers:
            w.kill()
            if w.pidfd is not None:
                w.reap()
        self.frontend.close(0)
        self.backend.close(0)
        self.ctx.term()
        os.close(self.signal_r)
        os.close(self.signal_w)
        signal.set_wakeup_fd(-1)

    # --- events -----------------------------------------------------------------------------

    def handle_signals(self) -> None:
        try:
            data = os.read(self.signal_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGQUIT:
                self.begin_stop(0)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(self.config.drain_timeout)

    def reap_worker(self, worker: Worker) -> None:
        self.poller.unregister(worker.pidfd)
        was = worker.state
        reason = worker.reap()
        self.by_identity.pop(worker.identity, None)
        log.warning("worker %d (pid %d) %s", worker.worker_id, worker.pid, reason)
        for job in list(worker.jobs.values()):
            self.fail_job(job, C.E_WORKER_LOST, f"worker {worker.worker_id} {reason}")
        if self.stopping:
            return
        if not self.started:
            self.fail_startup(f"worker {worker.worker_id} {worker.exit_reason} while loading")
            return
        if was == FAILED:
            return  # it told us why it cannot load; respawning would loop
        lived = time.monotonic() - worker.started_at
        first, cap = RESPAWN_BACKOFF_S
        delay = (
            first
            if lived > STABLE_AFTER_S
            else min(cap, self.backoff.get(worker.worker_id, first / 2) * 2)
        )
        self.backoff[worker.worker_id] = delay
        self.respawn_at[worker.worker_id] = time.monotonic() + delay
        log.info("worker %d respawns in %.1fs", worker.worker_id, delay)

    def handle_worker_messages(self) -> None:
        while True:
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            worker = self.by_identity.get(frames[0])
            if worker is None or len(frames) < 2:
                log.warning("message from unknown worker %r dropped", frames[0])
                continue
            kind = frames[1]
            if kind == C.W_READY:
                self.worker_ready(worker, codec.loads(frames[2]))
            elif kind == C.W_FAILED:
                worker.state = FAILED
                worker.exit_reason = codec.loads(frames[2])["reason"]
                log.error("worker %d failed to load: %s", worker.worker_id, worker.exit_reason)
            elif kind in (C.W_TOKEN, C.W_DONE, C.W_ERROR) and len(frames) == 4:
                self.job_message(worker, kind, frames[2], frames[3])

    def worker_ready(self, worker: Worker, info: dict) -> None:
        worker.mark_ready(info)
        log.info("worker %d ready: pid %d, %d slot(s)", worker.worker_id, worker.pid, worker.slots)
        if self.stopping:
            self.stop_idle_workers()
        elif not self.started and all(w.state == READY for w in self.workers):
            self.report_ready()

    def job_message(self, worker: Worker, kind: bytes, job_id: bytes, body: bytes) -> None:
        job = worker.jobs.get(job_id)
        if job is None:
            return  # the job was already ended (e.g. failed on stop)
        if kind == C.W_TOKEN:
            job.tokens_sent += 1
            self.send_to_client(job.client, [C.VERSION, C.TOKEN, job.request_id, body])
            return
        del worker.jobs[job_id]
        del self.inflight[(job.client, job.request_id)]
        worker.credits += 1
        worker.served += 1
        elapsed_ms = (time.monotonic() - job.accepted_at) * 1000
        self.service_ms += 0.2 * (elapsed_ms - self.service_ms)
        reply = C.DONE if kind == C.W_DONE else C.ERROR
        self.send_to_client(job.client, [C.VERSION, reply, job.request_id, body])
        if self.stopping:
            self.stop_idle_workers()

    def handle_client_messages(self) -> None:
        while True:
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            client, frames = frames[0], frames[1:]
            try:
                self.accept_request(client, codec.parse_request(frames))
            except ProtocolError as exc:
                self.rejected += 1
                request_id = codec.request_id_of(frames)
                self.send_to_client(client, codec.reply_frames(C.ERROR, request_id, exc.body()))

    def accept_request(self, client: bytes, request: codec.Request) -> None:
        if request.verb == C.PING:
            self.reply(client, request.request_id, {"pong": True, "version": C.VERSION.decode()})
            return
        if request.verb == C.STATUS:
            self.reply(client, request.request_id, self.status())
            return
        if self.stopping:
            raise ProtocolError(C.E_SHUTTING_DOWN, "llmsup is stopping; retry on another server")
        if (client, request.request_id) in self.inflight:
            raise ProtocolError(
                C.E_DUPLICATE_ID,
                f"request id {request.request_id!r} is already in flight from this client",
            )
        if len(self.queue) >= self.config.queue_size:
            raise ProtocolError(
                C.E_OVERLOADED,
                f"the queue is full ({self.config.queue_size} requests waiting); retry later",
                retry_after_ms=self.retry_after_ms(),
            )
        job = Job(
            next(self.job_ids).to_bytes(8, "big"),
            client,
            request.request_id,
            request.verb,
            request.body,
        )
        self.inflight[(client, request.request_id)] = job
        self.queue.append(job)
        self.accepted += 1
        self.dispatch_jobs()

    def retry_after_ms(self) -> int:
        slots = sum(w.slots for w in self.workers if w.state == READY) or 1
        estimate = self.service_ms * (len(self.queue) + 1) / slots
        return int(min(60_000, max(100, estimate)))

    def run_timers(self) -> None:
        now = time.monotonic()
        if not self.started and not self.stopping and now >= self.startup_deadline:
            waiting = [str(w.worker_id) for w in self.workers if w.state != READY]
            self.fail_startup(
                f"worker(s) {', '.join(waiting)} not ready after {self.config.startup_timeout:g}s"
            )
        for worker_id, at in list(self.respawn_at.items()):
            if now >= at and not self.stopping:
                del self.respawn_at[worker_id]
                self.spawn_worker(worker_id, self.config.groups[worker_id])
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.force_stop()
        if self.exit_deadline is not None and now >= self.exit_deadline:
            self.exit_deadline = None
            for w in self.workers:
                if w.state == DRAINING:
                    log.warning("worker %d did not exit after STOP; killing it", w.worker_id)
                    w.kill()
        if self.stopping:
            self.respawn_at.clear()
            for w in self.workers:
                if w.state == STARTING:
                    w.kill()

    # --- routing ----------------------------------------------------------------------------

    def dispatch_jobs(self) -> None:
        while self.queue:
            free = [w for w in self.workers if w.state == READY and w.credits > 0]
            if not free:
                return
            # Most free slots first, then the one that has served least: spreads load.
            worker = max(free, key=lambda w: (w.credits, -w.served))
            job = self.queue.popleft()
            worker.credits -= 1
            worker.jobs[job.job_id] = job
            job.worker = worker
            self.send_to_worker(worker, [C.S_JOB, job.job_id, job.verb, codec.dumps(job.body)])

    def fail_job(self, job: Job, code: str, message: str) -> None:
        """End a job with an error: its one terminal frame."""
        self.inflight.pop((job.client, job.request_id), None)
        if job.worker is not None:
            job.worker.jobs.pop(job.job_id, None)
        else:
            self.queue.remove(job)
        body = codec.error_body(code, message, tokens_sent=job.tokens_sent)
        self.send_to_client(job.client, codec.reply_frames(C.ERROR, job.request_id, body))

    def reply(self, client: bytes, request_id: bytes, body: dict) -> None:
        self.send_to_client(client, codec.reply_frames(C.DONE, request_id, body))

    def send_to_client(self, client: bytes, frames: list[bytes]) -> None:
        try:
            self.frontend.send_multipart([client, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client is gone. EAGAIN: it stopped reading and its queue is
            # full. Either way the frame cannot be delivered and must not block the loop.
            log.warning("reply to client %s dropped: %s", client.hex(), exc.strerror)

    def send_to_worker(self, worker: Worker, frames: list[bytes]) -> None:
        try:
            self.backend.send_multipart([worker.identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # Not connected yet or already gone; its pidfd will tell us if it died.
            log.warning("message to worker %d dropped: %s", worker.worker_id, exc.strerror)

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "endpoint": self.config.endpoint,
            "model": self.config.model,
            "stopping": self.stopping,
            "queue": {"depth": len(self.queue), "limit": self.config.queue_size},
            "requests": {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "in_flight": len(self.inflight),
            },
            "workers": [w.status() for w in self.workers],
        }
