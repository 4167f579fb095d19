"""Helpers that the tests, the benchmarks (perf/) and the lab tools (tools/) share, written
once. tools/ holds scripts, not a package: tests/conftest.py and the perf scripts put this
folder on sys.path, as they already did for fleetlab (a module of the installed llmsup
would ship test code to users)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import zmq

# The file a test session's reaper (tools/reaper.py) undoes if the session dies early.
REGISTRY_ENV = "LLMSUP_TEST_REGISTRY"


def start_reaper() -> None:
    """Start tools/reaper.py for this process (a test session) and point REGISTRY_ENV at its
    registry, so that what leave_nothing() records goes even if this process is killed."""
    fd, registry = tempfile.mkstemp(prefix="llmsup-reaper-", suffix=".txt", dir="/tmp")
    os.close(fd)
    os.environ[REGISTRY_ENV] = registry
    reaper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")
    subprocess.Popen(
        [sys.executable, reaper, str(os.getpid()), registry],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the session's process group: it outlives a kill
    )


def leave_nothing(kind: str, *args: object) -> None:
    """Record something made for a test ("state-dir", "pid", "netns", "user", "dir" or
    "cgroup", see tools/reaper.py) for the session's reaper; nothing outside a test
    session."""
    registry = os.environ.get(REGISTRY_ENV)
    if registry:
        with open(registry, "a") as f:
            f.write(" ".join(map(str, (kind, *args))) + "\n")


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dealer(endpoint: str, ctx: zmq.Context | None = None) -> zmq.Socket:
    """A DEALER connected to `endpoint` that drops what it has not sent when closed."""
    sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class PeakRss(threading.Thread):
    """The highest RSS of a process, sampled every 10 ms until stop()."""

    def __init__(self, proc: psutil.Process):
        super().__init__(daemon=True)
        self.proc, self.peak, self.running = proc, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak
