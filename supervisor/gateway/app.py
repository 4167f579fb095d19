"""The gateway's HTTP routes (aiohttp): OpenAI's /v1/models, /v1/completions and
/v1/chat/completions, plus /health and /metrics, each answered through one llmsup request.

A streamed response is committed (200 and the event-stream headers) at its first llmsup
frame: an error that comes first (overloaded, a bad parameter) still gets its own status
code and headers, while a request that waits in llmsup's queue gets its headers and a
`: queued` comment each second (`: loading MODEL` while its model loads), so proxies see
a live connection. The HTTP client going
away cancels the handler (aiohttp's handler_cancellation), and leaving the handler sends
llmsup `cancel` for a request that has not ended (Call.close).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway import metrics as M
from llmsup.supervisor.gateway import openai_api as oai
from llmsup.supervisor.gateway.upstream import Call, Lanes, UpstreamError

log = logging.getLogger("llmsup.gateway")

NODE_HEADER = "X-Llmsup-Node"  # on every response: which fleet node answered
ROUTE_KEY_BYTES = 256  # a request without prompt_cache_key or user: its lane from these
STATUS_TIMEOUT_S = 2.0  # /health, /metrics and model lookups wait this long for llmsup
DRAIN_STATUS_TIMEOUT_S = 0.5  # on SIGTERM: whether llmsup is there and not stopping
# A request is checked against the served models of a status at most this old; a name not
# among them, against one at most MODELS_MISS_MAX_AGE_S old (so a stream of unknown names
# costs llmsup at most about one status a second).
MODELS_MAX_AGE_S = 5.0
MODELS_MISS_MAX_AGE_S = 1.0
MODEL = web.RequestKey("model", str) if hasattr(web, "RequestKey") else "llmsup.model"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EventStream(web.StreamResponse):
    """A server-sent event stream whose headers leave with its first event, in one write:
    prepared at the first token, it had sent them alone first, a write and a wake-up of the
    client more before the token (aiohttp's own Response buffers them so; this attribute is
    how it opts in, from aiohttp 3.12, and means nothing to older ones)."""

    _send_headers_immediately = False


class Gateway:
    """What the routes share: the llmsup connection, the metrics, the key, the models."""

    def __init__(
        self,
        upstream: Lanes,
        api_key: bytes | None,
        max_body_bytes: int,
        node: str | None = None,
        public_metrics: bool = False,
    ):
        self.upstream = upstream
        # Paths answered without the key: a balancer's check, and a scraper's when asked to.
        self.open_paths = {"/health", "/metrics"} if public_metrics else {"/health"}
        self.node = node or socket.gethostname()
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = M.Metrics()
        self.models: list[str] = []  # the models llmsup serves, from its status
        self.default: str | None = None  # the one a request that names none runs on
        self.created: dict[str, int] = {}  # model -> when this gateway first saw it served
        self.models_at = -math.inf  # time.monotonic() of the status they are from
        self._models_refresh: asyncio.Future | None = None  # the status asked for them
        self.stopping = False  # refusing generation requests: the gateway stops
        self.draining = False  # told to stop: /health says 503 while requests still run
        # /health as a balancer's checks see it: asked at all, since when 503 (None: 200),
        # and whether llmsup itself said it stops (its own drain already warned them).
        self.health_asked = False
        self.down_since: float | None = None
        self.llmsup_stopping = False

    async def status(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """llmsup's status (raises UpstreamError); remembers the models it serves."""
        status = await self.upstream.request(C.STATUS, {}, timeout)
        default = status.get("model")
        names = [m["name"] for m in status.get("models") or ()
                 if isinstance(m, dict) and isinstance(m.get("name"), str)]  # fmt: skip
        if not names and isinstance(default, str):
            names = [default]  # an llmsup from before several models
        now = int(time.time())
        for name in names:
            self.created.setdefault(name, now)
        self.models, self.default = names, default if isinstance(default, str) else None
        self.models_at = time.monotonic()
        self.llmsup_stopping = bool(status.get("stopping"))
        return status

    async def served(self, max_age: float) -> list[str]:
        """The served models, from a status at most `max_age` seconds old if llmsup answers
        (else the last known ones; none known: the error, as an ApiError)."""
        if time.monotonic() - self.models_at > max_age:
            # One status for all the requests that find the models stale together: a burst
            # of 40 asked llmsup for 40 statuses at once, and each of its 503s waited.
            if self._models_refresh is None or self._models_refresh.done():
                self._models_refresh = asyncio.ensure_future(self.status())
            try:
                await asyncio.shield(self._models_refresh)
            except UpstreamError as exc:
                if not self.models:
                    raise oai.from_llmsup(exc.body, None) from None
        return self.models

    async def model_for(self, requested: str | None) -> str:
        """The model a request runs on: the one it names, which llmsup must serve (else 404
        model_not_found, as OpenAI answers), or the default when it names none."""
        await self.served(MODELS_MAX_AGE_S)
        if requested is None:
            return self.default or ""
        if requested not in self.models:  # llmsup may have restarted with other models
            await self.served(MODELS_MISS_MAX_AGE_S)
            if requested not in self.models:
                raise oai.model_not_found(requested, self.models)
        return requested

    async def drain_wait(self, drain_s: float) -> float:
        """Seconds /health should still answer 503 before the gateway stops accepting, once
        it is told to stop: `drain_s` (two health-check intervals) less what /health has
        already answered 503 for. 0 when nothing ever asked /health (no balancer to warn:
        a lone gateway stops at once, as before), when llmsup does not answer (nothing
        would be served meanwhile) or when it is stopping itself (its drain answered 503
        first, and llmsup stops its gateway last, within a 2 s grace)."""
        if not self.health_asked:
            return 0.0
        try:
            await self.status(DRAIN_STATUS_TIMEOUT_S)
        except UpstreamError:
            return 0.0
        if self.llmsup_stopping:
            return 0.0
        now = time.monotonic()
        since = self.down_since if self.down_since is not None else now
        return max(0.0, since + drain_s - now)

    def authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key
        )


