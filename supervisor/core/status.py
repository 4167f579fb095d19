"""The supervisor's `status` reply: its phase, queue, requests, connections, workers,
prefix cache, gateway and rolling replacement, as SPEC.md 3.7 lists them. A mixin of
Supervisor (server.py)."""

from __future__ import annotations

import os
import time


class StatusReport:
    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "instance": self.instance,
            "endpoint": self.config.endpoint,
            "model": self.config.default_model,
            "models": [
                {**m, "path": self.config.models[m["name"]]}
                for m in self.placement.status(time.monotonic())
            ],
            "phase": self.phase.value,
            "stopping": self.stopping,
            "queue": {
                "depth": len(self.queue),
                "limit": self.config.queue_size,
                "per_client_limit": self.queue.per_client,
                "prompt_tokens": self.queue.tokens,
                "prompt_token_limit": self.queue.token_limit,
            },
            "requests": {
                "accepted": self.stats.accepted,
                "rejected": self.stats.rejected,
                "in_flight": len(self.ledger),
                "worker_messages_dropped": self.pool.dropped,
            },
            "connections": self.conns.status(),
            "workers": [w.status(self.ledger.jobs_on(w)) for w in self.workers],
            "cache": self.arena.stats() if self.arena is not None else None,
            "gateway": self.gateway.status() if self.gateway is not None else None,
            "replacing": self.pool.replacement_status(),
            "reload": self.last_reload,
            "log": self.log_sink.status() if self.log_sink is not None else None,
        }
