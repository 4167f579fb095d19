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
import heapq
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import scoreboard as sb
from llmsup.protocol.arena import Arena
from llmsup.protocol.arena import segment_name as arena_name
from llmsup.protocol.codec import ProtocolError
from llmsup.supervisor import gatewayproc
from llmsup.supervisor.fairqueue import FairQueue, estimate_prompt_tokens
from llmsup.supervisor.gatewayproc import GatewayProcess
from llmsup.supervisor.pool import DRAINING, FAILED, FATAL, READY, Job, Pool, Worker
from llmsup.supervisor.routing import Router
from llmsup.supervisor.statedir import StateDir
from llmsup.supervisor.stats import RequestStats
from llmsup.supervisor.watchdog import Limits

log = logging.getLogger("llmsup.supervisor")

EXIT_DRAINED = 0
EXIT_STARTUP_FAILED = 2
EXIT_FORCED = 3

# Frames queued towards one client before it counts as not reading: a few seconds of
# tokens for many streams. Past it a send would block, so the client's requests end.
CLIENT_SNDHWM = 4096
CLIENT_RCVHWM = 1000  # requests buffered from one client before ZeroMQ stops reading it


@dataclass
class Config:
    model: str
    groups: list[list[int]]
    ctx_size: int
    endpoint: str
    queue_size: int
    startup_timeout: float
    drain_timeout: float
    slots_per_worker: int = 1
    prefill_chunk: int = 256
    limits: Limits = field(default_factory=Limits)
    queue_tokens: int = 65536  # estimated prompt tokens waiting, summed over the queue
    client_queue: int | None = None  # waiting requests one client may hold [queue_size/2]
    cache_mb: int = 0  # the shared prefix cache's size (0: no cache)
    gateway_args: list[str] = field(default_factory=list)  # the HTTP gateway's ([]: none)


