"""`n` above 1 (SPEC.md 3.16): n completions of one prompt, read once, on one worker, each
with its own seed, streamed with their index and answered with one DONE, through the
protocol (a raw DEALER and the Python client) and the HTTP gateway (the openai SDK), on a
real SmolLM2: 1 worker x 1 core x 4 slots."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import jsonschema
import openai
import orjson
import pytest

from llmsup.protocol import constants as C
from tests import test_clients
from tests.conftest import Instance, dealer_of, frames_until_end, launched, wait_until

pytestmark = pytest.mark.timeout(180)

MODEL = "smollm2-135m-instruct"
SLOTS = 4
PROMPT = "Once upon a time"
SCHEMAS = Path(__file__).resolve().parent.parent / "protocol" / "schemas"


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.json").read_text()))


@pytest.fixture(scope="module")
def inst():
    with launched(
        "--model", MODEL, "--workers", "1", "--cores-per-worker", "1",
        "--slots-per-worker", str(SLOTS), "--ctx-size", "512", http=True,
    ) as inst:  # fmt: skip
        yield inst


@pytest.fixture
def sock(inst):
    with dealer_of(inst) as s:
        yield s


def send(sock, rid: bytes, verb: bytes = C.COMPLETE, **body) -> None:
    sock.send_multipart([C.VERSION, verb, rid, orjson.dumps(body)])


def texts_of(frames) -> dict[int, str]:
    out: dict[int, str] = {}
    for kind, body in frames:
        if kind == C.TOKEN:
            index = body.get("index", 0)
            out[index] = out.get(index, "") + body["text"]
    return out


def run(sock, rid: bytes, **body) -> tuple[dict[int, str], dict]:
    send(sock, rid, prompt=PROMPT, **body)
    frames = frames_until_end(sock, rid)
    kind, done = frames[-1]
    assert kind == C.DONE, done
    return texts_of(frames), done


def all_free(inst: Instance) -> bool:
    return inst.status()["workers"][0]["free_slots"] == SLOTS


# --- the protocol ------------------------------------------------------------------------------


def test_three_choices_with_their_indexes_and_one_done(inst, sock):
    send(sock, b"n3", prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=5)
    frames = frames_until_end(sock, b"n3")
    token, done_schema = schema("reply.token"), schema("reply.done.generation")
    tokens = [body for kind, body in frames if kind == C.TOKEN]
    assert [kind for kind, _ in frames].count(C.DONE) == 1
    for body in tokens:
        token.validate(body)
        assert body["index"] in (0, 1, 2)
    kind, done = frames[-1]
    done_schema.validate(done)
    assert [c["index"] for c in done["choices"]] == [0, 1, 2]
    assert done["finish_reason"] == done["choices"][0]["finish_reason"]
    counts = [c["completion_tokens"] for c in done["choices"]]
    assert done["usage"]["completion_tokens"] == sum(counts) and all(counts)
    # The prompt is counted once: as a request of one counts it.
    _, one = run(sock, b"n1", max_tokens=2, temperature=0)
    assert done["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert "choices" not in one
    assert wait_until(lambda: all_free(inst), timeout=5)


def test_a_request_of_one_is_answered_as_before(sock):
    send(sock, b"one", prompt=PROMPT, max_tokens=3, temperature=0)
    frames = frames_until_end(sock, b"one")
    assert all("index" not in body for kind, body in frames if kind == C.TOKEN)
    assert set(frames[-1][1]) == {"finish_reason", "usage", "timings"}


def test_seeded_choices_differ_and_come_again(sock):
    first, done = run(sock, b"s1", n=3, max_tokens=16, temperature=1.0, seed=1234)
    again, _ = run(sock, b"s2", n=3, max_tokens=16, temperature=1.0, seed=1234)
    assert first == again, "the same seed gives the same choices"
    assert len(set(first.values())) >= 2, f"seeds 1234..1236 gave one text: {first}"
    other, _ = run(sock, b"s3", n=3, max_tokens=16, temperature=1.0, seed=99)
    assert other != first


def test_greedy_choices_are_equal(sock):
    texts, done = run(sock, b"g3", n=3, max_tokens=24, temperature=0)
    alone, _ = run(sock, b"g1", max_tokens=24, temperature=0)
    assert len(texts) == 3 and texts[0] == texts[1] == texts[2], texts
    assert texts[0] == alone[0], "a choice is what the request alone gives (greedy, 3 rows)"


def test_n_above_a_workers_slots_is_refused_naming_it(inst, sock):
    send(sock, b"big", prompt=PROMPT, n=SLOTS + 1, max_tokens=2)
    (kind, body), *_ = frames_until_end(sock, b"big")
    assert (kind, body["code"], body["field"]) == (C.ERROR, C.E_BAD_REQUEST, "n")
    assert str(SLOTS) in body["message"] and "--slots-per-worker" in body["message"]
    send(sock, b"huge", prompt=PROMPT, n=C.MAX_N + 1)
    (kind, body), *_ = frames_until_end(sock, b"huge")
    assert body["field"] == "n" and str(C.MAX_N) in body["message"]
    # The next request is served as usual.
    texts, done = run(sock, b"after", n=SLOTS, max_tokens=2, temperature=0)
    assert len(done["choices"]) == SLOTS


def test_a_request_holds_n_slots_of_one_worker(inst, sock):
    """n=3 takes 3 of the 4 slots; a request of 2 waits until they are free."""
    send(sock, b"hold", prompt=PROMPT, n=3, max_tokens=60, temperature=0)
    assert wait_until(lambda: inst.status()["workers"][0]["free_slots"] == 1, timeout=10)
    send(sock, b"wait", prompt=PROMPT, n=2, max_tokens=2, temperature=0)
    order = []  # (request id, kind), as they came
    while sum(kind in C.TERMINAL_KINDS for _, kind in order) < 2:
        assert sock.poll(60_000), order[-3:]
        _, kind, rid, _ = sock.recv_multipart()
        order.append((rid, kind))
    assert order.index((b"hold", C.DONE)) < order.index((b"wait", C.TOKEN))
    assert order[-1] == (b"wait", C.DONE)
    assert wait_until(lambda: all_free(inst), timeout=10)


def test_cancel_ends_it_with_one_terminal_frame(inst, sock):
    send(sock, b"long", prompt=PROMPT, n=3, max_tokens=400, temperature=0)
    while True:  # a token of each choice first
        assert sock.poll(60_000)
        _, kind, rid, raw = sock.recv_multipart()
        if kind == C.TOKEN and orjson.loads(raw)["index"] == 2:
            break
    send(sock, b"c", C.CANCEL, target="long")
    frames = frames_until_end(sock, b"long")
    kind, body = frames[-1]
    assert (kind, body["code"]) == (C.ERROR, C.E_CANCELLED)
    assert body["usage"]["completion_tokens"] >= 3
    assert not sock.poll(1500) or sock.recv_multipart()[2] != b"long", "nothing after the end"
    assert wait_until(lambda: all_free(inst), timeout=5)


def test_deadline_stop_strings_and_schema_per_choice(inst, sock):
    send(sock, b"late", prompt=PROMPT, n=2, max_tokens=400, temperature=0, timeout_ms=1500)
    frames = frames_until_end(sock, b"late")
    assert [k for k, _ in frames].count(C.ERROR) == 1
    assert frames[-1][1]["code"] == C.E_DEADLINE
    texts, done = run(sock, b"stop", n=3, max_tokens=40, temperature=1.0, seed=3, stop=[" "])
    assert all(" " not in t for t in texts.values())
    assert all(c["finish_reason"] == "stop" for c in done["choices"]), done
    shape = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}},
        "required": ["name"],
    }
    send(
        sock, b"json", C.CHAT, messages=[{"role": "user", "content": "Name a cat."}],
        n=2, max_tokens=60, temperature=1.0, seed=8, json_schema=shape,
    )  # fmt: skip
    frames = frames_until_end(sock, b"json")
    done = frames[-1][1]
    for index, text in texts_of(frames).items():
        if done["choices"][index]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(text), shape)
    assert wait_until(lambda: all_free(inst), timeout=5)


def test_python_client_gives_each_choice(inst):
    with inst.client() as client:
        stream = client.complete(PROMPT, n=2, max_tokens=4, temperature=0)
        choices = stream.choices()
    assert len(choices) == 2 and choices[0] == choices[1] and choices[0]


@pytest.mark.parametrize("cli", ["llmsup", "c", "node"])
def test_each_command_line_client_prints_each_choice(inst, cli):
    """`llmsup generate --choices 3` and the C and Node llmsup-generate: each completion
    whole, under its header, in index order, as the Python client gives them."""
    with inst.client() as client:
        stream = client.complete(PROMPT, n=3, max_tokens=12, temperature=1.0, seed=1234)
        texts = stream.choices()
    assert len(set(texts)) >= 2, texts  # interleaved frames would be told apart
    expected = "".join(
        f"--- choice {c['index']}: {c['finish_reason']}, {c['completion_tokens']} tokens\n"
        f"{texts[c['index']]}\n"
        for c in stream.done["choices"]
    )
    knobs = ["--choices", "3", "--seed", "1234"]
    if cli == "llmsup":
        result = inst.cli("generate", PROMPT, *knobs, "--max-tokens", "12", "--temperature", "1")
    else:
        command = test_clients.c_client() if cli == "c" else test_clients.node_client()
        result = test_clients.run(command, inst, *knobs, "-n", "12", "-t", "1", PROMPT)
    assert result.returncode == 0, result.stderr
    out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    assert out == expected


# --- the HTTP gateway (the openai SDK) ---------------------------------------------------------


def openai_client(inst) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{inst.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_chat_n3_whole_and_streamed(inst):
    client = openai_client(inst)
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, n=3, max_tokens=12, temperature=1.0, seed=11
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert reply.usage.completion_tokens >= 3
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, n=3, max_tokens=12, temperature=1.0, seed=11,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(texts) == sorted(finished) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.message.content for c in reply.choices]
    assert usage.completion_tokens == reply.usage.completion_tokens


def test_openai_tool_calls_per_choice(inst):
    client = openai_client(inst)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    }
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        n=2,
        max_tokens=80,
        temperature=1.0,
        seed=4,
    )
    reply = client.chat.completions.create(**kwargs)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        if choice.finish_reason == "tool_calls":
            (call,) = choice.message.tool_calls
            assert call.function.name == "get_weather"
            assert "city" in json.loads(call.function.arguments)
    assert any(c.finish_reason == "tool_calls" for c in reply.choices), reply
    names: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                names[choice.index] = names.get(choice.index, "") + (call.function.name or "")
    assert names == {
        c.index: "get_weather" for c in reply.choices if c.finish_reason == "tool_calls"
    }


def test_openai_completions_n_and_refusals(inst):
    client = openai_client(inst)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, n=2, max_tokens=4, temperature=0, echo=True
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text.startswith(PROMPT) for c in reply.choices)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, n=SLOTS + 1, max_tokens=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, best_of=2, max_tokens=2)
    assert err.value.body["param"] == "best_of"
    r = httpx.post(
        f"{inst.url}/v1/completions",
        json={"prompt": PROMPT, "n": 2, "logprobs": 1, "echo": True, "max_tokens": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


# --- a worker that dies ------------------------------------------------------------------------


def test_worker_dying_ends_it_once(inst, sock):
    """Killed after the choices streamed: one worker_lost (no retry: tokens were sent)."""
    send(sock, b"doomed", prompt=PROMPT, n=3, max_tokens=400, temperature=0)
    while True:
        assert sock.poll(60_000)
        _, kind, rid, raw = sock.recv_multipart()
        if kind == C.TOKEN:
            break
    os.kill(inst.status()["workers"][0]["pid"], signal.SIGKILL)
    frames = frames_until_end(sock, b"doomed")
    assert [k for k, _ in frames].count(C.ERROR) == 1
    assert frames[-1][1]["code"] == C.E_WORKER_LOST and frames[-1][1]["tokens_sent"] >= 1
    ready = wait_until(lambda: inst.status()["workers"][0]["state"] == "ready", timeout=60)
    assert ready and all_free(inst)
