"""File-descriptor pressure: the supervisor's limit, its reserve, and refused connections.

Every connection a peer opens to a tcp (or ipc) endpoint costs the supervisor one fd,
taken by libzmq's I/O thread as it accepts; nothing bounds how many. So:

- at start the soft RLIMIT_NOFILE is raised to the hard limit (`raise_limit`);
- a few fds are held open on /dev/null (`Reserve`): when opening something the loop
  needs (a worker's pidfd after it was spawned) fails with EMFILE, one is given up and
  the open retried; the reserve is refilled once fds are free again;
- everything else the loop opens (watchdog samples of /proc, py-spy, a respawn) is
  skipped on EMFILE/ENFILE and tried again at its next turn (`exhausted`): never fatal;
- `status` says when connections are being refused: a once-a-second check of the fds
  left (ConnectionWatch says why not a monitor of EVENT_ACCEPT_FAILED), logged once per
  interval with a count; and a socket monitor counts peers refused at the handshake.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time

import zmq

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
    """What `status` says about connections: peers refused at the handshake (CURVE), from
    a socket monitor read in the loop, and fd exhaustion, checked once a second.

    Not EVENT_ACCEPT_FAILED: while the fds are exhausted libzmq's I/O thread retries the
    accept in a tight loop and reports every failure; measured with the limit at 128 and
    185 idle connections, the monitor delivered 734,002 events in 3 s and reading them
    kept the supervisor's loop busy (126% CPU with the I/O thread). Instead the loop counts
    its own once-a-second check: fewer than FREE_MARGIN fds free (or none at all, EMFILE)
    means libzmq cannot accept either: new connections wait in the kernel's listen backlog
    (then are refused by it) until fds are free again.
    """

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    FREE_MARGIN = 4
    CHECK_INTERVAL_S = 1.0

    def __init__(self, sock: zmq.Socket):
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.handshake_refused = 0
        self.exhausted_checks = 0  # once-a-second checks that found no fd free
        self.exhausted_since: float | None = None
        self.last_exhausted_at: float | None = None
        self.next_check = 0.0
        self.warned_at: float | None = None
        self.unwarned = 0

    def read(self, most: int = 1000) -> None:
        for _ in range(most):
            try:
                self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handshake_refused += 1

    def tick(self, now: float) -> None:
        """Once per loop: refill the fd reserve; once a second, check the fds left."""
        reserve.refill()
        if now < self.next_check:
            return
        self.next_check = now + self.CHECK_INTERVAL_S
        used, most = open_count(), limit()
        if used is not None and used + self.FREE_MARGIN < most:
            if self.exhausted_since is not None:
                log.warning(
                    "file descriptors free again after %.0f s without", now - self.exhausted_since
                )
            self.exhausted_since = None
            return
        self.exhausted_checks += 1
        self.unwarned += 1
        self.last_exhausted_at = now
        if self.exhausted_since is None:
            self.exhausted_since = now
        if self.warned_at is None or now - self.warned_at >= WARN_INTERVAL_S:
            log.warning(
                "out of file descriptors (limit %d): connections cannot be accepted; "
                "%d check(s) found none free since the last warning",
                most,
                self.unwarned,
            )
            self.warned_at, self.unwarned = now, 0

    def status(self) -> dict:
        now = time.monotonic()
        at = self.last_exhausted_at
        return {
            "refusing": self.exhausted_since is not None,  # no fd free at the last check
            "fd_exhausted_checks": self.exhausted_checks,
            "last_fd_exhausted_s_ago": round(now - at, 1) if at is not None else None,
            "handshake_refused": self.handshake_refused,
            "open_fds": open_count(),
            "fd_limit": limit(),
        }

    def close(self) -> None:
        self.monitor.close(0)
