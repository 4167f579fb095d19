"""The C and Node.js clients (clients/) against a live supervisor.

Each client's command-line example, llmsup-generate, runs against a real server: a
streamed completion, a chat and tokenize (each compared with the Python client's answer),
-m naming the model (an unknown one: bad_request on `model`), a malformed request, an
overload (the retry_after_ms hint honoured), Ctrl-C (the `cancel` verb, then the
request's terminal frame) and the `accepted` frame with the server's instance. Against a
scripted fake server (tests/test_liveness.py): heartbeats and unknown kinds are not
terminal, the receive timeout is per frame, and after one the client pings and tells a
restarted server from a down one. Where a toolchain is absent (no cc, no libzmq or
jansson headers, no node, no node_modules) the tests skip and say why;
tools/setup-clients.sh installs everything.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import jsonschema
import orjson
import pytest

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from tests.conftest import Instance, launched
from tests.test_liveness import GENERATION_DONE, NEW, OLD, FakeServer, pong

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


def events(stderr: bytes) -> list[tuple[bytes, dict]]:
    """The non-terminal frames --verbose printed: "[kind] {body}" lines."""
    lines = re.findall(rb"^\[([\w-]+)\] (\{.*\})$", stderr, re.MULTILINE)
    return [(kind, orjson.loads(body)) for kind, body in lines]


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


CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "country"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


@pytest.mark.timeout(90)
def test_structured_output_tools_and_knobs(cli, served, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(CITY))
    result = run(
        cli,
        served,
        "--chat",
        "-t",
        "0",
        "-n",
        "80",
        "--json-schema",
        str(schema),
        "Name a city in France as JSON.",
    )
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), CITY)
    assert b"[stop:" in result.stderr, result.stderr  # complete, not cut short
    # Other new fields go as --param KEY=JSON: a tool call comes back printed from DONE.
    result = run(
        cli,
        served,
        "--chat",
        "-t",
        "0.5",
        "-p",
        f"tools={json.dumps([WEATHER])}",
        "-p",
        'tool_choice="required"',
        "-p",
        "min_p=0.05",
        "-p",
        "repeat_penalty=1.1",
        "-p",
        'logit_bias={"5": -100}',
        "What is the weather in Paris?",
    )
    assert result.returncode == 0, result.stderr
    call = re.fullmatch(rb"call get_weather\((\{.*\})\) \[call_\w+\]\n", result.stdout)
    assert call, result.stdout
    jsonschema.validate(json.loads(call.group(1)), WEATHER["function"]["parameters"])
    assert b"[tool_calls:" in result.stderr
    # A schema outside the subset: the server's bad_request, naming the field.
    schema.write_text('{"type": "integer", "minimum": 0}')
    result = run(cli, served, "--json-schema", str(schema), "x")
    assert result.returncode == 1 and b"error bad_request" in result.stderr, result.stderr
    assert b"(field json_schema)" in result.stderr, result.stderr
    # A file that is not JSON: a usage error.
    schema.write_text("{not json")
    assert run(cli, served, "--json-schema", str(schema), "x").returncode == 2


# Each option of the examples and the body member it sets, with a value the server refuses.
KNOB_OPTIONS = [
    (("--top-p", "0"), "top_p"),
    (("--top-k=-1",), "top_k"),
    (("--min-p", "1.5"), "min_p"),
    (("--presence-penalty=-3",), "presence_penalty"),
    (("--frequency-penalty", "3"), "frequency_penalty"),
    (("--repeat-penalty", "0"), "repeat_penalty"),
    (("--repeat-last-n=-1",), "repeat_last_n"),
    (("--logit-bias", "5=101"), "logit_bias"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, field", KNOB_OPTIONS, ids=[f for _, f in KNOB_OPTIONS])
def test_each_knob_option_sets_its_field(cli, served, args, field):
    """The server names the field a value it refuses came in: the option set that one."""
    result = run(cli, served, *args, "-n", "2", "x")
    assert result.returncode == 1, result.stderr
    assert b"error bad_request" in result.stderr, result.stderr
    assert f"(field {field})".encode() in result.stderr, result.stderr


@pytest.mark.timeout(90)
def test_knobs_grammar_and_tool_options(cli, served, tmp_path):
    prompt = "The capital of France is"
    knobs = {"repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    knobs.update(repeat_last_n=16, min_p=0.1, top_k=20, top_p=0.9)
    with served.client() as py:
        plain = py.complete(prompt, max_tokens=8, temperature=0).text()
        # Ban the tokens of the greedy answer: the answer must change.
        banned = {str(t): -100 for t in py.tokenize(plain)}
        expected = py.complete(
            prompt, max_tokens=8, temperature=0, logit_bias=banned, **knobs
        ).text()
    assert expected != plain  # so the comparison below tells the options were sent
    options = [f"--{key.replace('_', '-')}={value}" for key, value in knobs.items()]
    for token in banned:
        options += ["--logit-bias", f"{token}=-100"]
    result = run(cli, served, "-n", "8", "-t", "0", *options, prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected
    # --grammar FILE: the output matches it in full.
    grammar = tmp_path / "yesno.gbnf"
    grammar.write_text('root ::= " yes" | " no"\n')
    result = run(cli, served, "-n", "8", "-t", "0", "--grammar", str(grammar), "Is it? Answer:")
    assert result.returncode == 0, result.stderr
    assert result.stdout in (b" yes", b" no") and b"[stop:" in result.stderr, result
    # --tools FILE and --tool-choice NAME: the call comes back printed from DONE.
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    chat = ("--chat", "-t", "0", "-n", "60", "--tools", str(tools))
    result = run(cli, served, *chat, "--tool-choice", "get_weather", "Weather in Paris?")
    assert result.returncode == 0, result.stderr
    call = re.fullmatch(rb"call get_weather\((\{.*\})\) \[call_\w+\]\n", result.stdout)
    assert call, result.stdout
    jsonschema.validate(json.loads(call.group(1)), WEATHER["function"]["parameters"])
    assert b"[tool_calls:" in result.stderr, result.stderr
    result = run(cli, served, *chat, "--tool-choice", "get_time", "x")  # not among the tools
    assert result.returncode == 1 and b"(field tool_choice)" in result.stderr, result.stderr
    # What the client itself refuses: exit 2, naming the option.
    tools.write_text("[not json")
    for args in (
        ("--logit-bias", "five=1"),
        ("--logit-bias", "5"),
        ("--logit-bias", "5=x"),
        ("--min-p", "abc"),
        ("--grammar", str(tmp_path / "missing.gbnf")),
        ("--tools", str(tools)),
    ):
        result = run(cli, served, *args, "x")
        assert result.returncode == 2, (args, result.stderr)
        option = args[0].encode()  # the option, or for a knob its field (min_p)
        field = option.lstrip(b"-").replace(b"-", b"_")
        assert option in result.stderr or field in result.stderr, (args, result.stderr)


@pytest.mark.timeout(60)
def test_tokenize(cli, served):
    text = "Hello world, héllo wörld"
    with served.client() as py:
        expected = py.tokenize(text)
    result = run(cli, served, "--tokenize", text)
    assert result.returncode == 0, result.stderr
    assert [int(t) for t in result.stdout.split()] == expected


@pytest.mark.timeout(60)
def test_embed(cli, served):
    text = "The cat sat on the mat."
    with served.client() as py:
        expected = py.embed(text)
    result = run(cli, served, "--embed", text)
    assert result.returncode == 0, result.stderr
    got = [float(x) for x in result.stdout.split()]
    assert len(got) == expected["dimensions"] == len(expected["embeddings"][0])
    assert max(abs(a - b) for a, b in zip(got, expected["embeddings"][0], strict=True)) < 1e-5
    assert f"dimensions={expected['dimensions']}".encode() in result.stderr
    assert b"pooling=mean" in result.stderr


@pytest.mark.timeout(60)
def test_model_option(cli, served):
    """-m NAME is the request's `model` for complete, chat and tokenize (the shared server
    serves one model: its default); a name it does not serve is bad_request on `model`."""
    model = served.status()["model"]
    prompt, text = "The capital of France is", "Hello world"
    with served.client() as py:
        expected = py.complete(prompt, max_tokens=6, temperature=0, model=model).text()
        tokens = py.tokenize(text, model=model)
        assert tokens == py.tokenize(text)
        with pytest.raises(LlmsupError) as err:
            py.tokenize(text, model="no-such-model")
        assert err.value.body["field"] == "model"
    result = run(cli, served, "-m", model, "-n", "6", "-t", "0", prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected
    result = run(cli, served, "--model", model, "--chat", "-n", "2", "-t", "0", "Hi")
    assert result.returncode == 0, result.stderr
    result = run(cli, served, "-m", model, "--tokenize", text)
    assert result.returncode == 0, result.stderr
    assert [int(t) for t in result.stdout.split()] == tokens
    for args in (("-n", "2", "x"), ("--chat", "x"), ("--tokenize", "x")):
        result = run(cli, served, "-m", "no-such-model", *args)
        assert result.returncode == 1, result.stderr
        assert b"error bad_request" in result.stderr and b"(field model)" in result.stderr
        assert b"no-such-model" in result.stderr and model.encode() in result.stderr


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


@pytest.mark.timeout(60)
def test_accepted_carries_the_servers_instance(cli, served):
    with served.client() as py:
        instance = py.ping()["instance"]
    for args in (("-n", "2", "-t", "0", "Hello"), ("--tokenize", "Hello")):
        result = run(cli, served, "--verbose", *args)
        assert result.returncode == 0, result.stderr
        (kind, body), *rest = events(result.stderr)
        assert kind == b"accepted" and body["instance"] == instance, result.stderr
        assert {kind for kind, _ in rest} <= {b"queued", b"running"}, result.stderr


def read_into(stream, out: bytearray) -> None:
    """Read a pipe as it fills (the test watches `out` grow)."""
    while chunk := stream.read1(4096):
        out.extend(chunk)


# --- overload: one worker slot and no queue ------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    with launched("--workers", "1", "--cores-per-worker", "1", "--queue-size", "0") as inst:
        yield inst


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


# --- liveness, against a scripted server (tests/test_liveness.py) -------------------------


def run_at(cli: list[str], endpoint: str, *args: str):
    start = time.monotonic()
    result = subprocess.run([*cli, "--endpoint", endpoint, *args], capture_output=True, timeout=30)
    return result, time.monotonic() - start


@pytest.mark.timeout(60)
def test_heartbeats_and_unknown_kinds_are_not_terminal(cli):
    """Frames 0.5 s apart keep a 2 s request alive under a 0.8 s timeout per frame."""
    script = {
        C.COMPLETE: [
            (0, C.ACCEPTED, {"instance": OLD, "queue_depth": 2}),
            (0.5, C.QUEUED, {"position": 1, "queue_depth": 1}),
            (0.5, C.RUNNING, {"tokens_sent": 0}),
            (0.5, C.TOKEN, {"text": "Hel"}),
            (0.2, b"added-later", {"anything": 1}),
            (0.3, C.RUNNING, {"tokens_sent": 1}),
            (0, C.TOKEN, {"text": "lo"}),
            (0, C.DONE, GENERATION_DONE),
        ]
    }
    with FakeServer(script) as server:
        result, elapsed = run_at(cli, server.endpoint, "-v", "-T", "800", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Hello"
    assert elapsed >= 2.0
    kinds = [kind for kind, _ in events(result.stderr)]
    assert kinds == [b"accepted", b"queued", b"running", b"added-later", b"running"], kinds


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "ping, says",
    [
        (pong(NEW), f"the server restarted (instance {OLD}, now {NEW})"),
        (pong(OLD), f"the server (instance {OLD}) is up but sent nothing"),
        ([], "no answer to ping either"),
    ],
    ids=["restarted", "same-instance", "down"],
)
def test_silence_times_out_and_pings(cli, ping, says):
    """After `accepted`, nothing: the client gives up after its timeout per frame, says the
    request may be lost, pings and tells what became of the server (SPEC.md 4.1)."""
    script = {C.COMPLETE: [(0, C.ACCEPTED, {"instance": OLD, "queue_depth": 1})], C.PING: ping}
    with FakeServer(script) as server:
        result, elapsed = run_at(cli, server.endpoint, "-T", "700", "hi")
        received = list(server.received)
    assert result.returncode == 4, result.stderr
    assert elapsed >= 0.7
    assert b"may be lost" in result.stderr and b"ping" in result.stderr, result.stderr
    assert says.encode() in result.stderr, result.stderr
    # (The Node client also cancels the request it gave up on, as a loop left early does.)
    assert received[0] == C.COMPLETE and C.PING in received, received
