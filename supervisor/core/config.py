"""What `llmsup start` hands the supervisor: the models, the layout, the limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmsup.supervisor.core.watchdog import Limits


@dataclass
class Config:
    models: dict[str, str]  # name -> GGUF path; the first is the default
    groups: list[list[int]]
    ctx_size: int
    endpoint: str
    queue_size: int
    startup_timeout: float
    drain_timeout: float
    slots_per_worker: int = 1
    prefill_chunk: int = 256
    limits: Limits = field(default_factory=Limits)
    queue_tokens: int = 65536  # estimated prompt tokens waiting, summed over the queue
    client_queue: int | None = None  # waiting requests one client may hold [queue_size/2]
    cache_mb: int = 0  # the shared prefix cache's size (0: no cache)
    gateway_args: list[str] = field(default_factory=list)  # the HTTP gateway's ([]: none)
    keep_alive_s: float = 300.0  # a model other than the default, unused this long, goes
    max_loaded: int = 2  # models loaded at once at most
    tcp_auth: str = "curve"  # tcp peers: CURVE with the state dir's keys, or "none"

    @property
    def default_model(self) -> str:
        return next(iter(self.models))
