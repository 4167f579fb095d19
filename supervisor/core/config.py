"""What `llmsup start` hands the supervisor: the models, the layout, the limits. Every
field comes from a setting (supervisor/settings.py: its default, limits and help)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmsup.supervisor.configfile import Origin
from llmsup.supervisor.core.watchdog import Limits


@dataclass
class Config:
    models: dict[str, str]  # name -> GGUF path; the first is the default
    groups: list[list[int]]  # the cores of each worker (--workers, --cores-per-worker)
    ctx_size: int
    endpoint: str
    queue_size: int
    queue_tokens: int  # estimated prompt tokens waiting, summed over the queue
    client_queue: int | None  # waiting requests one client may hold [queue_size/2]
    startup_timeout: float
    drain_timeout: float
    slots_per_worker: int
    prefill_chunk: int
    cache_mb: int  # the shared prefix cache's size (0: no cache)
    keep_alive_s: float  # a model other than the default, unused this long, goes
    max_loaded: int  # models loaded at once at most
    tcp_auth: str  # tcp peers: CURVE with the state dir's keys, or "none"
    limits: Limits = field(default_factory=Limits)
    gateway_args: list[str] = field(default_factory=list)  # the HTTP gateway's ([]: none)
    origin: Origin | None = None  # how start read the settings: a reload reads them again
    settings: dict = field(default_factory=dict)  # their values now, by dest (configfile.py)
    log_format: str = "text"  # text or json, for the supervisor and its workers
    log_level: str = "info"  # the least severe records written (a reload may change it)

    @property
    def default_model(self) -> str:
        return next(iter(self.models))
