"""Ollama's native API on the gateway (supervisor/gateway/ollama_api.py), spoken to with the
`ollama` package, LangChain's ChatOllama and OllamaEmbeddings, and httpx line by line; the
per-request keep_alive (a second model unloaded once idle) and CORS (--cors-origin).

One llmsup for the module: the instruct model as the default and gemma3-270m on demand,
2 workers x 1 core, --http with one allowed origin."""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy
import ollama
import pydantic
import pytest
from testkit import free_port

from tests.conftest import launched, wait_until

pytestmark = pytest.mark.timeout(180)

INSTRUCT = "smollm2-135m-instruct"  # the default model here
OTHER = "gemma3-270m"
ALLOWED = "http://allowed.example:3000"
IGNORED_HEADER = "X-Llmsup-Ignored-Params"
GREEDY = {"temperature": 0, "top_k": 1, "num_predict": 12}
STATS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)


@pytest.fixture(scope="module")
def inst():
    with launched(
        "--model", INSTRUCT, "--model", OTHER,
        "--workers", "2", "--cores-per-worker", "1", "--slots-per-worker", "2",
        "--ctx-size", "1024", "--max-loaded", "2", "--cors-origin", ALLOWED, http=True,
    ) as inst:  # fmt: skip
        yield inst


@pytest.fixture(scope="module")
def url(inst) -> str:
    return inst.url


@pytest.fixture
def client(url) -> ollama.Client:
    return ollama.Client(host=url, timeout=120)


def serving(inst) -> list[str]:
    return sorted(w["model"] for w in inst.status()["workers"] if w["state"] == "ready")


def plausible(done) -> None:
    """The done statistics Ollama clients read: present, in nanoseconds, consistent."""
    for name in STATS:
        assert isinstance(done[name], int) and done[name] >= 0, (name, done[name])
    assert done["prompt_eval_count"] > 0 and done["eval_count"] > 0
    assert done["total_duration"] >= done["prompt_eval_duration"] + done["eval_duration"] > 0
    assert done["total_duration"] < 120e9
    assert done["done_reason"] in ("stop", "length")
    assert done["created_at"].endswith("Z")


# --- the ollama package ---------------------------------------------------------------------


def test_list_show_ps_version(client, url):
    names = [m.model for m in client.list().models]
    assert names == [f"{INSTRUCT}:latest", f"{OTHER}:latest"]  # the default first
    shown = client.show(INSTRUCT)
    assert shown.details.format == "gguf" and "completion" in shown.capabilities
    assert client.show(f"{INSTRUCT}:latest").details.format == "gguf"
    loaded = [m.model for m in client.ps().models]
    assert f"{INSTRUCT}:latest" in loaded
    version = httpx.get(f"{url}/api/version").json()
    assert version["version"].count(".") == 2


def test_model_facts_come_from_the_gguf_header(client, inst):
    """size, family, parameter size, quantization, context length and capabilities as
    Ollama gives them, for the two catalog files (SmolLM2 Q4_1 with a chat template, Gemma
    3 270M Q4_K_M base without one); `llmsup` reads the same header from the file."""
    paths = {m["name"]: m["path"] for m in inst.status()["models"]}
    listed = {m.model: m for m in client.list().models}
    smol, gemma = listed[f"{INSTRUCT}:latest"], listed[f"{OTHER}:latest"]
    assert smol.size == os.path.getsize(paths[INSTRUCT]) > 0
    assert gemma.size == os.path.getsize(paths[OTHER]) > smol.size
    assert (smol.details.family, smol.details.quantization_level) == ("llama", "Q4_1")
    assert smol.details.parameter_size == "134.52M"
    assert (gemma.details.family, gemma.details.quantization_level) == ("gemma3", "Q4_K_M")
    assert gemma.details.parameter_size == "268.10M"  # what `ollama show gemma3:270m` says
    shown = client.show(INSTRUCT)
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["general.parameter_count"] == 134515008
    assert shown.capabilities == ["completion", "tools", "embedding"]
    assert client.show(OTHER).capabilities == ["completion", "embedding"]  # no chat template
    ps = {m.model: m for m in client.ps().models}
    assert ps[f"{INSTRUCT}:latest"].size == smol.size
    assert ps[f"{INSTRUCT}:latest"].details.quantization_level == "Q4_1"


