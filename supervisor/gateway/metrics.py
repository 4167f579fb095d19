"""The gateway's /metrics, in Prometheus' text format (prometheus_client).

Counters and histograms of what went through this gateway, plus gauges read from llmsup's
`status` at scrape time (a Prometheus scrape is the only reader, so nothing polls llmsup
in between). Three of them carry the names and meaning Kubernetes' Gateway API inference
extension reads from a model server to pick one: `llmsup_num_requests_waiting` (queue
depth), `llmsup_num_requests_running` and `llmsup_kv_cache_usage_perc` (sequences running
over the slots of the ready workers, 0 to 1; 1 when no worker is ready: no room), and the
same three again under vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`), which an endpoint picker configured for vLLM reads unchanged.

Requests, tokens and times carry a `model` label: the name of a model llmsup serves (a
name a request asked for that llmsup does not serve is never a label value, so the
series stay few), empty for the routes that are not generation.
"""

from __future__ import annotations

import re
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

prometheus_client.disable_created_metrics()  # no *_created series: nobody here reads them

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# Ollama's routes (ollama_api.py).
ENDPOINTS += (
    "/api/generate",
    "/api/chat",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
    "/api/embed",
    "/api/embeddings",
)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# Ignored request fields get a label each, up to this many names that look like field
# names: a client cannot grow the series without bound.
IGNORED_NAMES = 64
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def endpoint_label(path: str) -> str:
    """The label of a request path: one of ENDPOINTS, else "other" (bounded cardinality)."""
    if path.startswith("/v1/models"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmsup_gateway_requests",
            "HTTP requests answered, by endpoint, status code (499: the client went away first) "
            "and model (a served model's name; empty for other routes and refused models)",
            ["endpoint", "code", "model"],
            registry=r,
        )
        self.rejections = Counter(
            "llmsup_gateway_rejections",
            "llmsup error replies to generation requests, by llmsup error code",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmsup_gateway_prompt_tokens",
            "prompt tokens of finished requests, by model",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "llmsup_gateway_completion_tokens",
            "tokens generated for finished requests, by model",
            ["model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "llmsup_gateway_cached_prompt_tokens",
            "prompt tokens continued from llmsup's prefix cache, by model",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmsup_gateway_time_to_first_token_seconds",
            "from the HTTP request's arrival to its first generated token",
            ["endpoint", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmsup_gateway_request_duration_seconds",
            "from the HTTP request's arrival to its last byte, generation requests",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ignored_params = Counter(
            "llmsup_gateway_ignored_params",
            "request fields the gateway does not know and ignored, by name (the first "
            f'{IGNORED_NAMES} names seen; later ones count as "other")',
            ["param"],
            registry=r,
        )
        self.ignored_names: set[str] = set()
        self.status: dict[str, Any] | None = None  # llmsup's, fetched for this scrape
        r.register(_StatusCollector(self))

    def ignored(self, name: str) -> bool:
        """Count an ignored field; True the first time this name is seen (to log it)."""
        new = name not in self.ignored_names
        if new and len(self.ignored_names) < IGNORED_NAMES and PARAM_NAME.fullmatch(name):
            self.ignored_names.add(name)
        label = name if name in self.ignored_names else "other"
        self.ignored_params.labels(label).inc()
        return new and label != "other"

    def finished(self, done: dict[str, Any], model: str) -> None:
        usage = done.get("usage") or {}
        self.prompt_tokens.labels(model).inc(usage.get("prompt_tokens", 0))
        self.completion_tokens.labels(model).inc(usage.get("completion_tokens", 0))
        self.cached_tokens.labels(model).inc(usage.get("cached_tokens", 0))

    def render(self, status: dict[str, Any] | None) -> bytes:
        """The exposition, with llmsup's gauges from `status` (None: llmsup did not answer)."""
        self.status = status
        try:
            return prometheus_client.generate_latest(self.registry)
        finally:
            self.status = None


class _StatusCollector:
    """Gauges (and llmsup's own counters) from the status reply of the current scrape."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # unchecked: its series exist only while llmsup answers

    def collect(self) -> Iterator[Metric]:
        status = self.metrics.status
        yield GaugeMetricFamily(
            "llmsup_up", "1 if llmsup answered status for this scrape", value=1 if status else 0
        )
        if not status:
            return
        workers = status["workers"]
        ready = [w for w in workers if w["state"] == "ready"]
        slots = sum(w["slots"] for w in ready)
        running = sum(len(w["running"]) for w in workers)
        depth = status["queue"]["depth"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("llmsup_stopping", "1 while llmsup stops (drains)", int(status["stopping"]))
        yield gauge("llmsup_queue_depth", "requests waiting for a slot", depth)
        yield gauge("llmsup_queue_limit", "--queue-size", status["queue"]["limit"])
        yield gauge(
            "llmsup_requests_in_flight",
            "admitted requests not yet ended (queued or running), every client's",
            status["requests"]["in_flight"],
        )
        yield gauge("llmsup_slots", "sequences the ready workers decode at once", slots)
        yield gauge(
            "llmsup_num_requests_waiting", "requests waiting for a slot (the queue depth)", depth
        )
        yield gauge("llmsup_num_requests_running", "requests being generated", running)
        usage = running / slots if slots else 1.0
        yield gauge(
            "llmsup_kv_cache_usage_perc",
            "running sequences over the ready workers' slots, 0 to 1 (1 with no ready worker)",
            usage,
        )
        # vLLM's names for the same values (':' is valid in a Prometheus metric name).
        yield gauge("vllm:num_requests_waiting", "= llmsup_num_requests_waiting", depth)
        yield gauge("vllm:num_requests_running", "= llmsup_num_requests_running", running)
        yield gauge("vllm:kv_cache_usage_perc", "= llmsup_kv_cache_usage_perc", usage)
        by_state = GaugeMetricFamily("llmsup_workers", "worker slots by state", labels=["state"])
        for state, count in sorted(Tally(w["state"] for w in workers).items()):
            by_state.add_metric([state], count)
        yield by_state
        by_model = GaugeMetricFamily(
            "llmsup_model_core_groups",
            "core groups given to each served model (its workers serve or load it there)",
            labels=["model"],
        )
        for model in status.get("models") or ():
            by_model.add_metric([model["name"]], len(model["groups"]))
        yield by_model
        yield CounterMetricFamily(
            "llmsup_worker_restarts",
            "worker restarts since llmsup started",
            value=sum(w["restarts"] for w in workers),
        )
        requests = status["requests"]
        yield CounterMetricFamily(
            "llmsup_requests_accepted",
            "requests llmsup admitted, every client's",
            value=requests["accepted"],
        )
        yield CounterMetricFamily(
            "llmsup_requests_rejected",
            "requests llmsup refused before admission, every client's",
            value=requests["rejected"],
        )
        cache = status.get("cache")
        if cache:
            yield CounterMetricFamily(
                "llmsup_prefix_cache_hits",
                "prompts continued from a cached prefix",
                value=cache["hits"],
            )
            yield CounterMetricFamily(
                "llmsup_prefix_cache_misses", "prompts read from the start", value=cache["misses"]
            )
            yield gauge(
                "llmsup_prefix_cache_bytes", "bytes of cached prefixes", cache["bytes_used"]
            )
            yield gauge(
                "llmsup_prefix_cache_bytes_limit", "--cache-mb in bytes", cache["bytes_limit"]
            )
