"""llmsup as a systemd service (issue 27), under a real systemd: the unit `llmsup
service-unit` prints, run by systemd 252 booted as PID 1 of namespaces of its own
(tools/systemdlab.py; the machine's /etc, /run, /tmp, /dev/shm and cgroups are not
touched). `systemctl start` returns when llmsup answers, `systemctl reload` under load
fails nothing, systemd's watchdog restarts a stopped supervisor, `systemctl stop` drains.
Where systemd cannot be booted, these skip and say why. tests/test_sdnotify.py checks the
same notifications against a bare NOTIFY_SOCKET, without systemd.

Each test boots its own lab (about a second) and its own llmsup: 1 worker, 2 slots, a
512-token context, the catalog's default model (SmolLM2), so a test that breaks the
service breaks no other."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

import llmsup
from llmsup.protocol.client import Client, LlmsupError
from llmsup.supervisor.models.catalog import DEFAULT_MODEL, catalog_path

from .conftest import STATE_DIRS, wait_until
from .conftest import llmsup as llmsup_cli

from systemdlab import LabError, SystemdLab  # tools/, on sys.path (conftest)  # isort: skip

pytestmark = pytest.mark.timeout(300)

# The service runs the venv's `llmsup` entry point with this checkout's package first on
# its path (what the test process imports), as `llmsup start` does for the other tests.
LLMSUP_EXE = Path(sys.executable).parent / "llmsup"
SRC = Path(llmsup.__file__).resolve().parents[1]
GREEDY = {"temperature": 0.0}


def service_unit(config: Path, state_dir: Path, watchdog_sec: int = 30) -> str:
    """The unit text `llmsup service-unit` prints for this config and state dir."""
    result = llmsup_cli(
        "service-unit",
        "--config", str(config),
        "--state-dir", str(state_dir),
        "--watchdog-sec", str(watchdog_sec),
        "--exec", str(LLMSUP_EXE),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


class Service:
    """llmsup.service in a lab: its config and state dir live in the lab's share."""

    def __init__(self, lab: SystemdLab, watchdog_sec: int = 30, settings: str = ""):
        self.lab = lab
        self.state_dir = lab.share / "state"
        self.state_dir.mkdir(mode=0o700)
        STATE_DIRS.append(str(self.state_dir))  # conftest checks no process is left with it
        self.config = lab.share / "llmsup.toml"
        self.write_config(settings)
        self.unit = service_unit(self.config, self.state_dir, watchdog_sec)
        lab.install_unit(
            "llmsup.service",
            self.unit,
            dropins={"test.conf": f"[Service]\nEnvironment=PYTHONPATH={SRC}\n"},
        )

    def write_config(self, settings: str = "") -> None:
        model = catalog_path(DEFAULT_MODEL)
        self.config.write_text(
            f'model = "{DEFAULT_MODEL}={model}"\n'
            "workers = 1\nctx-size = 512\nslots-per-worker = 2\ncache-mb = 64\n" + settings
        )
        self.config.chmod(0o600)

    def systemctl(self, verb: str, timeout: float = 200) -> subprocess.CompletedProcess:
        return self.lab.systemctl(verb, "llmsup", timeout=timeout)

    def show(self) -> dict:
        return self.lab.show("llmsup")

    def client(self, timeout: float = 60) -> Client:
        return Client(state_dir=self.state_dir, timeout=timeout)

    def processes(self) -> list[str]:
        """Command lines of the lab's processes of this llmsup (supervisor, workers)."""
        found = []
        for pid in self.lab.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(self.state_dir).encode() in cmdline:
                found.append(cmdline.decode(errors="replace"))
        return found

    def why(self) -> str:
        """For failure messages: the unit's state and the end of its journal."""
        return f"{self.show()}\n{self.lab.journal('llmsup')[-3000:]}"


@pytest.fixture
def lab():
    """A systemd of its own, or a skip that says why there is none here."""
    reason = SystemdLab.why_not()
    if reason:
        pytest.skip(f"systemd cannot run here: {reason}")
    if not catalog_path(DEFAULT_MODEL).exists():
        pytest.skip(f"{DEFAULT_MODEL} is not fetched: run tools/setup.sh")
    the_lab = SystemdLab()
    try:
        the_lab.boot()
    except LabError as exc:
        the_lab.close()
        pytest.skip(f"systemd could not be booted here: {exc}")
    try:
        yield the_lab
    finally:
        cgroups = list(the_lab.cgroups)
        share = the_lab.share
        problems = the_lab.close()
        assert not problems, problems
        # Nothing left: no process, cgroup, share, or mount of the lab's here.
        assert not [c for c in cgroups if os.path.exists(c)]
        assert not share.exists()
        assert str(share) not in Path("/proc/self/mountinfo").read_text()


def stream_in_threads(service: Service, n: int, max_tokens: int):
    """n completions, each on its own connection; (threads, finished, errors). A request is
    `finished` once it has had its one DONE and nothing after it (no second final reply)."""
    finished: list[dict] = []
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with service.client(timeout=120) as client:
                stream = client.complete(f"Story {i}:", max_tokens=max_tokens, **GREEDY)
                text = stream.text()
                extra = client.sock.poll(500, zmq.POLLIN)  # a second final reply?
                finished.append({"text": text, "done": stream.done, "extra": extra})
        except (LlmsupError, OSError) as exc:  # collected: asserted by the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, finished, errors


