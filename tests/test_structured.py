"""Structured output, tool calls and the sampling knobs through a real supervisor, on both
catalog models, with the Python client (SPEC.md 3.1, 3.11, 3.12)."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from tests.conftest import Instance, launched

pytestmark = pytest.mark.timeout(300)

GEMMA, SMOL = "gemma3-270m", "smollm2-135m-instruct"
NAME = {"type": "string", "minLength": 1, "maxLength": 40}
PERSON = {
    "type": "object",
    "properties": {
        "name": NAME,
        "age": {"type": "integer"},
        "city": {"anyOf": [NAME, {"type": "null"}]},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": NAME, "maxItems": 3},
        "home": {"$ref": "#/$defs/place"},
    },
    "required": ["name", "age", "role", "tags", "home"],
    "$defs": {
        "place": {
            "type": "object",
            "properties": {"country": NAME, "since": {"type": "string", "format": "date"}},
            "required": ["country"],
        }
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": NAME}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def inst():
    """Both catalog models, one single-core worker each, two sequences per worker."""
    with launched(
        "--model", SMOL, "--model", GEMMA,
        "--workers", "2", "--cores-per-worker", "1", "--slots-per-worker", "2",
    ) as inst:  # fmt: skip
        yield inst


def run(inst: Instance, messages=None, prompt=None, **params) -> tuple[str, dict]:
    with inst.client(timeout=120) as client:
        if messages is not None:
            stream = client.chat(messages, **params)
        else:
            stream = client.complete(prompt, **params)
        text = stream.text()
        return text, stream.done


@pytest.mark.parametrize("model", [SMOL, GEMMA])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_every_output_under_a_schema_validates(inst, model, temperature):
    ask = [{"role": "user", "content": "Invent a person and describe them as JSON."}]
    for seed in (1, 2, 3):
        text, done = run(
            inst,
            ask,
            model=model,
            json_schema=PERSON,
            temperature=temperature,
            seed=seed,
            max_tokens=400,
        )
        assert done["finish_reason"] == "stop", (text, done)
        jsonschema.validate(json.loads(text), PERSON)
        if temperature == 0:
            break  # the same output for every seed


def test_a_complete_under_a_schema_validates_too(inst):
    schema = {"type": "object", "properties": {"capital": NAME}, "required": ["capital"]}
    text, done = run(inst, prompt="France as JSON:", model=GEMMA, json_schema=schema, temperature=0)
    assert done["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_an_output_cut_by_max_tokens_ends_with_length(inst):
    text, done = run(inst, ASK, model=SMOL, json_schema=PERSON, temperature=0, max_tokens=4)
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 4
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_grammar_constrains_and_one_that_cannot_end_runs_to_length(inst):
    for temperature in (0, 1.0):
        text, done = run(
            inst,
            prompt="Is the sky blue? Answer:",
            model=GEMMA,
            grammar='root ::= " yes" | " no"',
            temperature=temperature,
        )
        assert text in (" yes", " no") and done["finish_reason"] == "stop"
    text, done = run(
        inst, prompt="a", model=GEMMA, grammar='root ::= "ab" root', temperature=0, max_tokens=12
    )
    assert done["finish_reason"] == "length" and set(text) <= {"a", "b"} and text


def test_tool_calls_validate_against_their_parameters(inst):
    tools = [WEATHER, TIME]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for model in (SMOL, GEMMA):
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            text, done = run(
                inst, ASK, model=model, tools=tools, tool_choice=choice, temperature=1.0, seed=5
            )
            assert done["finish_reason"] == C.FINISH_TOOL_CALLS and text == "", (text, done)
            (call,) = done["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("call_")
            name = call["function"]["name"]
            if isinstance(choice, dict):
                assert name == "get_time"
            jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])


def test_parallel_calls_and_a_tool_result_sent_back(inst):
    text, done = run(
        inst,
        ASK,
        model=SMOL,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=True,
        temperature=0,
        max_tokens=400,
    )
    assert done["finish_reason"] == C.FINISH_TOOL_CALLS, (text, done)
    assert 1 <= len(done["tool_calls"]) <= C.MAX_PARALLEL_CALLS
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": done["tool_calls"]},
        *(
            {"role": "tool", "tool_call_id": call["id"], "content": "22 degrees, sunny"}
            for call in done["tool_calls"]
        ),
    ]
    # tool_choice none: a plain answer, the tool's result in the prompt it read.
    text, done = run(inst, history, model=SMOL, tools=[WEATHER], tool_choice="none", temperature=0)
    assert done["finish_reason"] in ("stop", "length") and text.strip()
    assert "tool_calls" not in done
    # auto: a call or a reply, whichever it is, in its shape.
    text, done = run(inst, history, model=SMOL, tools=[WEATHER], temperature=0, max_tokens=200)
    if done["finish_reason"] == C.FINISH_TOOL_CALLS:
        assert text == "" and done["tool_calls"]
    else:
        assert done["finish_reason"] == "stop" and text and "tool_calls" not in done


def test_sampling_knobs_change_what_is_picked(inst):
    base, _ = run(inst, prompt="The capital of France is", model=GEMMA, temperature=0, max_tokens=8)
    with inst.client() as client:
        first = client.call(C.TOKENIZE, {"text": base, "model": GEMMA})["tokens"]
    first = [t for t in first if t != 2][0]  # past Gemma's BOS token
    banned, _ = run(
        inst,
        prompt="The capital of France is",
        model=GEMMA,
        temperature=0,
        max_tokens=8,
        logit_bias={str(first): -100},
    )
    assert banned and not banned.startswith(base[:3])
    repeated, _ = run(inst, prompt="one one one one one", model=GEMMA, temperature=0, max_tokens=12)
    penalized, _ = run(
        inst,
        prompt="one one one one one",
        model=GEMMA,
        temperature=0,
        max_tokens=12,
        repeat_penalty=1.8,
        presence_penalty=1.5,
        frequency_penalty=1.5,
    )
    assert repeated != penalized
    assert repeated.count("one") > penalized.count("one")
    sampled, done = run(
        inst, prompt="Once upon a time", model=GEMMA, temperature=0.9, min_p=0.2, max_tokens=8
    )
    assert sampled and done["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"json_schema": {"type": "integer", "minimum": 1}}, "json_schema", "/minimum"),
        ({"json_schema": {"$ref": "#/$defs/missing"}}, "json_schema", "points to nothing"),
        ({"logit_bias": {"999999999": 5}}, None, "this model's tokens are 0 to"),
        ({"grammar": "root ::= (("}, None, "grammar"),
        ({"grammar": 'root ::= root "a"'}, None, "grammar"),  # left recursion
        ({"grammar": 'root ::= ("a"{100}){100}'}, "grammar", "copies"),
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools[0].function.name",
            "name",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {
                "json_schema": {
                    "type": "object",
                    "properties": {
                        f"p{i}": {"type": "string", "maxLength": 4000} for i in range(8)
                    },
                }
            },
            None,
            "limit is 65536",
        ),
    ],
)
def test_bad_input_is_refused_and_the_next_request_served(inst, params, field, words):
    messages = ASK if "tools" in params else None
    prompt = None if messages else "x"
    with pytest.raises(LlmsupError) as err:
        run(inst, messages, prompt, model=SMOL, max_tokens=4, **params)
    assert err.value.code == C.E_BAD_REQUEST and words in err.value.message
    assert err.value.body.get("field") == field
    text, done = run(inst, prompt="Hello", model=SMOL, temperature=0, max_tokens=2)
    assert done["finish_reason"] in ("stop", "length")


def test_a_hostile_schema_does_not_stall_the_supervisor(inst):
    """10,000 nested levels and an enum of a million strings, five of each sent at once:
    each is refused, and a ping sent behind them is answered at once."""
    deep = '{"type":"array","items":' * 10000 + "{}" + "}" * 10000
    enum = b",".join(b'"v%d"' % i for i in range(1_000_000))[:900_000].rsplit(b",", 1)[0]
    bodies = [
        b'{"prompt":"x","json_schema":' + deep.encode() + b"}",
        b'{"prompt":"x","json_schema":{"enum":[' + enum + b"]}}",
    ] * 5
    sock = inst.dealer()
    try:
        for i, body in enumerate(bodies):
            sock.send_multipart([C.VERSION, C.COMPLETE, b"h%d" % i, body])
        with inst.client(timeout=10) as client:
            started = time.monotonic()
            client.ping()
            ping_s = time.monotonic() - started
        replies = []
        while len(replies) < len(bodies):
            assert sock.poll(30_000), f"{len(replies)} of {len(bodies)} answered"
            replies.append(sock.recv_multipart())
    finally:
        sock.close(0)
    for _, kind, _, body in replies:
        assert kind == C.ERROR and json.loads(body)["code"] == C.E_BAD_REQUEST, body[:200]
    assert ping_s < 2.0


CITY = {
    "type": "object",
    "properties": {"name": NAME, "country": NAME},
    "required": ["name", "country"],
}


def test_the_cli_takes_a_schema_grammar_and_knobs_from_files(inst, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(CITY))
    for command, ask in (("chat", "Name a city in France as JSON."), ("generate", "A city:")):
        out = inst.cli(
            command,
            ask,
            "--model",
            SMOL,
            "--temperature",
            "0",
            "--max-tokens",
            "60",
            "--json-schema",
            str(schema),
        )
        assert out.returncode == 0, out.stderr
        jsonschema.validate(json.loads(out.stdout), CITY)
        assert "finish stop" in out.stderr
    grammar = tmp_path / "yesno.gbnf"
    grammar.write_text('root ::= " yes" | " no"\n')
    out = inst.cli(
        "generate",
        "Is the sky blue? Answer:",
        "--model",
        GEMMA,
        "--grammar",
        str(grammar),
        "--temperature",
        "0.7",
        "--min-p",
        "0.05",
        "--repeat-penalty",
        "1.1",
        "--presence-penalty",
        "0.2",
        "--frequency-penalty",
        "0.2",
        "--repeat-last-n",
        "32",
        "--logit-bias",
        "5=-100",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("yes", "no")
    # Files that are not what they should be: a usage error naming the option.
    (tmp_path / "bad.json").write_text("{not json")
    for args in (
        ("--json-schema", str(tmp_path / "bad.json")),
        ("--json-schema", str(tmp_path / "missing.json")),
        ("--logit-bias", "five=1"),
    ):
        out = inst.cli("generate", "x", *args)
        assert out.returncode == 2 and args[0] in out.stderr, out.stderr
    # A schema outside the subset: the server's refusal, naming the field, with the pointer.
    (tmp_path / "min.json").write_text('{"type": "integer", "minimum": 0}')
    for command in ("generate", "chat"):
        out = inst.cli(command, "x", "--json-schema", str(tmp_path / "min.json"))
        assert out.returncode == 2 and "bad_request" in out.stderr, out.stderr
        assert "(field json_schema)" in out.stderr and "/minimum" in out.stderr, out.stderr


def test_the_cli_chat_takes_tools_and_prints_the_calls(inst, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, TIME]))
    ask = ASK[0]["content"]
    chat = ("chat", ask, "--model", SMOL, "--temperature", "0", "--max-tokens", "60")
    out = inst.cli(*chat, "--tools", str(tools), "--tool-choice", "get_weather")
    assert out.returncode == 0, out.stderr
    calls = re.findall(r"^call (\w+)\((\{.*\})\) \[(call_\w+)\]$", out.stdout, re.MULTILINE)
    assert len(calls) == 1 and calls[0][0] == "get_weather", out.stdout
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
    assert "finish tool_calls" in out.stderr, out.stderr
    # --tool-choice none: an answer in text, no call.
    out = inst.cli(*chat, "--tools", str(tools), "--tool-choice", "none")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "call " not in out.stdout, out.stdout
    assert "finish tool_calls" not in out.stderr, out.stderr
    # A tool the request does not offer, and a file that is not JSON.
    out = inst.cli(*chat, "--tools", str(tools), "--tool-choice", "get_news")
    assert out.returncode == 2 and "(field tool_choice)" in out.stderr, out.stderr
    tools.write_text("[not json")
    out = inst.cli(*chat, "--tools", str(tools))
    assert out.returncode == 2 and "--tools" in out.stderr, out.stderr
