"""What the gateway's routes share: the Gateway (the llmsup connection, the metrics, the API
key, the models llmsup serves, whether it stops) and the keys that find it and a request's
model on aiohttp's app and request objects.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import socket
import time
from typing import Any

from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import from_llmsup, model_not_found
from llmsup.supervisor.gateway.metrics import Metrics
from llmsup.supervisor.gateway.modelfacts import FactsCache
from llmsup.supervisor.gateway.upstream import Lanes, UpstreamError

log = logging.getLogger("llmsup.gateway")

STATUS_TIMEOUT_S = 2.0  # /health, /metrics and model lookups wait this long for llmsup
DRAIN_STATUS_TIMEOUT_S = 0.5  # on SIGTERM: whether llmsup is there and not stopping
# A request is checked against the served models of a status at most this old; a name not
# among them, against one at most MODELS_MISS_MAX_AGE_S old (so a stream of unknown names
# costs llmsup at most about one status a second).
MODELS_MAX_AGE_S = 5.0
MODELS_MISS_MAX_AGE_S = 1.0
# The model a request runs on, for the request counter's label (the middleware counts it).
MODEL = web.RequestKey("model", str) if hasattr(web, "RequestKey") else "llmsup.model"
# The request fields the gateway ignored, for the response's IGNORED_HEADER.
IGNORED = web.RequestKey("ignored", list) if hasattr(web, "RequestKey") else "llmsup.ignored"
IGNORED_HEADER = "X-Llmsup-Ignored-Params"


class Gateway:
    """What the routes share: the llmsup connection, the metrics, the key, the models."""

    def ignored_params(self, names: list[str]) -> None:
        """Fields a request sent that llmsup does not know: counted, and logged once each."""
        for name in names:
            if self.metrics.ignored(name):
                log.warning("ignoring the request field %r, which llmsup does not know", name)

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
        self.cors_origins: frozenset[str] = frozenset()  # --cors-origin (cors.py)
        self.node = node or socket.gethostname()
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.models: list[str] = []  # the models llmsup serves, from its status
        self.default: str | None = None  # the one a request that names none runs on
        self.created: dict[str, int] = {}  # model -> when this gateway first saw it served
        self.paths: dict[str, str] = {}  # model -> its GGUF file, from the status
        self.facts = FactsCache()  # what /api/show and friends say of each file
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
        names = [
            m["name"]
            for m in status.get("models") or ()
            if isinstance(m, dict) and isinstance(m.get("name"), str)
        ]
        if not names and isinstance(default, str):
            names = [default]  # an llmsup from before several models
        now = int(time.time())
        for name in names:
            self.created.setdefault(name, now)
        self.paths = {
            m["name"]: m["path"]
            for m in status.get("models") or ()
            if isinstance(m, dict) and isinstance(m.get("path"), str) and m.get("name") in names
        }
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
                    raise from_llmsup(exc.body, None) from None
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
                raise model_not_found(requested, self.models)
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