def test_start_returns_when_llmsup_answers(lab):
    service = Service(lab)
    started = service.systemctl("start")
    assert started.returncode == 0, f"{started.stderr}\n{service.why()}"
    # No wait, no retry: systemctl returned, so llmsup answers (READY=1 came only when
    # every worker was ready).
    with service.client(timeout=30) as client:
        status = client.status()
        assert status["workers"] and all(w["state"] == "ready" for w in status["workers"])
        assert client.complete("Hi", max_tokens=4, **GREEDY).text()
    props = service.show()
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), service.why()
    # The main process is the supervisor (NotifyAccess=main): the one in its pidfile.
    assert int((service.state_dir / "supervisor.pid").read_text()) == props["MainPID"]
    assert "1/1 workers ready" in props["StatusText"], props
    stopped = service.systemctl("stop")
    assert stopped.returncode == 0, stopped.stderr


def test_reload_under_load_loses_nothing(lab):
    service = Service(lab, settings="queue-size = 8\n")
    assert service.systemctl("start").returncode == 0, service.why()
    threads, finished, errors = stream_in_threads(service, 5, max_tokens=64)  # 2 run, 3 wait
    with service.client(timeout=10) as client:
        assert wait_until(lambda: client.status()["queue"]["depth"] >= 1, timeout=30)
    service.write_config("queue-size = 4\nstall-timeout = 45\n")
    reloaded = service.systemctl("reload", timeout=60)  # ExecReload waits for the reload
    assert reloaded.returncode == 0, f"{reloaded.stderr}\n{service.why()}"
    assert len(finished) + len(errors) < 5, "every request had finished before the reload"
    props = service.show()
    assert props["ActiveState"] == "active", service.why()
    with service.client(timeout=10) as client:
        status = client.status()
        assert status["queue"]["limit"] == 4 and status["reload"]["ok"], status["reload"]
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert len(finished) == 5, finished
    for request in finished:
        assert request["text"] and request["done"] and not request["extra"], request
    assert "Reloading" in service.lab.journal("llmsup")
    assert service.systemctl("stop").returncode == 0


def test_watchdog_restarts_a_stopped_supervisor(lab):
    service = Service(lab, watchdog_sec=5)
    assert service.systemctl("start").returncode == 0, service.why()
    before = service.show()
    assert before["NRestarts"] == 0
    supervisor = lab.host_pid(before["MainPID"])
    assert supervisor is not None
    os.kill(supervisor, signal.SIGSTOP)  # its event loop stops, and so do its WATCHDOG=1
    stopped_at = time.monotonic()

    def restarted() -> dict | None:
        props = service.show()
        serving = props["ActiveState"] == "active" and props["SubState"] == "running"
        return props if props["NRestarts"] >= 1 and serving else None

    after = wait_until(restarted, timeout=150, interval=0.5)
    assert after, service.why()
    assert after["MainPID"] != before["MainPID"]
    took = time.monotonic() - stopped_at
    assert took > 4, f"restarted {took:.1f} s after SIGSTOP, before the 5 s watchdog"
    assert "Watchdog timeout" in lab.journal("llmsup")
    assert not os.path.exists(f"/proc/{supervisor}"), "the stopped supervisor is still there"
    # The new supervisor serves.
    with service.client(timeout=30) as client:
        assert client.complete("Hi", max_tokens=4, **GREEDY).text()
    assert service.systemctl("stop").returncode == 0


def test_stop_drains_a_request_in_flight(lab):
    # The drain may take up to 80 s (TimeoutStopSec is 90): a loaded machine decodes
    # slowly, and a request failed at the drain timeout is not what this test is about.
    service = Service(lab, settings="drain-timeout = 80\n")
    assert service.systemctl("start").returncode == 0, service.why()
    tokens = 96
    received: list[str] = []
    stop_began_after: list[int] = []  # tokens received when systemd began the stop
    stopped: dict = {}

    def watch() -> None:
        wait_until(lambda: service.show()["ActiveState"] == "deactivating", 60, 0.05)
        stop_began_after.append(len(received))

    def stop() -> None:
        stopped["result"] = service.systemctl("stop", timeout=150)

    with service.client(timeout=60) as client:
        stream = client.complete("Once upon a time", max_tokens=tokens, **GREEDY)
        watcher = threading.Thread(target=watch, daemon=True)
        stopper = threading.Thread(target=stop, daemon=True)
        try:
            for piece in stream:
                received.append(piece)
                if len(received) == 1:  # decoding has begun: stop now
                    watcher.start()
                    stopper.start()
        except LlmsupError as exc:  # the stop failed the request
            stopper.join(timeout=150)
            pytest.fail(f"{exc} after {len(received)} tokens\n{service.why()}")
    assert stream.done and stream.done["usage"]["completion_tokens"] == tokens, stream.done
    watcher.join(timeout=60)
    stopper.join(timeout=150)
    assert stop_began_after and stop_began_after[0] < len(received), (
        f"the stop began after token {stop_began_after} of {len(received)}: "
        "no request was in flight"
    )
    assert stopped["result"].returncode == 0, stopped["result"].stderr
    props = service.show()
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), service.why()
    # The supervisor drained and stopped its workers itself: none is left.
    assert wait_until(lambda: not service.processes(), timeout=10), service.processes()


@pytest.mark.parametrize("state_dir", ["/run/llmsup", "/srv/llmsup-state"])
def test_systemd_analyze_verifies_the_unit(tmp_path, state_dir):
    """systemd-analyze verify, no systemd running needed. Under root it runs in a mount
    namespace with /run of its own: it writes /run/systemd/systemd-units-load."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    unit = tmp_path / "llmsup.service"
    unit.write_text(service_unit(Path("/etc/llmsup/llmsup.toml"), Path(state_dir)))
    argv = [analyze, "verify", str(unit)]
    if os.geteuid() == 0 and shutil.which("unshare"):
        argv = ["unshare", "--mount", "sh", "-ec", 'mount -t tmpfs tmpfs /run; exec "$@"', "-",
                *argv]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "llmsup.service" not in result.stderr, result.stderr  # no warning about our unit
