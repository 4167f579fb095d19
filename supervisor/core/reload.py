"""Reload (SIGHUP, `llmsup reload`): read the settings again, as `start` read them (the same
flags and environment, the config file anew), and change what can change while serving.

A live setting (settings.py: live=True) changes at once and touches nothing in flight: the
queue's limits apply to the next admission (a queue already longer than a lowered limit
drains as it would, nothing queued is refused), the watchdog's thresholds to the next
sample, keep-alive to the next placement, the drain time to the next stop, the log level
to the next record, and the HTTP gateway's key and log level to its next request (it
re-reads them on SIGHUP from the state dir's gateway-live.json). Any other setting that
changed is logged by name as needing a restart. A file or variable that does not parse
changes nothing and is logged. `status` shows the last reload (its `reload` member)."""

from __future__ import annotations

import dataclasses
import logging
import time

from llmsup.supervisor.configfile import BY_DEST, ConfigError
from llmsup.supervisor.host import logs

log = logging.getLogger("llmsup.supervisor")

# Live settings and the watchdog field each sets (Limits, core/watchdog.py).
LIMITS = {
    "mem_soft_mb": "mem_soft_mb",
    "mem_hard_mb": "mem_hard_mb",
    "stall_timeout": "stall_timeout_s",
    "spin_cpu": "spin_cpu_percent",
    "spin_seconds": "spin_seconds",
    "max_requests": "max_requests",
}
GATEWAY = ("api_key", "api_key_file", "log_level")  # what the gateway re-reads
GATEWAY_LIVE_FILE = "gateway-live.json"  # in the state dir: the gateway's --live-file


class Reload:
    """A mixin of Supervisor (server.py): `reload_settings` is SIGHUP's handler."""

    def reload_settings(self) -> None:
        self.notify.reloading()
        self.reloads += 1
        record = {"count": self.reloads, "at": time.time(), "ok": False}
        record.update(changed=[], restart_needed=[], error=None)
        try:
            record.update(self.apply_reload())
            record["ok"] = True
        except ConfigError as exc:
            record["error"] = "; ".join(exc.problems)
            log.error("reload: nothing changed: %s", record["error"])
        self.last_reload = record
        self.notify.ready(self.status_line())

    def apply_reload(self) -> dict:
        if self.config.origin is None:
            raise ConfigError(["this supervisor was not started by `llmsup start`"])
        _, found = self.config.origin.read()
        new = {dest: sourced.value for dest, sourced in found.items()}
        changed = sorted(d for d in new if new[d] != self.config.settings.get(d))
        live = [d for d in changed if BY_DEST[d].live]
        problem = self.gateway_problem(new) if any(d in GATEWAY for d in live) else None
        if problem:
            raise ConfigError([problem])
        for dest in live:
            self.config.settings[dest] = new[dest]
        self.apply_live(set(live))
        restart = [BY_DEST[d].name for d in changed if not BY_DEST[d].live]
        names = [BY_DEST[d].name for d in live]
        if names:
            log.info("reload: changed %s", ", ".join(f"{n}" for n in names))
        if restart:
            log.warning("reload: needs a restart to change: %s", ", ".join(restart))
        if not names and not restart:
            log.info("reload: nothing changed")
        return {"changed": names, "restart_needed": restart}

    def apply_live(self, live: set[str]) -> None:
        s = self.config.settings
        if live & {"queue_size", "queue_tokens", "client_queue"}:
            self.config.queue_size = s["queue_size"]
            self.queue.limit = s["queue_size"]
            self.queue.token_limit = s["queue_tokens"]
            self.queue.per_client = s["client_queue"] or max(1, s["queue_size"] // 2)
        if "keep_alive" in live:
            self.placement.keep_alive_s = s["keep_alive"]
        if "drain_timeout" in live:
            self.config.drain_timeout = s["drain_timeout"]
        if live & {*LIMITS, "crash_loop"}:
            limits = dataclasses.replace(
                self.config.limits,
                **{field: s[dest] for dest, field in LIMITS.items()},
                crash_loop_failures=s["crash_loop"][0],
                crash_loop_window_s=s["crash_loop"][1],
            )
            self.config.limits = self.pool.limits = self.pool.watch.limits = limits
            if self.gateway is not None:
                self.gateway.limits = limits
        if "log_level" in live:  # workers spawned from now on get it too
            logs.set_level(s["log_level"])
            self.config.log_level = s["log_level"]
        if self.gateway is not None and live & set(GATEWAY):
            self.write_gateway_live()
            self.gateway.reload()

    def write_gateway_live(self) -> None:
        """What the gateway re-reads on SIGHUP: the key's file (an api-key value goes into
        the state dir's 0600 api-key file, as start puts it) and the log level."""
        s = self.config.settings
        key_file = s.get("api_key_file")
        if s.get("api_key"):
            key_file = self.state.path / "api-key"
            self.state.write_file(key_file, s["api_key"].encode())
        live = {"api_key_file": str(key_file) if key_file else None}
        self.state.write_json(
            self.state.path / GATEWAY_LIVE_FILE, {**live, "log_level": s.get("log_level", "info")}
        )

    def gateway_problem(self, new: dict) -> str | None:
        """Why the gateway's new key cannot be taken (then nothing changes), or None."""
        if self.gateway is None:
            return None
        if (new["api_key"] or new["api_key_file"]) is None and self.gateway.remote:
            return "api-key: the HTTP gateway listens beyond loopback and must keep a key"
        return None
