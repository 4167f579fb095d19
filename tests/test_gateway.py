"""The OpenAI HTTP gateway (llmsup.supervisor.gateway), started by the test as its own
process in front of a real supervisor, spoken to with OpenAI's own Python SDK, httpx and
curl."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import orjson
import pytest
from testkit import free_port, stop_process

from tests.conftest import Instance, launched, wait_until

MODEL = "gemma3-270m"  # the suite's model (tests/conftest.py), llmsup's default here
pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0, "top_k": 1}  # top_k: llmsup's, sent as an extra field
PROMPT = "The capital of France is"
# A stream that outlives the test using it: greedy, so no sampled end-of-text cuts it short.
LONG = {"max_tokens": 1500, "temperature": 0}


class Gateway:
    """`python -m llmsup.supervisor.gateway` on a free loopback port; its output in a file."""

    def __init__(self, endpoint: str, *args: str, listen: str | None = None):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="llmsup-gw-", suffix=".log")
        listen = listen or f"127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "llmsup.supervisor.gateway",
            "--endpoint",
            endpoint,
            "--listen",
            listen,
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_listening(self, timeout: float = 30) -> Gateway:
        up = wait_until(
            lambda: "listening on" in self.output() or self.proc.poll() is not None, timeout
        )
        assert up and self.proc.poll() is None, f"gateway did not start: {self.output()}"
        return self

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", timeout=60, **kwargs)

    def stop(self) -> int:
        code = stop_process(self.proc)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def inst():
    """One supervisor for the module: 1 worker x 1 core x 2 slots."""
    with launched("--workers", "1", "--cores-per-worker", "1", "--slots-per-worker", "2") as inst:
        yield inst


@pytest.fixture
def gateways():
    """Start gateways with start(endpoint, *args); each is stopped when the test ends."""
    made: list[Gateway] = []

    def start(endpoint: str, *args: str, wait: bool = True, **kwargs) -> Gateway:
        gw = Gateway(endpoint, *args, **kwargs)
        made.append(gw)
        return gw.wait_listening() if wait else gw

    yield start
    for gw in made:
        gw.stop()


@pytest.fixture
def gw(inst, gateways) -> Gateway:
    return gateways(inst.status()["endpoint"])


def in_flight(inst: Instance) -> int:
    return inst.status()["requests"]["in_flight"]


def events(lines: list[str]) -> list[dict]:
    return [orjson.loads(line[6:]) for line in lines if line.startswith("data: {")]


# --- models, health, metrics ---------------------------------------------------------------------


def test_models_and_health(inst, gw):
    assert inst.status()["model"] == MODEL
    client = gw.client()
    listed = client.models.list().data
    assert [m.id for m in listed] == [MODEL]
    assert listed[0].object == "model" and listed[0].owned_by == "llmsup"
    assert listed[0].created > time.time() - 600
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert MODEL in err.value.message  # it lists what is served
    health = httpx.get(f"{gw.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_metrics_has_its_names(inst, gw):
    gw.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{gw.url}/metrics").text
    for name in (
        'llmsup_gateway_requests_total{code="200",endpoint="/v1/completions",'
        f'model="{MODEL}"}} 1.0',
        "llmsup_gateway_rejections_total",
        "llmsup_gateway_prompt_tokens_total",
        f'llmsup_gateway_completion_tokens_total{{model="{MODEL}"}} 3.0',
        "llmsup_gateway_cached_prompt_tokens_total",
        "llmsup_gateway_time_to_first_token_seconds_bucket",
        "llmsup_gateway_request_duration_seconds_bucket",
        "llmsup_up 1.0",
        "llmsup_queue_depth 0.0",
        'llmsup_workers{state="ready"} 1.0',
        f'llmsup_model_core_groups{{model="{MODEL}"}} 1.0',
        "llmsup_worker_restarts_total",
        "llmsup_prefix_cache_hits_total",
        "llmsup_prefix_cache_misses_total",
        "llmsup_prefix_cache_bytes",
        "llmsup_num_requests_waiting 0.0",
        "llmsup_num_requests_running 0.0",
        "llmsup_kv_cache_usage_perc 0.0",
    ):
        assert name in text, name


# --- completions and chat ------------------------------------------------------------------------


def test_completion_whole_and_streamed_agree(gw):
    client = gw.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=GREEDY)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert whole.model == MODEL and whole.created > time.time() - 60
    choice = whole.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    u = whole.usage
    assert u.completion_tokens <= 8 and u.prompt_tokens >= 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_whole_streamed_and_cached_tokens(gw):
    client = gw.client()
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, temperature=0
    )
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant" and first.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == first.usage.prompt_tokens
    # The same conversation again: llmsup's prefix cache continues the prompt.
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert first.usage.prompt_tokens_details.cached_tokens == 0


def test_fields_openai_clients_send_routinely_are_accepted(gw):
    reply = gw.client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_tokens=2,
        n=1,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        user="u1",
        store=False,
        metadata={"k": "v"},
        tool_choice="none",
        tools=[],
        stop=["\n\n"],
        seed=7,
        top_p=0.9,
        logprobs=False,
        service_tier="auto",
        stream=False,
    )
    assert reply.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"echo": 1}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
    ],
)
def test_bad_completion_parameters_are_400_naming_the_field(gw, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().completions.create(model=MODEL, prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"extra_body": {"echo": True}}, "echo"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
    ],
)
def test_bad_chat_parameters_are_400_naming_the_field(gw, kwargs, param):
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().chat.completions.create(**kwargs)
    assert err.value.param == param


def test_unknown_model_is_404_and_a_huge_body_413(gw):
    with pytest.raises(openai.NotFoundError) as err:
        gw.client().completions.create(model="gpt-4", prompt=PROMPT)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    # A placeholder some clients send is refused too: no answer from a model not asked for.
    with pytest.raises(openai.NotFoundError) as err:
        hi = [{"role": "user", "content": "Hi"}]
        gw.client().chat.completions.create(model="gpt-3.5-turbo", messages=hi, stream=True)
    assert err.value.code == "model_not_found" and MODEL in err.value.message
    # No model at all: llmsup's default answers, and the response says which it is.
    plain = httpx.post(f"{gw.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert plain.status_code == 200 and plain.json()["model"] == MODEL
    not_a_name = httpx.post(f"{gw.url}/v1/completions", json={"prompt": PROMPT, "model": 5})
    assert not_a_name.status_code == 400 and not_a_name.json()["error"]["param"] == "model"
    too_big = httpx.post(f"{gw.url}/v1/completions", content=b"x" * (4 * 1024 * 1024 + 1))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    not_json = httpx.post(f"{gw.url}/v1/completions", content=b"{")
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]


def test_context_overflow_is_400_on_the_prompt(gw):
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().completions.create(model=MODEL, prompt="hello " * 3000, max_tokens=4)
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"


def test_sse_framing_with_curl(gw):
    body = {
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        **GREEDY,
        "stream_options": {"include_usage": True},
    }
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "-H",
            "Content-Type: application/json",
            "-d",
            orjson.dumps(body),
            f"{gw.url}/v1/completions",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout.decode()
    assert out.endswith("data: [DONE]\n\n")
    blocks = out.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1]), out
    parsed = events(out.splitlines())
    assert len(parsed) == len(blocks) - 2  # every block but [DONE] is one JSON chunk
    assert parsed[-1]["usage"]["completion_tokens"] == 5 and parsed[-1]["choices"] == []
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"


# --- structured output, tools, fields llmsup does not know ---------------------------------------

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "country"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


def test_response_format_json_schema_and_json_object(gw):
    ask = [{"role": "user", "content": "Name a city in France as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    reply = gw.client().chat.completions.create(
        model=MODEL, messages=ask, response_format=fmt, temperature=0, max_tokens=100
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)
    reply = gw.client().chat.completions.create(
        model=MODEL,
        messages=ask,
        response_format={"type": "json_object"},
        temperature=1,
        seed=3,
        max_tokens=200,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].finish_reason == "length"
    # A keyword llmsup cannot honour: 400 naming where it is, never a looser grammar.
    loose = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().chat.completions.create(
            model=MODEL,
            messages=ask,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": loose}},
        )
    assert err.value.param == "response_format.json_schema.schema"
    assert "/properties/n/minimum" in err.value.message


def test_tool_calls_whole_and_streamed_in_openai_shape(gw):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = gw.client().chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # Streamed: the call's index, id, type and name first, then its argument fragments.
    body = {
        "model": MODEL,
        "messages": ask,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = events(r.iter_lines())
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert all(set(c) == {"index", "function"} for c in calls[1:]) and len(calls) >= 2
    arguments = "".join(c["function"]["arguments"] for c in calls)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The call and its result sent back, as an agent does; tool_choice none: a text answer.
    history = [
        *ask,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
    ]
    final = gw.client().chat.completions.create(
        model=MODEL,
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_sampling_knobs_reach_the_sampler(gw):
    greedy = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    plain = gw.client().completions.create(**greedy).choices[0].text
    first = httpx.post(f"{gw.url}/v1/completions", json={**greedy, "max_tokens": 1}).json()
    first_text = first["choices"][0]["text"]
    assert plain.startswith(first_text)
    # Every knob set at once, with vLLM's name for repeat_penalty: served.
    knobs = gw.client().completions.create(
        **greedy,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        extra_body={"min_p": 0.05, "repetition_penalty": 1.3, "repeat_last_n": 16},
    )
    assert knobs.choices[0].text


def test_fields_llmsup_does_not_know_are_ignored_but_named(inst, gw):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "mirostat": 2,
        "typical_p": 0.9,
        "bad\nname": 1,
    }
    for _ in range(2):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200
        assert r.headers["X-Llmsup-Ignored-Params"] == "mirostat, typical_p, ?"
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'llmsup_gateway_ignored_params_total{param="mirostat"} 2.0' in metrics
    assert 'llmsup_gateway_ignored_params_total{param="other"} 2.0' in metrics
    assert gw.output().count("ignoring the request field 'mirostat'") == 1
    # A known field with a value llmsup cannot honour is still refused.
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={**body, "store": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "store"


# --- disconnects, failures, shutdown -------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_is_cancelled(inst, gw):
    served = inst.status()["workers"][0]["served"]
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert in_flight(inst) == 1
    assert len(events(got)) == 3
    assert wait_until(lambda: in_flight(inst) == 0, timeout=2), "the request was not cancelled"
    assert inst.status()["workers"][0]["served"] == served + 1


def test_a_client_that_gives_up_waiting_is_cancelled(inst, gw):
    body = {"prompt": "Once upon a time", **LONG}  # not streamed: nothing comes back for long
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    assert wait_until(lambda: in_flight(inst) == 0, timeout=2), "the request was not cancelled"


def test_sigterm_cancels_what_is_in_flight_and_exits_0(inst, gateways):
    """The SDK, mid-stream, gets the error event as an exception, not a silent end."""
    gw = gateways(inst.status()["endpoint"])
    stream = gw.client().completions.create(
        model=MODEL, prompt="Once upon a time", stream=True, **LONG
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].text is not None and in_flight(inst) == 1
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as err:
        for _ in chunks:
            pass
    assert err.value.code == "shutting_down"
    assert gw.proc.wait(5) == 0 and time.monotonic() - sent < 3, gw.output()
    assert wait_until(lambda: in_flight(inst) == 0, timeout=2)


def test_a_waiting_stream_gets_queued_comments(inst, gw):
    """Both slots busy: a third stream waits in llmsup's queue, its connection kept busy
    with `: queued` comments, then streams as usual once a slot frees."""
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        holders = [http.stream("POST", "/v1/completions", json=body) for _ in range(2)]
        held = [h.__enter__() for h in holders]
        firsts = [r.iter_lines() for r in held]  # kept: dropping one closes its response
        for lines in firsts:
            next(lines)
        short = {"prompt": PROMPT, "stream": True, "max_tokens": 3}
        with http.stream("POST", "/v1/completions", json=short) as waiting:
            lines = waiting.iter_lines()
            assert next(lines) == ": queued"
            for h in holders:
                h.__exit__(None, None, None)  # a slot frees: the waiting request runs
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert events(rest)[-1]["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: in_flight(inst) == 0, timeout=2)


def test_api_key_is_required_except_for_health(inst, gateways, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k3y-for-tests\n")
    key_file.chmod(0o600)
    gw = gateways(inst.status()["endpoint"], "--api-key-file", str(key_file))
    with pytest.raises(openai.AuthenticationError) as err:
        gw.client(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401
    assert httpx.get(f"{gw.url}/metrics").status_code == 401
    assert httpx.get(f"{gw.url}/health").status_code == 200
    keyed = gw.client(api_key="k3y-for-tests")
    assert keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage
    assert b"k3y" not in Path(f"/proc/{gw.proc.pid}/cmdline").read_bytes()
    # A key file others can read, or a symlink to one, is refused.
    key_file.chmod(0o644)
    loose = gateways("ipc:///nonexistent", "--api-key-file", str(key_file), wait=False)
    assert loose.proc.wait(10) == 2 and "chmod 600" in loose.output()
    key_file.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(key_file)
    linked = gateways("ipc:///nonexistent", "--api-key-file", str(link), wait=False)
    assert linked.proc.wait(10) == 2 and "symlink" in linked.output()


def test_remote_listen_needs_allow_remote_and_a_key(gateways, tmp_path):
    remote = f"0.0.0.0:{free_port()}"
    bare = gateways("ipc:///nonexistent", listen=remote, wait=False)
    assert bare.proc.wait(10) == 2 and "--allow-remote" in bare.output()
    keyless = gateways("ipc:///nonexistent", "--allow-remote", listen=remote, wait=False)
    assert keyless.proc.wait(10) == 2
    assert "--allow-remote needs --api-key-file" in keyless.output()


def test_overloaded_is_503_with_retry_after_and_the_sdk_retries(instance_factory, gateways):
    inst = instance_factory(
        "--workers", "1", "--cores-per-worker", "1", "--slots-per-worker", "1", "--queue-size", "0"
    )
    assert inst.start().returncode == 0
    gw = gateways(inst.status()["endpoint"])
    # A first request sets llmsup's service time estimate, hence retry_after_ms.
    gw.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    holder = httpx.stream(
        "POST",
        f"{gw.url}/v1/completions",
        timeout=60,
        json={"prompt": "Once upon a time", "stream": True, **LONG},
    )
    resp = holder.__enter__()
    # The one slot is generating. (The iterator is kept: dropping it closes the response.)
    lines = resp.iter_lines()
    next(lines)
    try:
        raw = gw.client().completions.with_raw_response
        with pytest.raises(openai.InternalServerError) as err:
            raw.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        headers = err.value.response.headers
        assert err.value.status_code == 503 and err.value.code == "overloaded"
        retry_ms = int(headers["retry-after-ms"])
        assert 100 <= retry_ms <= 60000
        assert int(headers["retry-after"]) == math.ceil(retry_ms / 1000)

        # max_retries=2: three attempts in all, each refused, the last one raised.
        rejected = inst.status()["requests"]["rejected"]
        with pytest.raises(openai.InternalServerError):
            gw.client(max_retries=2).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert inst.status()["requests"]["rejected"] == rejected + 3

        # The slot frees while the SDK waits retry-after-ms: its retry succeeds.
        results: list = []

        def retrying() -> None:
            try:
                client = gw.client(max_retries=5)
                results.append(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2))
            except BaseException as exc:  # collected: a failure in a thread fails nothing
                results.append(exc)

        rejected = inst.status()["requests"]["rejected"]
        thread = threading.Thread(target=retrying)
        thread.start()
        assert wait_until(lambda: inst.status()["requests"]["rejected"] > rejected, timeout=10)
    finally:
        holder.__exit__(None, None, None)  # disconnect: llmsup cancels it, the slot frees
    thread.join(60)
    assert len(results) == 1 and not isinstance(results[0], BaseException), results
    assert results[0].usage.completion_tokens >= 1


def test_a_stream_that_fails_midway_ends_with_an_error_event(inst, gw):
    """Its worker is SIGKILLed after tokens were streamed: llmsup answers worker_lost."""
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as resp:
        it = resp.iter_lines()
        lines = [next(it), next(it)]
        os.kill(inst.status()["workers"][0]["pid"], signal.SIGKILL)
        lines += [line for line in it if line]
    assert lines[-1] == "data: [DONE]", lines[-6:]
    error = events(lines)[-1]["error"]
    assert error["code"] == "worker_lost" and error["type"] == "server_error"
    assert wait_until(lambda: inst.status()["workers"][0]["state"] == "ready", timeout=60)


def test_health_is_503_while_llmsup_stops_and_once_it_is_gone(inst, gw):
    """Last in the module: it stops the module's supervisor, with a stream in flight."""
    assert httpx.get(f"{gw.url}/health").status_code == 200
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        stopped: list = []
        stopper = threading.Thread(target=lambda: stopped.append(inst.stop("--timeout", "2")))
        stopper.start()
        draining = wait_until(lambda: httpx.get(f"{gw.url}/health").status_code == 503, 5)
        reason = httpx.get(f"{gw.url}/health").json()["reason"]
        rest = [line for line in lines if line]
    stopper.join(30)
    assert draining and reason == "llmsup is stopping"
    assert stopped and stopped[0].returncode == 3  # the stream was failed at the timeout
    assert events(rest)[-1]["error"]["code"] == "shutting_down" and rest[-1] == "data: [DONE]"
    health = httpx.get(f"{gw.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    with pytest.raises(openai.InternalServerError) as err:
        gw.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 503 and err.value.code == "upstream_unavailable"
    assert "llmsup_up 0.0" in httpx.get(f"{gw.url}/metrics").text
