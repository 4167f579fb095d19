"""Encoding, decoding and validation of protocol v1 frames: all (de)serialization is here.

`parse_request` turns the frames a client sent into a `Request` whose body is a typed
value (messages.py) holding only validated, defaulted values, or raises `ProtocolError`
naming the field and the limit. The worker codec (workerwire.py) parses a job's body with
the same `parse_body`, so both sockets share one set of rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from llmsup.protocol import constants as C
from llmsup.protocol import gbnf, schema_subset
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
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "logit_bias",
    "grammar",
    "json_schema",
    "keep_alive_s",
}
TOOL_FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}
TOOL_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{C.MAX_TOOL_NAME_CHARS}}}")


def _model(body: dict) -> str | None:
    """A model's name: checked for shape here, for existence by the supervisor."""
    value = body.get("model")
    if value is None:  # absent or null: the server's default model
        return None
    return _text(body, "model", C.MAX_MODEL_NAME_BYTES)


_DEFAULT = M.Sampling()


def _timeout(body: dict) -> int | None:
    return _integer(body, "timeout_ms", None, 1, C.MAX_TIMEOUT_MS)


def _keep_alive(body: dict) -> float | None:
    """Seconds the model stays loaded unused after this request: -1 (forever), or 0 to
    MAX_KEEP_ALIVE_S; absent or null: the server's --keep-alive."""
    value = body.get("keep_alive_s")
    if value is None:
        return None
    if value == C.KEEP_ALIVE_FOREVER and not isinstance(value, bool):
        return float(C.KEEP_ALIVE_FOREVER)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(
            C.E_BAD_REQUEST, "keep_alive_s must be a finite number", field="keep_alive_s"
        )
    if not 0 <= value <= C.MAX_KEEP_ALIVE_S:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"keep_alive_s is {value}; it must be -1 (forever) or from 0 to {C.MAX_KEEP_ALIVE_S}",
            field="keep_alive_s",
        )
    return float(value)


def _sampling(body: dict) -> M.Sampling:
    d = _DEFAULT
    sampling = M.Sampling(
        max_tokens=_max_tokens(body),
        temperature=_number(body, "temperature", d.temperature, 0.0, C.MAX_TEMPERATURE),
        top_p=_number(body, "top_p", d.top_p, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", d.top_k, 0, C.MAX_TOP_K),
        seed=_integer(body, "seed", d.seed, 0, C.MAX_SEED),
        stop=tuple(_stop(body)),
        min_p=_number(body, "min_p", d.min_p, 0.0, 1.0),
        presence_penalty=_number(
            body, "presence_penalty", d.presence_penalty, -C.MAX_PENALTY, C.MAX_PENALTY
        ),
        frequency_penalty=_number(
            body, "frequency_penalty", d.frequency_penalty, -C.MAX_PENALTY, C.MAX_PENALTY
        ),
        repeat_penalty=_number(
            body, "repeat_penalty", d.repeat_penalty, 0.0, C.MAX_REPEAT_PENALTY, lo_open=True
        ),
        repeat_last_n=_integer(body, "repeat_last_n", d.repeat_last_n, 0, C.MAX_TOKENS_LIMIT),
        logit_bias=_logit_bias(body),
        grammar=_grammar(body),
        json_schema=_json_schema(body, "json_schema", body.get("json_schema")),
    )
    if sampling.grammar is not None and sampling.json_schema is not None:
        raise ProtocolError(
            C.E_BAD_REQUEST, "grammar and json_schema cannot be used together", field="json_schema"
        )
    logprobs = _logprobs(body)
    if logprobs != (False, 0):
        sampling = dataclasses.replace(sampling, logprobs=logprobs[0], top_logprobs=logprobs[1])
    return sampling


def _max_tokens(body: dict) -> int:
    """1 to MAX_TOKENS_LIMIT; 0 too with echo (the prompt's logprobs, nothing generated)."""
    value = body.get("max_tokens")
    if type(value) is int and value == 0:
        if body.get("echo") is True:
            return 0
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"max_tokens is 0; it must be from 1 to {C.MAX_TOKENS_LIMIT} (0 only with echo)",
            field="max_tokens",
        )
    return _integer(body, "max_tokens", C.DEFAULT_MAX_TOKENS, 1, C.MAX_TOKENS_LIMIT)  # type: ignore[return-value]


LOGPROB_FIELDS = {"logprobs", "top_logprobs"}


