"""Cross-origin requests (CORS) for the origins `--cors-origin` allows, on every route.

None allowed (the default): no CORS header is ever sent and a preflight (OPTIONS) is
answered like any unknown method, so browsers keep pages of other origins out. An allowed
origin (or any, with `*`) gets Access-Control-Allow-Origin on every response, errors and
streams included, and its preflights are answered 204 before the API key is asked for
(browsers send no Authorization header on a preflight); a preflight from another origin
gets 403 without CORS headers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

ANY = "*"
ALLOW_METHODS = "GET, POST, OPTIONS"
# What a page may read besides the CORS-safelisted headers.
EXPOSE_HEADERS = "Retry-After, X-Llmsup-Node, X-Llmsup-Ignored-Params, retry-after-ms"
ALLOW_HEADERS = "Authorization, Content-Type"  # when the preflight names none
MAX_AGE_S = 600  # browsers cache a preflight's answer this long
REQUEST_HEADERS = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed(origins: frozenset[str], origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for a request from `origin`, or None."""
    if not origins or not origin:
        return None
    if ANY in origins:
        return ANY
    return origin if origin in origins else None


def is_preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def preflight(request: web.Request, origins: frozenset[str]) -> web.Response:
    """The answer to a preflight: 204 with the CORS headers for an allowed origin, else
    403 with none."""
    allow = allowed(origins, request.headers.get("Origin"))
    if allow is None:
        return web.Response(status=403, text="origin not allowed (--cors-origin)\n")
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    headers = {
        "Access-Control-Allow-Origin": allow,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": asked
        if REQUEST_HEADERS.fullmatch(asked)
        else ALLOW_HEADERS,
        "Access-Control-Max-Age": str(MAX_AGE_S),
    }
    if allow != ANY:
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


def add_headers(origins: frozenset[str], request: web.Request, response: web.StreamResponse):
    """An allowed origin's CORS headers on a response (aiohttp's on_response_prepare)."""
    allow = allowed(origins, request.headers.get("Origin"))
    if allow is None or "Access-Control-Allow-Origin" in response.headers:
        return
    response.headers["Access-Control-Allow-Origin"] = allow
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if allow != ANY:
        response.headers["Vary"] = "Origin"
