"""Fixtures: a real supervisor on the real default model, and a leftover check at the end."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol.client import Client
from llmsup.supervisor.configfile import FILE_SETTINGS
from llmsup.supervisor.host.statedir import StateDir

# tools/ holds scripts, not a package: the helpers that tests share with perf/ and tools/
# (testkit) and the fleet lab (fleetlab) are imported from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import testkit  # noqa: E402

# State dirs are short /tmp/llmsup-t* paths: ipc socket paths are limited to 107 bytes.
STATE_DIRS: list[str] = []  # every instance's, to check for leftovers at the end
SEGMENTS: set[str] = set()  # every shared-memory segment their supervisors recorded


def pytest_configure(config) -> None:
    # A killed session never reaches its fixtures' teardown, and llmsup daemons outlive it:
    # tools/reaper.py undoes what the session recorded with testkit.leave_nothing.
    testkit.start_reaper()
    # The suite runs on defaults and its own flags: not on a config file or LLMSUP_*
    # variables of the machine or the developer (tests/test_config.py sets its own).
    os.environ["LLMSUP_CONFIG"] = str(Path(__file__).resolve().parent / "data" / "empty.toml")
    for setting in FILE_SETTINGS.values():
        if setting.name != "state-dir":
            os.environ.pop(setting.env, None)


def llmsup(
    *args: str, timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmsup.supervisor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def our_processes() -> list[psutil.Process]:
    """Supervisors and workers started by this test session (found by their state dirs)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        # Only this session's state dirs: other test runs may share the machine.
        if "llmsup." in cmd and any(d in cmd for d in STATE_DIRS):
            found.append(proc)
    return found


class Instance:
    """One llmsup started with `llmsup start` in its own state dir."""

    def __init__(self, *start_args: str, env: dict | None = None):
        self.state_dir = tempfile.mkdtemp(prefix="llmsup-t", dir="/tmp")
        testkit.leave_nothing("state-dir", self.state_dir)
        STATE_DIRS.append(self.state_dir)
        self.start_args = start_args
        self.env = env

    def start(self) -> subprocess.CompletedProcess:
        # Tests count capacity in workers: one sequence each unless a test asks for slots.
        slots = () if "--slots-per-worker" in self.start_args else ("--slots-per-worker", "1")
        # A small prefix cache: the default (a sixteenth of RAM) is allocated up front.
        cache = () if "--cache-mb" in self.start_args else ("--cache-mb", "64")
        # The suite's model: Gemma 3 (sliding-window attention, which the prefix-cache tests
        # are about), unless a test names its own.
        model = () if "--model" in self.start_args else ("--model", "gemma3-270m")
        result = llmsup(
            "start",
            "--state-dir",
            self.state_dir,
            *slots,
            *cache,
            *model,
            *self.start_args,
            env=self.env,
        )
        self.segments()
        return result

    def segments(self) -> dict[str, str]:
        """The shared-memory segments its supervisor recorded (kind -> random name)."""
        names = StateDir(Path(self.state_dir)).read_segments()
        SEGMENTS.update(names)
        return {kind: name for name, kind in names.items()}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return llmsup(*args, "--state-dir", self.state_dir)

    def top(self) -> dict:
        result = self.cli("top", "--json")
        assert result.returncode == 0, result.stderr
        return orjson.loads(result.stdout)

    def log(self) -> str:
        return Path(self.state_dir, "supervisor.log").read_text(errors="replace")

    def stop(self, *args: str) -> subprocess.CompletedProcess:
        return llmsup("stop", "--state-dir", self.state_dir, *args)

    def client(self, timeout: float = 60) -> Client:
        return Client(state_dir=self.state_dir, timeout=timeout)

    def status(self) -> dict:
        with self.client(timeout=10) as c:
            return c.status()

    def dealer(self, ctx: zmq.Context | None = None) -> zmq.Socket:
        """A raw DEALER on its client endpoint (supervisor.json), for frame-level tests."""
        info = orjson.loads(Path(self.state_dir, "supervisor.json").read_bytes())
        return testkit.dealer(info["endpoint"], ctx)

    @property
    def pid(self) -> int:
        return int(Path(self.state_dir, "supervisor.pid").read_text())

    def cleanup(self) -> None:
        """Stop whatever is left and remove the state dir."""
        self.segments()
        if Path(self.state_dir, "supervisor.json").exists():
            self.stop("--timeout", "5")
        shutil.rmtree(self.state_dir, ignore_errors=True)


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture
def instance_factory():
    made: list[Instance] = []

    def make(*start_args: str, env: dict | None = None) -> Instance:
        inst = Instance(*start_args, env=env)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.cleanup()


