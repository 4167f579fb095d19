"""`llmsup top`: a live view of the workers, read from the scoreboard alone.

Reading shared memory needs no round trip to the supervisor, so top works the same when
the supervisor is busy or stuck. Each worker's row shows the model it serves (MODEL; the
scoreboard row's "model", also in `--json`).
"""

from __future__ import annotations

import time

from llmsup.protocol.arena import Arena
from llmsup.protocol.scoreboard import Scoreboard

BUSY_STATES = ("prefill", "decode")


def snapshot(board: Scoreboard, arena: Arena | None = None) -> dict:
    """The scoreboard as JSON-ready data, with per-request age and tokens/s worked out, and
    the prefix cache's figures (None when it is off)."""
    data = board.read()
    data["cache"] = arena.stats() if arena is not None else None
    now = time.monotonic()
    for w in data["workers"]:
        busy = w["activity"] in BUSY_STATES and w["request_started"] > 0
        age = now - w["request_started"] if busy else None
        w["request_age_s"] = round(age, 3) if age is not None else None
        w["tokens_per_s"] = round(w["tokens"] / age, 2) if age and w["tokens"] else None
        w["anon_mb"] = round(w["anon_bytes"] / (1 << 20), 1)
        w["stalled_s"] = round(now - w["progress_at"], 3) if busy and w["progress_at"] else None
    return data


def render(data: dict) -> str:
    # MODEL is as wide as the longest name (up to 64 bytes): a name is never cut.
    width = max([5, *(len(w.get("model") or "-") for w in data["workers"])])
    lines = [
        f"llmsup pid {data['supervisor_pid']}   queue {data['queue_depth']}/{data['queue_limit']}"
        f"   accepted {data['accepted_per_s']:.1f}/s   rejected {data['rejected_per_s']:.1f}/s"
        f"   latency p50 {data['latency_p50_ms']:.0f} ms  p99 {data['latency_p99_ms']:.0f} ms",
        cache_line(data["cache"]),
        *gateway_line(data["gateway"]),
        "",
        f"{'ID':>3} {'PID':>8} {'CORES':<6} {'MODEL':<{width}} {'ACTIVITY':<9} {'REQUEST':<16}"
        f" {'AGE':>6} {'TOK/S':>6} {'ANON MB':>8} {'CPU%':>5} {'SERVED':>6} {'RESTARTS':>8}"
        "  LAST EXIT",
    ]
    for i, w in enumerate(data["workers"]):
        age = f"{w['request_age_s']:.1f}" if w["request_age_s"] is not None else "-"
        tps = f"{w['tokens_per_s']:.1f}" if w["tokens_per_s"] is not None else "-"
        request = w["request_id"][:16] or "-"
        model = w.get("model") or "-"
        lines.append(
            f"{i:>3} {w['pid']:>8} {w['cores']:<6} {model:<{width}} {w['activity']:<9}"
            f" {request:<16} {age:>6} {tps:>6} {w['anon_mb']:>8.1f} {w['cpu_percent']:>5.0f}"
            f" {w['served']:>6} {w['restarts']:>8}  {w['last_exit'] or '-'}"
        )
    return "\n".join(lines)


def cache_line(cache: dict | None) -> str:
    """The prefix cache in one line (top's header, status)."""
    if cache is None:
        return "prefix cache off"
    mb = 1 << 20
    return (
        f"prefix cache {cache['bytes_used'] / mb:.0f}/{cache['bytes_limit'] / mb:.0f} MB"
        f"  {cache['entries']} entries   hits {cache['hits']} (in place {cache['hits_slot']},"
        f" restored {cache['hits_shared']})  misses {cache['misses']}"
        f"  tokens reused {cache['tokens_reused']}  evictions {cache['evictions']}"
    )


def gateway_line(gateway: dict) -> list[str]:
    """The HTTP gateway in one line, or none when llmsup runs without --http."""
    if gateway["state"] == "none":
        return []
    return [
        f"http gateway {gateway['state']}   pid {gateway['pid'] or '-'}"
        f"   restarts {gateway['restarts']}"
    ]
