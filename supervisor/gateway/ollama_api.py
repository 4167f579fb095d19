"""Ollama's native API (its docs/api.md) on the gateway, beside the OpenAI routes: the same
process, llmsup connection, models and backpressure.

POST /api/generate and /api/chat (NDJSON streaming, one JSON object a line, or one object
with `"stream": false`), GET /api/tags, POST /api/show, GET /api/ps, GET|HEAD /api/version,
POST /api/embed and /api/embeddings. Errors are Ollama's `{"error": "..."}` with the status
Ollama uses (app.py shapes them for every /api/ path).

Models: a name as Ollama users type it, NAME:TAG. A served model NAME answers to `NAME` and
`NAME:latest` (any other tag is another model: one served under a name with that tag
itself); /api/tags lists each as `NAME:latest` and responses name the model as asked.

Requests: `options` become the protocol's sampling fields (OPTION_FIELDS); the options
llmsup cannot change per request (num_ctx, num_thread, mirostat...) and top-level fields
it does not know are ignored and named in the X-Llmsup-Ignored-Params header, as the
OpenAI routes do. `format` "json" or a JSON schema is the protocol's json_schema;
`keep_alive` (a duration "5m", a number of seconds, 0, negative) its keep_alive_s; and
/api/chat takes the protocol's `tool_choice` beside `tools` (Ollama has none).
/api/generate without `raw` sends the prompt (and `system`) as a chat, as Ollama formats
it with the model's template; with `raw: true` as it is (`complete`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

import orjson
from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import ApiError, bad, from_llmsup, stopping_error
from llmsup.supervisor.gateway.generate import client_of, failed, read_json
from llmsup.supervisor.gateway.metrics import endpoint_label
from llmsup.supervisor.gateway.openai_api import Job, _validated
from llmsup.supervisor.gateway.state import (
    GATEWAY,
    IGNORED,
    MODEL,
    MODELS_MAX_AGE_S,
    MODELS_MISS_MAX_AGE_S,
    Gateway,
)
from llmsup.supervisor.gateway.upstream import Call, UpstreamError

OLLAMA_VERSION = "0.9.0"  # the Ollama API level /api/version reports
LATEST = ":latest"
NDJSON = "application/x-ndjson"
NS = 1_000_000  # nanoseconds per millisecond
NEVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # expires_at of a model kept for good

# Ollama's options -> the protocol's fields (SPEC.md 3.1).
OPTION_FIELDS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
COMMON_FIELDS = {"model", "format", "options", "stream", "keep_alive"}
# tool_choice is llmsup's (SPEC.md 3.12), not Ollama's: a small model may need "required".
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "tools",
    "tool_choice",
    "think",
    "logprobs",
    "top_logprobs",
}
GENERATE_FIELDS = COMMON_FIELDS | {
    "prompt",
    "system",
    "raw",
    "images",
    "suffix",
    "context",
    "template",
    "think",
    "logprobs",
    "top_logprobs",
}
MESSAGE_FIELDS = {"role", "content", "images", "tool_calls", "tool_name", "tool_call_id"}
ROLES = ("system", "user", "assistant", "tool")
# Go's time.ParseDuration, which Ollama's keep_alive strings go through.
DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")
DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def error_body(err: ApiError) -> dict[str, Any]:
    return {"error": err.message}


def not_found(name: str) -> ApiError:
    return ApiError(
        404,
        f"model {orjson.dumps(name[:100]).decode()} not found, try pulling it first",
        param="model",
        code="model_not_found",
    )


def now_text() -> str:
    """Ollama's created_at: RFC 3339 in UTC."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def tagged(name: str) -> str:
    return name if ":" in name else name + LATEST


def match(name: str, served: list[str]) -> str | None:
    """The served model that `name` means: itself, or NAME for NAME:latest."""
    if name in served:
        return name
    if name.endswith(LATEST) and name[: -len(LATEST)] in served:
        return name[: -len(LATEST)]
    return None