GATEWAY = web.AppKey("gateway", Gateway)


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(err: oai.ApiError) -> web.Response:
    return json_response(err.body(), err.status, err.headers)


# --- middleware -------------------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, OpenAI-style errors for everything, and the request counter."""
    gw = request.app[GATEWAY]
    response: web.StreamResponse | None = None
    try:
        response = await answer(request, handler, gw)
        return response
    finally:
        # 499 (nginx's "client closed request"): the handler was cancelled before an answer.
        code = response.status if response is not None else 499
        model = request.get(MODEL, "")  # a served model's name: bounded cardinality
        gw.metrics.requests.labels(M.endpoint_label(request.path), str(code), model).inc()


async def answer(request: web.Request, handler: Handler, gw: Gateway) -> web.StreamResponse:
    try:
        if request.path not in gw.open_paths and not gw.authorized(request):
            raise oai.ApiError(
                401,
                "missing or incorrect API key: send Authorization: Bearer KEY",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)
    except oai.ApiError as err:
        return error_response(err)
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            oai.ApiError(
                413,
                f"the request body is over {gw.max_body_bytes} bytes (--max-body-bytes)",
                code="request_too_large",
            )
        )
    except web.HTTPException as exc:  # 404 and 405 from the router
        code = exc.reason.lower().replace(" ", "_")
        return error_response(
            oai.ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code)
        )
    except ConnectionError:
        raise  # the client went away: aiohttp drops the connection quietly
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(
            oai.ApiError(500, "internal error in the gateway (see its log)", code=C.E_INTERNAL)
        )


# --- routes -----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.health_asked = True
    reason = None
    if gw.draining or gw.stopping:  # first, before llmsup is asked: no wait for it
        reason = "the gateway is stopping"
    else:
        try:
            status = await gw.status()
        except UpstreamError as exc:
            reason = exc.body.get("message") or "llmsup did not answer"
        else:
            if status["stopping"]:
                reason = "llmsup is stopping"
    if reason is None:
        gw.down_since = None
        return json_response({"status": "ok"})
    if gw.down_since is None:
        gw.down_since = time.monotonic()
    return json_response({"status": "unavailable", "reason": reason}, 503)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        status = await gw.status()
    except UpstreamError:
        status = None
    body = gw.metrics.render(status)
    return web.Response(body=body, headers={"Content-Type": M.CONTENT_TYPE})


