"""Encoding, decoding and validation of protocol v1 frames: all (de)serialization is here.

`parse_request` turns the frames a client sent into a `Request` whose body is a typed
value (messages.py) holding only validated, defaulted values, or raises `ProtocolError`
naming the field and the limit. The worker codec (workerwire.py) parses a job's body with
the same `parse_body`, so both sockets share one set of rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from llmsup.protocol import constants as C
from llmsup.protocol import messages as M


class ProtocolError(Exception):
    """A request the server refuses; becomes an ERROR reply with this code."""

    def __init__(self, code: str, message: str, *, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


@dataclass(frozen=True)
class Request:
    verb: bytes
    request_id: bytes
    body: M.Body


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes) -> Any:
    return orjson.loads(data)


def reply_frames(kind: bytes, request_id: bytes, body: dict[str, Any]) -> list[bytes]:
    return [C.VERSION, kind, request_id, orjson.dumps(body)]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **extra}


def request_id_of(frames: list[bytes]) -> bytes:
    """The request id to echo in an error reply, even for a malformed message."""
    if len(frames) >= 3 and len(frames[2]) <= C.MAX_REQUEST_ID_BYTES:
        return frames[2]
    return b""


def parse_request(frames: list[bytes]) -> Request:
    if len(frames) != 4:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "a request has 4 frames (version, verb, request id, body); got "
            + (str(len(frames)) if len(frames) < 4 else "more"),
        )
    version, verb, request_id, raw = frames
    if version not in C.SUPPORTED_VERSIONS:
        raise ProtocolError(
            C.E_UNSUPPORTED_VERSION,
            f"protocol version {version[:32]!r} is not supported",
            supported=[v.decode() for v in C.SUPPORTED_VERSIONS],
        )
    if not request_id or len(request_id) > C.MAX_REQUEST_ID_BYTES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"request id must be 1 to {C.MAX_REQUEST_ID_BYTES} bytes; got {len(request_id)}",
            field="request_id",
        )
    if verb not in C.VERBS:
        raise ProtocolError(
            C.E_UNKNOWN_VERB,
            f"unknown verb {verb[:32]!r}; known verbs: {', '.join(v.decode() for v in C.VERBS)}",
        )
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(C.E_BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    return Request(verb, request_id, parse_body(verb, body))


def parse_body(verb: bytes, body: Any) -> M.Body:
    """A verb's decoded JSON body as its typed value, or ProtocolError."""
    if not isinstance(body, dict):
        raise ProtocolError(C.E_BAD_REQUEST, "body must be a JSON object")
    return _VALIDATORS[verb](body)


# --- per-verb validation -------------------------------------------------------------------


def _reject_unknown(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"unknown field {key!r}; allowed: {', '.join(sorted(allowed))}",
                field=key,
            )


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:  # absent or null: the default
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(C.E_BAD_REQUEST, f"{name} must be an integer", field=name)
    if not lo <= value <= hi:
        raise ProtocolError(
            C.E_BAD_REQUEST, f"{name} is {value}; it must be from {lo} to {hi}", field=name
        )
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    value = body.get(name)
    if value is None:  # absent or null: the default
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(C.E_BAD_REQUEST, f"{name} must be a finite number", field=name)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise ProtocolError(
            C.E_BAD_REQUEST, f"{name} is {value}; it must be {bound} and at most {hi}", field=name
        )
    return float(value)


def _text(body: dict, name: str, limit: int) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ProtocolError(C.E_BAD_REQUEST, f"{name} must be a string", field=name)
    if not value:
        raise ProtocolError(C.E_BAD_REQUEST, f"{name} must not be empty", field=name)
    size = len(value.encode())
    if size > limit:
        raise ProtocolError(
            C.E_BAD_REQUEST, f"{name} has {size} bytes; the limit is {limit}", field=name
        )
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:  # absent or null: no stop strings
        value = []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(
            C.E_BAD_REQUEST, "stop must be a string or a list of strings", field="stop"
        )
    if len(value) > C.MAX_STOP_STRINGS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"stop has {len(value)} strings; the limit is {C.MAX_STOP_STRINGS}",
            field="stop",
        )
    for s in value:
        if not 1 <= len(s) <= C.MAX_STOP_CHARS:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"each stop string must have 1 to {C.MAX_STOP_CHARS} characters",
                field="stop",
            )
    return value


