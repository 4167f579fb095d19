"""The supervisor: one event loop that routes client requests to model workers.

Routing is zguide's load-balancing broker: a job is sent only to a worker with a free
slot (its READY says how many it has; the ledger knows how many it holds). Requests that
find none wait in a bounded queue; when that is full the client gets an immediate
`overloaded` error. The loop sleeps in one poll on the client socket, the worker socket,
a pidfd per worker (death is seen at once) and the signal wakeup pipe, with a timeout
from the nearest timer; it never busy-polls. Requests belong to the ledger (ledger.py),
workers to the pool (pool.py); each socket's messages go through one codec (codec.py,
workerwire.py), and nothing a peer sends can raise out of the loop.
"""

from __future__ import annotations

import logging
import os
import secrets
import time

import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import scoreboard as sb
from llmsup.protocol import workerwire as wire
from llmsup.protocol.arena import Arena
from llmsup.protocol.codec import ProtocolError
from llmsup.supervisor.core.admission import Admission
from llmsup.supervisor.core.config import Config
from llmsup.supervisor.core.fairqueue import FairQueue
from llmsup.supervisor.core.gatewayproc import GatewayProcess, GatewayState
from llmsup.supervisor.core.ledger import Ledger
from llmsup.supervisor.core.lifecycle import Lifecycle, Phase
from llmsup.supervisor.core.placement import Placement
from llmsup.supervisor.core.pool import Pool
from llmsup.supervisor.core.receive import receive
from llmsup.supervisor.core.reload import Reload
from llmsup.supervisor.core.routing import Router
from llmsup.supervisor.core.stats import RequestStats
from llmsup.supervisor.core.status import StatusReport
from llmsup.supervisor.core.workerproc import Worker, WorkerState
from llmsup.supervisor.host import curve, endpoints, fds
from llmsup.supervisor.host.sdnotify import Notifier
from llmsup.supervisor.host.statedir import StateDir

log = logging.getLogger("llmsup.supervisor")

# A worker's step message holds a TOKEN and maybe a DONE per sequence: 3 frames each.
MAX_WORKER_FRAMES = 3 * 2 * 256


