"""File-descriptor pressure: the supervisor's limit, its reserve, and refused connections.

Every connection a peer opens to a tcp (or ipc) endpoint costs the supervisor one fd,
taken by libzmq's I/O thread as it accepts; nothing bounds how many. So:

- at start the soft RLIMIT_NOFILE is raised to the hard limit (`raise_limit`);
- a few fds are held open on /dev/null (`Reserve`): when opening something the loop
  needs (a worker's pidfd after it was spawned) fails with EMFILE, one is given up and
  the open retried; the reserve is refilled once fds are free again;
- everything else the loop opens (watchdog samples of /proc, py-spy, a respawn) is
  skipped on EMFILE/ENFILE and tried again at its next turn (`exhausted`): never fatal;
- a socket monitor on the frontend counts the connections libzmq could not accept
  (EVENT_ACCEPT_FAILED) and the peers refused at the handshake (CURVE), for `status`.
  While fds are exhausted libzmq retries the accept in a loop, so the events come fast:
  they are counted, not logged one by one (one warning per interval at most).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("llmsup.supervisor")

RESERVE_FDS = 16
WARN_INTERVAL_S = 10.0
EXHAUSTION = (errno.EMFILE, errno.ENFILE)


def exhausted(exc: BaseException) -> bool:
    """An OSError (or ZMQError) that says the process or the system is out of fds."""
    return getattr(exc, "errno", None) in EXHAUSTION


def raise_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one (infinite: fs.nr_open); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_count() -> int | None:
    """Open fds of this process (None when even that cannot be read just now)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd
    except OSError:
        return None


class Reserve:
    """Fds held on /dev/null, given up one at a time when an open must not fail."""

    def __init__(self, size: int = RESERVE_FDS):
        self.size = size
        self.fds: list[int] = []
        self.refill()

    def refill(self) -> None:
        while len(self.fds) < self.size:
            try:
                self.fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # still short of fds: next time

    def call(self, fn, *args):
        """fn(*args); on EMFILE give up a reserved fd and try again (as long as any is left)."""
        while True:
            try:
                return fn(*args)
            except OSError as exc:
                if not exhausted(exc) or not self.fds:
                    raise
                os.close(self.fds.pop())

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


reserve = Reserve(0)  # the process's; filled by prepare()


def prepare() -> tuple[int, int]:
    """At supervisor start: raise the limit, fill the reserve; returns (soft, hard)."""
    soft, hard = raise_limit()
    reserve.size = RESERVE_FDS
    reserve.refill()
    return soft, hard


class ConnectionWatch:
    """Counts refused connections on a socket through its monitor (read in the loop)."""

    EVENTS = (zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)  # fmt: skip

    def __init__(self, sock: zmq.Socket):
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.accept_failed = 0
        self.auth_failed = 0
        self.last_accept_error: str | None = None
        self.last_refused_at: float | None = None
        self.warned_at = 0.0
        self.unwarned = 0

    def read(self, most: int = 10000) -> None:
        for _ in range(most):
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                event = parse_monitor_message(frames)
            except Exception:
                continue
            self.count(event["event"], event["value"])
        self.warn()

    def count(self, event: int, value: int) -> None:
        if event == zmq.EVENT_ACCEPT_FAILED:
            self.accept_failed += 1
            self.unwarned += 1
            self.last_accept_error = errno.errorcode.get(value, str(value))
            self.last_refused_at = time.monotonic()
        else:
            self.auth_failed += 1

    def warn(self) -> None:
        now = time.monotonic()
        if self.unwarned and now - self.warned_at >= WARN_INTERVAL_S:
            log.warning("%d connection(s) could not be accepted (%s) in the last %.0fs; open "
                        "fds %s of %d", self.unwarned, self.last_accept_error,
                        min(now - self.warned_at, now), open_count(), limit())  # fmt: skip
            self.warned_at, self.unwarned = now, 0

    def status(self) -> dict:
        ago = self.last_refused_at
        refusing = ago is not None and time.monotonic() - ago < 5.0
        return {
            "refusing": refusing,  # a connection could not be accepted in the last 5 s
            "accept_failed": self.accept_failed,
            "last_accept_error": self.last_accept_error,
            "last_refused_s_ago": round(time.monotonic() - ago, 1) if ago else None,
            "handshake_refused": self.auth_failed,
            "open_fds": open_count(),
            "fd_limit": limit(),
        }

    def close(self) -> None:
        self.monitor.close(0)