def test_chat_whole_and_streamed(client):
    messages = [{"role": "user", "content": "Name three rivers."}]
    whole = client.chat(model=INSTRUCT, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.model == INSTRUCT and whole.done
    plausible(whole)
    assert whole.eval_count <= 12

    parts = list(
        client.chat(model=f"{INSTRUCT}:latest", messages=messages, options=GREEDY, stream=True)
    )
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content or "" for p in parts)
    assert text == whole.message.content  # greedy: the same answer
    assert parts[-1].model == f"{INSTRUCT}:latest"  # as asked
    plausible(parts[-1])


def test_generate_whole_and_streamed(client):
    whole = client.generate(model=INSTRUCT, prompt="Say hello.", options=GREEDY)
    assert whole.response and whole.done
    plausible(whole)
    parts = list(client.generate(model=INSTRUCT, prompt="Say hello.", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    plausible(parts[-1])
    raw = client.generate(
        model=INSTRUCT, prompt="The capital of France is", raw=True, options=GREEDY
    )
    assert raw.response and raw.prompt_eval_count < whole.prompt_eval_count  # no template


def test_format_schema_and_tools(client, url):
    answer = client.chat(
        model=INSTRUCT,
        messages=[{"role": "user", "content": "Give a city in France as JSON."}],
        format=City.model_json_schema(),
        options={"temperature": 0, "num_predict": 60},
    )
    City.model_validate_json(answer.message.content)

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 30}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # A 135M model answers in prose unless told to call: llmsup's tool_choice (Ollama has
    # none, so not through the ollama package); the answer is read as the package does.
    ask = {"model": INSTRUCT, "messages": messages, "tools": tools, "tool_choice": "required",
           "options": {"temperature": 0}, "stream": False}  # fmt: skip
    first = ollama.ChatResponse.model_validate(httpx.post(f"{url}/api/chat", json=ask).json())
    calls = first.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict)  # an object, as Ollama sends it
    assert isinstance(calls[0].function.arguments["city"], str)
    with httpx.stream("POST", f"{url}/api/chat", json={**ask, "stream": True}) as response:
        streamed = [ollama.ChatResponse.model_validate_json(line) for line in response.iter_lines()]
    assert any(p.message.tool_calls for p in streamed) and streamed[-1].done
    # Ollama's clients: tools sent with the package, whatever the model answers.
    client.chat(model=INSTRUCT, messages=messages, tools=tools, options=GREEDY)
    # The call and its result go back, as Ollama's clients send them (tool_name, no id).
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": "21 degrees and sunny", "tool_name": "get_weather"},
    ]
    last = client.chat(model=INSTRUCT, messages=messages, options=GREEDY)
    assert last.message.content


def test_embed(client):
    result = client.embed(model=INSTRUCT, input=["The cat sat.", "A kitten rests.", "Taxes rose."])
    vectors = numpy.array(result.embeddings)
    assert vectors.shape == (3, 576) and result.prompt_eval_count > 3
    assert numpy.allclose(numpy.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]
    legacy = client.embeddings(model=INSTRUCT, prompt="The cat sat.")  # /api/embeddings
    assert len(legacy.embedding) == 576


# --- LangChain ------------------------------------------------------------------------------


def test_langchain_chat_ollama(url):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=INSTRUCT, base_url=url, temperature=0, num_predict=16)
    reply = llm.invoke("Name a colour.")
    assert reply.content and reply.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("Name a colour."))
    assert "".join(c.content for c in chunks) == reply.content

    structured = ChatOllama(model=INSTRUCT, base_url=url, temperature=0, num_predict=80)
    city = structured.with_structured_output(City, method="json_schema").invoke(
        "Give a city in France."
    )
    assert isinstance(city, City) and city.name


def test_langchain_ollama_embeddings(url):
    from langchain_ollama import OllamaEmbeddings

    embedder = OllamaEmbeddings(model=INSTRUCT, base_url=url)
    vectors = embedder.embed_documents(["a", "b"])
    assert len(vectors) == 2 and len(vectors[0]) == len(embedder.embed_query("a")) == 576


# --- the wire -------------------------------------------------------------------------------


def test_ndjson_line_by_line(url):
    body = {"model": INSTRUCT, "messages": [{"role": "user", "content": "Count to five."}],
            "options": GREEDY}  # fmt: skip
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = list(response.iter_lines())
    objects = [json.loads(line) for line in lines]  # every line one whole JSON object
    assert len(objects) >= 3 and objects[-1]["done"] and not any(o["done"] for o in objects[:-1])
    for o in objects[:-1]:
        assert set(o) == {"model", "created_at", "message", "done"}
    plausible(objects[-1])
    metrics = httpx.get(f"{url}/metrics").text  # counted under its own route
    assert 'endpoint="/api/chat"' in metrics
    assert 'llmsup_gateway_time_to_first_token_seconds_count{endpoint="/api/chat"' in metrics


