"""Start, stop and death of whole llmsup instances, each in its own state dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from testkit import free_port

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from llmsup.supervisor.models.errors import ModelError
from llmsup.supervisor.models.gguf import check_gguf
from tests.conftest import our_processes, wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}
ONE_WORKER = ("--workers", "1", "--cores-per-worker", "1")


def worker_pids(inst) -> list[int]:
    return [w["pid"] for w in inst.status()["workers"]]


def test_start_twice_is_refused_and_workers_are_named(instance_factory):
    inst = instance_factory(*ONE_WORKER)
    first = inst.start()
    assert first.returncode == 0, first.stderr
    assert "endpoint ipc://" in first.stdout
    second = inst.start()
    assert second.returncode == 1
    assert "already running" in second.stderr
    (pid,) = worker_pids(inst)
    cmdline = psutil.Process(pid).cmdline()
    assert "llmsup.worker" in cmdline and "--worker-id" in cmdline and "--cores" in cmdline
    assert os.sched_getaffinity(pid) == {0}
    assert inst.stop().returncode == 0
    assert not Path(inst.state_dir, "client.sock").exists()
    assert not Path(inst.state_dir, "supervisor.pid").exists()


def test_supervisor_sleeps_while_workers_load(instance_factory):
    # 8 slots: the worker measures its decode costs before READY, so start-up takes a while
    # and a supervisor that spun through it would have used most of it on one core.
    inst = instance_factory("--workers", "1", "--slots-per-worker", "8")
    started_at = time.monotonic()
    result = inst.start()
    wall = time.monotonic() - started_at
    assert result.returncode == 0, result.stderr
    supervisor = psutil.Process(int(Path(inst.state_dir, "supervisor.pid").read_text()))
    cpu = sum(supervisor.cpu_times()[:2])  # its imports and set-up included
    assert cpu < 0.5 * wall, f"supervisor used {cpu:.2f} s CPU during a {wall:.2f} s start"
    assert inst.stop().returncode == 0


def test_stop_drains_request_in_flight(instance_factory):
    port = free_port()
    inst = instance_factory(*ONE_WORKER, "--bind", f"tcp://127.0.0.1:{port}")
    assert inst.start().returncode == 0
    with inst.client() as client:
        stream = client.complete("Write a poem about rivers.", max_tokens=40, **GREEDY)
        it = iter(stream)
        first = next(it)
        stopping = time.monotonic()
        stopper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmsup.supervisor",
                "stop",
                "--state-dir",
                inst.state_dir,
                "--timeout",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        rest = "".join(it)
    out, err = stopper.communicate(timeout=60)
    assert stopper.returncode == 0, err
    assert "drained" in out
    assert (first + rest).strip()
    assert stream.done["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - stopping < 60
    # A new request during the drain would have been refused; after it, nothing listens.
    assert not our_processes_for(inst)


def test_stop_timeout_fails_in_flight_with_shutting_down(instance_factory):
    inst = instance_factory(*ONE_WORKER)
    assert inst.start().returncode == 0
    with inst.client() as client:
        stream = client.complete("Tell a very long story.", max_tokens=2000, **GREEDY)
        it = iter(stream)
        next(it)
        result = inst.stop("--timeout", "0.5")
        with pytest.raises(LlmsupError) as info:
            for _ in it:
                pass
    assert info.value.code == C.E_SHUTTING_DOWN
    assert result.returncode == 3, result.stderr
    assert "1 request(s) in flight were failed" in result.stderr
    assert not our_processes_for(inst)


def test_sigkill_of_supervisor_leaves_no_worker_and_restart_works(instance_factory):
    inst = instance_factory("--workers", "2", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    segments = inst.segments()
    assert set(segments) == {"scoreboard", "cache"}
    pids = worker_pids(inst)
    os.kill(inst.pid, signal.SIGKILL)
    gone = wait_until(
        lambda: (
            not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in pids
            )
        ),
        timeout=10,
    )
    assert gone, f"workers {pids} outlived their supervisor"
    # `stop` of a dead supervisor removes what it left behind ...
    cleaned = inst.stop()
    assert cleaned.returncode == 1 and "removed the sockets" in cleaned.stderr
    # the scoreboard and the prefix cache
    assert not [n for n in segments.values() if os.path.exists(f"/dev/shm/{n}")]
    assert not Path(inst.state_dir, "client.sock").exists()
    # ... and neither they nor a stale pidfile would block a new start.
    again = inst.start()
    assert again.returncode == 0, again.stderr
    with inst.client() as client:
        assert client.ping()["pong"] is True
    assert inst.stop().returncode == 0


def test_stop_when_not_running(instance_factory):
    inst = instance_factory()
    result = inst.stop()
    assert result.returncode == 1
    assert "not running" in result.stderr


def test_non_loopback_bind_refused(instance_factory):
    inst = instance_factory("--bind", "tcp://0.0.0.0:7411")
    result = inst.start()
    assert result.returncode != 0
    assert "--allow-remote" in result.stderr


def test_too_many_workers_refused(instance_factory):
    inst = instance_factory("--workers", "64")
    result = inst.start()
    assert result.returncode != 0
    assert "--workers 64" in result.stderr and "physical cores" in result.stderr


# --- models ------------------------------------------------------------------------------------


def test_missing_model_refused_before_spawn(instance_factory, tmp_path):
    inst = instance_factory("--model", str(tmp_path / "nope.gguf"))
    result = inst.start()
    assert result.returncode != 0
    assert "nope.gguf does not exist" in result.stderr
    assert not our_processes_for(inst)


def test_non_gguf_model_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        check_gguf(bad)


def test_truncated_model_refused(instance_factory, tmp_path):
    from llmsup.supervisor.models.fetch import default_model

    full = default_model()
    cut = tmp_path / "cut.gguf"
    with full.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(full.stat().st_size // 2))
    inst = instance_factory("--model", str(cut))
    result = inst.start()
    assert result.returncode != 0
    assert "cut.gguf is truncated" in result.stderr
    assert not our_processes_for(inst)


def write_unloadable_gguf(path: Path) -> None:
    """A well-formed GGUF with an architecture llama.cpp does not know."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_tensor("dummy.weight", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_worker_that_cannot_load_is_reported_not_respawned(instance_factory, tmp_path):
    model = tmp_path / "weird.gguf"
    write_unloadable_gguf(model)
    check_gguf(model)  # passes the file checks: only llama.cpp can tell
    inst = instance_factory(*ONE_WORKER, "--model", str(model), "--startup-timeout", "60")
    started = time.monotonic()
    result = inst.start()
    assert result.returncode == 2, result.stderr
    assert "worker 0" in result.stderr
    assert "unknown model architecture: 'no-such-arch'" in result.stderr
    assert time.monotonic() - started < 50, "a load failure must not wait for the timeout"
    assert not our_processes_for(inst)


# --- helpers -------------------------------------------------------------------------------------


def our_processes_for(inst) -> list:
    def mine():
        return [p for p in our_processes() if inst.state_dir in " ".join(p.cmdline())]

    wait_until(lambda: not mine(), timeout=10)
    return mine()
