"""Helpers that the tests, the benchmarks (perf/) and the lab tools (tools/) share, written
once. tools/ holds scripts, not a package: tests/conftest.py and the perf scripts put this
folder on sys.path, as they already did for fleetlab (a module of the installed llmsup
would ship test code to users)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import psutil
import zmq


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
