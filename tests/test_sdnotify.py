"""systemd's notifications (issue 27 item 4) from a real `llmsup start --foreground` to a
real NOTIFY_SOCKET datagram listener, as systemd would receive them: READY=1 only once
every worker serves, STATUS=, WATCHDOG=1 from the event loop (a stopped loop stops them),
RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload, STOPPING=1 when the drain
begins; the children never see the socket. tests/test_systemd.py runs the same under a
real systemd where one can run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from llmsup.protocol.client import Client
from llmsup.supervisor.host.sdnotify import Notifier

from .conftest import STATE_DIRS

pytestmark = pytest.mark.timeout(240)

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


class Listener:
    """NOTIFY_SOCKET: every datagram received, as (monotonic time, {field: value})."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def read(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))

    def until(self, predicate, timeout: float) -> dict[str, str] | None:
        """Read until a message satisfies predicate; that message, or None at the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = len(self.messages)
            self.read(max(0.01, deadline - time.monotonic()))
            for _, fields in self.messages[before:]:
                if predicate(fields):
                    return fields
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def foreground():
    """`llmsup start --foreground` under a NOTIFY_SOCKET listener, stopped at the end."""
    state_dir = tempfile.mkdtemp(prefix="llmsup-t", dir="/tmp")
    STATE_DIRS.append(state_dir)
    listener = Listener(state_dir)
    env = {**os.environ, "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    args = ["--workers", "1", "--slots-per-worker", "2", "--cache-mb", "64"]
    args += ["--model", "smollm2-135m-instruct", "--state-dir", state_dir]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsup.supervisor", "start", "--foreground", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    yield proc, listener, state_dir
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=60)
    proc.stdout.close()
    listener.close()
    shutil.rmtree(state_dir, ignore_errors=True)


def test_ready_status_watchdog_reload_and_stopping(foreground):
    proc, listener, state_dir = foreground
    ready = listener.until(lambda f: f.get("READY") == "1", timeout=120)
    assert ready is not None, [m for _, m in listener.messages]
    # READY=1 came once every worker serves: a request right now is answered.
    with Client(state_dir=state_dir, timeout=30) as client:
        status = client.status()
        assert all(w["state"] == "ready" for w in status["workers"])
        assert client.complete("Hi", max_tokens=4, temperature=0).text()
    assert "1/1 workers ready" in ready["STATUS"]
    before = [m for _, m in listener.messages[:-1]]
    assert not any(m.get("READY") for m in before), "READY=1 before the workers were ready"

    # The children (worker, py-spy, gateway) never see the socket: only the main process
    # may notify (NotifyAccess=main).
    for child in psutil.Process(proc.pid).children(recursive=True):
        assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{child.pid}/environ").read_bytes()

    # WATCHDOG=1 about every half of WATCHDOG_USEC, and STATUS= lines each second.
    start = len(listener.messages)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        listener.read(0.2)
    window = [m for _, m in listener.messages[start:]]
    pings = [m for m in window if m.get("WATCHDOG") == "1"]
    assert 4 <= len(pings) <= 8, len(pings)
    assert any("STATUS" in m for m in window)

    # A stopped event loop stops the pings (systemd then kills and restarts it).
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(0.3)
    stopped_at = time.monotonic()
    while time.monotonic() < stopped_at + 2.5:
        listener.read(0.2)
    assert not [t for t, m in listener.messages if t > stopped_at and m.get("WATCHDOG")]
    os.kill(proc.pid, signal.SIGCONT)
    assert listener.until(lambda f: f.get("WATCHDOG") == "1", timeout=3) is not None

    # A reload: RELOADING=1 with the monotonic clock, then READY=1.
    os.kill(proc.pid, signal.SIGHUP)
    reloading = listener.until(lambda f: f.get("RELOADING") == "1", timeout=10)
    assert reloading is not None
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < 10_000_000
    assert listener.until(lambda f: f.get("READY") == "1", timeout=10) is not None

    # A drain: STOPPING=1, then the process exits 0.
    proc.send_signal(signal.SIGTERM)
    stopping = listener.until(lambda f: f.get("STOPPING") == "1", timeout=10)
    assert stopping is not None and "draining" in stopping.get("STATUS", "")
    assert proc.wait(timeout=60) == 0


def test_the_notifier_is_inert_without_systemd_and_takes_its_variables():
    env = {"PATH": "/bin"}
    notifier = Notifier.from_env(env)
    assert notifier.sock is None and not notifier.ready() and not notifier.watchdog()
    env = {"NOTIFY_SOCKET": "@abstract-name", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    notifier = Notifier.from_env(env)
    # Taken out of the environment; the watchdog is for another pid: not pinged by us.
    assert env == {} and notifier.address == "\0abstract-name"
    assert notifier.watchdog_interval_s is None
    notifier.close()
