"""What agents and extraction pipelines send, with the libraries they send it with: the
openai SDK's `parse`, LangChain's ChatOpenAI (`with_structured_output` by each of its three
methods, `bind_tools` and a tool result sent back) and instructor (TOOLS and JSON modes),
against a real gateway in front of a real SmolLM2 (docs/http-api.md)."""

from __future__ import annotations

import json

import httpx
import instructor
import jsonschema
import openai
import pydantic
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from testkit import free_port

from tests.conftest import Instance

pytestmark = pytest.mark.timeout(300)

MODEL = "smollm2-135m-instruct"


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"21 degrees and sunny in {city}"


@pytest.fixture(scope="module")
def url():
    port = free_port()
    inst = Instance(
        "--model", MODEL, "--workers", "1", "--cores-per-worker", "2", "--http", f"127.0.0.1:{port}"
    )
    try:
        started = inst.start()
        assert started.returncode == 0, started.stderr
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        inst.cleanup()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def chat_model(url: str, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=url, api_key="unused", model=MODEL, temperature=0, max_tokens=200, **kwargs
    )


ASK = "Tell me about Paris, the capital of France."


def test_openai_sdk_parse_gives_the_pydantic_object(url):
    reply = sdk(url).chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        response_format=City,
        temperature=0,
        max_tokens=200,
    )
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country
    assert reply.choices[0].finish_reason == "stop"


def test_openai_sdk_streams_a_tool_call(url):
    tools = [openai.pydantic_function_tool(City, name="save_city")]
    stream = sdk(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        tools=tools,
        tool_choice="required",
        temperature=0,
        stream=True,
    )
    deltas, finish = [], None
    for chunk in stream:
        choice = chunk.choices[0]
        deltas.extend(choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "save_city"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    City.model_validate_json(arguments)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output_by_each_method(url, method):
    llm = chat_model(url).with_structured_output(City, method=method)
    ask = ASK
    if method == "json_mode":  # JSON mode is told the fields by the prompt, as LangChain says
        ask += ' Answer in JSON with the keys "name" and "country".'
    city = llm.invoke(ask)
    assert isinstance(city, City) and city.name and city.country


def test_langchain_bind_tools_round_trip(url):
    llm = chat_model(url)
    question = HumanMessage("What is the weather in Paris?")
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    assert isinstance(called, AIMessage) and len(called.tool_calls) == 1
    call = called.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], get_weather.args_schema.model_json_schema())
    result = get_weather.invoke(call)  # a ToolMessage answering that call
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke([question, called, result])
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert isinstance(final.content, str) and final.content.strip()


@pytest.mark.parametrize("mode", ["TOOLS", "JSON", "JSON_SCHEMA"])
def test_instructor_modes(url, mode):
    if not hasattr(instructor.Mode, mode):
        pytest.skip(f"this instructor has no Mode.{mode}")
    client = instructor.from_openai(sdk(url), mode=getattr(instructor.Mode, mode))
    city = client.chat.completions.create(
        model=MODEL,
        response_model=City,
        messages=[{"role": "user", "content": ASK}],
        temperature=0,
        max_tokens=200,
        max_retries=0,
    )
    assert isinstance(city, City) and city.name and city.country


def test_what_these_libraries_send_is_all_known(url):
    """Every field LangChain and instructor sent above is one llmsup knows: a request
    shaped like theirs names nothing in X-Llmsup-Ignored-Params."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": ASK}],
        "temperature": 0,
        "max_tokens": 100,
        "stream": False,
        "n": 1,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "City", "schema": City.model_json_schema(), "strict": True},
        },
        "parallel_tool_calls": False,
    }
    reply = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200 and "X-Llmsup-Ignored-Params" not in reply.headers
    City.model_validate(json.loads(reply.json()["choices"][0]["message"]["content"]))