SAMPLING_FIELDS = {
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "timeout_ms",
    "model",
}


def _model(body: dict) -> str | None:
    """A model's name: checked for shape here, for existence by the supervisor."""
    value = body.get("model")
    if value is None:  # absent or null: the server's default model
        return None
    return _text(body, "model", C.MAX_MODEL_NAME_BYTES)


_DEFAULT = M.Sampling()


def _timeout(body: dict) -> int | None:
    return _integer(body, "timeout_ms", None, 1, C.MAX_TIMEOUT_MS)


def _sampling(body: dict) -> M.Sampling:
    return M.Sampling(
        max_tokens=_integer(body, "max_tokens", _DEFAULT.max_tokens, 1, C.MAX_TOKENS_LIMIT),
        temperature=_number(body, "temperature", _DEFAULT.temperature, 0.0, C.MAX_TEMPERATURE),
        top_p=_number(body, "top_p", _DEFAULT.top_p, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", _DEFAULT.top_k, 0, C.MAX_TOP_K),
        seed=_integer(body, "seed", _DEFAULT.seed, 0, C.MAX_SEED),
        stop=tuple(_stop(body)),
    )


def _complete(body: dict) -> M.Complete:
    _reject_unknown(body, SAMPLING_FIELDS | {"prompt"})
    # The order of checks is SPEC.md's ("Field checks"): the first failing field is named.
    prompt = _text(body, "prompt", C.MAX_PROMPT_BYTES)
    return M.Complete(
        prompt, model=_model(body), timeout_ms=_timeout(body), sampling=_sampling(body)
    )


def _chat(body: dict) -> M.Chat:
    _reject_unknown(body, SAMPLING_FIELDS | {"messages"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(C.E_BAD_REQUEST, "messages must be a non-empty list", field="messages")
    if len(messages) > C.MAX_MESSAGES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"messages has {len(messages)} entries; the limit is {C.MAX_MESSAGES}",
            field="messages",
        )
    clean, total = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ProtocolError(
                C.E_BAD_REQUEST, f"{where} must be an object with role and content", field=where
            )
        if message["role"] not in C.CHAT_ROLES:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"{where}.role must be one of {', '.join(C.CHAT_ROLES)}",
                field=f"{where}.role",
            )
        if not isinstance(message["content"], str):
            raise ProtocolError(
                C.E_BAD_REQUEST, f"{where}.content must be a string", field=f"{where}.content"
            )
        total += len(message["content"].encode())
        clean.append(M.Message(message["role"], message["content"]))
    if total > C.MAX_PROMPT_BYTES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"messages hold {total} bytes of content; the limit is {C.MAX_PROMPT_BYTES}",
            field="messages",
        )
    return M.Chat(
        tuple(clean), model=_model(body), timeout_ms=_timeout(body), sampling=_sampling(body)
    )


def _tokenize(body: dict) -> M.Tokenize:
    _reject_unknown(body, {"text", "model"})
    return M.Tokenize(_text(body, "text", C.MAX_PROMPT_BYTES), model=_model(body))


def _cancel(body: dict) -> M.Cancel:
    _reject_unknown(body, {"target"})
    return M.Cancel(_text(body, "target", C.MAX_REQUEST_ID_BYTES).encode())


def _ping(body: dict) -> M.Ping:
    _reject_unknown(body, set())
    return M.Ping()


def _status(body: dict) -> M.Status:
    _reject_unknown(body, set())
    return M.Status()


_VALIDATORS = {
    C.COMPLETE: _complete,
    C.CHAT: _chat,
    C.TOKENIZE: _tokenize,
    C.PING: _ping,
    C.STATUS: _status,
    C.CANCEL: _cancel,
}