def _logprobs(body: dict) -> tuple[bool, int]:
    """logprobs (a boolean) and top_logprobs (0 to MAX_TOP_LOGPROBS, with logprobs only)."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ProtocolError(C.E_BAD_REQUEST, "logprobs must be true or false", field="logprobs")
    top = _integer(body, "top_logprobs", 0, 0, C.MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise ProtocolError(
            C.E_BAD_REQUEST, "top_logprobs needs logprobs: true", field="top_logprobs"
        )
    return bool(logprobs), top or 0


def _echo(body: dict, sampling: M.Sampling) -> bool:
    echo = body.get("echo")
    if echo is None:
        return False
    if not isinstance(echo, bool):
        raise ProtocolError(C.E_BAD_REQUEST, "echo must be true or false", field="echo")
    if echo and not sampling.logprobs:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "echo needs logprobs: true (it returns the prompt's logprobs)",
            field="echo",
        )
    return echo


def _n(body: dict, echo: bool = False) -> int:
    """How many completions of the prompt: 1 to MAX_N (a worker's slots bound it further,
    at admission); above 1 not with echo (one prompt_logprobs, SPEC.md 3.16)."""
    n = _integer(body, "n", 1, 1, C.MAX_N)
    if n > 1 and echo:
        raise ProtocolError(C.E_BAD_REQUEST, f"n is {n}; with echo it must be 1", field="n")
    return n  # type: ignore[return-value]


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "logit_bias must be an object of token ids (as strings) to biases",
            field="logit_bias",
        )
    if len(value) > C.MAX_LOGIT_BIAS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"logit_bias has {len(value)} entries; the limit is {C.MAX_LOGIT_BIAS}",
            field="logit_bias",
        )
    out = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < 2**31):
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"logit_bias key {key[:20]!r} is not a token id (a decimal integer below 2^31)",
                field="logit_bias",
            )
        limit = C.MAX_LOGIT_BIAS_VALUE
        if (
            isinstance(bias, bool)
            or not isinstance(bias, (int, float))
            or not -limit <= bias <= limit
        ):
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"logit_bias[{key}] must be a number from {-limit:g} to {limit:g}",
                field="logit_bias",
            )
        out.append((int(key), float(bias)))
    return tuple(out)


def _grammar(body: dict) -> str | None:
    if body.get("grammar") is None:
        return None
    grammar = _text(body, "grammar", C.MAX_GRAMMAR_BYTES)
    problem = gbnf.copies_problem(grammar)
    if problem:
        raise ProtocolError(C.E_BAD_REQUEST, f"grammar: {problem}", field="grammar")
    return grammar


def _json_schema(body: dict, name: str, value: Any, limit: int = C.MAX_SCHEMA_BYTES) -> str | None:
    """A schema as compact JSON, checked against the subset llmsup converts exactly
    (schema_subset.py); None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(C.E_BAD_REQUEST, f"{name} must be a JSON object", field=name)
    text = orjson.dumps(value).decode()
    if len(text) > limit:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{name} has {len(text)} bytes as compact JSON; the limit is {limit}",
            field=name,
        )
    try:
        schema_subset.normalize(value)
    except schema_subset.SchemaError as exc:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{name} at {exc.pointer or '/'}: {exc}",
            field=name,
            pointer=exc.pointer,
            **({"keyword": exc.keyword} if exc.keyword else {}),
        ) from None
    return text


def _no_stop_with_structure(sampling: M.Sampling, structured: bool) -> None:
    if sampling.stop and structured:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "stop cannot be used with json_schema or tools: a stop string would cut the "
            "structured output short",
            field="stop",
        )


def _total_bytes(field: str, size: int, sampling: M.Sampling, tools_bytes: int = 0) -> None:
    """The prompt (or the messages) and the grammar, schema and tools fit together in
    MAX_PROMPT_BYTES: one frame holds them all (constants.MAX_FRAME_BYTES)."""
    total = size + len((sampling.grammar or "").encode()) + len(sampling.json_schema or "")
    total += tools_bytes
    if total > C.MAX_PROMPT_BYTES and total > size:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{field} with grammar, json_schema and tools hold {total} bytes together; "
            f"the limit is {C.MAX_PROMPT_BYTES}",
            field=field,
        )