@pytest.fixture
def started(instance_factory):
    """start(*start_args, env=None): an instance started with these arguments (the test
    fails there if `llmsup start` does)."""

    def start(*start_args: str, env: dict | None = None) -> Instance:
        inst = instance_factory(*start_args, env=env)
        result = inst.start()
        assert result.returncode == 0, result.stderr
        return inst

    return start


@contextlib.contextmanager
def launched(*args: str, http: bool = False) -> Iterator[Instance]:
    """A supervisor started with these arguments, cleaned up after (also when its start
    fails). http: with the gateway on a free loopback port, its base URL in `inst.url`."""
    url = None
    if http:
        port = testkit.free_port()
        args = (*args, "--http", f"127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
    inst = Instance(*args)
    inst.url = url
    try:
        result = inst.start()
        assert result.returncode == 0, result.stderr
        yield inst
    finally:
        inst.cleanup()


@contextlib.contextmanager
def dealer_of(inst: Instance) -> Iterator[zmq.Socket]:
    """A raw DEALER on `inst`'s client endpoint, with a context of its own, closed after."""
    ctx = zmq.Context()
    sock = inst.dealer(ctx)
    try:
        yield sock
    finally:
        sock.close(0)
        ctx.term()


def frames_until_end(sock: zmq.Socket, rid: bytes, timeout_s: float = 120) -> list[tuple]:
    """Every reply (kind, body) of request `rid` on a raw DEALER, up to and including its
    terminal one; other requests' replies are skipped."""
    got: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        assert sock.poll(max(0, (deadline - time.monotonic()) * 1000)), f"no end: {got[-3:]}"
        _, kind, request_id, raw = sock.recv_multipart()
        if request_id == rid:
            got.append((kind, orjson.loads(raw)))
            if kind in C.TERMINAL_KINDS:
                return got


@pytest.fixture(scope="session")
def served():
    """The shared supervisor: 2 workers x 1 core on the default model, a queue of 1."""
    inst = Instance("--workers", "2", "--cores-per-worker", "1", "--queue-size", "1")
    result = inst.start()
    assert result.returncode == 0, result.stderr
    yield inst
    stopped = inst.stop()
    assert stopped.returncode == 0, stopped.stderr
    shutil.rmtree(inst.state_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    # After every supervisor was stopped: no process, socket dir or shm segment remains.
    wait_until(lambda: not our_processes(), timeout=10)
    left = our_processes()
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"
    assert not [d for d in STATE_DIRS if os.path.exists(d)], "state dirs left behind"
    assert not [s for s in os.listdir("/dev/shm") if s in SEGMENTS]


@pytest.fixture(scope="module")
def other():
    """A throwaway second user (no home, no login), removed after this module."""
    if os.geteuid() != 0:
        pytest.skip("making a second user needs root (useradd)")
    if not shutil.which("useradd") or not shutil.which("userdel"):
        pytest.skip("useradd/userdel are not installed")
    name = f"llmsupt{secrets.token_hex(3)}"
    made = subprocess.run(
        ["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", name], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    testkit.leave_nothing("user", name)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
