"""The JSON Schema subset llmsup converts exactly (protocol/schema_subset.py), the grammar
made from it (worker/grammar.py, llama-cpp-python's converter, no model needed) and the
generic tool format's output reader (worker/tools.py). No server: these are pure functions.
"""

from __future__ import annotations

import json
import typing

import orjson
import pydantic
import pytest

from llmsup.protocol import codec, schema_subset
from llmsup.protocol import constants as C
from llmsup.protocol.messages import Chat, Message, Tool, ToolCall
from llmsup.worker import grammar, tools


class Address(pydantic.BaseModel):
    city: str
    zip: str | None = None


class Person(pydantic.BaseModel):
    name: str
    age: int
    tags: list[str]
    home: Address
    kind: typing.Literal["a", "b"]


class Cat(pydantic.BaseModel):
    pet: typing.Literal["cat"]
    lives: int


class Dog(pydantic.BaseModel):
    pet: typing.Literal["dog"]
    good: bool


class Owner(pydantic.BaseModel):
    pet: Cat | Dog = pydantic.Field(discriminator="pet")


@pytest.mark.parametrize("model", [Person, Address, Owner])
def test_pydantic_schemas_are_in_the_subset_and_convert(model):
    schema = model.model_json_schema()
    gbnf = grammar.convert(schema)
    assert gbnf.startswith(("root ::=", "char ::=")) or "\nroot ::=" in gbnf
    # The string rule keeps control characters out: a raw newline is not valid JSON.
    has_strings = model is not Owner
    assert ("char ::=" in gbnf) == has_strings
    assert (r"\x00-\x1F" in gbnf) == has_strings


@pytest.mark.parametrize(
    ("schema", "pointer", "keyword"),
    [
        ({"type": "integer", "minimum": 0}, "/minimum", "minimum"),
        (
            {"properties": {"n": {"type": "number", "multipleOf": 2}}},
            "/properties/n/multipleOf",
            "multipleOf",
        ),
        ({"type": "array", "items": {}, "uniqueItems": True}, "/uniqueItems", "uniqueItems"),
        ({"type": "string", "format": "email"}, "/format", "format"),
        ({"$ref": "#/$defs/Nope"}, "/$ref", "$ref"),
        ({"$ref": "https://example.com/s.json"}, "/$ref", "$ref"),
        ({"not": {"type": "string"}}, "/not", "not"),
        ({"type": "object", "required": ["x"], "properties": {}}, "/required", "required"),
        ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "/oneOf", "oneOf"),
        ({"anyOf": [{"type": "string"}], "type": "string"}, "/type", "type"),
        ({"type": "string", "pattern": "^a.b$"}, "/pattern", "pattern"),
        ({"type": "string", "pattern": "abc"}, "/pattern", "pattern"),
        ({"type": "string", "pattern": "^(a{100}){100}$"}, "/pattern", "pattern"),
        ({"type": "string", "maxLength": 5, "pattern": "^a+$"}, "/maxLength", "maxLength"),
        ({"type": "array", "maxItems": 100000, "items": {}}, "/maxItems", "maxItems"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "/allOf", "allOf"),
        ({"type": "object", "properties": {"a": True}}, "/properties/a", None),
    ],
)
def test_keywords_outside_the_subset_are_refused_where_they_are(schema, pointer, keyword):
    with pytest.raises(schema_subset.SchemaError) as err:
        schema_subset.normalize(schema)
    assert err.value.pointer == pointer and err.value.keyword == keyword


def test_the_codec_names_the_field_the_pointer_and_the_keyword():
    body = {
        "prompt": "x",
        "json_schema": {"properties": {"age": {"type": "integer", "maximum": 9}}},
    }
    with pytest.raises(codec.ProtocolError) as err:
        codec.parse_body(C.COMPLETE, body)
    assert err.value.field == "json_schema"
    assert err.value.extra == {"pointer": "/properties/age/maximum", "keyword": "maximum"}
    assert "/properties/age/maximum" in err.value.message