class Supervisor:
    def __init__(self, config: Config, state: StateDir, on_ready=None):
        self.config = config
        self.state = state
        self.on_ready = on_ready  # called once with (ok, info_or_error)
        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.poller = zmq.Poller()
        # The prefix cache first: it is the one that can fail (no room in /dev/shm).
        self.arena_name = arena_name(str(state.path)) if config.cache_mb else None
        self.arena = Arena.create(self.arena_name, config.cache_mb) if config.cache_mb else None
        self.router = Router(prefer_prefix=self.arena is not None)
        self.gateway = (GatewayProcess(config.gateway_args, config.limits, log_fd=2)
                        if config.gateway_args else None)  # fmt: skip
        self.board_name = sb.segment_name(str(state.path))
        self.board = sb.Scoreboard.create(self.board_name, len(config.groups))
        self.pool = Pool(
            groups=config.groups,
            spawn_args=[
                "--endpoint", state.worker_endpoint,
                "--model", config.model,
                "--ctx-size", str(config.ctx_size),
                "--slots", str(config.slots_per_worker),
                "--prefill-chunk", str(config.prefill_chunk),
                "--supervisor-pid", str(os.getpid()),
            ],
            board=self.board,
            board_name=self.board_name,
            arena=self.arena,
            arena_name=self.arena_name,
            limits=config.limits,
            send=self.send_to_worker,
            log_fd=2,
        )  # fmt: skip
        self.queue = FairQueue(
            config.queue_size,
            config.client_queue or max(1, config.queue_size // 2),
            config.queue_tokens,
        )
        self.deadlines: list[tuple[float, bytes, Job]] = []  # heap
        self.gone_clients: set[bytes] = set()
        self.inflight: dict[tuple[bytes, bytes], Job] = {}
        self.job_ids = itertools.count(1)
        self.stats = RequestStats()
        self.started = False
        self.startup_deadline = 0.0
        self.stopping = False
        self.drain_deadline: float | None = None
        self.forced = False
        self.failed_on_stop = 0
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.polled_fds: set[int] = set()

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        self.bind_sockets()
        self.startup_deadline = time.monotonic() + self.config.startup_timeout
        try:
            self.pool.start_all()
            if self.gateway is not None:
                self.gateway.spawn()
            while not self.finished():
                self.register_pidfds()
                events = dict(self.poller.poll(self.poll_timeout_ms()))
                if self.signal_r in events:
                    self.handle_signals()
                for fd in [fd for fd in events if fd in self.pool.by_pidfd]:
                    self.worker_died(self.pool.reap(fd, self.stopping))
                for fd in [fd for fd in events if fd in self.pool.dumpers]:
                    self.pool.dump_finished(fd)
                if self.gateway is not None and set(self.gateway.fds()) & set(events):
                    self.gateway_event(events)
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
        """Stopping, and every child has exited (the HTTP gateway last: see run_timers)."""
        children = [*self.workers, *([self.gateway] if self.gateway else [])]
        return self.stopping and not any(c.alive for c in children)

    def startup_complete(self) -> bool:
        gateway_ready = self.gateway is None or self.gateway.state == gatewayproc.READY
        return gateway_ready and all(w.state == READY for w in self.workers)

    def gateway_event(self, events: dict) -> None:
        """The gateway said it listens, or died: while starting up, the latter fails it."""
        if self.gateway.ready_fd in events and self.gateway.ready_event():
            if not self.started and not self.stopping and self.startup_complete():
                self.report_ready()
        if self.gateway.pidfd in events:
            self.gateway.reap()
            if not self.started and not self.stopping:
                self.fail_startup(f"the http gateway {self.gateway.exit_reason} while starting")

    def register_pidfds(self) -> None:
        """Poll every worker and py-spy pidfd; a dead one is reported once, then dropped."""
        wanted = set(self.pool.by_pidfd) | set(self.pool.dumpers)
        wanted |= set(self.gateway.fds() if self.gateway else ())
        for fd in wanted - self.polled_fds:
            self.poller.register(fd, zmq.POLLIN)
        for fd in self.polled_fds - wanted:
            self.poller.unregister(fd)
        self.polled_fds = wanted

    def poll_timeout_ms(self) -> int | None:
        watching = self.started and not self.stopping
        deadlines = (self.pool.next_deadline(watching), self.drain_deadline,
                     self.gateway.next_deadline() if self.gateway else None)  # fmt: skip
        timers = [t for t in deadlines if t is not None]
        if self.deadlines:
            timers.append(self.deadlines[0][0])
        if watching:
            timers.append(self.stats.next_report)  # scoreboard header and QUEUED frames
        if not self.started:
            timers.append(self.startup_deadline)
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
        self.frontend.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.frontend.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(self.state.worker_endpoint)
        self.frontend.bind(self.config.endpoint)
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)

    def report_ready(self) -> None:
        self.started = True
        info = {
            "pid": os.getpid(),
            "endpoint": self.config.endpoint,
            "model": self.config.model,
            "scoreboard": self.board_name,
            "cache": self.arena_name,
            "http": self.gateway.url if self.gateway is not None else None,
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
        self.pool.kill_all()

    def begin_stop(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
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
            self.pool.stop_when_idle(w)

    def force_stop(self) -> None:
        """Drain time is up: every request still open gets its terminal error now."""
        self.forced = True
        for job in list(self.inflight.values()):
            self.fail_job(job, C.E_SHUTTING_DOWN, "llmsup stopped before this request finished")
            self.failed_on_stop += 1
        self.pool.kill_all()
        self.drain_deadline = None

    def shut_down(self) -> None:
        self.pool.reap_all()
        self.frontend.close(0)
        self.backend.close(0)
        self.ctx.term()
        self.board.close()
        if self.arena is not None:
            self.arena.close()
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

    def worker_died(self, worker: Worker) -> None:
        """Its requests: retried once elsewhere if nothing was streamed yet, else worker_lost."""
        self.router.forget(worker.worker_id)
        for job in sorted(worker.jobs.values(), key=lambda j: j.accepted_at, reverse=True):
            worker.jobs.pop(job.job_id)
            if job.cancel_code is not None:
                job.worker = None
                self.fail_job(job, job.cancel_code, "stopped as asked; its worker then died")
            elif job.tokens_sent == 0 and not job.retried and not self.stopping:
                job.retried = True
                job.worker = None
                self.queue.push(job, front=True)  # it has waited already: goes first
                log.info("request %r retried after worker %d died", job.request_id,
                         worker.worker_id)  # fmt: skip
            else:
                job.worker = None
                self.fail_job(job, C.E_WORKER_LOST,
                              f"worker {worker.worker_id} died: {worker.exit_reason}")  # fmt: skip
        if not self.started and not self.stopping:
            self.fail_startup(f"worker {worker.worker_id} {worker.exit_reason} while loading")
        elif (
            self.started
            and not self.stopping
            and all(w.state in (FAILED, FATAL) for w in self.workers)
        ):
            for job in list(self.queue):
                self.fail_job(job, C.E_WORKER_LOST, "no worker is left to serve this request")

    def handle_worker_messages(self) -> None:
        while True:
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            worker = self.pool.by_identity.get(frames[0])
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
            elif kind in C.W_JOB_KINDS and len(frames) % 3 == 1:
                # (kind, job id, body) triples: a decoding step's all come in one message.
                for i in range(1, len(frames), 3):
                    self.job_message(worker, frames[i], frames[i + 1], frames[i + 2])

    def worker_ready(self, worker: Worker, info: dict) -> None:
        worker.mark_ready(info)
        log.info("worker %d ready: pid %d, %d slot(s)", worker.worker_id, worker.pid, worker.slots)
        if self.stopping:
            self.stop_idle_workers()
        elif not self.started and self.startup_complete():
            self.report_ready()

    def job_message(self, worker: Worker, kind: bytes, job_id: bytes, body: bytes) -> None:
        if kind not in C.W_JOB_KINDS:
            log.warning("worker %d sent a job message of unknown kind %r", worker.worker_id, kind)
            return
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
        self.stats.finished(elapsed_ms)
        reply = C.DONE if kind == C.W_DONE else C.ERROR
        self.send_to_client(job.client, [C.VERSION, reply, job.request_id, body])
        if self.stopping:
            self.stop_idle_workers()
        else:
            self.pool.stop_when_idle(worker)

    def handle_client_messages(self) -> None:
        while True:
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            client, frames = frames[0], frames[1:]
            self.gone_clients.discard(client)  # it is back (or was never gone)
            try:
                self.accept_request(client, codec.parse_request(frames))
            except ProtocolError as exc:
                self.stats.rejected += 1
                request_id = codec.request_id_of(frames)
                self.send_to_client(client, codec.reply_frames(C.ERROR, request_id, exc.body()))

    def accept_request(self, client: bytes, request: codec.Request) -> None:
        if request.verb == C.PING:
            self.reply(client, request.request_id, {"pong": True, "version": C.VERSION.decode()})
            return
        if request.verb == C.STATUS:
            self.reply(client, request.request_id, self.status())
            return
        if request.verb == C.CANCEL:
            found = self.cancel(client, request.body["target"].encode())
            self.reply(client, request.request_id, {"found": found})
            return
        if self.stopping:
            raise ProtocolError(C.E_SHUTTING_DOWN, "llmsup is stopping; retry on another server")
        if (client, request.request_id) in self.inflight:
            raise ProtocolError(
                C.E_DUPLICATE_ID,
                f"request id {request.request_id!r} is already in flight from this client",
            )
        tokens = estimate_prompt_tokens(request.body)
        # The queue's bounds apply to waiting: a request that a free slot takes at once
        # never waits, whatever --queue-size says.
        refusal = self.queue.refusal(client, tokens) if self.queue or not self.free_slot() else None
        if refusal is not None:
            raise ProtocolError(
                C.E_OVERLOADED, f"{refusal}; retry later", retry_after_ms=self.retry_after_ms()
            )
        if all(w.state in (FAILED, FATAL) for w in self.workers):
            raise ProtocolError(C.E_WORKER_LOST, "every worker is failed or fatal; see status")
        # The job id carries the client's request id after an 8-byte sequence number, so a
        # worker can show it in the scoreboard without knowing clients.
        job_id = next(self.job_ids).to_bytes(8, "big") + request.request_id
        job = Job(job_id, client, request.request_id, request.verb, request.body)
        job.prompt_tokens = tokens
        timeout_ms = request.body.get("timeout_ms")
        if timeout_ms is not None:
            job.deadline = job.accepted_at + timeout_ms / 1000
            heapq.heappush(self.deadlines, (job.deadline, job.job_id, job))
        self.inflight[(client, request.request_id)] = job
        self.queue.push(job)
        self.stats.accepted += 1
        self.dispatch_jobs()

    def retry_after_ms(self) -> int:
        slots = sum(w.slots for w in self.workers if w.state == READY)
        return self.stats.retry_after_ms(len(self.queue), slots)

    def run_timers(self) -> None:
        now = time.monotonic()
        if not self.started and not self.stopping and now >= self.startup_deadline:
            waiting = [str(w.worker_id) for w in self.workers if w.state != READY]
            self.fail_startup(
                f"worker(s) {', '.join(waiting)} not ready after {self.config.startup_timeout:g}s"
            )
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.force_stop()
        self.expire_deadlines(now)
        self.pool.run_timers(now, self.stopping)
        if self.gateway is not None:
            self.gateway.run_timers(now)
        if self.stopping:
            for w in self.workers:
                if w.state not in (READY, DRAINING):
                    w.kill()  # still loading: nothing to drain
            if self.gateway is not None and not any(w.alive for w in self.workers):
                self.gateway.stop()  # last: it relayed the drained requests' final frames
        elif self.started:
            for worker, verdict, reason in self.pool.watch(now):
                self.pool.act(worker, verdict, reason)
            if now >= self.stats.next_report:
                self.write_scoreboard_header(now)
                self.tell_queued_clients()

    def write_scoreboard_header(self, now: float) -> None:
        gateway = self.gateway.scoreboard_fields() if self.gateway is not None else {}
        self.board.write_header(queue_depth=len(self.queue), queue_limit=self.config.queue_size,
                                **self.stats.report(now), **gateway)  # fmt: skip

    # --- cancellation, deadlines, clients that went away -------------------------------------

    def cancel(self, client: bytes, target: bytes) -> bool:
        """A client cancels one of its own requests; other clients' ids are never looked at."""
        job = self.inflight.get((client, target))
        if job is None:
            return False
        self.stop_job(job, C.E_CANCELLED, "cancelled by the client")
        return True

    def stop_job(self, job: Job, code: str, message: str) -> None:
        """End a job early: at once if queued, within one token if running."""
        if job.worker is None:
            self.fail_job(job, code, message)
        elif job.cancel_code is None:
            job.cancel_code = code
            self.send_to_worker(
                job.worker, [C.S_CANCEL, job.job_id, codec.dumps(codec.error_body(code, message))]
            )

    def expire_deadlines(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self.deadlines)
            if self.inflight.get((job.client, job.request_id)) is not job:
                continue  # already ended
            where = "in the queue" if job.worker is None else "while generating"
            ms = job.body["timeout_ms"]
            self.stop_job(job, C.E_DEADLINE, f"timeout_ms {ms} passed {where}")

    def tell_queued_clients(self) -> None:
        """A QUEUED frame per waiting request: progress for the client, and a liveness probe
        (ROUTER_MANDATORY makes a send to a disconnected client fail)."""
        position: collections.Counter[bytes] = collections.Counter()
        for job in list(self.queue):
            position[job.client] += 1
            body = {"position": position[job.client], "queue_depth": len(self.queue)}
            self.send_to_client(job.client, codec.reply_frames(C.QUEUED, job.request_id, body))

    # --- routing ----------------------------------------------------------------------------

    def free_slot(self) -> bool:
        return any(w.state == READY and w.credits > 0 for w in self.workers)

    def dispatch_jobs(self) -> None:
        while self.queue:
            free = [w for w in self.workers if w.state == READY and w.credits > 0]
            if not free:
                return
            job = self.queue.pop()
            worker = self.router.pick(free, job)
            worker.credits -= 1
            worker.jobs[job.job_id] = job
            job.worker = worker
            job.dispatched_at = time.monotonic()
            self.send_to_worker(worker, [C.S_JOB, job.job_id, job.verb, codec.dumps(job.body)])

    def fail_job(self, job: Job, code: str, message: str) -> None:
        """End a job with an error: its one terminal frame."""
        self.inflight.pop((job.client, job.request_id), None)
        if job.worker is not None:
            job.worker.jobs.pop(job.job_id, None)
            self.pool.stop_when_idle(job.worker)
        else:
            self.queue.remove(job)
        body = codec.error_body(code, message, tokens_sent=job.tokens_sent)
        self.send_to_client(job.client, codec.reply_frames(C.ERROR, job.request_id, body))

    def reply(self, client: bytes, request_id: bytes, body: dict) -> None:
        self.send_to_client(client, codec.reply_frames(C.DONE, request_id, body))

    def send_to_client(self, client: bytes, frames: list[bytes]) -> None:
        if client in self.gone_clients:
            return
        try:
            self.frontend.send_multipart([client, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client disconnected. EAGAIN: it stopped reading and its
            # frames reached CLIENT_SNDHWM. Either way nobody will read what it asked for.
            self.client_gone(client, "disconnected" if exc.errno == zmq.EHOSTUNREACH
                             else "stopped reading its replies")  # fmt: skip

    def client_gone(self, client: bytes, why: str) -> None:
        """Cancel everything a client has queued or running instead of generating into the void."""
        self.gone_clients.add(client)
        mine = [job for (c, _), job in self.inflight.items() if c == client]
        if mine:
            log.warning("client %s %s: cancelling %d request(s)", client.hex(), why, len(mine))
        for job in mine:
            self.stop_job(job, C.E_CANCELLED, f"the client {why}")

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
            "queue": {
                "depth": len(self.queue),
                "limit": self.config.queue_size,
                "per_client_limit": self.queue.per_client,
                "prompt_tokens": self.queue.tokens,
                "prompt_token_limit": self.queue.token_limit,
            },
            "requests": {
                "accepted": self.stats.accepted,
                "rejected": self.stats.rejected,
                "in_flight": len(self.inflight),
            },
            "workers": [w.status() for w in self.workers],
            "cache": self.arena.stats() if self.arena is not None else None,
            "gateway": self.gateway.status() if self.gateway is not None else None,
        }
