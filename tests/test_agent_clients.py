"""What agents and extraction pipelines send, with the libraries they send it with: the
openai SDK's `parse`, LangChain's ChatOpenAI (`with_structured_output` by each of its three
methods, `bind_tools` and a tool result sent back) and instructor (TOOLS, JSON and
JSON_SCHEMA modes), against a real gateway in front of a real SmolLM2 (docs/http-api.md).

Every library speaks through a recording HTTP client (Wire), so each test also checks the
requests the library really sent: all answered 200, and X-Llmsup-Ignored-Params names
nothing (a field llmsup does not know is ignored and named, never refused; the last test
proves that through the SDK)."""

from __future__ import annotations

import json

import instructor
import jsonschema
import openai
import pydantic
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.conftest import launched

pytestmark = pytest.mark.timeout(300)

MODEL = "smollm2-135m-instruct"
IGNORED_HEADER = "X-Llmsup-Ignored-Params"


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"21 degrees and sunny in {city}"


@pytest.fixture(scope="module")
def url():
    with launched("--model", MODEL, "--workers", "1", "--cores-per-worker", "1", http=True) as inst:
        yield f"{inst.url}/v1"


class Wire:
    """An HTTP client for the openai SDK (and so for LangChain and instructor) that keeps
    every request body it sent and the status and ignored-fields header it got back."""

    def __init__(self) -> None:
        self.exchanges: list[dict] = []

    def client(self) -> openai.DefaultHttpxClient:
        return openai.DefaultHttpxClient(
            event_hooks={"request": [self._request], "response": [self._response]}
        )

    def _request(self, request) -> None:
        body = json.loads(request.content) if request.content else None
        self.exchanges.append({"path": request.url.path, "body": body})

    def _response(self, response) -> None:
        self.exchanges[-1]["status"] = response.status_code
        self.exchanges[-1]["ignored"] = response.headers.get(IGNORED_HEADER)

    def bodies(self) -> list[dict]:
        return [e["body"] for e in self.exchanges if e["path"] == "/v1/chat/completions"]

    def problems(self) -> list[dict]:
        """The exchanges that were not a plain 200 naming no ignored field."""
        return [e for e in self.exchanges if e.get("status") != 200 or e.get("ignored")]


@pytest.fixture
def wire() -> Wire:
    return Wire()


def sdk(url: str, wire: Wire) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url, api_key="unused", max_retries=0, timeout=120, http_client=wire.client()
    )


def chat_model(url: str, wire: Wire, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=url,
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=200,
        max_retries=0,  # a refused request fails the test, never hides behind a retry
        timeout=120,
        http_client=wire.client(),
        **kwargs,
    )


def all_known(wire: Wire, requests: int) -> None:
    """The library sent `requests` chat requests, all answered 200 naming no ignored field."""
    assert len(wire.bodies()) == requests, wire.exchanges
    assert wire.problems() == []


ASK = "Tell me about Paris, the capital of France."


def test_openai_sdk_parse_gives_the_pydantic_object(url, wire):
    client = sdk(url, wire)
    completions = client.chat.completions
    parse = (
        completions.parse if hasattr(completions, "parse") else client.beta.chat.completions.parse
    )
    reply = parse(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        response_format=City,
        temperature=0,
        max_tokens=200,
    )
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country
    assert reply.choices[0].finish_reason == "stop"
    sent = wire.bodies()[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    all_known(wire, 1)


def test_openai_sdk_streams_a_tool_call(url, wire):
    tools = [openai.pydantic_function_tool(City, name="save_city")]
    stream = sdk(url, wire).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        tools=tools,
        tool_choice="required",
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    deltas, finish = [], None
    for chunk in stream:
        if not chunk.choices:  # a usage-only chunk
            continue
        choice = chunk.choices[0]
        deltas.extend(choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas and deltas[0].index == 0 and deltas[0].id
    assert deltas[0].function.name == "save_city"
    assert len(deltas) > 1, "the arguments came in one piece, not streamed"
    assert {d.index for d in deltas} == {0} and not [d for d in deltas[1:] if d.id]
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), tools[0]["function"]["parameters"])
    City.model_validate_json(arguments)
    all_known(wire, 1)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output_by_each_method(url, wire, method):
    llm = chat_model(url, wire).with_structured_output(City, method=method)
    ask = ASK
    if method == "json_mode":  # JSON mode is told the fields by the prompt, as LangChain says
        ask += ' Answer in JSON with the keys "name" and "country".'
    city = llm.invoke(ask)
    assert isinstance(city, City) and city.name and city.country
    sent = wire.bodies()[0]
    expected = {"json_schema": "json_schema", "function_calling": None, "json_mode": "json_object"}
    assert (sent.get("response_format") or {}).get("type") == expected[method], sent
    assert ("tools" in sent) == (method == "function_calling"), sent
    all_known(wire, 1)


def test_langchain_bind_tools_round_trip(url, wire):
    llm = chat_model(url, wire)
    question = HumanMessage("What is the weather in Paris?")
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    assert isinstance(called, AIMessage) and len(called.tool_calls) == 1
    assert not called.invalid_tool_calls
    call = called.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], get_weather.args_schema.model_json_schema())
    result = get_weather.invoke(call)  # a ToolMessage answering that call
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    history = [question, called, result]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert isinstance(final.content, str) and final.content.strip()
    plain = llm.invoke(history)  # the same history to the model without tools
    assert isinstance(plain, AIMessage) and not plain.tool_calls
    assert isinstance(plain.content, str) and plain.content.strip()
    # What went back: the assistant's call and the tool's answer to it, by id.
    sent = wire.bodies()[1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == call["id"] == sent[2]["tool_call_id"]
    all_known(wire, 3)


@pytest.mark.parametrize("mode", ["TOOLS", "JSON", "JSON_SCHEMA"])
def test_instructor_modes(url, wire, mode):
    if not hasattr(instructor.Mode, mode):
        pytest.skip(f"this instructor has no Mode.{mode}")
    client = instructor.from_openai(sdk(url, wire), mode=getattr(instructor.Mode, mode))
    city = client.chat.completions.create(
        model=MODEL,
        response_model=City,
        messages=[{"role": "user", "content": ASK}],
        temperature=0,
        max_tokens=200,
        max_retries=0,
    )
    assert isinstance(city, City) and city.name and city.country
    # Each mode asks the gateway for a different thing: a forced call, JSON, a schema.
    sent = wire.bodies()[0]
    asked = {
        "TOOLS": (sent.get("tool_choice") or {}).get("function", {}).get("name"),
        "JSON": (sent.get("response_format") or {}).get("type"),
        "JSON_SCHEMA": (sent.get("response_format") or {}).get("type"),
    }[mode]
    assert asked == {"TOOLS": "City", "JSON": "json_object", "JSON_SCHEMA": "json_schema"}[mode]
    all_known(wire, 1)


def test_an_unknown_field_is_ignored_and_named(url, wire):
    """A field llmsup does not know, sent the SDK's way (extra_body), is answered as usual
    and named in X-Llmsup-Ignored-Params, never refused."""
    raw = sdk(url, wire).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        temperature=0,
        max_tokens=20,
        extra_body={"vendor_knob": 1},
    )
    assert raw.http_response.status_code == 200
    assert raw.headers.get(IGNORED_HEADER) == "vendor_knob"
    assert raw.parse().choices[0].message.content
    assert [e["ignored"] for e in wire.exchanges] == ["vendor_knob"]
