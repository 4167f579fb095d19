"""The worker without a supervisor: its stdin handshake, its order loop under malformed
and random messages (a stub engine), and a real worker process spoken to over the worker
codec, as the supervisor does."""

from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import sys
import tempfile

import orjson
import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol import workerwire as wire
from llmsup.protocol.messages import Chat, Complete, Message, Sampling, Tokenize
from llmsup.worker.__main__ import SpawnLineError, read_spawn_line
from llmsup.worker.loop import WorkerLoop

SECRET = bytes(range(32))
JOB = b"\0" * 7 + b"\1" + b"req-1"  # an 8-byte sequence number, then the request id


def spawn_line(**fields) -> io.BytesIO:
    line = {"identity": "w0.x7Gq", "secret": SECRET.hex(), **fields}
    return io.BytesIO(orjson.dumps(line) + b"\n")


# --- the spawn line on stdin ---------------------------------------------------------------


def test_spawn_line_gives_identity_and_secret():
    assert read_spawn_line(spawn_line()) == (b"w0.x7Gq", SECRET)


@pytest.mark.parametrize(
    "stdin, complaint",
    [
        (b"", "empty"),
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"secret": "' + SECRET.hex().encode() + b'"}\n', "identity"),
        (orjson.dumps({"identity": "", "secret": SECRET.hex()}), "identity"),
        (orjson.dumps({"identity": "x" * 256, "secret": SECRET.hex()}), "identity"),
        (orjson.dumps({"identity": "\0w0", "secret": SECRET.hex()}), "zero byte"),
        (orjson.dumps({"identity": "w0"}), "secret"),
        (orjson.dumps({"identity": "w0", "secret": SECRET.hex()[:-2]}), "secret"),
        (orjson.dumps({"identity": "w0", "secret": "zz" * 32}), "secret"),
        (orjson.dumps({"identity": "w0", "secret": 7}), "secret"),
        (b'{"identity": "' + b"x" * 5000 + b'"}\n', "longer than"),
    ],
)
def test_spawn_line_rejects_anything_else(stdin: bytes, complaint: str):
    with pytest.raises(SpawnLineError, match=complaint):
        read_spawn_line(io.BytesIO(stdin))


