"""The HTTP gateway process as the supervisor sees it: spawn, notice ready, restart, stop.

The gateway (`python -m llmsup.supervisor.gateway`) is a client of the public ZeroMQ
protocol like any other; the supervisor only keeps it alive. It is watched like a worker:
its death is seen at once through a pidfd, it is restarted with the same backoff, and too
many crashes in the crash-loop window make it FATAL. It reports that it listens by
writing a byte to a pipe (`--ready-fd`), which the supervisor's loop polls. On stop it is
the last child to go: it goes on answering (shutting_down, then the last tokens of the
requests that drain) until the workers have exited.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import signal
import subprocess
import sys
import time

from llmsup.protocol import scoreboard as sb
from llmsup.supervisor.core.watchdog import Limits
from llmsup.supervisor.core.workerproc import TERM_GRACE_S, respawn_delay
from llmsup.supervisor.host import fds
from llmsup.supervisor.host.netaddr import is_loopback, split_host_port

log = logging.getLogger("llmsup.supervisor")


class GatewayState(enum.StrEnum):
    """The gateway process's state, as `status` and `top` show it (scoreboard.GATEWAY_STATES
    numbers them in this order)."""

    STARTING = "starting"
    SERVING = "serving"  # it said it listens
    DEAD = "dead"  # exited; a restart is due
    FATAL = "fatal"  # crash loop: given up on
    STOPPED = "stopped"


class GatewayProcess:
    def __init__(self, argv: list[str], limits: Limits, log_fd: int):
        self.argv = argv  # the gateway's arguments (endpoint, listen address, key file)
        self.limits = limits
        self.log_fd = log_fd
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.ready_fd: int | None = None  # read end of the gateway's ready pipe
        self.state = GatewayState.STARTING
        self.restarts = -1
        self.exit_reason: str | None = None
        self.crashes: collections.deque[float] = collections.deque()
        self.respawn_at: float | None = None
        self.kill_at: float | None = None
        self.stopping = False

    @property
    def alive(self) -> bool:
        return self.pidfd is not None

    @property
    def url(self) -> str:
        return f"http://{self.argv[self.argv.index('--listen') + 1]}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def remote(self) -> bool:
        """Listening beyond loopback (which start allows only with a key)."""
        host = split_host_port(self.argv[self.argv.index("--listen") + 1])
        return host is None or not is_loopback(host[0])

    def reload(self) -> None:
        """SIGHUP: it re-reads its key and log level from its --live-file."""
        if self.alive and self.state == GatewayState.SERVING:
            self.proc.send_signal(signal.SIGHUP)

    def fds(self) -> list[int]:
        """The fds for the supervisor's poller: its pidfd and, until it is ready, its pipe."""
        return [fd for fd in (self.pidfd, self.ready_fd) if fd is not None]

    def spawn(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self.restarts += 1
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmsup.supervisor.gateway",
                *self.argv,
                "--ready-fd",
                str(write_fd),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log_fd,
            stderr=self.log_fd,
            pass_fds=(write_fd,),
            close_fds=True,
        )
        os.close(write_fd)
        try:  # out of fds: a reserved one; none left: it cannot be watched, so not kept
            self.pidfd = fds.reserve.call(os.pidfd_open, self.proc.pid)
        except OSError:
            os.close(read_fd)
            self.proc.kill()
            self.proc.wait()
            raise
        self.ready_fd = read_fd
        self.state = GatewayState.STARTING
        log.info("http gateway spawned: pid %d", self.proc.pid, extra={"pid": self.proc.pid})

    def ready_event(self) -> bool:
        """Its ready pipe fired: True if it said it listens (EOF: it died first)."""
        data = os.read(self.ready_fd, 1)
        os.close(self.ready_fd)
        self.ready_fd = None
        if data:
            self.state = GatewayState.SERVING
            log.info("http gateway ready: pid %d", self.pid, extra={"pid": self.pid})
        return bool(data)

    def reap(self) -> None:
        """Its pidfd fired: collect it; restart it after a backoff unless stopping or FATAL."""
        code = self.proc.wait()
        os.close(self.pidfd)
        self.pidfd = None
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        self.kill_at = None
        if self.stopping:
            self.state = GatewayState.STOPPED
            log.info("http gateway (pid %d) %s", self.proc.pid, how, extra={"pid": self.proc.pid})
            return
        self.exit_reason = how
        now = time.monotonic()
        delay = respawn_delay(self.crashes, now, self.limits)
        if delay is None:
            self.state = GatewayState.FATAL
            self.exit_reason = f"crash loop: {len(self.crashes)} crashes, last: {how}"
            log.error("http gateway is FATAL: %s", self.exit_reason)
            return
        self.state = GatewayState.DEAD
        self.respawn_at = now + delay
        log.warning(
            "http gateway (pid %d) %s; restarts in %.1fs",
            self.proc.pid,
            how,
            delay,
            extra={"pid": self.proc.pid},
        )

    def stop(self) -> None:
        """SIGTERM now (it cancels what it still has in flight and exits), SIGKILL later."""
        self.stopping = True
        self.respawn_at = None
        if self.alive and self.kill_at is None:
            self.proc.send_signal(signal.SIGTERM)
            self.kill_at = time.monotonic() + TERM_GRACE_S
        elif not self.alive:
            self.state = GatewayState.STOPPED

    def next_deadline(self) -> float | None:
        times = [t for t in (self.respawn_at, self.kill_at) if t is not None]
        return min(times) if times else None

    def restart_or_kill_when_due(self, now: float) -> None:
        """Restart it once its backoff is over; SIGKILL it if SIGTERM did not stop it."""
        if self.respawn_at is not None and now >= self.respawn_at:
            self.respawn_at = None
            try:
                self.spawn()
            except OSError as exc:
                if not fds.exhausted(exc):
                    raise
                self.respawn_at = now + 1.0  # out of fds: again in a second
                log.warning("http gateway not restarted: %s; retrying in 1s", exc)
        if self.kill_at is not None and now >= self.kill_at and self.alive:
            log.warning("http gateway still alive after SIGTERM; SIGKILL")
            self.proc.kill()
            self.kill_at = None

    def scoreboard_fields(self) -> dict:
        """Its line in the scoreboard header, for `llmsup top`."""
        return {
            "gateway_pid": self.pid if self.alive else 0,
            "gateway_state": sb.GATEWAY_STATES.index(self.state),
            "gateway_restarts": max(0, self.restarts),
        }

    def status(self) -> dict:
        return {
            "pid": self.pid if self.alive else None,
            "url": self.url,
            "state": self.state,
            "restarts": max(0, self.restarts),
            "last_exit": self.exit_reason,
        }
