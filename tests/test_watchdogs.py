"""Watchdogs against real workers made to leak, hang, spin or crash (worker/faults.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import orjson
import psutil
import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol import scoreboard as sb
from llmsup.protocol.arena import Arena
from llmsup.protocol.arena_layout import VALID, WRITING
from llmsup.protocol.client import LlmsupError
from llmsup.worker import faults
from tests.conftest import wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}
FAULTS = {faults.ENV: faults.ENABLE_VALUE}
ONE = ("--workers", "1", "--cores-per-worker", "1")
TWO = ("--workers", "2", "--cores-per-worker", "1")


def fault(inst, kind: str, max_tokens: int = 4) -> tuple[str, dict]:
    """Send a fault request; returns (terminal kind, body)."""
    with inst.client(timeout=90) as client:
        stream = client.complete(f"{faults.PREFIX}{kind}", max_tokens=max_tokens, **GREEDY)
        try:
            stream.text()
        except LlmsupError as exc:
            return "error", exc.body
        return "done", stream.done


def replaced(inst, worker_id: int, words: str, timeout: float = 30) -> dict:
    def check():
        w = inst.top()["workers"][worker_id]
        back = w["restarts"] >= 1 and words in w["last_exit"] and w["activity"] == "idle"
        return w if back else None

    w = wait_until(check, timeout=timeout, interval=0.25)
    assert w, inst.top()
    return w


# --- the scoreboard ----------------------------------------------------------------------------


def test_scoreboard_survives_readers_that_exit():
    name = f"llmsup-test-{os.getpid()}"
    board = sb.Scoreboard.create(name, 2)
    try:
        board.write_worker(1, pid=42, state=sb.DECODE, request_id=b"abc", tokens=3)
        board.beat(1, tokens=4)
        code = (
            "from llmsup.protocol import scoreboard as sb\n"
            f"b = sb.Scoreboard.attach({name!r})\n"
            "r = b.read_row(1)\n"
            "assert (r['pid'], r['activity'], r['request_id'], r['tokens'], r['progress']) == "
            "(42, 'decode', 'abc', 4, 1), r\n"
            "b.close()\n"
        )
        for _ in range(2):  # Python 3.11's resource tracker would unlink it on exit
            subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        assert os.path.exists(f"/dev/shm/{name}")
        assert board.read_row(1)["pid"] == 42
    finally:
        board.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_create_never_takes_over_an_existing_segment():
    """An existing name (another user's, or a killed supervisor's) is an error, never reused
    or removed: a stale segment is swept from its state dir's record (test_security.py)."""
    name = f"llmsup-test-stale-{os.getpid()}"
    stale = sb.Scoreboard.create(name, 1)
    try:
        with pytest.raises(FileExistsError):
            sb.Scoreboard.create(name, 3)
        assert len(stale.rows) == 1 and os.path.exists(f"/dev/shm/{name}")
    finally:
        stale.close()


def test_fault_injection_is_off_without_the_environment(served):
    kind, body = fault(served, "crash")
    assert kind == "done", "a fault prompt is an ordinary prompt in production"
    assert all(
        w["restarts"] == 0 or "SIGSEGV" not in (w["last_exit"] or "")
        for w in served.status()["workers"]
    )


# --- each watchdog fires on its fault ------------------------------------------------------------


def test_hang_is_dumped_killed_and_replaced(started):
    inst = started(*ONE, "--stall-timeout", "2", env=FAULTS)
    kind, body = fault(inst, "hang")
    # Retried once (no token was sent), hung again, then reported.
    assert kind == "error" and body["code"] == C.E_WORKER_LOST
    assert "hung: no token progress" in body["message"]
    w = replaced(inst, 0, "hung: no token progress")
    assert w["restarts"] == 2
    log = inst.log()
    assert "py-spy dump follows" in log
    assert "Thread" in log and "inject" in log, "the dump shows where the worker was stuck"


def test_memory_soft_limit_recycles_after_the_request(started):
    inst = started(*ONE, "--mem-soft-mb", "400", "--mem-hard-mb", "4000", env=FAULTS)
    kind, body = fault(inst, "leak:400", max_tokens=24)
    assert kind == "done", body  # graceful: the request finishes first
    w = replaced(inst, 0, "recycled: anonymous memory")
    assert "soft limit 400 MiB" in w["last_exit"]
    assert w["anon_mb"] < 400  # the replacement starts small


def test_memory_hard_limit_kills_at_once(started):
    inst = started(*ONE, "--mem-soft-mb", "300", "--mem-hard-mb", "400", env=FAULTS)
    kind, body = fault(inst, "leak:600", max_tokens=2000)
    assert kind == "error" and body["code"] == C.E_WORKER_LOST, body
    w = replaced(inst, 0, "killed: anonymous memory")
    assert "hard limit 400 MiB" in w["last_exit"]