def test_bad_input_is_named_and_the_next_is_served(url, client):
    ask = {"model": INSTRUCT, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    bad = httpx.post(f"{url}/api/generate", json={**ask, "keep_alive": "five minutes"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
    bad = httpx.post(f"{url}/api/generate", json={**ask, "keep_alive": [1]})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]

    missing = httpx.post(f"{url}/api/chat", json={**ask, "model": "llama3:8b"})
    assert missing.status_code == 404
    assert missing.json() == {"error": 'model "llama3:8b" not found, try pulling it first'}
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="x")
    assert info.value.status_code == 404

    out_of_range = httpx.post(f"{url}/api/generate", json={**ask, "options": {"temperature": 9}})
    assert out_of_range.status_code == 400 and "options.temperature" in out_of_range.json()["error"]
    images = httpx.post(f"{url}/api/generate", json={**ask, "images": ["aGk="]})
    assert images.status_code == 400 and "images" in images.json()["error"]

    # An option llmsup cannot change per request: served, and named in the header.
    odd = {**ask, "options": {"num_predict": 2, "num_ctx": 4096, "mirostat": 0}, "think": True}
    served = httpx.post(f"{url}/api/generate", json=odd, timeout=60)
    assert served.status_code == 200 and served.json()["done"]
    named = served.headers[IGNORED_HEADER].split(", ")
    assert {"options.num_ctx", "options.mirostat", "think"} <= set(named)

    ok = httpx.post(f"{url}/api/generate", json=ask, timeout=60)
    assert ok.status_code == 200 and ok.json()["eval_count"] <= 2


def test_keep_alive_zero_unloads_the_second_model(inst, client):
    """--keep-alive is 300 s; keep_alive 0 on a request for the other model gives its group
    back to the default once the request is done; so does Ollama's empty request with
    keep_alive 0 (what `ollama stop` sends)."""
    assert serving(inst) == [INSTRUCT, INSTRUCT]
    done = client.generate(
        model=f"{OTHER}:latest", prompt="The sky is", options=GREEDY, raw=True, keep_alive=0
    )
    assert done.load_duration > 0  # it waited for gemma to load
    entry = next(m for m in inst.status()["models"] if m["name"] == OTHER)
    assert entry["groups"] and entry["keep_alive_s"] == 0
    started = time.monotonic()
    assert wait_until(lambda: serving(inst) == [INSTRUCT, INSTRUCT], timeout=30, interval=0.2)
    assert time.monotonic() - started < 15
    assert f"{OTHER}:latest" not in [m.model for m in client.ps().models]

    # Loaded by an empty request (Ollama's preload), kept 300 s, then unloaded by one.
    loaded = client.generate(model=OTHER, prompt="")
    assert loaded.done_reason == "load" and OTHER in serving(inst)
    assert f"{OTHER}:latest" in [m.model for m in client.ps().models]
    unloaded = client.generate(model=OTHER, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert wait_until(lambda: serving(inst) == [INSTRUCT, INSTRUCT], timeout=30, interval=0.2)
    # Not loaded: an unload does not load it first.
    assert client.generate(model=OTHER, prompt="", keep_alive=0).done_reason == "unload"
    time.sleep(1.5)
    assert serving(inst) == [INSTRUCT, INSTRUCT]

    # The default model stays: keep_alive 0 does not unload it (nothing does).
    client.generate(model=INSTRUCT, prompt="Hi", options={"num_predict": 1}, keep_alive=0)
    time.sleep(2.5)
    assert serving(inst) == [INSTRUCT, INSTRUCT]


# --- CORS -----------------------------------------------------------------------------------


def test_cors_preflight_and_headers(url):
    asked = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    for path in ("/api/chat", "/v1/chat/completions"):
        pre = httpx.options(f"{url}{path}", headers=asked)
        assert pre.status_code == 204
        assert pre.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
        assert int(pre.headers["Access-Control-Max-Age"]) > 0
    refused = httpx.options(f"{url}/api/chat", headers={**asked, "Origin": "http://evil.example"})
    assert refused.status_code == 403
    assert "Access-Control-Allow-Origin" not in refused.headers

    tags = httpx.get(f"{url}/api/tags", headers={"Origin": ALLOWED})
    assert tags.headers["Access-Control-Allow-Origin"] == ALLOWED
    models = httpx.get(f"{url}/v1/models", headers={"Origin": "http://evil.example"})
    assert models.status_code == 200 and "Access-Control-Allow-Origin" not in models.headers
    error = httpx.post(f"{url}/api/chat", json={"model": "nope"}, headers={"Origin": ALLOWED})
    assert error.status_code == 404 and error.headers["Access-Control-Allow-Origin"] == ALLOWED


# --- without a server -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("-1", -1.0),
        ("300", 300.0),
        ("-5m", -1.0),
        (-1, -1.0),
        (-100, -1.0),
    ],
)
def test_keep_alive_durations(value, seconds):
    from llmsup.supervisor.gateway.ollama_api import keep_alive_seconds

    if seconds is None:
        assert keep_alive_seconds(value) is None
    else:
        assert keep_alive_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["five minutes", "5 m", "m", "5x", "1h 30m", "", True, [1], {}])