def model_object(gw: Gateway, name: str) -> dict[str, Any]:
    created = gw.created.get(name, 0)
    return {"id": name, "object": "model", "created": created, "owned_by": "llmsup"}


async def models(request: web.Request) -> web.Response:
    """The models llmsup serves (its status' "models"), the default first."""
    gw = request.app[GATEWAY]
    names = await gw.served(max_age=0)
    return json_response({"object": "list", "data": [model_object(gw, n) for n in names]})


async def model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    name = request.match_info["model"]
    await gw.served(max_age=0)
    if name not in gw.models:
        raise oai.model_not_found(name, gw.models)
    return json_response(model_object(gw, name))


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, oai.completion_job)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, oai.chat_job)


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise oai.bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise oai.bad("the request body must be a JSON object", None, "invalid_json")
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
        raise oai.stopping_error()
    raw = await read_json(request, gw.max_body_bytes)
    job: oai.Job = translate(raw)
    model = await gw.model_for(job.model)
    request[MODEL] = model
    if job.model is not None:  # else llmsup's default, whatever it is by now
        job.body["model"] = model
    shaper = oai.Shaper(job, model)
    try:
        call = gw.upstream.open(job.verb, job.body, client_of(raw))
    except UpstreamError as exc:
        raise oai.from_llmsup(exc.body, job) from None
    endpoint = M.endpoint_label(request.path)
    try:
        if job.stream:
            return await stream(request, gw, call, job, shaper, started)
        return await whole(gw, call, job, shaper, started)
    finally:
        call.close()
        gw.metrics.latency.labels(endpoint, model).observe(time.monotonic() - started)


def failed(gw: Gateway, body: dict[str, Any], job: oai.Job, model: str) -> oai.ApiError:
    gw.metrics.rejections.labels(body.get("code", C.E_INTERNAL)).inc()
    if body.get("usage"):  # cancelled or past its deadline while generating
        gw.metrics.finished(body, model)
    return oai.from_llmsup(body, job, gw.stopping)


async def whole(
    gw: Gateway, call: Call, job: oai.Job, shaper: oai.Shaper, started: float
) -> web.Response:
    texts: list[str] = []
    while True:
        kind, body = await call.next()
        if kind == C.TOKEN:
            if not texts:
                gw.metrics.ttft.labels(request_path(job), shaper.model).observe(
                    time.monotonic() - started
                )
            texts.append(body["text"])
        elif kind == C.DONE:
            gw.metrics.finished(body, shaper.model)
            return json_response(shaper.whole("".join(texts), body))
        elif kind == C.ERROR:
            raise failed(gw, body, job, shaper.model)
        # ACCEPTED, QUEUED, RUNNING and kinds added later (SPEC.md 7): nothing to do.


def request_path(job: oai.Job) -> str:
    return "/v1/chat/completions" if job.chat else "/v1/completions"


async def stream(
    request: web.Request, gw: Gateway, call: Call, job: oai.Job, shaper: oai.Shaper, started: float
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
                out.append(shaper.token(body["text"]))
            elif kind == C.QUEUED:
                out.append(oai.queued_comment(body))
            elif kind == C.RUNNING:
                out.append(oai.RUNNING_COMMENT)
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


async def node_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors and streams included, names the node that answered."""
    response.headers[NODE_HEADER] = request.app[GATEWAY].node


def make_app(gw: Gateway) -> web.Application:
    # client_max_size: a chunked body (no Content-Length) is cut there too (413).
    app = web.Application(middlewares=[middleware], client_max_size=gw.max_body_bytes)
    app[GATEWAY] = gw
    app.on_response_prepare.append(node_header)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
