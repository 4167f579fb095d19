"""Signals and disk errors like a daemon (issue 17, items 6-8): SIGHUP replaces the workers
without failing a request, SIGUSR1 reopens the log, other signals do not kill, a full or
read-only disk is reported in one line and does not stop serving, repeated warnings are
rate-limited.

The disk tests mount a small tmpfs (or a read-only bind mount) on a state dir: root only,
skipped with the reason otherwise; every mount is undone in a finally.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from llmsup.protocol.client import Client
from llmsup.supervisor.commands.exits import EXIT_DISK
from llmsup.supervisor.host.logs import LogSink, RateLimit

from .conftest import llmsup, wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}
ONE_LINE_DISK_ERROR = r"llmsup: cannot write /\S+: [^\n]+ \({}\)\n?"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs or a read-only bind mount needs root")


@contextlib.contextmanager
def mounted(path: str, *mount_args: str):
    """mount ... path for the block; unmounted (lazily if busy) whatever happens."""
    made = subprocess.run(["mount", *mount_args, path], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mount {' '.join(mount_args)} failed: {made.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def fill(directory: str) -> None:
    """Fill the filesystem of `directory` (a file of zeros), and the last page of its
    supervisor.log if it has one, until ENOSPC."""
    for name in ("fill", "supervisor.log"):
        path = Path(directory, name)
        if name == "supervisor.log" and not path.exists():
            continue
        with open(path, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096 if name == "fill" else b"#")
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def run_requests(inst, n: int, max_tokens: int) -> tuple[list, list, list]:
    """n concurrent completions, each on its own client: (threads, done bodies, errors)."""
    done, errors = [], []

    def one(i: int) -> None:
        try:
            with Client(state_dir=inst.state_dir, timeout=120) as client:
                stream = client.complete(
                    f"Story number {i} about a lighthouse.", max_tokens=max_tokens, **GREEDY
                )
                stream.text()
                done.append(stream.done)
        except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, done, errors


# --- item 8: the rate limit (unit) -----------------------------------------------------------


def record(msg: str, *args, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("llmsup.supervisor", level, __file__, 1, msg, args, None)


def test_rate_limit_counts_repeats_and_never_hides_distinct_messages():
    now = [100.0]
    limit = RateLimit(interval=10.0, clock=lambda: now[0])
    first = record("message from %r dropped", b"a")
    assert limit.filter(first)
    passed = [limit.filter(record("message from %r dropped", str(i).encode())) for i in range(412)]
    assert not any(passed)  # the same warning, other arguments: held back
    # Distinct format strings, another level, and INFO are never held back.
    assert limit.filter(record("worker %d exited", 1))
    assert limit.filter(record("message from %r dropped", b"x", level=logging.ERROR))
    assert all(limit.filter(record("ready: %d", i, level=logging.INFO)) for i in range(5))
    now[0] += 10.5
    later = record("message from %r dropped", b"z")
    assert limit.filter(later)
    assert later.getMessage() == "message from b'z' dropped (and 412 more in the last 10 s)"
    assert limit.suppressed == 412
    now[0] += 0.1
    assert not limit.filter(record("message from %r dropped", b"q"))  # a new window
    assert not limit.filter(record("message from %r dropped", b"r"))
    assert limit.expired() == []  # the window is not over
    now[0] += 10
    (summary,) = limit.expired()  # a burst that stopped: counted when its window ends
    assert summary.getMessage() == "message from b'r' dropped (and 1 more in the last 10 s)"
    assert limit.filter(record("message from %r dropped", b"s"))  # counted: passes as new
    # On exit every window is flushed, over or not: nothing held back is lost.
    assert not limit.filter(record("message from %r dropped", b"t"))
    assert limit.expired() == []
    (held,) = limit.expired(everything=True)
    assert held.getMessage() == "message from b't' dropped"


def test_log_sink_counts_failed_writes_and_resumes():
    full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    r, w = os.pipe()
    try:
        sink = LogSink(path="/x/supervisor.log", fd=full)
        sink.setFormatter(logging.Formatter("%(message)s"))
        sink.emit(record("one"))
        sink.emit(record("two"))
        st = sink.status()
        assert st["errors"] == 2 and not st["writing"]
        assert st["last_error"] == "No space left on device (ENOSPC)"
        sink.fd = w  # room again
        sink.emit(record("three"))
        os.close(w)
        w = -1
        text = os.read(r, 4096).decode()
        assert text == "log: 2 line(s) lost (No space left on device (ENOSPC))\nthree\n"
        assert sink.status()["writing"]
    finally:
        for fd in (full, r, w):
            if fd >= 0:
                os.close(fd)


# --- item 6: signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 1])
def test_restart_workers_replaces_every_worker_without_failing_a_request(instance_factory, workers):
    inst = instance_factory(
        "--workers", str(workers), "--cores-per-worker", "1", "--queue-size", "16"
    )
    started = inst.start()
    assert started.returncode == 0, started.stderr
    before = {w["id"]: w["pid"] for w in inst.status()["workers"]}
    threads, done, errors = run_requests(inst, 6, max_tokens=48)
    wait_until(lambda: inst.status()["requests"]["in_flight"] >= 2, timeout=20)
    asked = inst.cli("restart-workers")
    assert asked.returncode == 0, asked.stderr
    replacing = wait_until(lambda: inst.status()["replacing"], timeout=5)
    assert replacing and replacing["why"] == "restart-workers", inst.log()[-3000:]
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(done) == 6 and all(d["usage"]["completion_tokens"] > 0 for d in done)

    def replaced():
        st = inst.status()
        pids = {w["id"]: w["pid"] for w in st["workers"]}
        serving = all(w["state"] == "ready" for w in st["workers"])
        return st["replacing"] is None and serving and all(pids[g] != before[g] for g in pids)

    assert wait_until(replaced, timeout=60, interval=0.5), inst.log()[-3000:]
    log = inst.log()
    assert f"replacing {workers} worker(s) one core group at a time (restart-workers)" in log
    assert "replaced workers" in log
    shown = inst.cli("status")
    assert shown.returncode == 0 and "replaced: restart-workers" in shown.stdout
    assert inst.stop().returncode == 0


def test_sigusr1_reopens_the_log_and_other_signals_do_not_kill(instance_factory):
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    pid = inst.pid
    log = Path(inst.state_dir, "supervisor.log")
    for sig in (
        signal.SIGPIPE,
        signal.SIGALRM,
        signal.SIGVTALRM,
        signal.SIGPROF,
        signal.SIGIO,
        signal.SIGPWR,
        signal.SIGXCPU,
        signal.SIGXFSZ,
        signal.SIGRTMIN + 3,
    ):
        os.kill(pid, sig)
        time.sleep(0.05)
    assert wait_until(lambda: "SIGRTMIN+3 received: ignored" in log.read_text(), timeout=5)
    assert alive(pid)
    with inst.client(timeout=30) as client:
        assert client.ping()["pong"]
        assert client.complete("Hello", max_tokens=4, **GREEDY).text()
    for _ in range(3):  # the same warning again within 10 s: held back, counted
        os.kill(pid, signal.SIGPWR)
        time.sleep(0.1)
    assert wait_until(lambda: inst.status()["log"]["rate_limited"] >= 2, timeout=5)
    text = log.read_text()
    assert text.count("SIGPWR received: ignored") == 1
    for name in ("SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR"):
        assert f"{name} received: ignored" in text
    assert "SIGXCPU received (a resource limit was reached)" in text
    # logrotate: move the file away, SIGUSR1, new lines go to a new supervisor.log.
    log.rename(log.with_name("supervisor.log.1"))
    os.kill(pid, signal.SIGUSR1)
    assert wait_until(lambda: log.exists() and "log reopened" in log.read_text(), timeout=5)
    os.kill(pid, signal.SIGUSR2)  # restart-workers: its steps are logged into the new file
    assert wait_until(lambda: "replaced workers [0]" in log.read_text(), timeout=60)
    old = log.with_name("supervisor.log.1").read_text()
    assert "log reopened" not in old and "replacing worker 0" not in old
    assert inst.status()["log"]["reopened"] == 1
    stopped = inst.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert "stopping: draining" in log.read_text()


# --- item 7: disk errors -------------------------------------------------------------------------


def test_a_full_log_disk_keeps_serving_and_status_says_so(instance_factory):
    need_root()
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    with mounted(inst.state_dir, "-t", "tmpfs", "-o", "size=1m,mode=700", "tmpfs"):
        try:
            assert inst.start().returncode == 0
            fill(inst.state_dir)
            os.kill(inst.pid, signal.SIGUSR2)  # a warning to log, which cannot be written
            st = wait_until(lambda: (s := inst.status())["log"]["errors"] and s, timeout=5)
            assert st, inst.status()["log"]
            assert st["log"]["path"] == str(Path(inst.state_dir, "supervisor.log"))
            assert st["log"]["last_error"] == "No space left on device (ENOSPC)"
            assert not st["log"]["writing"]
            with inst.client(timeout=30) as client:
                assert client.complete("Hello", max_tokens=4, **GREEDY).text()
            shown = inst.cli("status")
            assert shown.returncode == 0
            assert "could not be written, last: No space left on device" in shown.stdout
            stopped = inst.stop()
            assert stopped.returncode == 0, stopped.stderr  # its record was reserved at start
            assert "all requests drained" in stopped.stdout
        finally:
            inst.stop("--timeout", "5")


def test_start_on_a_full_disk_says_which_file_and_errno(instance_factory):
    need_root()
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    with mounted(inst.state_dir, "-t", "tmpfs", "-o", "size=64k,mode=700", "tmpfs"):
        fill(inst.state_dir)
        result = inst.start()
    assert result.returncode == EXIT_DISK, result.stderr
    assert re.fullmatch(ONE_LINE_DISK_ERROR.format("ENOSPC"), result.stderr), result.stderr


def test_read_only_state_dir_gives_one_line_not_a_traceback():
    need_root()
    path = tempfile.mkdtemp(prefix="llmsup-t", dir="/tmp")
    try:
        Path(path, "supervisor.log").write_bytes(b"")
        with mounted(path, "--bind", path):
            remount = ["mount", "-o", "remount,bind,ro", path]
            assert subprocess.run(remount, capture_output=True).returncode == 0
            for command in (
                ["start", "--workers", "1", "--cores-per-worker", "1", "--cache-mb", "0"],
                ["stop"],
            ):
                result = llmsup(*command, "--state-dir", path, timeout=60)
                assert result.returncode == EXIT_DISK, (command, result.stderr)
                assert re.fullmatch(ONE_LINE_DISK_ERROR.format("EROFS"), result.stderr)
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