def _complete(body: dict) -> M.Complete:
    _reject_unknown(body, SAMPLING_FIELDS | LOGPROB_FIELDS | {"prompt", "echo", "tokens", "n"})
    # The order of checks is SPEC.md's ("Field checks"): the first failing field is named.
    tokens = None
    if "tokens" in body and "prompt" not in body:  # the prompt as token ids
        tokens = _token_ids(body)
        prompt, size = "", len(tokens) * 4
    else:
        prompt = _text(body, "prompt", C.MAX_PROMPT_BYTES)
        if "tokens" in body:
            raise ProtocolError(
                C.E_BAD_REQUEST, "prompt and tokens cannot be used together", field="tokens"
            )
        size = len(prompt.encode())
    model, timeout, sampling = _model(body), _timeout(body), _sampling(body)
    keep = _keep_alive(body)
    echo = _echo(body, sampling)
    n = _n(body, echo)
    _no_stop_with_structure(sampling, sampling.json_schema is not None)
    _total_bytes("prompt", size, sampling)
    return M.Complete(
        prompt,
        model=model,
        timeout_ms=timeout,
        sampling=sampling,
        echo=echo,
        tokens=tokens,
        keep_alive_s=keep,
        n=n,
    )


def _chat(body: dict) -> M.Chat:
    _reject_unknown(body, SAMPLING_FIELDS | TOOL_FIELDS | LOGPROB_FIELDS | {"messages", "n"})
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
        parsed, size = _message(i, message)
        total += size
        clean.append(parsed)
    if total > C.MAX_PROMPT_BYTES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"messages hold {total} bytes of content; the limit is {C.MAX_PROMPT_BYTES}",
            field="messages",
        )
    model, timeout, keep = _model(body), _timeout(body), _keep_alive(body)
    sampling = _sampling(body)
    tools, tools_bytes = _tools(body)
    choice = _tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "parallel_tool_calls must be true or false",
            field="parallel_tool_calls",
        )
    n = _n(body)
    uses_tools = bool(tools) and choice != "none"
    if uses_tools and sampling.logprobs:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "logprobs cannot be used with tools in use (tool_choice other than none): the "
            "answer's text is not the model's tokens",
            field="logprobs",
        )
    _no_stop_with_structure(sampling, sampling.json_schema is not None or uses_tools)
    _total_bytes("messages", total, sampling, tools_bytes)
    return M.Chat(
        tuple(clean),
        model=model,
        timeout_ms=timeout,
        sampling=sampling,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=bool(parallel),
        keep_alive_s=keep,
        n=n,
    )


MESSAGE_MEMBERS = {"role", "content", "tool_calls", "tool_call_id"}