async def resolve(gw: Gateway, name: Any, field: str = "model") -> str:
    """The served model a request names (404 as Ollama words it when none)."""
    if not isinstance(name, str) or not name:
        raise bad(f"{field} is required", field)
    served = await gw.served(MODELS_MAX_AGE_S)
    found = match(name, served)
    if found is None:
        found = match(name, await gw.served(MODELS_MISS_MAX_AGE_S))
    if found is None:
        raise not_found(name)
    return found


# --- requests -----------------------------------------------------------------------------


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive as the protocol's keep_alive_s: None (absent: the server's
    --keep-alive), -1 (negative: for good) or seconds. 400 naming the field otherwise."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            seconds = math.nan
    elif isinstance(value, str):
        seconds = parse_duration(value.strip())
    else:
        seconds = math.nan
    if math.isnan(seconds):
        shown = orjson.dumps(value).decode()[:60]
        raise bad(
            f"keep_alive {shown} is not a duration: give seconds (a number) or a duration "
            'such as "30s", "5m", "1h" or "1h30m"; 0 unloads the model once idle, a negative '
            "value keeps it loaded",
            "keep_alive",
        )
    if seconds < 0:
        return float(C.KEEP_ALIVE_FOREVER)
    if seconds > C.MAX_KEEP_ALIVE_S:
        raise bad(
            f"keep_alive is {seconds:g} s; the limit is {C.MAX_KEEP_ALIVE_S} s (365 days); "
            "a negative value keeps the model loaded",
            "keep_alive",
        )
    return seconds


def parse_duration(text: str) -> float:
    """Seconds of a Go duration ("1h30m", "-5m", "300ms", "0") or of a number written as a
    string ("300", "-1": OLLAMA_KEEP_ALIVE's forms); NaN if it is neither."""
    if NUMBER.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    total, at = 0.0, 0
    for part in DURATION_PART.finditer(body):
        if part.start() != at:
            return math.nan
        total += float(part.group(1)) * DURATION_UNITS[part.group(2)]
        at = part.end()
    if at == 0 or at != len(body):
        return math.nan
    return sign * total


