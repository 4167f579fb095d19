"""The generation routes, /v1/completions and /v1/chat/completions: each request is one
llmsup call on the lane its routing key picks, answered whole or as a server-sent event
stream.

A streamed response is committed (200 and the event-stream headers) at its first llmsup
frame: an error that comes first (overloaded, a bad parameter) still gets its own status
code and headers, while a request that waits in llmsup's queue gets its headers and a
`: queued` comment each second (`: loading MODEL` while its model loads), so proxies see
a live connection. The HTTP client going away cancels the handler (aiohttp's
handler_cancellation), and leaving the handler sends llmsup `cancel` for a request that
has not ended (Call.close).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import ApiError, bad, from_llmsup, stopping_error
from llmsup.supervisor.gateway.metrics import endpoint_label
from llmsup.supervisor.gateway.openai_api import Job, chat_job, completion_job
from llmsup.supervisor.gateway.responses import (
    RUNNING_COMMENT,
    Shaper,
    error_response,
    json_response,
    queued_comment,
)
from llmsup.supervisor.gateway.state import GATEWAY, IGNORED, MODEL, Gateway
from llmsup.supervisor.gateway.upstream import Call, UpstreamError

ROUTE_KEY_BYTES = 256  # a request without prompt_cache_key or user: its lane from these
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class EventStream(web.StreamResponse):
    """A server-sent event stream whose headers leave with its first event, in one write:
    prepared at the first token, it had sent them alone first, a write and a wake-up of the
    client more before the token (aiohttp's own Response buffers them so; this attribute is
    how it opts in, from aiohttp 3.12, and means nothing to older ones)."""

    _send_headers_immediately = False


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, completion_job)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat_job)


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    return body


def client_of(body: dict[str, Any]) -> bytes:
    """The routing key of a request, for the lane it takes: OpenAI's `prompt_cache_key`
    when the client sends one, else its `user`, else the first ROUTE_KEY_BYTES bytes of its
    prompt or messages (as JSON), so requests that begin alike go alike."""
    for name in ("prompt_cache_key", "user"):
        key = body.get(name)
        if isinstance(key, str) and key:
            return key.encode()
    text = body.get("messages", body.get("prompt"))
    return orjson.dumps(text)[:ROUTE_KEY_BYTES]


async def generate(request: web.Request, translate: Callable) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.monotonic()
    if gw.stopping:
        raise stopping_error()
    raw = await read_json(request, gw.max_body_bytes)
    job: Job = translate(raw)
    if job.ignored:
        request[IGNORED] = job.ignored
        gw.ignored_params(job.ignored)
    model = await gw.model_for(job.model)
    request[MODEL] = model
    if job.model is not None:  # else llmsup's default, whatever it is by now
        job.body["model"] = model
    shaper = Shaper(job, model)
    try:
        call = gw.upstream.open(job.verb, job.body, client_of(raw))
    except UpstreamError as exc:
        raise from_llmsup(exc.body, job) from None
    endpoint = endpoint_label(request.path)
    try:
        if job.stream:
            return await stream(request, gw, call, job, shaper, started)
        return await whole(gw, call, job, shaper, started)
    finally:
        call.close()
        gw.metrics.latency.labels(endpoint, model).observe(time.monotonic() - started)


def failed(gw: Gateway, body: dict[str, Any], job: Job, model: str) -> ApiError:
    gw.metrics.rejections.labels(body.get("code", C.E_INTERNAL)).inc()
    if body.get("usage"):  # cancelled or past its deadline while generating
        gw.metrics.finished(body, model)
    return from_llmsup(body, job, gw.stopping)


async def whole(gw: Gateway, call: Call, job: Job, shaper: Shaper, started: float) -> web.Response:
    texts: dict[int, list[str]] = {}  # by choice (index), for n above 1
    entries: dict[int, list[dict[str, Any]]] = {}  # logprobs, when asked for
    while True:
        kind, body = await call.next()
        if kind == C.TOKEN:
            if not texts:
                gw.metrics.ttft.labels(request_path(job), shaper.model).observe(
                    time.monotonic() - started
                )
            index = body.get("index", 0)
            texts.setdefault(index, []).append(body["text"])
            entries.setdefault(index, []).extend(body.get("logprobs") or ())
        elif kind == C.DONE:
            gw.metrics.finished(body, shaper.model)
            joined = {index: "".join(parts) for index, parts in texts.items()}
            return json_response(shaper.whole(joined, body, entries))
        elif kind == C.ERROR:
            raise failed(gw, body, job, shaper.model)
        # ACCEPTED, QUEUED, RUNNING and kinds added later (SPEC.md 7): nothing to do.


def request_path(job: Job) -> str:
    return "/v1/chat/completions" if job.chat else "/v1/completions"


async def stream(
    request: web.Request, gw: Gateway, call: Call, job: Job, shaper: Shaper, started: float
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    first_token = True
    while True:
        frame: tuple[bytes, dict] | None = await call.next()
        out: list[bytes] = []
        while frame is not None:  # what already arrived is written in one go
            kind, body = frame
            if kind == C.TOKEN:
                if first_token:
                    first_token = False
                    gw.metrics.ttft.labels(request_path(job), shaper.model).observe(
                        time.monotonic() - started
                    )
                out.append(shaper.token(body))
            elif kind == C.QUEUED:
                out.append(queued_comment(body))
            elif kind == C.RUNNING:
                out.append(RUNNING_COMMENT)
            elif kind == C.DONE:
                gw.metrics.finished(body, shaper.model)
                out.append(shaper.finish(body))
            elif kind == C.ERROR:
                err = failed(gw, body, job, shaper.model)
                if response is None and not out:  # nothing to send first: a status code
                    return error_response(err)
                out.append(shaper.error(err))
            frame = call.next_nowait()
        if not out:
            continue  # ACCEPTED, or a kind added later: no reason to start the response yet
        try:
            if response is None:
                response = EventStream(headers=SSE_HEADERS)
                await response.prepare(request)
                out.insert(0, shaper.start())
            await response.write(b"".join(out))
            if call.ended:
                await response.write_eof()
                return response
        except ConnectionResetError:  # the client went away: generate() cancels the request
            if response is None or not response.prepared:
                raise
            return response