class Supervisor(Lifecycle, Admission, StatusReport, Reload):
    """The loop and the events it handles; start-up, shut-down and signals are
    Lifecycle's (lifecycle.py), what a client request gets on arrival Admission's
    (admission.py), the status report StatusReport's (status.py), a reload Reload's
    (reload.py)."""

    def __init__(self, config: Config, state: StateDir, on_ready=None, log_sink=None):
        self.config = config
        # systemd's socket, taken out of the environment before any child is spawned.
        self.notify = Notifier.from_env()
        self.next_watchdog = time.monotonic()  # a WATCHDOG=1 is due (if systemd asks)
        self.reloads = 0
        self.last_reload: dict | None = None  # status' `reload`
        self.state = state
        self.log_sink = log_sink  # logs.LogSink: fd 2, its write errors, SIGUSR1's reopen
        self.on_ready = on_ready  # called once with (ok, info_or_error)
        self.instance = secrets.token_hex(8)  # tells clients a restarted supervisor apart
        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.poller = zmq.Poller()
        # The prefix cache first: it is the one that can fail (no room in /dev/shm).
        # Segment names are random and recorded before the segments exist (host/segments.py).
        self.arena_name = (
            state.record_segment("cache", suffix="-cache") if config.cache_mb else None
        )
        self.arena = Arena.create(self.arena_name, config.cache_mb) if config.cache_mb else None
        self.router = Router(prefer_prefix=self.arena is not None)
        self.gateway = (
            GatewayProcess(config.gateway_args, config.limits, log_fd=2)
            if config.gateway_args
            else None
        )
        if self.gateway is not None and config.settings:
            self.write_gateway_live()  # before it starts: it reads it then and on SIGHUP
        self.board_name = state.record_segment("scoreboard")
        self.board = sb.Scoreboard.create(self.board_name, len(config.groups))
        self.queue = FairQueue(
            config.queue_size,
            config.client_queue or max(1, config.queue_size // 2),
            config.queue_tokens,
        )
        self.ledger = Ledger(self.queue, self.send_to_client, self.send_to_worker, self.instance)
        self.ledger.on_answered = self.answered
        self.placement = Placement(
            config.models,
            config.default_model,
            len(config.groups),
            keep_alive_s=config.keep_alive_s,
            max_loaded=config.max_loaded,
        )
        self.pool = Pool(
            groups=config.groups,
            spawn_args=worker_args(config, state.worker_endpoint),
            board=self.board,
            board_name=self.board_name,
            arena=self.arena,
            arena_name=self.arena_name,
            limits=config.limits,
            send=self.send_to_worker,
            jobs_on=self.ledger.jobs_on,
            models=config.models,
            assignment=self.placement.assignment,
            log_fd=2,
        )
        self.stats = RequestStats()
        self.phase = Phase.STARTING
        self.startup_deadline = 0.0
        self.drain_deadline: float | None = None
        self.failed_on_stop = 0
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.polled_fds: set[int] = set()
        self.curve = self.conns = None  # bind_sockets: CURVE's ZAP handler, the monitor

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers

    @property
    def stopping(self) -> bool:
        return self.phase not in (Phase.STARTING, Phase.SERVING)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Phase:
        """Serve until stopped; the phase it ended in (START_FAILED, FORCED or DRAINING)
        tells the daemon its exit status (commands/exits.py)."""
        self.install_signal_handlers()
        fds.prepare()
        try:
            self.bind_sockets()
        except (endpoints.EndpointError, curve.CurveError, zmq.ZMQError) as exc:
            self.fail_startup(f"cannot bind {self.config.endpoint}: {exc}")
            self.shut_down()
            return self.phase
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
                for fd in [fd for fd in events if fd in self.pool.dumps.by_pidfd]:
                    self.pool.dump_finished(fd)
                if self.gateway is not None and set(self.gateway.fds()) & set(events):
                    self.gateway_event(events)
                if self.backend in events:
                    self.read_worker_socket()
                if self.frontend in events:
                    self.read_client_socket()
                if self.conns.monitor in events:
                    self.conns.read()
                self.handle_deadlines()
                self.dispatch_jobs()
        finally:
            # Whatever is still open (start-up failed with requests queued) gets its reply.
            self.ledger.end_all(C.E_SHUTTING_DOWN, "llmsup stopped before this request ran")
            self.shut_down()
        return self.phase

    def finished(self) -> bool:
        """Stopping, and every child has exited (the HTTP gateway last: see handle_deadlines)."""
        children = [*self.workers, *([self.gateway] if self.gateway else [])]
        return self.stopping and not any(c.alive for c in children)

    def startup_complete(self) -> bool:
        gateway_ready = self.gateway is None or self.gateway.state == GatewayState.SERVING
        return gateway_ready and all(w.state == WorkerState.READY for w in self.workers)

    def gateway_event(self, events: dict) -> None:
        """The gateway said it listens, or died: while starting up, the latter fails it."""
        if self.gateway.ready_fd in events and self.gateway.ready_event():
            if self.phase is Phase.STARTING and self.startup_complete():
                self.report_ready()
        if self.gateway.pidfd in events:
            self.gateway.reap()
            if self.phase is Phase.STARTING:
                self.fail_startup(f"the http gateway {self.gateway.exit_reason} while starting")

    def register_pidfds(self) -> None:
        """Poll every worker and py-spy pidfd; a dead one is reported once, then dropped."""
        wanted = set(self.pool.by_pidfd) | set(self.pool.dumps.by_pidfd)
        wanted |= set(self.gateway.fds() if self.gateway else ())
        for fd in wanted - self.polled_fds:
            self.poller.register(fd, zmq.POLLIN)
        for fd in self.polled_fds - wanted:
            self.poller.unregister(fd)
        self.polled_fds = wanted

    def poll_timeout_ms(self) -> int | None:
        watching = self.phase is Phase.SERVING
        deadlines = (
            self.pool.next_deadline(watching),
            self.drain_deadline,
            self.gateway.next_deadline() if self.gateway else None,
        )
        timers = [t for t in deadlines if t is not None]
        if self.ledger.deadlines:
            timers.append(self.ledger.deadlines[0][0])
        if watching or self.ledger:
            timers.append(self.stats.next_report)  # heartbeats and the scoreboard header
        if self.phase is Phase.STARTING:
            timers.append(self.startup_deadline)
        if self.notify.watchdog_interval_s:
            timers.append(self.next_watchdog)
        if not timers:
            return None
        return max(0, int((min(timers) - time.monotonic()) * 1000) + 1)

    # --- events -----------------------------------------------------------------------------

    def worker_died(self, worker: Worker) -> None:
        """Its requests: retried once elsewhere if nothing was streamed yet, else worker_lost."""
        self.router.forget(worker.worker_id)
        self.ledger.worker_lost(worker, worker.exit_reason, may_retry=not self.stopping)
        if self.phase is Phase.STARTING:
            self.fail_startup(f"worker {worker.worker_id} {worker.exit_reason} while loading")
        elif self.phase is Phase.SERVING and self.no_worker_left():
            self.ledger.fail_queued(C.E_WORKER_LOST, "no worker is left to serve this request")

    def no_worker_left(self) -> bool:
        return all(w.state in (WorkerState.FAILED, WorkerState.FATAL) for w in self.workers)

    def read_worker_socket(self) -> None:
        while (frames := receive(self.backend, MAX_WORKER_FRAMES)) is not None:
            identity, frames = frames[0], frames[1:]
            try:
                report = wire.decode_report(frames)
            except wire.WireError as exc:
                self.pool.drop(identity, str(exc))
                continue
            if isinstance(report, (wire.Ready, wire.Failed)):
                if (worker := self.pool.hello(identity, report)) is not None:
                    self.worker_hello(worker, report)
                continue
            worker = self.pool.sender(identity)
            if worker is None:
                self.pool.drop(identity, "job events from no worker that said READY")
                continue
            for event in report:
                if event.kind == C.W_TOKEN:
                    self.ledger.token(worker, event)
                else:
                    self.ledger.finished(worker, event)

    def worker_hello(self, worker: Worker, report: wire.Ready | wire.Failed) -> None:
        """A worker said READY or FAILED: start-up may be complete now; a model that did
        not load answers the requests waiting for it and is not loaded again for a while."""
        if self.phase is Phase.STARTING and self.startup_complete():
            self.report_ready()
        elif isinstance(report, wire.Failed) and self.phase is Phase.SERVING:
            self.placement.load_failed(worker.model, report.reason, time.monotonic())
            self.ledger.fail_queued(
                C.E_WORKER_FAILED,
                f"model {worker.model} did not load: {report.reason}",
                model=worker.model,
            )

    def answered(self, job) -> None:
        """A worker answered a job (the ledger's hook): count it."""
        self.pool.answered(job.worker)
        now = time.monotonic()
        self.placement.used(job.model, now)
        self.stats.finished((now - job.dispatched_at) * 1000, (now - job.accepted_at) * 1000)

    def read_client_socket(self) -> None:
        while (frames := receive(self.frontend, C.FRAMES_PER_REQUEST)) is not None:
            client, frames = frames[0], frames[1:]
            try:
                self.accept_request(client, codec.parse_request(frames))
            except ProtocolError as exc:
                self.stats.rejected += 1
                request_id = codec.request_id_of(frames)
                self.send_to_client(client, codec.reply_frames(C.ERROR, request_id, exc.body()))

    def handle_deadlines(self) -> None:
        """Everything due by the clock, once per loop: start-up and drain deadlines, request
        timeouts, model placement, the pool's and the gateway's timers, the 1 s report."""
        now = time.monotonic()
        if self.notify.watchdog_interval_s and now >= self.next_watchdog:
            self.notify.watchdog()  # from the loop: a wedged loop stops these
            self.next_watchdog = now + self.notify.watchdog_interval_s
        if self.phase is Phase.STARTING and now >= self.startup_deadline:
            waiting = [str(w.worker_id) for w in self.workers if w.state != WorkerState.READY]
            self.fail_startup(
                f"worker(s) {', '.join(waiting)} not ready after {self.config.startup_timeout:g}s"
            )
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.force_stop()
        self.ledger.expire(now)
        self.conns.tick(now)  # the fd reserve; fd exhaustion, for status
        # Requests waiting: at once (one may wait for its model). Keep-alive: on the tick,
        # not on every token's wake-up.
        if self.phase is Phase.SERVING and (self.queue or now >= self.stats.next_report):
            self.place_models(now)
        self.pool.tend(
            now,
            stopping=self.stopping,
            watching=self.phase is Phase.SERVING,
            queue_empty=not self.queue,
        )
        if self.gateway is not None:
            self.gateway.restart_or_kill_when_due(now)
            if self.stopping and not any(w.alive for w in self.workers):
                self.gateway.stop()  # last: it relayed the drained requests' final frames
        if now >= self.stats.next_report:
            if self.log_sink is not None:
                self.log_sink.flush_held()  # what the rate limit held back, counted
            if self.phase is Phase.SERVING:
                gateway = self.gateway.scoreboard_fields() if self.gateway is not None else {}
                self.board.write_header(
                    queue_depth=len(self.queue),
                    queue_limit=self.config.queue_size,
                    **self.stats.report(now),
                    **gateway,
                )
            else:
                self.stats.report(now)
            self.ledger.heartbeat(loading=self.loading_models())
            self.notify.status(self.status_line())

    # --- routing ----------------------------------------------------------------------------

    def free_slots(self, model: str | None = None) -> dict[Worker, int]:
        """Each serving worker (of `model`) with a free slot: how many it has."""
        free = {}
        for w in self.workers:
            if w.state == WorkerState.READY and (model is None or w.model == model):
                if (n := self.ledger.free_slots(w)) > 0:
                    free[w] = n
        return free

    def dispatch_jobs(self) -> None:
        while self.queue:
            free = self.free_slots()
            if not free:
                return
            room: dict[str, int] = {}  # model -> most free slots one of its workers has
            for w, n in free.items():
                room[w.model] = max(room.get(w.model, 0), n)
            job = self.queue.pop_first(lambda job, room=room: room.get(job.model, 0) >= job.seqs)
            if job is None:
                return  # what waits is for models whose workers are busy or loading
            mine = {w: n for w, n in free.items() if w.model == job.model and n >= job.seqs}
            self.ledger.dispatch(job, self.router.pick(mine, job.work))

    def place_models(self, now: float) -> None:
        """Give core groups to the models requests wait for (placement.py)."""
        waiting = {job.model for job in self.queue}

        def idle(group: int) -> bool:
            w = self.workers[group]
            return w.alive and w.state == WorkerState.READY and not self.ledger.jobs_on(w)

        for move in self.placement.plan(now, waiting, idle):
            self.pool.move(move.group, move.why)

    def status_line(self) -> str:
        """One line for systemd's STATUS= (`systemctl status`)."""
        ready = sum(w.state == WorkerState.READY for w in self.workers)
        running = len(self.ledger) - len(self.queue)
        return (
            f"{self.phase.value}: {ready}/{len(self.workers)} workers ready, "
            f"{running} running, {len(self.queue)}/{self.config.queue_size} queued"
        )

    def loading_models(self) -> set[str]:
        """Models a group is assigned to whose worker there is not serving yet."""
        return {
            m
            for g, m in enumerate(self.placement.assignment)
            if self.workers[g].model != m or self.workers[g].state != WorkerState.READY
        }

    def reply(self, client: bytes, request_id: bytes, body: dict) -> None:
        self.send_to_client(client, codec.reply_frames(C.DONE, request_id, body))

    def send_to_client(self, client: bytes, frames: list[bytes]) -> str | None:
        """Send, or say why the client cannot be reached (the ledger then stops its jobs)."""
        try:
            self.frontend.send_multipart([client, *frames], zmq.NOBLOCK)
            return None
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client disconnected. EAGAIN: it stopped reading and its
            # frames reached CLIENT_SNDHWM. Either way nobody will read what it asked for.
            return "disconnected" if exc.errno == zmq.EHOSTUNREACH else "stopped reading"

    def send_to_worker(self, worker: Worker, frames: list[bytes]) -> None:
        try:
            self.backend.send_multipart([worker.identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # Not connected yet or already gone; its pidfd will tell us if it died.
            log.warning(
                "message to worker %d dropped: %s",
                worker.worker_id,
                exc.strerror,
                extra={"worker": worker.worker_id},
            )


def worker_args(config: Config, endpoint: str) -> list[str]:
    """The command line every worker shares (each adds its id, cores, model, segments)."""
    args = {
        "--endpoint": endpoint,
        "--ctx-size": config.ctx_size,
        "--slots": config.slots_per_worker,
        "--prefill-chunk": config.prefill_chunk,
        "--supervisor-pid": os.getpid(),
        "--log-format": config.log_format,
        "--log-level": config.log_level,
    }
    return [str(part) for flag_value in args.items() for part in flag_value]
