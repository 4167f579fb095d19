"""The gateway's HTTP application (aiohttp): OpenAI's /v1/models, /v1/completions and
/v1/chat/completions (generate.py), llama-server's /tokenize and /detokenize (tokens.py),
plus /health and /metrics, behind one middleware that
checks the API key, answers every error OpenAI's way and counts the requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway import cors, ollama_api
from llmsup.supervisor.gateway.embeddings import embeddings
from llmsup.supervisor.gateway.errors import ApiError, model_not_found
from llmsup.supervisor.gateway.generate import chat_completions, completions
from llmsup.supervisor.gateway.metrics import CONTENT_TYPE, PARAM_NAME, endpoint_label
from llmsup.supervisor.gateway.responses import error_response, json_response
from llmsup.supervisor.gateway.state import GATEWAY, IGNORED, IGNORED_HEADER, MODEL, Gateway
from llmsup.supervisor.gateway.tokens import detokenize, tokenize
from llmsup.supervisor.gateway.upstream import UpstreamError

log = logging.getLogger("llmsup.gateway")

NODE_HEADER = "X-Llmsup-Node"  # on every response: which fleet node answered
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- middleware -------------------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, OpenAI-style errors for everything, and the request counter."""
    gw = request.app[GATEWAY]
    response: web.StreamResponse | None = None
    try:
        if gw.cors_origins and cors.is_preflight(request):  # before the key: none is sent
            response = cors.preflight(request, gw.cors_origins)
            return response
        response = await answer(request, handler, gw)
        return response
    finally:
        # 499 (nginx's "client closed request"): the handler was cancelled before an answer.
        code = response.status if response is not None else 499
        model = request.get(MODEL, "")  # a served model's name: bounded cardinality
        gw.metrics.requests.labels(endpoint_label(request.path), str(code), model).inc()


async def answer(request: web.Request, handler: Handler, gw: Gateway) -> web.StreamResponse:
    """The handler's response; an error as OpenAI shapes it, or Ollama on its routes."""
    try:
        return await checked(request, handler, gw)
    except ApiError as err:
        if request.path.startswith("/api/"):
            return ollama_api.json_response(ollama_api.error_body(err), err.status, err.headers)
        return error_response(err)


async def checked(request: web.Request, handler: Handler, gw: Gateway) -> web.StreamResponse:
    try:
        if request.path not in gw.open_paths and not gw.authorized(request):
            raise ApiError(
                401,
                "missing or incorrect API key: send Authorization: Bearer KEY",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            f"the request body is over {gw.max_body_bytes} bytes (--max-body-bytes)",
            code="request_too_large",
        ) from None
    except web.HTTPException as exc:  # 404 and 405 from the router
        code = exc.reason.lower().replace(" ", "_")
        raise ApiError(
            exc.status, f"{exc.reason}: {request.method} {request.path}", code=code
        ) from None
    except ConnectionError:
        raise  # the client went away: aiohttp drops the connection quietly
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        raise ApiError(
            500, "internal error in the gateway (see its log)", code=C.E_INTERNAL
        ) from None


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
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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
        raise model_not_found(name, gw.models)
    return json_response(model_object(gw, name))


async def node_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors and streams included, names the node that answered, and the
    request fields it ignored."""
    gw = request.app[GATEWAY]
    response.headers[NODE_HEADER] = gw.node
    if gw.cors_origins:
        cors.add_headers(gw.cors_origins, request, response)
    ignored = request.get(IGNORED)
    if ignored:
        # Only names a header can carry (no control characters): the others as "?".
        shown = (n if PARAM_NAME.fullmatch(n) else "?" for n in ignored[:32])
        response.headers[IGNORED_HEADER] = ", ".join(shown)


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
    app.router.add_post("/v1/embeddings", embeddings)
    for prefix in ("", "/v1"):  # llama-server's names, and under OpenAI's prefix
        app.router.add_post(f"{prefix}/tokenize", tokenize)
        app.router.add_post(f"{prefix}/detokenize", detokenize)
    ollama_api.add_routes(app)
    return app
