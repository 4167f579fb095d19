"""Liveness on the wire (SPEC.md 4.1): every admitted request is acknowledged at once with
the server's instance id, is never silent for more than two heartbeats until its terminal
frame, and a restarted server has another instance. Also the Python client's side: a
timeout per frame (CLIENT_RECEIVE_TIMEOUT_MS) that says the request may be lost.

Every frame is collected on the test's own thread and every check is made in the test
body; FakeServer's thread only answers.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import orjson
import psutil
import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol.client import Client, LlmsupError, ReplyTimeout
from tests.conftest import dealer_of, launched, wait_until

HEARTBEAT_S = C.HEARTBEAT_MS / 1000
MAX_SILENCE_S = 2.5  # SPEC: 2 x HEARTBEAT_MS, plus scheduling on a loaded machine
NON_TERMINAL = (C.ACCEPTED, C.QUEUED, C.RUNNING, C.TOKEN)
COUNTING = "1, 2, 3, 4,"  # greedy, the model keeps counting: a long generation
# Over 4,000 tokens of counting: read 32 tokens a step (--prefill-chunk 32), it takes
# seconds, and the model goes on counting after it.
LONG_COUNT = ", ".join(str(i) for i in range(1, 1001)) + ","


# --- a fake server, for what a real one does only sometimes ------------------------------


class FakeServer:
    """A ROUTER on loopback tcp that answers each request from a script: verb -> a list
    of (delay in seconds, reply kind, body) sent in order. Only its thread touches the
    socket until close()."""

    def __init__(self, script: dict[bytes, list[tuple[float, bytes, dict]]]):
        self.script = script
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.received: list[bytes] = []  # the verbs, in arrival order
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            if not self.sock.poll(20, zmq.POLLIN):
                continue
            identity, _version, verb, request_id, _body = self.sock.recv_multipart()
            self.received.append(verb)
            for delay, kind, body in self.script.get(verb, []):
                if self.stopping.wait(delay):
                    return
                self.sock.send_multipart(
                    [identity, C.VERSION, kind, request_id, orjson.dumps(body)]
                )

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pong(instance: str) -> list[tuple[float, bytes, dict]]:
    return [(0, C.DONE, {"pong": True, "version": "LLMSUP1", "instance": instance})]


OLD, NEW = "0123456789abcdef", "fedcba9876543210"
GENERATION_DONE = {
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "cached_tokens": 0},
    "timings": {"prompt_ms": 1.0, "generation_ms": 1.0, "tokens_per_second": None},
}


def test_python_client_waits_per_frame_and_keeps_the_instance():
    """Heartbeats 0.5 s apart keep a request alive under a 0.8 s timeout per frame, though
    the whole request takes 2 s; kinds the client does not know are skipped."""
    script = {
        C.COMPLETE: [
            (0, C.ACCEPTED, {"instance": OLD, "queue_depth": 2}),
            (0.5, C.QUEUED, {"position": 1, "queue_depth": 1}),
            (0.5, C.RUNNING, {"tokens_sent": 0}),
            (0.5, C.TOKEN, {"text": "Hel"}),
            (0.2, b"added-later", {"anything": 1}),
            (0.3, C.TOKEN, {"text": "lo"}),
            (0, C.DONE, GENERATION_DONE),
        ],
        C.PING: pong(OLD),
    }
    assert Client("tcp://127.0.0.1:1").timeout_ms == C.CLIENT_RECEIVE_TIMEOUT_MS  # default
    with FakeServer(script) as server, Client(server.endpoint, timeout=0.8) as client:
        start = time.monotonic()
        stream = client.complete("hi")
        assert stream.text() == "Hello"
        assert time.monotonic() - start >= 2.0
        assert stream.done == GENERATION_DONE
        assert stream.instance == OLD == client.instance
        assert client.ping()["instance"] == OLD


def test_python_client_timeout_says_the_request_may_be_lost():
    script = {C.COMPLETE: [(0, C.ACCEPTED, {"instance": OLD, "queue_depth": 1})], C.PING: pong(NEW)}
    with FakeServer(script) as server, Client(server.endpoint, timeout=0.5) as client:
        stream = client.complete("hi")
        start = time.monotonic()
        with pytest.raises(ReplyTimeout) as lost:
            stream.text()
        waited = time.monotonic() - start
        # As SPEC.md 4.1 says: ping, and compare the instances.
        assert client.ping()["instance"] == NEW != stream.instance
    assert 0.5 <= waited < 3
    assert isinstance(lost.value, TimeoutError)  # what callers caught before
    assert lost.value.instance == OLD and lost.value.request_id == stream.request_id
    message = str(lost.value)
    assert "may be lost" in message and "Ping" in message and OLD in message


# --- a real server ------------------------------------------------------------------------


def send(sock: zmq.Socket, verb: bytes, request_id: bytes, body: dict) -> None:
    sock.send_multipart([C.VERSION, verb, request_id, orjson.dumps(body)])


def receive(sock: zmq.Socket) -> tuple[float, bytes, bytes, dict]:
    """(arrival time, kind, request id, body) of the next reply; fails after 10 s."""
    assert sock.poll(10_000, zmq.POLLIN), "no frame in 10 s"
    version, kind, request_id, body = sock.recv_multipart()
    assert version == C.VERSION
    return time.monotonic(), kind, request_id, orjson.loads(body)


def exchange(sock: zmq.Socket, verb: bytes, request_id: bytes, body: dict) -> list:
    """Every reply to one request, up to its terminal frame: [(time, kind, body)]."""
    send(sock, verb, request_id, body)
    replies = []
    while not replies or replies[-1][1] not in C.TERMINAL_KINDS:
        at, kind, rid, reply = receive(sock)
        assert rid == request_id, (rid, kind, reply)
        replies.append((at, kind, reply))
    return replies


@pytest.fixture
def served_dealer(served):
    with dealer_of(served) as sock:
        yield sock


@pytest.mark.timeout(90)
def test_every_admitted_request_is_acknowledged_with_the_instance(served_dealer):
    sock = served_dealer
    [(_, kind, pong_body)] = exchange(sock, C.PING, b"p1", {})
    assert kind == C.DONE
    instance = pong_body["instance"]
    assert len(instance) == 16 and int(instance, 16) >= 0
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    requests = [
        (C.COMPLETE, {"prompt": "The capital of France is", "max_tokens": 3}),
        (C.CHAT, chat),
        (C.TOKENIZE, {"text": "Hello world"}),
    ]
    for i, (verb, body) in enumerate(requests):
        replies = exchange(sock, verb, f"a{i}".encode(), body)
        (_, first, accepted), *rest = replies
        assert first == C.ACCEPTED, (verb, replies)
        assert accepted["instance"] == instance
        assert accepted["queue_depth"] >= 1  # this request, at least
        assert rest[-1][1] == C.DONE, (verb, rest[-1])
        assert all(kind in (C.QUEUED, C.RUNNING, C.TOKEN) for _, kind, _ in rest[:-1])
        assert C.ACCEPTED not in [kind for _, kind, _ in rest]
    # Answered at once, and alone: ping, status, cancel and refused requests.
    [(_, kind, status)] = exchange(sock, C.STATUS, b"s1", {})
    assert kind == C.DONE and status["instance"] == instance
    assert status["phase"] == "serving"
    assert status["requests"]["worker_messages_dropped"] == 0
    [(_, kind, found)] = exchange(sock, C.CANCEL, b"c1", {"target": "a0"})
    assert kind == C.DONE and found == {"found": False}
    [(_, kind, error)] = exchange(sock, C.COMPLETE, b"bad", {"prompt": "x", "top_k": -1})
    assert kind == C.ERROR and error["field"] == "top_k"


@pytest.fixture(scope="module")
def one_slot():
    """One worker with one slot on one core, reading prompts 32 tokens a step."""
    with launched(
        "--workers", "1", "--cores-per-worker", "1", "--ctx-size", "8192", "--prefill-chunk", "32"
    ) as inst:
        yield inst


def gaps(sent_at: float, frames: list) -> list[float]:
    times = [sent_at, *(at for at, _, _ in frames)]
    return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]


@pytest.mark.timeout(180)
def test_a_request_is_never_silent_until_its_end(one_slot):
    """A long prompt is read for seconds before its first token: it gets `running`. A
    request behind it waits: it gets `queued`. Neither is ever silent for 2.5 s."""
    ctx = zmq.Context()
    sock = one_slot.dealer(ctx)
    frames: dict[bytes, list] = {b"long": [], b"behind": []}
    try:
        sent_at = time.monotonic()
        send(
            sock, C.COMPLETE, b"long", {"prompt": LONG_COUNT, "max_tokens": 1500, "temperature": 0}
        )
        send(
            sock,
            C.COMPLETE,
            b"behind",
            {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
        )
        cancel_sent = False
        while any(not f or f[-1][1] not in C.TERMINAL_KINDS for f in frames.values()):
            at, kind, rid, body = receive(sock)
            if rid == b"cancel-long":
                continue  # the cancel's own done
            frames[rid].append((at, kind, body))
            # Once the second request has waited long enough for several heartbeats,
            # end the first one (it would count for minutes).
            if not cancel_sent and at - sent_at > 4.5:
                send(sock, C.CANCEL, b"cancel-long", {"target": "long"})
                cancel_sent = True
    finally:
        sock.close(0)
        ctx.term()
    for rid, got in frames.items():
        kinds = [kind for _, kind, _ in got]
        assert kinds[0] == C.ACCEPTED, (rid, kinds)
        assert all(kind in NON_TERMINAL for kind in kinds[:-1]), (rid, kinds)
        silences = gaps(sent_at, got)
        assert max(silences) < MAX_SILENCE_S, (rid, kinds, silences)
        tokens = 0
        for _, kind, body in got:  # each heartbeat counts the tokens sent before it
            if kind == C.RUNNING:
                assert body["tokens_sent"] == tokens, (rid, kinds)
            tokens += kind == C.TOKEN
    long_kinds = [kind for _, kind, _ in frames[b"long"]]
    first_token = long_kinds.index(C.TOKEN) if C.TOKEN in long_kinds else len(long_kinds)
    assert C.RUNNING in long_kinds[:first_token], f"no running while reading: {long_kinds}"
    assert frames[b"long"][-1][2].get("code") == C.E_CANCELLED, frames[b"long"][-1]
    behind = [kind for _, kind, _ in frames[b"behind"]]
    assert behind.count(C.QUEUED) >= 3, behind  # waited over 4.5 s: a heartbeat a second
    assert C.TOKEN in behind and behind[-1] == C.DONE, behind
    assert C.QUEUED not in behind[behind.index(C.TOKEN) :], behind


@pytest.mark.timeout(120)
def test_a_stopped_worker_still_gets_its_requests_heartbeats(one_slot):
    """A request whose worker makes no progress (SIGSTOP: as a long step or a hang before
    the watchdog acts) gets `running` frames that count the tokens sent so far."""
    worker = one_slot.status()["workers"][0]["pid"]
    with one_slot.client(timeout=10) as client:
        stream = client.complete(COUNTING, max_tokens=400, temperature=0)
        pieces = iter(stream)
        next(pieces)  # it is generating
        os.kill(worker, signal.SIGSTOP)
        try:
            start = time.monotonic()
            seen = []
            while time.monotonic() - start < 3.5:
                seen.append((time.monotonic(), *client._receive(stream.request_id)))
        finally:
            os.kill(worker, signal.SIGCONT)
        client.cancel(stream)
        with pytest.raises(LlmsupError, match="cancelled"):
            for _ in pieces:
                pass
    # Tokens already under way may come first; then only heartbeats.
    kinds = [kind for _, kind, _ in seen]
    assert C.RUNNING in kinds, kinds
    first = kinds.index(C.RUNNING)
    assert set(kinds[first:]) == {C.RUNNING}, kinds
    counted = {body["tokens_sent"] for _, kind, body in seen if kind == C.RUNNING}
    assert len(counted) == 1 and counted.pop() >= 1
    assert max(gaps(start, seen)) < MAX_SILENCE_S, seen


@pytest.mark.timeout(300)
def test_a_restarted_server_has_another_instance(instance_factory):
    """A request held by a supervisor that died never ends: the client's timeout fires,
    and ping on the same connection shows the new instance once it is back."""
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    with Client(state_dir=inst.state_dir) as client:  # the default 5 s per frame
        first = client.ping()["instance"]
        stream = client.complete(COUNTING, max_tokens=2000, temperature=0)
        pieces = iter(stream)
        next(pieces)
        assert stream.instance == first
        workers = [w["pid"] for w in client.status()["workers"]]
        os.kill(inst.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ReplyTimeout) as lost:
            for _ in pieces:
                pass
        waited = time.monotonic() - start
        assert lost.value.instance == first
        with pytest.raises(ReplyTimeout):
            client.ping()  # nobody answers
        gone = wait_until(lambda: not any(alive(p) for p in workers), timeout=15)
        assert gone, f"workers {workers} outlived their supervisor"
        assert inst.stop().returncode == 1  # removes what the killed supervisor left
        started = inst.start()
        assert started.returncode == 0, started.stderr
        second = client.ping()["instance"]  # the same DEALER, reconnected by itself
        assert second != first
        assert client.status()["instance"] == second
        # A clean stop and start: another instance again.
        assert inst.stop().returncode == 0
        assert inst.start().returncode == 0
        third = client.ping()["instance"]
        assert third not in (first, second)
        assert client.instance == third
    assert C.CLIENT_RECEIVE_TIMEOUT_MS / 1000 - 0.1 <= waited < 15


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
