"""Backpressure: overload, deadlines, cancellation, clients that go away, fairness."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from tests.conftest import wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}
ONE = ("--workers", "1", "--cores-per-worker", "1")
LOADGEN = Path(__file__).resolve().parent.parent / "tools" / "loadgen.py"


def send(sock, rid: bytes, verb=C.COMPLETE, **body) -> None:
    sock.send_multipart([C.VERSION, verb, rid, orjson.dumps(body)])


_early: dict[tuple[int, bytes], tuple[bytes, dict, float]] = {}


def terminal(sock, rid: bytes, timeout: float = 60) -> tuple[bytes, dict, float]:
    """Read until rid's terminal frame; returns (kind, body, time it arrived). Terminal
    frames of other requests read on the way are kept for their own call."""
    if (id(sock), rid) in _early:
        return _early.pop((id(sock), rid))
    deadline = time.monotonic() + timeout
    while True:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"no reply for {rid}"
        _, kind, got, raw = sock.recv_multipart()
        if kind in C.TERMINAL_KINDS:
            if got == rid:
                return kind, orjson.loads(raw), time.monotonic()
            _early[(id(sock), got)] = (kind, orjson.loads(raw), time.monotonic())


def first_token(sock, rid: bytes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000)))
        _, kind, got, raw = sock.recv_multipart()
        if kind in C.TERMINAL_KINDS:
            assert got != rid, orjson.loads(raw)
            _early[(id(sock), got)] = (kind, orjson.loads(raw), time.monotonic())
        if got == rid and kind == C.TOKEN:
            return


def worker_idle(inst) -> bool:
    return all(w["running"] == [] for w in inst.status()["workers"])


def test_overload_at_4x_capacity_rejects_at_once_and_completes_the_rest(started):
    inst = started("--workers", "2", "--cores-per-worker", "1", "--queue-size", "4")
    supervisor = psutil.Process(inst.pid)
    rss_before = supervisor.memory_info().rss
    # 2 workers at ~25 tokens/s with 24-token answers serve ~2 requests/s: offer ~4x that.
    run = subprocess.run(
        [
            sys.executable,
            str(LOADGEN),
            "--state-dir",
            inst.state_dir,
            "--mode",
            "open",
            "--rate",
            "8",
            "--duration",
            "6",
            "--max-tokens",
            "24",
            "--clients",
            "4",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    result = orjson.loads(run.stdout)
    assert result["no_reply"] == 0, result
    assert set(result["errors"]) == {C.E_OVERLOADED}, result
    assert result["errors"][C.E_OVERLOADED] >= result["sent"] // 4, result
    assert result["completed"] >= 4, result
    assert result["reject_ms"]["p99"] < 1000, "a refusal does not wait for a worker"
    growth = supervisor.memory_info().rss - rss_before
    assert growth < 16 << 20, f"supervisor RSS grew {growth >> 20} MiB under overload"


def test_deadline_in_queue_never_reaches_a_worker(started):
    inst = started(*ONE)
    sock = inst.dealer()
    try:
        send(sock, b"long", prompt="Write a long story.", max_tokens=300, **GREEDY)
        first_token(sock, b"long")
        sent = time.monotonic()
        send(sock, b"short-lived", prompt="Hi", max_tokens=4, timeout_ms=300)
        kind, body, at = terminal(sock, b"short-lived")
        assert (kind, body["code"]) == (C.ERROR, C.E_DEADLINE)
        assert "in the queue" in body["message"]
        assert 0.25 < at - sent < 2.0
        assert inst.status()["workers"][0]["served"] == 0, "it never reached the worker"
        send(sock, b"cancel-long", C.CANCEL, target="long")
        assert terminal(sock, b"long")[1]["code"] == C.E_CANCELLED
    finally:
        sock.close()


def test_deadline_while_generating_counts_what_was_produced(started):
    inst = started(*ONE)
    with inst.client() as client:
        stream = client.complete("Write a long story.", max_tokens=1000, timeout_ms=1500, **GREEDY)
        text = ""
        with pytest.raises(LlmsupError) as info:
            for piece in stream:
                text += piece
    assert info.value.code == C.E_DEADLINE
    assert "while generating" in info.value.message
    assert info.value.body["usage"]["completion_tokens"] >= 1
    assert text, "the tokens before the deadline were streamed"
    assert wait_until(lambda: worker_idle(inst), timeout=5)


def test_cancel_stops_within_a_token_and_touches_no_one_else(started):
    inst = started("--workers", "2", "--cores-per-worker", "1")
    a, b = inst.dealer(), inst.dealer()
    try:
        send(a, b"same-id", prompt="Write a long story.", max_tokens=400, **GREEDY)
        send(b, b"same-id", prompt="Count to twenty:", max_tokens=24, **GREEDY)
        first_token(a, b"same-id")
        # b cancels "its" same-id: only b's request can be touched.
        send(b, b"c1", C.CANCEL, target="same-id")
        kind, body, _ = terminal(b, b"same-id")
        assert body["code"] == C.E_CANCELLED
        assert terminal(b, b"c1")[1] == {"found": True}
        # a's request is still streaming; now a cancels it.
        first_token(a, b"same-id")
        asked = time.monotonic()
        send(a, b"c2", C.CANCEL, target="same-id")
        kind, body, at = terminal(a, b"same-id")
        assert (kind, body["code"]) == (C.ERROR, C.E_CANCELLED)
        assert at - asked < 1.0, "stopped within about one token"
        assert body["usage"]["completion_tokens"] >= 2
        send(a, b"c3", C.CANCEL, target="nothing-like-this")
        assert terminal(a, b"c3")[1] == {"found": False}
        assert wait_until(lambda: worker_idle(inst), timeout=5)
    finally:
        a.close()
        b.close()


def test_disconnected_client_has_its_work_cancelled(started):
    inst = started(*ONE, "--queue-size", "4")
    sock = inst.dealer()
    send(sock, b"running", prompt="Write a long story.", max_tokens=1500, **GREEDY)
    send(sock, b"queued", prompt="Write another long story.", max_tokens=1500, **GREEDY)
    first_token(sock, b"running")
    assert wait_until(lambda: inst.status()["queue"]["depth"] == 1, timeout=5)
    sock.close()
    gone = time.monotonic()
    # Running: seen at the next token frame. Queued: at the next QUEUED probe (1 s).
    assert wait_until(
        lambda: worker_idle(inst) and inst.status()["queue"]["depth"] == 0, timeout=10
    )
    assert time.monotonic() - gone < 5, "not after generating 1500 tokens into the void"
    assert "disconnected: cancelling" in inst.log()
    with inst.client() as client:  # and the worker serves the next client
        stream = client.complete("Hi", max_tokens=3, **GREEDY)
        stream.text()
        assert stream.done["usage"]["completion_tokens"] >= 1


def test_flooding_client_does_not_starve_a_polite_one(started):
    inst = started(*ONE, "--queue-size", "16")
    flood, polite = inst.dealer(), inst.dealer()
    try:
        body = {"prompt": "Tell me something.", "max_tokens": 8, **GREEDY}
        for i in range(16):
            send(flood, f"f{i}".encode(), **body)
        time.sleep(0.3)
        send(polite, b"p", **body)
        kind, _, polite_done = terminal(polite, b"p")
        assert kind == C.DONE, "the polite client is admitted while the flooder fills its share"
        outcomes = {}
        for i in range(16):
            outcomes[i] = terminal(flood, f"f{i}".encode())
        refused = [i for i, (k, b, _) in outcomes.items() if k == C.ERROR]
        assert refused and all(outcomes[i][1]["code"] == C.E_OVERLOADED for i in refused)
        served = [t for k, b, t in outcomes.values() if k == C.DONE]
        later = sum(1 for t in served if t > polite_done)
        assert later >= len(served) - 3, "round robin: the polite request went ahead"
    finally:
        flood.close()
        polite.close()