def options_body(req: dict[str, Any], body: dict[str, Any], job: Job) -> None:
    """`options` as the protocol's sampling fields; the others are named as ignored."""
    options = req.get("options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise bad("options must be an object", "options")
    for name, value in options.items():
        field = OPTION_FIELDS.get(name)
        if field is None:
            job.ignored.append(f"options.{name}")
            continue
        if value is None:
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name == "num_predict" and is_int and value < 0:
            value = C.MAX_TOKENS_LIMIT  # -1 (no limit), -2 (fill the context): till it is full
        elif name == "repeat_last_n" and is_int and value < 0:
            value = C.MAX_TOKENS_LIMIT  # -1: the whole context
        elif name == "seed" and is_int and value < 0:
            value = None  # Ollama's -1: a random seed
        if value is not None:
            body[field] = value
            job.names[field] = f"options.{name}"


def format_body(req: dict[str, Any], body: dict[str, Any], job: Job) -> None:
    fmt = req.get("format")
    if fmt is None or fmt == "":
        return
    if fmt == "json":
        body["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict):
        body["json_schema"] = fmt
    else:
        raise bad('format must be "json" or a JSON schema (an object)', "format")
    job.names["json_schema"] = "format"


def check_fields(req: dict[str, Any], allowed: set[str], job: Job) -> None:
    for name, value in req.items():
        if name not in allowed:
            job.ignored.append(name)
        elif name == "think" and value not in (None, False):
            job.ignored.append(name)  # no thinking models' split here: the text is whole
        elif name == "logprobs" and value not in (None, False):
            raise bad("logprobs are not supported on the Ollama routes", "logprobs")
    for name in ("images",):
        if req.get(name):
            raise bad("images are not supported: llmsup serves text models", name)


def new_job(chat: bool, verb: bytes, req: dict[str, Any]) -> Job:
    stream = req.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    # Ollama streams unless told not to.
    return Job(chat, verb, {}, req.get("model"), stream is not False)


def finish_body(req: dict[str, Any], body: dict[str, Any], job: Job) -> None:
    format_body(req, body, job)
    options_body(req, body, job)
    body.setdefault("max_tokens", C.MAX_TOKENS_LIMIT)  # Ollama's num_predict -1: no limit
    keep = keep_alive_seconds(req.get("keep_alive"))
    if keep is not None:
        body["keep_alive_s"] = keep
    job.body = _validated(job.verb, body, job.names)


def chat_request(req: dict[str, Any]) -> Job:
    job = new_job(True, C.CHAT, req)
    check_fields(req, CHAT_FIELDS, job)
    body: dict[str, Any] = {"messages": messages(req.get("messages"))}
    if req.get("tools"):
        body["tools"] = req["tools"]
        if req.get("tool_choice") is not None:
            body["tool_choice"] = req["tool_choice"]
    finish_body(req, body, job)
    return job


def generate_request(req: dict[str, Any]) -> Job:
    job = new_job(False, C.COMPLETE, req)
    check_fields(req, GENERATE_FIELDS, job)
    for name, why in (("suffix", "suffix (fill-in-the-middle)"), ("context", "context")):
        if req.get(name):
            raise bad(f"{why} is not supported; send the conversation to /api/chat", name)
    if req.get("template"):
        job.ignored.append("template")  # the model's own template is used
    prompt = req.get("prompt")
    if not isinstance(prompt, str):
        raise bad("prompt must be a string", "prompt")
    raw = req.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise bad("raw must be true or false", "raw")
    system = req.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("system must be a string", "system")
    if raw:
        body: dict[str, Any] = {"prompt": prompt}
        if system:
            job.ignored.append("system")  # raw: the prompt is sent as it is
    else:  # as Ollama does: the prompt in the model's template, a user turn
        job.verb = C.CHAT
        turns = [{"role": "system", "content": system}] if system else []
        body = {"messages": [*turns, {"role": "user", "content": prompt}]}
        job.names["messages"] = "prompt"
    finish_body(req, body, job)
    return job


def messages(value: Any) -> list[dict[str, Any]]:
    """Ollama's messages as the protocol's: a tool call's arguments (an object) become
    JSON text with an id, and a tool message gets the id of the call it answers (by its
    tool_name, else the next one unanswered)."""
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) not answered yet
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad("each message must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"role must be one of {', '.join(ROLES)}", f"{where}.role")
        for name in message:
            if name not in MESSAGE_FIELDS and name != "thinking":
                raise bad(f"unknown message field {name!r}", f"{where}.{name}")
        if message.get("images"):
            raise bad("images are not supported: llmsup serves text models", f"{where}.images")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad("content must be a string", f"{where}.content")
        clean: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            clean["tool_calls"] = calls = tool_calls(where, i, message["tool_calls"])
            pending = [(c["id"], c["function"]["name"]) for c in calls]
        elif role == "tool":
            clean["tool_call_id"] = answered(message, pending, i)
        out.append(clean)
    return out


def tool_calls(where: str, i: int, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise bad("tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(
                "a tool call must be {function: {name, arguments}}", f"{where}.tool_calls[{j}]"
            )
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function["name"], "arguments": text},
            }
        )
    return out


def answered(message: dict[str, Any], pending: list[tuple[str, str]], i: int) -> str:
    given = message.get("tool_call_id")
    if isinstance(given, str) and given:
        return given
    name = message.get("tool_name")
    for k, (call_id, function) in enumerate(pending):
        if name is None or function == name:
            del pending[k]
            return call_id
    return f"call_{i}"  # a result with no call before it: the template shows it anyway


# --- responses ----------------------------------------------------------------------------