def test_keep_alive_refused(value):
    from llmsup.supervisor.gateway.errors import ApiError
    from llmsup.supervisor.gateway.ollama_api import keep_alive_seconds

    with pytest.raises(ApiError) as info:
        keep_alive_seconds(value)
    assert info.value.status == 400 and info.value.param == "keep_alive"
    assert "keep_alive" in info.value.message


def test_keep_alive_over_a_year_names_the_limit():
    from llmsup.supervisor.gateway.errors import ApiError
    from llmsup.supervisor.gateway.ollama_api import keep_alive_seconds

    with pytest.raises(ApiError, match="365 days"):
        keep_alive_seconds("9000h")


def test_placement_takes_each_requests_keep_alive():
    from llmsup.supervisor.core.placement import Placement

    p = Placement(["a", "b"], "a", 2, keep_alive_s=300, max_loaded=2)
    assert p.plan(0.0, {"b"}, lambda g: True)  # b takes a group
    p.used("b", 10.0)
    assert not p.plan(11.0, set(), lambda g: True)  # 300 s
    p.asked_keep_alive("b", 0.0)
    assert [m.model for m in p.plan(11.0, set(), lambda g: True)] == ["a"]  # at once
    assert p.plan(12.0, {"b"}, lambda g: True)
    p.asked_keep_alive("b", -1.0)
    p.used("b", 12.0)
    assert not p.plan(1e9, set(), lambda g: True)  # forever
    assert {m["name"]: m["keep_alive_s"] for m in p.status(13.0)} == {"a": -1, "b": -1}
    p.asked_keep_alive("b", None)  # back to the server's
    assert [m.model for m in p.plan(12.0 + 300, set(), lambda g: True)] == ["a"]
    p.asked_keep_alive("a", 0.0)  # the default: never unloaded
    assert not p.plan(1e9, set(), lambda g: True)


def test_cors_origins_checked():
    from llmsup.supervisor.host.netaddr import cors_origin_problem

    for good in ("*", "http://localhost:3000", "https://app.example.com", "app://x"):
        assert cors_origin_problem(good) is None, good
    for bad in ("localhost:3000", "http://x/path", "http://*.example.com", "", "a, b"):
        assert cors_origin_problem(bad), bad


def test_ollama_messages_become_the_protocols():
    from llmsup.supervisor.gateway.ollama_api import messages

    out = messages(
        [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "w", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "w", "arguments": {"city": "Rome"}}},
                ],
            },
            {"role": "tool", "content": "sunny", "tool_name": "w"},
            {"role": "tool", "content": "rain"},
        ]
    )
    calls = out[1]["tool_calls"]
    assert calls[0]["function"]["arguments"] == '{"city":"Paris"}'
    assert [m.get("tool_call_id") for m in out[2:]] == [calls[0]["id"], calls[1]["id"]]


def test_busy_is_503_with_retry_after(instance_factory):
    """One slot, no queue: a second request while the first streams is Ollama's error with
    503 and Retry-After, and the stream goes on."""
    port = free_port()
    inst = instance_factory(
        "--model", INSTRUCT, "--workers", "1", "--cores-per-worker", "1",
        "--slots-per-worker", "1", "--queue-size", "0", "--ctx-size", "1024",
        "--http", f"127.0.0.1:{port}",
    )  # fmt: skip
    assert inst.start().returncode == 0
    url = f"http://127.0.0.1:{port}"
    long = {"model": INSTRUCT, "prompt": "Tell a long story.", "options": {"num_predict": 400}}
    with httpx.stream("POST", f"{url}/api/generate", json=long, timeout=60) as first:
        lines = first.iter_lines()
        assert not json.loads(next(lines))["done"]  # it holds the slot now
        busy = httpx.post(f"{url}/api/generate", json={**long, "stream": False}, timeout=60)
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]
        assert not json.loads(next(lines))["done"]