def test_depth_and_size_are_bounded():
    nested: dict = {}
    for _ in range(C.MAX_SCHEMA_DEPTH + 2):
        nested = {"type": "array", "items": nested}
    with pytest.raises(schema_subset.SchemaError, match="deeper"):
        schema_subset.normalize(nested)
    huge_enum = {"enum": [f"value-{i}" for i in range(1_000_000)]}
    with pytest.raises(codec.ProtocolError) as err:
        codec.parse_body(C.COMPLETE, {"prompt": "x", "json_schema": huge_enum})
    assert err.value.field == "json_schema" and "limit is 65536" in err.value.message
    # Under the byte limit, but its grammar would be over MAX_GRAMMAR_BYTES: the worker
    # refuses it (an error it answers with bad_request).
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": 4000} for i in range(8)},
    }
    with pytest.raises(grammar.GrammarError, match="limit is 65536"):
        grammar.convert(wide)


def test_recursive_references_convert():
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    assert "x-llmsup-ref-0" in grammar.convert(tree)


def chat(*messages: Message, **kwargs) -> Chat:
    tool = Tool(
        "get_weather", "Weather", '{"type":"object","properties":{"city":{"type":"string"}}}'
    )
    return Chat(messages, tools=(tool,), **kwargs)


def test_the_generic_format_writes_history_the_templates_know():
    call = ToolCall("call_1", "get_weather", '{"city":"Paris"}')
    c = chat(
        Message("system", "Be brief."),
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (call,)),
        Message("tool", "22 C", tool_call_id="call_1"),
    )
    out = tools.prompt_messages(c)
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content.startswith("Be brief.") and "get_weather" in out[0].content
    assert json.loads(out[2].content) == {
        "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}
    }
    assert json.loads(out[3].content) == {
        "tool_response": {"tool": "get_weather", "tool_call_id": "call_1", "content": "22 C"}
    }
    # tool_choice none: no tools described, no grammar; the history is still rewritten.
    plain = tools.prompt_messages(chat(*c.messages, tool_choice="none"))
    assert "get_weather" not in plain[0].content and plain[3].role == "user"


def test_the_output_schema_follows_tool_choice():
    auto = tools.output_schema(chat(Message("user", "x")), None)
    assert [list(b["properties"]) for b in auto["anyOf"]] == [["tool_call"], ["response"]]
    required = tools.output_schema(chat(Message("user", "x"), tool_choice="required"), None)
    assert list(required["properties"]) == ["tool_call"]
    named = tools.output_schema(chat(Message("user", "x"), tool_choice="get_weather"), None)
    assert named["properties"]["tool_call"]["properties"]["name"] == {"const": "get_weather"}
    parallel = tools.output_schema(
        chat(Message("user", "x"), tool_choice="required", parallel_tool_calls=True), None
    )
    assert parallel["properties"]["tool_calls"]["minItems"] == 1
    grammar.convert(parallel)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_a_string_response_streams_unescaped_across_any_cut(cut):
    text = 'Caf\u00e9 "quoted" \\ back \n line \U0001f600 end'
    raw = (
        ' { "response" : '
        + orjson.dumps(text).decode().replace("\U0001f600", "\\ud83d\\ude00")
        + " }"
    )
    answer = tools.Answer()
    streamed = "".join(answer.feed(raw[i : i + cut]) for i in range(0, len(raw), cut))
    rest, calls = answer.finish(complete=True)
    assert streamed + rest == text and calls == []


def test_calls_come_whole_at_the_end_and_a_cut_call_is_none():
    raw = '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}'
    answer = tools.Answer()
    assert "".join(answer.feed(raw[i : i + 4]) for i in range(0, len(raw), 4)) == ""
    rest, calls = answer.finish(complete=True)
    assert rest == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0].id.startswith("call_")
    cut = tools.Answer()
    cut.feed(raw[:30])
    assert cut.finish(complete=False) == ("", [])


@pytest.mark.parametrize(
    ("grammar", "refused"),
    [
        ('root ::= ("a"{1000}){1000}', True),  # a million copies of "a"
        ('root ::= ((("a"{16}){16}){16}){16}', True),
        ("root ::= x{5000}\nx ::= [a-z]", True),
        ('root ::= "a"{100} "b"{100}', False),  # side by side: 200 copies
        ('root ::= "{9999}" [{]{3} # {9999} in a comment', False),  # inside literals
    ],
)
def test_a_grammar_that_would_expand_past_the_bound_is_refused(grammar, refused):
    body = {"prompt": "x", "grammar": grammar}
    if refused:
        with pytest.raises(codec.ProtocolError) as err:
            codec.parse_body(C.COMPLETE, body)
        assert err.value.field == "grammar" and "copies" in err.value.message
    else:
        assert codec.parse_body(C.COMPLETE, body).sampling.grammar == grammar