def test_idle_spin_is_recycled(started):
    inst = started(*ONE, "--spin-seconds", "2", "--spin-cpu", "50", env=FAULTS)
    kind, _ = fault(inst, "spin")
    assert kind == "done"
    w = replaced(inst, 0, "recycled: idle but using")
    assert "spin limit 50%" in w["last_exit"]


def test_crash_is_retried_once_then_reported_and_capacity_returns(started):
    inst = started(*TWO, env=FAULTS)
    kind, body = fault(inst, "crash")
    assert kind == "error" and body["code"] == C.E_WORKER_LOST
    assert "SIGSEGV" in body["message"] and body["tokens_sent"] == 0
    for worker_id in (0, 1):  # both crashed: the original attempt and the retry
        replaced(inst, worker_id, "SIGSEGV")
    with inst.client() as client:
        stream = client.complete("Hello", max_tokens=3, **GREEDY)
        stream.text()
        assert stream.done["usage"]["completion_tokens"] >= 1


def test_crash_loop_marks_worker_fatal(started):
    inst = started(*ONE, "--crash-loop", "3", "60", env=FAULTS)
    kind, body = fault(inst, "crash")  # two crashes: first try and retry
    assert kind == "error" and body["code"] == C.E_WORKER_LOST, body
    assert "SIGSEGV" in body["message"], body
    idle = wait_until(lambda: inst.top()["workers"][0]["activity"] == "idle", timeout=30)
    assert idle, inst.top()
    kind, body = fault(inst, "crash")  # third crash within the window
    assert kind == "error" and body["code"] == C.E_WORKER_LOST, body
    w = wait_until(
        lambda: inst.status()["workers"][0]["state"] == "fatal" and inst.status()["workers"][0],
        timeout=30,
    )
    assert w and "crash loop: 3 crashes in 60s" in w["last_exit"], inst.status()
    assert inst.top()["workers"][0]["activity"] == "fatal"
    with inst.client() as client, pytest.raises(LlmsupError) as info:
        client.complete("Hello", max_tokens=3).text()
    assert info.value.code == C.E_WORKER_LOST
    result = inst.cli("status")
    assert "fatal" in result.stdout and "crash loop" in result.stdout


def test_max_requests_recycles(started):
    inst = started(*ONE, "--max-requests", "3", env=None)
    with inst.client() as client:
        for _ in range(4):
            client.complete("Hi", max_tokens=2, **GREEDY).text()
    replaced(inst, 0, "recycled: served")


# --- and never on healthy work -------------------------------------------------------------------


def test_healthy_long_generation_is_left_alone(started):
    # The shortest timeouts there are, and a generation well past them (on one of our
    # faster cores 120 tokens took 1.96 s, so 240 tokens take about 4 s).
    inst = started(*ONE, "--stall-timeout", "1", "--spin-seconds", "1", env=None)
    with inst.client() as client:
        stream = client.complete("Write a long essay about the sea.", max_tokens=240, **GREEDY)
        stream.text()
    assert stream.done["usage"]["completion_tokens"] == 240
    assert stream.done["timings"]["generation_ms"] > 1000, "longer than the stall timeout"
    time.sleep(1.5)  # idle afterwards, past the spin window
    w = inst.top()["workers"][0]
    assert w["restarts"] == 0 and w["activity"] == "idle", w


def test_long_prefill_is_not_a_hang(started):
    # Small chunks: each step reads 32 prompt tokens and beats; the whole prompt takes longer
    # than the stall timeout.
    inst = started(*ONE, "--stall-timeout", "2", "--prefill-chunk", "32", env=None)
    prompt = "The sea was calm and the light was steady. " * 150  # about 1500 tokens
    with inst.client() as client:
        stream = client.complete(prompt, max_tokens=4, **GREEDY)
        stream.text()
    assert stream.done["usage"]["prompt_tokens"] > 1200
    assert stream.done["timings"]["prompt_ms"] > 2000, "the prefill outlasted the stall timeout"
    assert inst.top()["workers"][0]["restarts"] == 0


# --- chaos ----------------------------------------------------------------------------------------


# Short prompts; and prompts that share a long start, so that workers restore from and save
# to the prefix cache while they are killed and stopped.
LOG = "The keeper's log, written every night at the lighthouse on the northern rock. " * 12
CHAOS_PROMPTS = {"short": "Story number {i}:", "shared prefix": LOG + "Night {i}:"}