def _message(i: int, message: Any) -> tuple[M.Message, int]:
    """messages[i] and the bytes it counts toward MAX_PROMPT_BYTES."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or not {"role", "content"} <= set(message) <= MESSAGE_MEMBERS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{where} must be an object with role and content (and tool_calls on an "
            "assistant message, tool_call_id on a tool message)",
            field=where,
        )
    role = message["role"]
    if role not in C.CHAT_ROLES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{where}.role must be one of {', '.join(C.CHAT_ROLES)}",
            field=f"{where}.role",
        )
    content = message["content"]
    if not isinstance(content, str):
        raise ProtocolError(
            C.E_BAD_REQUEST, f"{where}.content must be a string", field=f"{where}.content"
        )
    size = len(content.encode())
    calls: list[M.ToolCall] = []
    raw_calls = message.get("tool_calls")
    if raw_calls is not None:
        if role != "assistant" or not isinstance(raw_calls, list) or not raw_calls:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"{where}.tool_calls must be a non-empty list, on an assistant message",
                field=f"{where}.tool_calls",
            )
        for j, call in enumerate(raw_calls):
            calls.append(_tool_call(f"{where}.tool_calls[{j}]", call))
            size += len(orjson.dumps(call))
    call_id = message.get("tool_call_id")
    if role == "tool":
        if not isinstance(call_id, str) or not 1 <= len(call_id) <= C.MAX_REQUEST_ID_BYTES:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"{where}.tool_call_id must be a string of 1 to {C.MAX_REQUEST_ID_BYTES} "
                "characters (the id of the call it answers)",
                field=f"{where}.tool_call_id",
            )
    elif call_id is not None:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{where}.tool_call_id belongs on a tool message only",
            field=f"{where}.tool_call_id",
        )
    return M.Message(role, content, tuple(calls), call_id), size


def _tool_call(where: str, call: Any) -> M.ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(call, dict)
        or call.get("type", "function") != "function"
        or not isinstance(call.get("id"), str)
        or not 1 <= len(call["id"]) <= C.MAX_REQUEST_ID_BYTES
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
        or not isinstance(function.get("arguments"), str)
    ):
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"{where} must be {{id (1 to {C.MAX_REQUEST_ID_BYTES} characters), type "
            '"function", function: {name, arguments (a JSON string)}}',
            field=where,
        )
    return M.ToolCall(call["id"], function["name"], function["arguments"])


def _tools(body: dict) -> tuple[tuple[M.Tool, ...], int]:
    """The tools, and their bytes as compact JSON."""
    value = body.get("tools")
    if value is None:
        return (), 0
    if not isinstance(value, list):
        raise ProtocolError(C.E_BAD_REQUEST, "tools must be a list", field="tools")
    if len(value) > C.MAX_TOOLS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"tools has {len(value)} entries; the limit is {C.MAX_TOOLS}",
            field="tools",
        )
    size = len(orjson.dumps(value))
    if size > C.MAX_TOOLS_BYTES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"tools hold {size} bytes as compact JSON; the limit is {C.MAX_TOOLS_BYTES}",
            field="tools",
        )
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f'{where} must be {{"type": "function", "function": {{name, description, '
                "parameters}}}",
                field=where,
            )
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"{where}.function.name must be 1 to {C.MAX_TOOL_NAME_CHARS} letters, digits, "
                "_ or -",
                field=f"{where}.function.name",
            )
        if name in names:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"{where}.function.name {name!r} names an earlier tool too",
                field=f"{where}.function.name",
            )
        names.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"{where}.function.description must be a string",
                field=f"{where}.function.description",
            )
        params = function.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        text = _json_schema(body, f"{where}.function.parameters", params, C.MAX_TOOLS_BYTES)
        tools.append(M.Tool(name, description, text))
    return tuple(tools), size


def _tool_choice(body: dict, tools: tuple[M.Tool, ...]) -> str:
    value = body.get("tool_choice")
    if value is None:
        return "auto"
    if isinstance(value, str) and value in C.TOOL_CHOICES:
        name = value
    elif (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        name = value["function"]["name"]
        if name not in {t.name for t in tools}:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"tool_choice names {name[:64]!r}, which is not among tools",
                field="tool_choice",
            )
    else:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            '"function": {"name": ...}}',
            field="tool_choice",
        )
    if name == "required" and not tools:
        raise ProtocolError(
            C.E_BAD_REQUEST, "tool_choice required needs tools", field="tool_choice"
        )
    return name


def _tokenize(body: dict) -> M.Tokenize:
    _reject_unknown(body, {"text", "model", "add_special", "with_pieces"})
    text, model = _text(body, "text", C.MAX_PROMPT_BYTES), _model(body)
    flags = _flags(body, add_special=True, with_pieces=False)
    return M.Tokenize(text, model=model, **flags)


def _detokenize(body: dict) -> M.Detokenize:
    _reject_unknown(body, {"tokens", "model"})
    return M.Detokenize(_token_ids(body), model=_model(body))


def _flags(body: dict, **defaults: bool) -> dict[str, bool]:
    """Boolean members by name, absent or null: their default; anything else bad_request."""
    flags = {}
    for name, default in defaults.items():
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise ProtocolError(C.E_BAD_REQUEST, f"{name} must be true or false", field=name)
        flags[name] = default if value is None else value
    return flags


def _embed(body: dict) -> M.Embed:
    _reject_unknown(body, {"input", "model", "normalize", "truncate", "encoding_format"})
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not all(isinstance(t, str) and t for t in inputs):
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "input must be a non-empty string or a list of non-empty strings",
            field="input",
        )
    if not 1 <= len(inputs) <= C.MAX_EMBED_INPUTS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"input has {len(inputs)} texts; it must have 1 to {C.MAX_EMBED_INPUTS}",
            field="input",
        )
    size = sum(len(t.encode()) for t in inputs)
    if size > C.MAX_PROMPT_BYTES:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"input holds {size} bytes of UTF-8; at most {C.MAX_PROMPT_BYTES} together",
            field="input",
        )
    flags = _flags(body, normalize=True, truncate=False)
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in C.EMBED_ENCODINGS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"encoding_format must be one of {', '.join(C.EMBED_ENCODINGS)}",
            field="encoding_format",
        )
    return M.Embed(tuple(inputs), model=_model(body), encoding=encoding or "float", **flags)


def _token_ids(body: dict) -> tuple[int, ...]:
    """`tokens`: 1 to MAX_DETOKENIZE_TOKENS token ids (the worker checks them against the
    model's vocabulary)."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < 2**31 for t in tokens):
        raise ProtocolError(
            C.E_BAD_REQUEST,
            "tokens must be a list of token ids (integers from 0 below the model's vocabulary)",
            field="tokens",
        )
    if not 1 <= len(tokens) <= C.MAX_DETOKENIZE_TOKENS:
        raise ProtocolError(
            C.E_BAD_REQUEST,
            f"tokens has {len(tokens)} ids; it must have 1 to {C.MAX_DETOKENIZE_TOKENS}",
            field="tokens",
        )
    return tuple(tokens)


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
    C.DETOKENIZE: _detokenize,
    C.EMBED: _embed,
}