def test_worker_without_spawn_line_exits_2_and_says_why():
    argv = [
        "--worker-id",
        "0",
        "--cores",
        "0",
        "--endpoint",
        "ipc:///nonexistent",
        "--model",
        "/nonexistent",
        "--ctx-size",
        "256",
        "--supervisor-pid",
        str(os.getpid()),
    ]
    for stdin in (b"", b"--identity w0\n"):
        result = subprocess.run(
            [sys.executable, "-m", "llmsup.worker", *argv],
            input=stdin,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert b"identity and secret on stdin" in result.stderr
    identity = subprocess.run(
        [sys.executable, "-m", "llmsup.worker", *argv, "--identity", "w0"],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    assert identity.returncode == 2 and b"unrecognized arguments" in identity.stderr


# --- the order loop, with a stub engine ------------------------------------------------------


class StubGeneration:
    def __init__(self, engine, work):
        self.engine, self.work = engine, work
        self.tokens, self.prefilling, self.job_id = [], True, b""
        self.followers = []  # a request of n completions' other sequences (none here)

    def close(self, keep: bool = False) -> None:
        self.engine.closed.append(self.job_id)

    def usage(self) -> dict:
        return {"usage": {"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 0}}


class StubEngine:
    def __init__(self):
        self.started, self.closed = [], []

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return [len(text)]

    def start(self, work):
        self.started.append(work)
        return StubGeneration(self, work)

    def step(self, emit=None):
        return []


@pytest.fixture
def loop_and_peer():
    ctx = zmq.Context.instance()
    ours, theirs = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    name = f"inproc://worker-units-{random.random()}"
    theirs.bind(name)
    ours.connect(name)
    try:
        yield WorkerLoop(ours, StubEngine(), slots=2), theirs
    finally:
        ours.close(0)
        theirs.close(0)


def deliver(loop: WorkerLoop, peer, frames: list[bytes]) -> list[list[bytes]]:
    """Send one order to the loop, let it handle it; the reports it sent back."""
    peer.send_multipart(frames)
    assert loop.sock.poll(1000)
    loop.handle_messages()
    reports = []
    while peer.poll(0):
        reports.append(peer.recv_multipart())
    return reports


def test_orders_reach_the_engine_as_typed_work(loop_and_peer):
    loop, peer = loop_and_peer
    work = Complete("hi", Sampling(max_tokens=3, temperature=0.5, stop=("x",)))
    assert deliver(loop, peer, wire.job_order(JOB, work)) == []
    assert loop.engine.started == [work] and set(loop.running) == {JOB}
    (report,) = deliver(loop, peer, wire.abort_order(JOB, C.E_CANCELLED, "client cancelled"))
    (event,) = wire.decode_report(report)
    assert (event.kind, event.job_id) == (C.W_ERROR, JOB) and not loop.running
    assert orjson.loads(event.body)["code"] == C.E_CANCELLED
    (report,) = deliver(loop, peer, wire.job_order(JOB, Tokenize("four")))
    (event,) = wire.decode_report(report)
    assert event.kind == C.W_DONE and orjson.loads(event.body) == {"tokens": [4], "count": 1}
    assert deliver(loop, peer, wire.drain_order()) == [] and loop.stopping


def test_malformed_orders_change_nothing_and_are_logged_once_per_interval(loop_and_peer, caplog):
    loop, peer = loop_and_peer
    deliver(loop, peer, wire.job_order(JOB, Complete("running")))
    body = orjson.dumps({"prompt": "x"})
    malformed = [
        [b"READY"],
        [C.S_JOB],
        [C.S_JOB, JOB, C.COMPLETE],
        [C.S_JOB, b"short", C.COMPLETE, body],
        [C.S_JOB, JOB + b"2", C.PING, b"{}"],
        [C.S_JOB, JOB + b"2", C.COMPLETE, b"{oops"],
        [C.S_JOB, JOB + b"2", C.COMPLETE, b"[]"],
        [C.S_JOB, JOB + b"2", C.COMPLETE, orjson.dumps({"prompt": "x", "top_p": 0})],
        [C.S_JOB, JOB, C.COMPLETE, body],  # that job is already running
        [C.S_ABORT, JOB],
        [C.S_ABORT, JOB, b"{}"],
        [C.S_ABORT, JOB, b'"x"'],
        [C.S_DRAIN, b"now"],
        [b""],
        [b"\xff" * 100, b"x"],
    ]
    with caplog.at_level(logging.ERROR, logger="llmsup.worker"):
        for frames in malformed:
            assert deliver(loop, peer, frames) == [], frames
        assert set(loop.running) == {JOB} and not loop.stopping
        assert loop.engine.started == [Complete("running")] and loop.engine.closed == []
        assert len(caplog.records) == 1 and "dropped 1 malformed" in caplog.text
        loop.drop_logged_at -= 11  # ten seconds later
        deliver(loop, peer, [C.S_DRAIN, b"now"])
    assert len(caplog.records) == 2
    assert f"dropped {len(malformed)} malformed" in caplog.records[1].getMessage()


def test_random_orders_never_raise_and_malformed_ones_change_nothing(loop_and_peer):
    loop, peer = loop_and_peer
    rng = random.Random(16)
    kinds = [C.S_JOB, C.S_ABORT, C.S_DRAIN, b"JOBS", b""]
    verbs = [*C.WORKER_VERBS, C.PING, C.CANCEL, b"\x00"]
    bodies = [
        b"{}",
        b"{",
        b"null",
        b'{"prompt": 1}',
        b'{"text": "a"}',
        b'{"prompt": "p"}',
        b'{"messages": [{"role": "user", "content": "c"}]}',
        b'{"code": "c"}',
        b'{"code": "c", "message": "m"}',
        b'{"prompt": "p", "max_tokens": -1}',
        b"\xc3\x28",
    ]
    ids = [JOB, JOB + b"b", b"", b"x" * 9, b"y" * 100]
    anything = [*ids, *verbs, *bodies]
    # Mostly the right kind of frame at each place, so that many orders are valid.
    places = {C.S_JOB: [ids, verbs, bodies], C.S_ABORT: [ids, bodies]}
    seen: set[str] = set()
    for _ in range(3000):
        frames = [rng.choice(kinds)]
        pools = places.get(frames[0], [])
        for i in range(rng.choice([len(pools)] * 4 + [0, 1, 2, 3, 4])):
            right = i < len(pools) and rng.random() < 0.9
            frames.append(rng.choice(pools[i] if right else anything))
        try:
            order = wire.decode_order(frames)
        except wire.WireError:
            order = None
        seen.add(type(order).__name__)
        before = (set(loop.running), loop.stopping, len(loop.engine.started))
        deliver(loop, peer, frames)
        if order is None or (isinstance(order, wire.JobOrder) and order.job_id in before[0]):
            assert (set(loop.running), loop.stopping, len(loop.engine.started)) == before
        loop.stopping = False
    assert seen == {"NoneType", "JobOrder", "AbortOrder", "DrainOrder"}


# --- a real worker process -------------------------------------------------------------------


@pytest.fixture
def router():
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    path = tempfile.mktemp(prefix="llmsup-wu", dir="/tmp")
    sock.bind(f"ipc://{path}")
    try:
        yield sock, f"ipc://{path}"
    finally:
        sock.close(0)
        if os.path.exists(path):
            os.unlink(path)


def spawn_worker(endpoint: str, model: str, identity: bytes) -> subprocess.Popen:
    argv = [
        "--worker-id",
        "0",
        "--cores",
        "0",
        "--endpoint",
        endpoint,
        "--model",
        model,
        "--ctx-size",
        "512",
        "--slots",
        "2",
        "--supervisor-pid",
        str(os.getpid()),
    ]
    proc = subprocess.Popen([sys.executable, "-m", "llmsup.worker", *argv], stdin=subprocess.PIPE)
    line = {"identity": identity.decode(), "secret": SECRET.hex()}
    proc.stdin.write(orjson.dumps(line) + b"\n")
    proc.stdin.close()
    return proc


def receive(sock, timeout_ms: int = 60_000) -> tuple[bytes, list[bytes]]:
    assert sock.poll(timeout_ms), "the worker sent nothing"
    sender, *frames = sock.recv_multipart()
    return sender, frames


def test_real_worker_proves_its_identity_and_serves_typed_jobs(router):
    from llmsup.supervisor.models.fetch import default_model

    sock, endpoint = router
    identity = os.urandom(8).hex().encode()
    proc = spawn_worker(endpoint, str(default_model()), identity)
    try:
        sender, frames = receive(sock)
        ready = wire.decode_report(frames)
        assert sender == identity and isinstance(ready, wire.Ready)
        assert ready.secret == SECRET and ready.pid == proc.pid and ready.slots == 2
        assert ready.n_ctx == 512 and len(ready.step_ms) == 2
        greedy = Sampling(max_tokens=4, temperature=0.0)
        chat = Chat((Message("system", "Be brief."), Message("user", "Name a colour.")), greedy)
        for work in (Complete("Once upon a time", greedy), chat):
            sock.send_multipart([identity, *wire.job_order(JOB, work)])
            kinds = []
            while not {C.W_DONE, C.W_ERROR} & set(kinds):
                sender, frames = receive(sock)
                kinds += [event.kind for event in wire.decode_report(frames)]
            assert sender == identity and C.W_ERROR not in kinds, kinds
        sock.send_multipart([identity, *wire.drain_order()])
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_real_worker_reports_a_failed_load_with_its_secret(router):
    sock, endpoint = router
    with tempfile.NamedTemporaryFile(suffix=".gguf") as junk:
        junk.write(b"not a model" * 100)
        junk.flush()
        proc = spawn_worker(endpoint, junk.name, b"w0.junk")
        try:
            sender, frames = receive(sock)
            failed = wire.decode_report(frames)
            assert sender == b"w0.junk" and isinstance(failed, wire.Failed)
            assert failed.secret == SECRET and failed.reason
            assert proc.wait(60) == 3
        finally:
            proc.kill()
            proc.wait()
