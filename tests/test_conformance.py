"""The protocol as a contract: conformance vectors and JSON Schemas (protocol/vectors, schemas).

Each vector in protocol/vectors/requests.json is a list of request frames with the outcome
SPEC.md requires. The Python codec must produce it, and so must a live supervisor reached
through a raw DEALER socket; every reply body the live server sends must match its schema
in protocol/schemas/.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest
import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "protocol" / "schemas"
VECTORS = json.loads((ROOT / "protocol" / "vectors" / "requests.json").read_text())["vectors"]

SCHEMAS = {
    p.name.removesuffix(".json"): json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.json")
}
DONE_SCHEMA = {
    "complete": "reply.done.generation",
    "chat": "reply.done.generation",
    "tokenize": "reply.done.tokenize",
    "ping": "reply.done.ping",
    "status": "reply.done.status",
    "cancel": "reply.done.cancel",
    "detokenize": "reply.done.detokenize",
    "embed": "reply.done.embed",
}
# Limits JSON Schema cannot express (each schema's description says so): byte lengths,
# "integer" written without fraction or exponent, the JSON Schema subset a json_schema or a
# tool's parameters must keep to (SPEC.md 3.11) and a tool_choice naming a listed tool. For
# these the request schema accepts a body the server refuses.
SCHEMA_LOOSER_THAN_CODEC = {
    "max_tokens 5.0 (not an integer)",
    "max_tokens 5e0 (exponent: not an integer)",
    "prompt over 1 MiB in bytes, under it in code points",
    "contents over 1 MiB together",
    "json_schema with a keyword outside the subset",
    "json_schema with an unknown $ref",
    "json_schema nested 40 levels",
    "tool_choice naming a tool not in tools",
    "a tool whose parameters use a keyword outside the subset",
}


def frame_bytes(frame) -> bytes:
    if isinstance(frame, str):
        return frame.encode()
    if "hex" in frame:
        return bytes.fromhex(frame["hex"])
    if "repeat" in frame:
        return frame["repeat"].encode() * frame["times"]
    return b"".join(frame_bytes(f) for f in frame["concat"])


def frames_of(vector) -> list[bytes]:
    return [frame_bytes(f) for f in vector["frames"]]


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        SCHEMAS[name], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def check_reply_body(kind: bytes, verb: bytes, body: dict) -> None:
    """Raise if a reply body does not match its schema."""
    if kind == C.ERROR:
        name = "reply.error"
    elif kind == C.DONE:
        name = DONE_SCHEMA[verb.decode()]
    elif kind == C.TOKEN:
        name = "reply.token"
    elif kind in (C.QUEUED, C.ACCEPTED, C.RUNNING):
        name = f"reply.{kind.decode()}"
    else:
        raise AssertionError(f"unknown reply kind {kind!r}")
    validator(name).validate(body)


def vector_id(vector) -> str:
    return vector["name"]


# --- the files themselves ------------------------------------------------------------------


def test_every_schema_is_valid_draft_2020_12():
    assert set(SCHEMAS) == {f"request.{v.decode()}" for v in C.VERBS} | {
        "reply.token",
        "reply.queued",
        "reply.accepted",
        "reply.running",
        "reply.error",
        *DONE_SCHEMA.values(),
    }
    for name, schema in SCHEMAS.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        jsonschema.Draft202012Validator.check_schema(schema)


def test_spec_lists_every_schema():
    spec = (ROOT / "protocol" / "SPEC.md").read_text()
    for name in SCHEMAS:
        assert f"schemas/{name}.json" in spec, name


def test_vectors_cover_every_required_kind_of_malformation():
    outcomes = {
        (v["expect"]["kind"], v["expect"].get("code"), v["expect"].get("field")) for v in VECTORS
    }
    codes = {code for _, code, _ in outcomes}
    assert {"bad_request", "unsupported_version", "unknown_verb"} <= codes
    assert any(len(v["frames"]) != 4 for v in VECTORS)
    assert ("error", "bad_request", "request_id") in outcomes
    assert ("error", "bad_request", "temperature") in outcomes


# --- the Python codec ----------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_codec(vector):
    frames = frames_of(vector)
    expect = vector["expect"]
    try:
        request = codec.parse_request(frames)
    except codec.ProtocolError as exc:
        body = exc.body()
        assert expect["kind"] == "error", f"refused: {body}"
        assert body["code"] == expect["code"], body
        assert body.get("field") == expect.get("field"), body
        if "supported" in expect:
            assert body["supported"] == expect["supported"]
        assert codec.request_id_of(frames).decode() == expect["request_id"]
        validator("reply.error").validate(body)
        return
    assert expect["kind"] == "done", f"accepted, expected {expect}"
    assert request.request_id.decode() == expect["request_id"]
    if expect["normalized"] is not None:
        assert request.body.to_body() == expect["normalized"]


def body_of(vector):
    """The parsed body of a vector that is well-formed up to its body, else None."""
    frames = frames_of(vector)
    if len(frames) != 4 or frames[0] != C.VERSION or frames[1] not in C.VERBS:
        return None
    if not 1 <= len(frames[2]) <= C.MAX_REQUEST_ID_BYTES:
        return None
    try:
        return orjson.loads(frames[3]) if frames[3] else {}
    except orjson.JSONDecodeError:
        return None  # a schema sees only parsed bodies


@pytest.mark.parametrize("vector", [v for v in VECTORS if body_of(v) is not None], ids=vector_id)
def test_request_schema_agrees_with_codec(vector):
    """Where the frames are well-formed up to the body, the verb's request schema accepts
    the body exactly when the codec does (except the limits a schema cannot express)."""
    frames, body = frames_of(vector), body_of(vector)
    valid = validator(f"request.{frames[1].decode()}").is_valid(body)
    accepted = vector["expect"]["kind"] == "done"
    if vector["name"] in SCHEMA_LOOSER_THAN_CODEC:
        assert valid and not accepted
    else:
        assert valid == accepted


# --- a live server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dealer(served):
    ctx = zmq.Context()
    sock = served.dealer(ctx)
    yield sock
    sock.close(0)
    ctx.term()


def exchange(sock, frames: list[bytes], timeout_ms: int = 60_000) -> list[list[bytes]]:
    """Send one request; return every reply up to and including its terminal frame."""
    sock.send_multipart(frames)
    replies = []
    while True:
        assert sock.poll(timeout_ms, zmq.POLLIN), f"no reply in {timeout_ms} ms: {replies}"
        reply = sock.recv_multipart()
        replies.append(reply)
        assert len(reply) == 4, reply
        if reply[1] in C.TERMINAL_KINDS:
            return replies


@pytest.mark.timeout(90)
@pytest.mark.parametrize("vector", [v for v in VECTORS if v.get("live", True)], ids=vector_id)
def test_live_server(dealer, vector):
    frames = frames_of(vector)
    expect = vector["expect"]
    verb = frames[1] if len(frames) == 4 else b""
    replies = exchange(dealer, frames)
    for version, kind, request_id, raw in replies:
        assert version == C.VERSION
        assert request_id == expect["request_id"].encode()
        body = orjson.loads(raw)
        check_reply_body(kind, verb, body)
    *streamed, (_, kind, _, raw) = replies
    assert all(r[1] in (C.ACCEPTED, C.TOKEN, C.QUEUED, C.RUNNING) for r in streamed)
    body = orjson.loads(raw)
    assert kind.decode() == expect["kind"], body
    if kind == C.ERROR:
        assert body["code"] == expect["code"], body
        assert body.get("field") == expect.get("field"), body
        if "supported" in expect:
            assert body["supported"] == expect["supported"]
    if verb == C.TOKENIZE and kind == C.DONE:
        assert body["count"] == len(body["tokens"])
    if verb in (C.COMPLETE, C.CHAT) and kind == C.DONE:
        assert body["usage"]["completion_tokens"] <= orjson.loads(frames[3])["max_tokens"]


@pytest.mark.timeout(60)
def test_live_status_and_ping_match_their_schemas(dealer):
    for verb, name in ((C.STATUS, "reply.done.status"), (C.PING, "reply.done.ping")):
        (_, kind, _, raw), *_ = exchange(dealer, [C.VERSION, verb, b"sch", b"{}"])
        assert kind == C.DONE
        validator(name).validate(orjson.loads(raw))


def test_schemas_reject_what_the_contract_forbids():
    """The reply schemas are strict where SPEC.md is: each of these bodies must fail."""
    bad = [
        ("reply.token", {"text": ""}),
        ("reply.queued", {"position": 0, "queue_depth": 1}),
        ("reply.error", {"code": "overloaded", "message": "full"}),  # no retry_after_ms
        ("reply.error", {"code": "unsupported_version", "message": "x"}),  # no supported
        ("reply.error", {"code": "unknown_verb", "message": "x", "field": "x"}),
        ("reply.done.generation", {"finish_reason": "eos", "usage": {}, "timings": {}}),
        ("reply.done.ping", {"pong": True, "version": "LLMSUP2"}),
        ("reply.done.cancel", {"found": "yes"}),
        ("reply.done.tokenize", {"tokens": [1.5], "count": 1}),
    ]
    for name, body in bad:
        assert not validator(name).is_valid(body), (name, body)
