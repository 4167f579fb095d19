"""The C and Node.js clients (clients/) against a live supervisor.

Each client's command-line example, llmsup-generate, runs against a real server: a
streamed completion, a chat and tokenize (each compared with the Python client's answer),
a malformed request, an overload (the retry_after_ms hint honoured) and Ctrl-C (the
`cancel` verb, then the request's terminal frame). Where a toolchain is absent (no cc, no
libzmq or jansson headers, no node, no node_modules) the tests skip and say why;
tools/setup-clients.sh installs everything.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from llmsup.protocol.client import LlmsupError
from tests.conftest import Instance

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "clients" / "c"
NODE_DIR = ROOT / "clients" / "node"
COUNTING = "1, 2, 3, 4,"  # greedy, the model keeps counting: a long generation
SETUP = "run tools/setup-clients.sh"


def c_client() -> list[str]:
    if not shutil.which("cc") or not shutil.which("make"):
        pytest.skip(f"no C toolchain (cc, make): {SETUP}")
    for header in ("zmq.h", "jansson.h"):
        probe = subprocess.run(
            ["cc", "-E", "-x", "c", "-"],
            input=f"#include <{header}>\n",
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            pytest.skip(f"{header} not found (libzmq3-dev, libjansson-dev): {SETUP}")
    # The headers are there, so a failing build is a real failure, not a skip.
    built = subprocess.run(["make", "-s", "-C", str(C_DIR)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return [str(C_DIR / "llmsup-generate")]


def node_client() -> list[str]:
    if not shutil.which("node"):
        pytest.skip(f"no node: {SETUP}")
    if not (NODE_DIR / "node_modules" / "zeromq").is_dir():
        pytest.skip(f"clients/node/node_modules is not installed: {SETUP}")
    return ["node", str(NODE_DIR / "bin" / "llmsup-generate.js")]


@pytest.fixture(scope="module", params=["c", "node"])
def cli(request) -> list[str]:
    return c_client() if request.param == "c" else node_client()


def run(cli: list[str], inst: Instance, *args: str, timeout: float = 60):
    return subprocess.run(
        [*cli, "--state-dir", inst.state_dir, *args], capture_output=True, timeout=timeout
    )


# --- on the shared server --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_streamed_completion(cli, served):
    prompt = "The capital of France is"
    with served.client() as py:
        expected = py.complete(prompt, max_tokens=8, temperature=0).text()
    result = run(cli, served, "-n", "8", "-t", "0", prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected
    usage = rb"\[(length|stop): prompt_tokens=\d+ completion_tokens=\d+ cached_tokens=\d+\]"
    assert re.search(usage, result.stderr)


@pytest.mark.timeout(60)
def test_chat(cli, served):
    question = "Name a color."
    with served.client() as py:
        messages = [{"role": "user", "content": question}]
        expected = py.chat(messages, max_tokens=8, temperature=0).text()
    result = run(cli, served, "--chat", "-n", "8", "-t", "0", question)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected


@pytest.mark.timeout(60)
def test_tokenize(cli, served):
    text = "Hello world, héllo wörld"
    with served.client() as py:
        expected = py.tokenize(text)
    result = run(cli, served, "--tokenize", text)
    assert result.returncode == 0, result.stderr
    assert [int(t) for t in result.stdout.split()] == expected


@pytest.mark.timeout(60)
def test_malformed_request(cli, served):
    result = run(cli, served, "--param", "temperature=5", "x")
    assert result.returncode == 1, result.stderr
    assert b"error bad_request" in result.stderr and b"(field temperature)" in result.stderr
    result = run(cli, served, "--param", "max_token=5", "x")  # an unknown field
    assert result.returncode == 1, result.stderr
    assert b"(field max_token)" in result.stderr


@pytest.mark.timeout(60)
def test_ctrl_c_cancels(cli, served):
    proc = subprocess.Popen(
        [*cli, "--state-dir", served.state_dir, "-n", "400", "-t", "0", COUNTING],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out = bytearray()
    reader = threading.Thread(target=read_into, args=(proc.stdout, out), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(out) < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert len(out) >= 12, "no tokens streamed"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    # 130 with this message means the server's terminal frame said `cancelled`.
    assert proc.returncode == 130, err
    match = re.search(rb"cancelled after (\d+) token frames", err)
    assert match, err
    assert 0 < int(match.group(1)) < 400
    # The request is gone on the server too: nothing in flight once the cancel landed.
    status = served.status()
    assert status["requests"]["in_flight"] == 0


def read_into(stream, out: bytearray) -> None:
    """Read a pipe as it fills (the test watches `out` grow)."""
    while chunk := stream.read1(4096):
        out.extend(chunk)


# --- overload: one worker slot and no queue ------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    inst = Instance("--workers", "1", "--cores-per-worker", "1", "--queue-size", "0")
    result = inst.start()
    assert result.returncode == 0, result.stderr
    yield inst
    inst.cleanup()


class Blocker:
    """A generation on the Python client that holds tiny's only slot until it ends."""

    def __init__(self, inst: Instance, max_tokens: int):
        self.client = inst.client()
        self.stream = self.client.complete(COUNTING, max_tokens=max_tokens, temperature=0)
        self.pieces = iter(self.stream)
        next(self.pieces)  # the first token: it is running now

    def finish(self) -> None:
        for _ in self.pieces:
            pass
        self.client.close()


@pytest.mark.timeout(60)
def test_overloaded_gives_up_after_its_attempts(cli, tiny):
    blocker = Blocker(tiny, max_tokens=300)
    try:
        start = time.monotonic()
        result = run(cli, tiny, "-a", "2", "-n", "2", "hello")
        elapsed = time.monotonic() - start
    finally:
        blocker.client.cancel(blocker.stream)
        with pytest.raises(LlmsupError, match="cancelled"):
            blocker.finish()
    assert result.returncode == 3, result.stderr
    waits = [int(m) for m in re.findall(rb"retrying in (\d+) ms", result.stderr)]
    assert len(waits) == 1, result.stderr  # 2 attempts: one wait between them
    assert re.search(rb"overloaded: .*retry_after_ms=\d+", result.stderr)
    assert elapsed >= waits[0] / 1000


@pytest.mark.timeout(60)
def test_overloaded_retries_after_the_hint(cli, tiny):
    blocker = Blocker(tiny, max_tokens=48)  # about 1.5 s of generation left
    try:
        start = time.monotonic()
        result = run(cli, tiny, "-a", "30", "-n", "2", "-t", "0", "hello")
        elapsed = time.monotonic() - start
    finally:
        blocker.finish()
    assert result.returncode == 0, result.stderr
    waits = [int(m) for m in re.findall(rb"retrying in (\d+) ms", result.stderr)]
    assert waits, f"never overloaded: {result.stderr}"
    assert all(100 <= w <= 60000 for w in waits)
    # Honoured: it waited each hint out before trying again.
    assert elapsed >= sum(waits) / 1000
    assert result.stdout