class Lines:
    """The NDJSON objects of one request. A token's line is a prebuilt prefix (with the
    time its batch of frames was written), the text as a JSON string and a suffix."""

    def __init__(self, job: Job, name: str, started: float, path: str = ""):
        self.path = path  # the route, for the TTFT histogram
        self.first_token_at: float | None = None
        self.job = job
        self.name = name  # as the request named it
        self.started = started
        self.loading_since: float | None = None
        self.load_s = 0.0
        model = orjson.dumps(name)
        if job.chat:
            self.head = b'{"model":' + model + b',"created_at":"'
            self.middle = b'","message":{"role":"assistant","content":'
            self.suffix = b'},"done":false}\n'
        else:
            self.head = b'{"model":' + model + b',"created_at":"'
            self.middle = b'","response":'
            self.suffix = b',"done":false}\n'

    def prefix(self) -> bytes:
        return self.head + now_text().encode() + self.middle

    def waited(self, body: dict[str, Any]) -> None:
        """A queued frame: while its model loads, the wait counts as load_duration."""
        if body.get("loading") and self.loading_since is None:
            self.loading_since = self.started

    def token(self, gw: Gateway, model: str) -> None:
        """A token came: the first one's time goes to the TTFT histogram."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            gw.metrics.ttft.labels(self.path, model).observe(self.first_token_at - self.started)
        self.began()

    def began(self) -> None:
        """Its prompt is read (or its first token came): the load, if any, is over."""
        if self.loading_since is not None:
            self.load_s = time.monotonic() - self.loading_since
            self.loading_since = None

    def stats(self, done: dict[str, Any]) -> dict[str, Any]:
        usage = done.get("usage") or {}
        timings = done.get("timings") or {}
        reason = done.get("finish_reason", C.FINISH_STOP)
        return {
            "done": True,
            "done_reason": "length" if reason == C.FINISH_LENGTH else "stop",
            "total_duration": int((time.monotonic() - self.started) * 1e9),
            "load_duration": int(self.load_s * 1e9),
            "prompt_eval_count": usage.get("prompt_tokens", 0),
            "prompt_eval_duration": int(timings.get("prompt_ms", 0) * NS),
            "eval_count": usage.get("completion_tokens", 0),
            "eval_duration": int(timings.get("generation_ms", 0) * NS),
        }

    def output(self, text: str, done: dict[str, Any] | None) -> dict[str, Any]:
        if not self.job.chat:
            return {"response": text}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = (done or {}).get("tool_calls")
        if calls:
            message["tool_calls"] = [ollama_call(k, c) for k, c in enumerate(calls)]
        return {"message": message}

    def whole(self, text: str, done: dict[str, Any]) -> dict[str, Any]:
        head = {"model": self.name, "created_at": now_text()}
        return {**head, **self.output(text, done), **self.stats(done)}

    def last(self, done: dict[str, Any]) -> bytes:
        """The closing line(s): tool calls in a line of their own, then the statistics."""
        head = {"model": self.name, "created_at": now_text()}
        out = b""
        if done.get("tool_calls"):
            out += orjson.dumps({**head, **self.output("", done), "done": False}) + b"\n"
        return out + orjson.dumps({**head, **self.output("", None), **self.stats(done)}) + b"\n"


def ollama_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    """A protocol tool call as Ollama's: arguments an object, not JSON text."""
    function = call["function"]
    try:
        arguments = orjson.loads(function["arguments"])
    except orjson.JSONDecodeError:
        arguments = {}
    return {
        "id": call.get("id"),
        "function": {"index": index, "name": function["name"], "arguments": arguments},
    }


def json_line(body: Any) -> bytes:
    return orjson.dumps(body) + b"\n"


# --- routes -------------------------------------------------------------------------------


async def chat(request: web.Request) -> web.StreamResponse:
    return await generation(request, chat_request, "messages")


async def generate(request: web.Request) -> web.StreamResponse:
    return await generation(request, generate_request, "prompt")


def empty(req: dict[str, Any], field: str) -> bool:
    """A request without a prompt (or messages): Ollama's way to load a model, or with
    keep_alive 0 to unload it."""
    value = req.get(field)
    return value is None or value in ("", [])


