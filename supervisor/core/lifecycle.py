"""The supervisor's phases: start-up (signal handlers, sockets, the ready report), the drain
and the forced stop, shut-down, and what each signal does. A mixin of Supervisor
(server.py), whose loop calls these; they change its phase and nothing else decides it."""

from __future__ import annotations

import enum
import logging
import os
import signal
import time

import zmq

from llmsup.protocol import constants as C
from llmsup.supervisor.host import curve, endpoints, fds, logs, signals

log = logging.getLogger("llmsup.supervisor")

# Frames queued towards one client before it counts as not reading: a few seconds of
# tokens for many streams. Past it a send would block, so the client's requests end.
CLIENT_SNDHWM = 4096
CLIENT_RCVHWM = 1000  # requests buffered from one client before ZeroMQ stops reading it


class Phase(enum.Enum):
    STARTING = "starting"  # workers loading; requests are queued
    SERVING = "serving"
    DRAINING = "draining"  # stop asked: no new requests, the accepted ones finish
    FORCED = "forced"  # the drain time ran out: what was open was failed
    START_FAILED = "start_failed"  # never served: a worker failed or it was stopped first


class Lifecycle:
    def install_signal_handlers(self) -> None:
        # Handlers do nothing: the wakeup fd carries the signal number into the loop.
        signals.install(self.signal_w)  # every catchable fatal-by-default one (signals.py)
        self.poller.register(self.signal_r, zmq.POLLIN)

    def bind_sockets(self) -> None:
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises
        self.frontend.setsockopt(zmq.MAXMSGSIZE, C.MAX_FRAME_BYTES)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.frontend.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.MAXMSGSIZE, C.MAX_FRAME_BYTES)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(self.state.worker_endpoint)
        endpoints.claim(self.config.endpoint)  # a stale ipc socket goes, anything else: refused
        self.curve = curve.serve(
            self.ctx, self.frontend, self.state, self.config.endpoint, self.config.tcp_auth
        )
        self.conns = fds.ConnectionWatch(self.frontend)
        self.frontend.bind(self.config.endpoint)
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.conns.monitor, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)

    def report_ready(self) -> None:
        self.phase = Phase.SERVING
        info = {
            "pid": os.getpid(),
            "instance": self.instance,
            "endpoint": self.config.endpoint,
            "tcp_auth": self.config.tcp_auth if self.config.endpoint.startswith("tcp:") else None,
            "model": self.config.default_model,
            "models": list(self.config.models),
            "scoreboard": self.board_name,
            "cache": self.arena_name,
            "http": self.gateway.url if self.gateway is not None else None,
            "workers": [w.status(self.ledger.jobs_on(w)) for w in self.workers],
        }
        try:
            self.state.write_json(self.state.info_file, info)
        except OSError as exc:
            self.fail_startup(logs.DiskError(logs.describe_os_error(exc, path=exc.filename)))
            return
        log.info("ready: %d workers, endpoint %s", len(self.workers), self.config.endpoint)
        self.announce(True, info)
        self.notify.ready(self.status_line())

    def announce(self, ok: bool, detail) -> None:
        on_ready, self.on_ready = self.on_ready, None  # start-up ends once, either way
        if on_ready:
            on_ready(ok, detail)

    def fail_startup(self, reason: str) -> None:
        log.error("start-up failed: %s", reason)
        self.notify.stopping(f"start-up failed: {reason}")
        self.announce(False, reason)
        self.phase = Phase.START_FAILED
        self.pool.kill_all()

    def begin_stop(self, drain_timeout: float) -> None:
        if self.phase is Phase.STARTING:
            self.fail_startup("stopped before it was ready")
            return
        deadline = time.monotonic() + drain_timeout
        if self.phase is Phase.SERVING:
            self.phase = Phase.DRAINING
            running = len(self.ledger) - len(self.queue)
            log.info(
                "stopping: draining %d running and %d queued requests", running, len(self.queue)
            )
            self.notify.stopping(self.status_line())
        self.drain_deadline = min(deadline, self.drain_deadline or deadline)

    def force_stop(self) -> None:
        """Drain time is up: every request still open gets its terminal error now."""
        self.phase = Phase.FORCED
        self.failed_on_stop += self.ledger.end_all(
            C.E_SHUTTING_DOWN, "llmsup stopped before this request finished"
        )
        self.pool.kill_all()
        self.drain_deadline = None

    def shut_down(self) -> None:
        self.pool.reap_all()
        if self.conns is not None:
            self.conns.close()
        if self.curve is not None:
            self.curve.stop()
        self.frontend.close(0)
        self.backend.close(0)
        self.ctx.term()
        self.board.close()
        if self.arena is not None:
            self.arena.close()
        os.close(self.signal_r)
        os.close(self.signal_w)
        signal.set_wakeup_fd(-1)
        self.notify.close()

    # --- signals ----------------------------------------------------------------------------

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
            else:
                self.other_signal(signum)

    def other_signal(self, signum: int) -> None:
        """SIGHUP reloads the settings, SIGUSR2 replaces the workers, SIGUSR1 reopens the
        log; the rest are logged."""
        if signum == signals.RELOAD and not self.stopping:
            self.reload_settings()
        elif signum == signals.RELOAD:
            log.warning("SIGHUP while %s: not reloaded", self.phase.value)
        elif signum == signals.REPLACE and self.phase is Phase.SERVING:
            self.pool.replace_all("restart-workers")
        elif signum == signals.REPLACE:
            log.warning("SIGUSR2 while %s: no workers replaced", self.phase.value)
        elif signum == signals.REOPEN_LOG:
            error = self.log_sink.reopen(self.state.open_log) if self.log_sink else "no log"
            log.log(logging.WARNING if error else logging.INFO, error or "SIGUSR1: log reopened")
        elif signum in signals.WARN:
            log.warning(
                "%s received (a resource limit was reached); serving goes on", signals.name(signum)
            )
        else:
            log.warning(f"{signals.name(signum)} received: ignored")  # one rate limit each