@pytest.mark.parametrize("prompts", CHAOS_PROMPTS)
def test_chaos_every_request_gets_exactly_one_terminal(started, prompts):
    # Our own kills are not a crash loop: keep the pool from going FATAL under them.
    inst = started(
        *TWO, "--stall-timeout", "2", "--queue-size", "64", "--crash-loop", "1000", "60", env=None
    )
    supervisor = psutil.Process(inst.pid)
    endpoint = inst.status()["endpoint"]
    sent: dict[bytes, int] = {}
    terminals: dict[bytes, list[tuple[bytes, dict]]] = {}
    unknown: list[bytes] = []
    lock = threading.Lock()
    done = threading.Event()

    def client(n: int) -> None:
        """Runs in a thread: any failure is raised, and re-raised below by its future."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            for i in range(8):
                rid = f"c{n}-r{i}".encode()
                with lock:
                    sent[rid] = n
                body = {
                    "prompt": CHAOS_PROMPTS[prompts].format(i=i + 8 * n),
                    "max_tokens": 12,
                    **GREEDY,
                }
                sock.send_multipart([C.VERSION, C.COMPLETE, rid, orjson.dumps(body)])
                while True:  # non-terminal kinds (token, queued, any new one) are skipped
                    assert sock.poll(60000), f"no terminal frame for {rid}"
                    _, kind, got, raw = sock.recv_multipart()
                    if got != rid:
                        with lock:
                            unknown.append(got)
                    if kind in C.TERMINAL_KINDS:
                        with lock:
                            terminals.setdefault(got, []).append((kind, orjson.loads(raw)))
                        if got == rid:
                            break
            assert not sock.poll(300), f"client {n}: a frame after its last terminal frame"
        finally:
            sock.close()

    def chaos() -> int:
        """Runs in a thread until `done`; returns how many signals it sent."""
        rng = random.Random(7)
        signalled = 0
        while not done.wait(1.2):
            busy = [w for w in inst.top()["workers"] if w["activity"] in ("prefill", "decode")]
            if not busy:
                continue
            target = rng.choice(busy)
            sig = rng.choice([signal.SIGKILL, signal.SIGSTOP])
            try:
                os.kill(target["pid"], sig)
                signalled += 1
            except ProcessLookupError:
                pass
        return signalled

    # Each thread's outcome comes back through its future: a failed assert in a client (or
    # an error in the chaos thread) fails the test here, not only its thread.
    pool = ThreadPoolExecutor(max_workers=5, thread_name_prefix="chaos-test")
    rss_before = supervisor.memory_info().rss
    try:
        clients = [pool.submit(client, n) for n in range(4)]
        chaos_future = pool.submit(chaos)
        finished, running = wait(clients, timeout=120)
        done.set()
        for future in clients:
            if future in finished:
                future.result()  # re-raises a client's failure
        assert not running, f"{len(running)} client threads still running after 120s"
        signalled = chaos_future.result(timeout=30)  # re-raises an error in the chaos thread
    finally:
        done.set()
        pool.shutdown(wait=False, cancel_futures=True)

    assert not unknown, f"frames for ids never sent: {unknown}"
    assert set(terminals) == set(sent), "every request got a terminal frame"
    for rid, frames in terminals.items():
        assert len(frames) == 1, f"{rid} got {len(frames)} terminal frames"
        kind, body = frames[0]
        assert kind == C.DONE or body["code"] in (C.E_WORKER_LOST, C.E_OVERLOADED), body
    assert sum(1 for f in terminals.values() if f[0][0] == C.DONE) >= len(sent) // 4

    def full_strength():
        workers = inst.top()["workers"]
        return all(w["activity"] == "idle" for w in workers) and workers

    workers = wait_until(full_strength, timeout=40, interval=0.5)
    assert workers, (inst.top(), inst.status(), inst.log()[-3000:])
    assert sum(w["restarts"] for w in workers) >= 1, f"{signalled} signals sent, no restart"
    reasons = " ".join(w["last_exit"] for w in workers)
    assert "SIGKILL" in reasons or "hung" in reasons
    growth = supervisor.memory_info().rss - rss_before
    assert growth < 16 << 20, f"supervisor RSS grew {growth >> 20} MiB"
    # The prefix cache came through: nothing half-written or pinned by the dead is left.
    arena = Arena.attach(inst.segments()["cache"])
    try:
        states = list(arena.entries["state"])
        assert WRITING not in states and not arena.entries["pins"].any()
        stats = arena.stats()
        assert stats["bytes_used"] <= stats["bytes_limit"]
        assert states.count(VALID) == stats["entries"]
        if prompts == "shared prefix":
            assert stats["hits"] >= 1, stats
    finally:
        arena.close()


# --- profile ------------------------------------------------------------------------------------


def test_profile_dump_and_flame_graph(served, tmp_path):
    dump = served.cli("profile", "0")
    assert dump.returncode == 0, dump.stderr
    assert "llmsup.worker --worker-id 0" in dump.stdout
    assert "WorkerLoop.run" in dump.stdout
    svg = tmp_path / "worker.svg"
    record = served.cli("profile", "1", "--record", "1", "--output", str(svg))
    assert record.returncode == 0, record.stderr
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    missing = served.cli("profile", "7")
    assert missing.returncode != 0 and "workers are 0 to 1" in missing.stderr