async def load_or_unload(gw: Gateway, req: dict[str, Any], name: str, model: str, chat: bool):
    """Ollama's answer to an empty request: the model loaded (or, with keep_alive 0,
    unloaded once idle), done at once with done_reason "load" or "unload". llmsup has no
    verb that only loads: a one-token `complete` with the request's keep_alive_s does
    both, unless the model is to be unloaded and is not loaded anyway."""
    keep = keep_alive_seconds(req.get("keep_alive"))
    reason = "unload" if keep == 0 else "load"
    if keep != 0 or await loaded(gw, model):
        body: dict[str, Any] = {"prompt": " ", "max_tokens": 1, "temperature": 0, "model": model}
        if keep is not None:
            body["keep_alive_s"] = keep
        try:
            call = gw.upstream.open(C.COMPLETE, body, name.encode())
        except UpstreamError as exc:
            raise from_llmsup(exc.body, None) from None
        try:
            while True:
                kind, reply = await call.next()
                if kind == C.ERROR:
                    raise from_llmsup(reply, None, gw.stopping)
                if kind == C.DONE:
                    break
        finally:
            call.close()
    out: dict[str, Any] = (
        {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    )
    return json_response(
        {"model": name, "created_at": now_text(), **out, "done": True, "done_reason": reason}
    )


async def loaded(gw: Gateway, model: str) -> bool:
    """Whether a core group serves (or loads) `model` now."""
    try:
        status = await gw.status()
    except UpstreamError as exc:
        raise from_llmsup(exc.body, None) from None
    return any(
        isinstance(m, dict) and m.get("name") == model and m.get("groups")
        for m in status.get("models") or ()
    )


async def generation(
    request: web.Request, translate: Callable[[dict], Job], field: str
) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.monotonic()
    if gw.stopping:
        raise stopping_error()
    raw = await read_json(request, gw.max_body_bytes)
    name = raw.get("model")
    model = await resolve(gw, name)
    request[MODEL] = model
    if empty(raw, field):
        return await load_or_unload(gw, raw, name, model, field == "messages")
    job = translate(raw)
    if job.ignored:
        request[IGNORED] = job.ignored
        gw.ignored_params(job.ignored)
    job.body["model"] = model
    lines = Lines(job, name, started, request.path)
    try:
        call = gw.upstream.open(job.verb, job.body, client_of(raw))
    except UpstreamError as exc:
        raise from_llmsup(exc.body, job) from None
    try:
        if job.stream:
            return await stream(request, gw, call, job, lines, model)
        return await whole(gw, call, job, lines, model)
    finally:
        call.close()
        gw.metrics.latency.labels(endpoint_label(request.path), model).observe(
            time.monotonic() - started
        )


async def whole(gw: Gateway, call: Call, job: Job, lines: Lines, model: str) -> web.Response:
    texts: list[str] = []
    while True:
        kind, body = await call.next()
        if kind == C.TOKEN:
            lines.token(gw, model)
            texts.append(body["text"])
        elif kind == C.DONE:
            gw.metrics.finished(body, model)
            return json_response(lines.whole("".join(texts), body))
        elif kind == C.ERROR:
            raise failed(gw, body, job, model)
        elif kind == C.QUEUED:
            lines.waited(body)
        elif kind == C.RUNNING:
            lines.began()


async def stream(
    request: web.Request, gw: Gateway, call: Call, job: Job, lines: Lines, model: str
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    while True:
        frame: tuple[bytes, dict] | None = await call.next()
        out: list[bytes] = []
        prefix = b""
        while frame is not None:  # what already arrived is written in one go
            kind, body = frame
            if kind == C.TOKEN:
                if not prefix:
                    lines.token(gw, model)
                    prefix = lines.prefix()
                out.append(prefix + orjson.dumps(body["text"]) + lines.suffix)
            elif kind == C.DONE:
                gw.metrics.finished(body, model)
                out.append(lines.last(body))
            elif kind == C.ERROR:
                err = failed(gw, body, job, model)
                if response is None and not out:  # nothing sent yet: a status code
                    return json_response(error_body(err), err.status, err.headers)
                out.append(json_line(error_body(err)))
            elif kind == C.QUEUED:
                lines.waited(body)
            elif kind == C.RUNNING:
                lines.began()
            frame = call.next_nowait()
        if not out:
            continue
        try:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": NDJSON})
                await response.prepare(request)
            await response.write(b"".join(out))
            if call.ended:
                await response.write_eof()
                return response
        except ConnectionResetError:  # the client went away: generation() cancels it
            if response is None or not response.prepared:
                raise
            return response


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def modified(gw: Gateway, name: str) -> str:
    when = datetime.fromtimestamp(gw.created.get(name, 0), UTC)
    return when.isoformat().replace("+00:00", "Z")


async def tags(request: web.Request) -> web.Response:
    """The served models, the default first, each as NAME:latest."""
    gw = request.app[GATEWAY]
    names = await gw.served(max_age=0)
    facts = {n: gw.facts.of(gw.paths.get(n)) for n in names}
    models = [
        {
            "name": tagged(n),
            "model": tagged(n),
            "modified_at": modified(gw, n),
            "size": facts[n].size,
            "digest": "",
            "details": facts[n].details(),
        }
        for n in names
    ]
    return json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    req = await read_json(request, gw.max_body_bytes)
    field = "model" if "model" in req else "name"  # `name`: Ollama's older spelling
    model = await resolve(gw, req.get(field), field)
    facts = gw.facts.of(gw.paths.get(model))
    return json_response(
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": facts.details(),
            "model_info": facts.info,
            "capabilities": facts.capabilities(),
            "modified_at": modified(gw, model),
        }
    )


async def ps(request: web.Request) -> web.Response:
    """The models loaded now (a core group serves or loads them) and when each unloads."""
    gw = request.app[GATEWAY]
    try:
        status = await gw.status()
    except UpstreamError as exc:
        raise from_llmsup(exc.body, None) from None
    now = datetime.now(UTC)
    models = []
    for m in status.get("models") or ():
        if not isinstance(m, dict) or not m.get("groups"):
            continue
        keep, idle = m.get("keep_alive_s"), m.get("idle_s") or 0.0
        if m.get("default") or not isinstance(keep, (int, float)) or keep < 0:
            expires = NEVER
        else:
            expires = now + timedelta(seconds=max(0.0, keep - idle))
        name = m["name"]
        facts = gw.facts.of(m.get("path"))
        models.append(
            {
                "name": tagged(name),
                "model": tagged(name),
                "size": facts.size,
                "digest": "",
                "details": facts.details(),
                "expires_at": expires.isoformat().replace("+00:00", "Z"),
                "size_vram": 0,
            }
        )
    return json_response({"models": models})


def llmsup_version() -> str:
    try:
        return metadata.version("llmsup")
    except metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


async def version(request: web.Request) -> web.Response:
    """The Ollama API level served, and llmsup's own version."""
    return json_response({"version": OLLAMA_VERSION, "llmsup": llmsup_version()})


async def embed(request: web.Request) -> web.Response:
    """/api/embed: {model, input (a string or a list), truncate} -> {embeddings}."""
    gw = request.app[GATEWAY]
    started = time.monotonic()
    req = await read_json(request, gw.max_body_bytes)
    model = await resolve(gw, req.get("model"))
    request[MODEL] = model
    inputs = req.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
        raise bad("input must be a string or a list of strings", "input")
    truncate = req.get("truncate", True)
    if not isinstance(truncate, bool):
        raise bad("truncate must be true or false", "truncate")
    keep_alive_seconds(req.get("keep_alive"))
    result = await embeddings(gw, inputs, model, True, truncate)
    usage = result.get("usage") or {}
    return json_response(
        {
            "model": req["model"],
            "embeddings": result["embeddings"],
            "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": usage.get("prompt_tokens", 0),
        }
    )


async def embeddings_legacy(request: web.Request) -> web.Response:
    """/api/embeddings, Ollama's older route: {model, prompt} -> {embedding}, not
    normalized."""
    gw = request.app[GATEWAY]
    req = await read_json(request, gw.max_body_bytes)
    model = await resolve(gw, req.get("model"))
    request[MODEL] = model
    prompt = req.get("prompt")
    if not isinstance(prompt, str):
        raise bad("prompt must be a string", "prompt")
    keep_alive_seconds(req.get("keep_alive"))
    result = await embeddings(gw, [prompt], model, False, True)
    return json_response({"embedding": result["embeddings"][0]})


async def embeddings(
    gw: Gateway, inputs: list[str], model: str, normalize: bool, truncate: bool
) -> dict[str, Any]:
    body = {"input": inputs, "model": model, "normalize": normalize, "truncate": truncate}
    try:
        return await gw.upstream.answer(C.EMBED, body)
    except UpstreamError as exc:
        raise from_llmsup(exc.body, None) from None


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_get("/api/version", version)  # GET also answers HEAD
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings_legacy)
