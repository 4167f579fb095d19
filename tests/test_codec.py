"""Protocol v1 request parsing and validation (no server needed)."""

import orjson
import pytest

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol.codec import ProtocolError


def frames(verb=C.COMPLETE, body=None, rid=b"r1", version=C.VERSION):
    raw = (
        body
        if isinstance(body, bytes)
        else orjson.dumps({"prompt": "hi"} if body is None else body)
    )
    return [version, verb, rid, raw]


def rejected(f) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.parse_request(f)
    return info.value


def test_complete_gets_defaults():
    req = codec.parse_request(frames())
    assert req.verb == C.COMPLETE and req.request_id == b"r1"
    assert req.body.to_body() == {
        "prompt": "hi",
        "model": None,
        "max_tokens": C.DEFAULT_MAX_TOKENS,
        "temperature": C.DEFAULT_TEMPERATURE,
        "top_p": C.DEFAULT_TOP_P,
        "top_k": C.DEFAULT_TOP_K,
        "seed": None,
        "stop": [],
        "timeout_ms": None,
    }


def test_stop_string_becomes_list():
    request = codec.parse_request(frames(body={"prompt": "x", "stop": "\n"}))
    assert request.body.sampling.stop == ("\n",)


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"prompt": "x", "temperature": 5}, "temperature", "at most 2.0"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "finite number"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "from 1 to 32768"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "integer"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
        ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0.0"),
        ({"prompt": "x", "top_k": -1}, "top_k", "from 0 to 1000"),
        ({"prompt": "x", "seed": 2**32}, "seed", "from 0 to 4294967295"),
        ({"prompt": "x", "stop": ["a"] * 9}, "stop", "limit is 8"),
        ({"prompt": "x", "stop": [""]}, "stop", "1 to 64"),
        ({"prompt": "x", "stop": 3}, "stop", "list of strings"),
        ({"prompt": "x", "timeout_ms": 0}, "timeout_ms", "from 1 to 86400000"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": 7}, "prompt", "must be a string"),
        ({}, "prompt", "must be a string"),
        ({"prompt": "x", "temprature": 0.5}, "temprature", "unknown field"),
        ({"prompt": "x" * (C.MAX_PROMPT_BYTES + 1)}, "prompt", "the limit is 1048576"),
    ],
)
def test_bad_parameters_name_field_and_limit(body, field, words):
    err = rejected(frames(body=body))
    assert err.code == C.E_BAD_REQUEST
    assert err.field == field
    assert words in err.message


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0]"),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": 1}],
            "messages[1].content",
        ),
    ],
)
def test_bad_chat_messages(messages, field):
    err = rejected(frames(C.CHAT, {"messages": messages}))
    assert (err.code, err.field) == (C.E_BAD_REQUEST, field)


def test_malformed_frames():
    assert rejected([C.VERSION, C.PING]).code == C.E_BAD_REQUEST
    err = rejected(frames(version=b"LLMSUP9"))
    assert err.code == C.E_UNSUPPORTED_VERSION and err.body()["supported"] == ["LLMSUP1"]
    assert rejected(frames(verb=b"dance")).code == C.E_UNKNOWN_VERB
    assert rejected(frames(body=b"{not json")).code == C.E_BAD_REQUEST
    assert rejected(frames(body=b"[1, 2]")).code == C.E_BAD_REQUEST
    assert rejected(frames(rid=b"")).field == "request_id"
    assert rejected(frames(rid=b"x" * 65)).field == "request_id"


def test_request_id_echo_survives_malformed_messages():
    assert codec.request_id_of([C.VERSION, b"x", b"abc"]) == b"abc"
    assert codec.request_id_of([C.VERSION]) == b""
    assert codec.request_id_of([C.VERSION, b"x", b"y" * 100, b"{}"]) == b""


def test_error_body_carries_extras():
    err = ProtocolError(C.E_OVERLOADED, "full", retry_after_ms=250)
    assert err.body() == {"code": "overloaded", "message": "full", "retry_after_ms": 250}


def test_null_means_default():
    body = codec.parse_request(frames(body={"prompt": "x", "max_tokens": None, "top_k": None}))
    assert body.body.sampling.max_tokens == C.DEFAULT_MAX_TOKENS
    assert body.body.sampling.top_k == C.DEFAULT_TOP_K
