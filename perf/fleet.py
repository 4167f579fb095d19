#!/usr/bin/env python3
"""Fleet rows (issue 18): two one-core llmsup nodes, each in a network namespace of its own,
behind HAProxy as `llmsup fleet haproxy-config` writes it (tools/fleetlab.py), against one
one-core node reached directly, in one run.

    python perf/fleet.py                 # about 2 minutes; needs root, iproute2 and haproxy
    python perf/fleet.py --requests 48   # more requests per throughput round

Rows:
- throughput: aggregate completion tokens/s, 2 nodes behind the balancer with 16 clients
  against node a alone, directly, with 8 (each node has 8 slots). Target >= 1.8x.
- latency: p50 of a one-token completion through the balancer minus direct to a node,
  alternating. Target <= 15 ms.
- chat: conversations through the balancer (a shared system prompt, 4 turns each): the
  share of turn 2+ prompt tokens read from the prefix cache, and how many later turns
  stayed on turn 1's node.

Writes perf/results/fleet.json. Machines here are noisy and shared: read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
import fleetlab  # noqa: E402

KEY = "fleet-bench-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "gemma3-270m"
NODE_ARGS = ("--model", MODEL, "--cache-mb", "64", "--slots-per-worker", "8")
PROMPT = "Write a long story about a lighthouse keeper and the sea."
SYSTEM = (
    "You are a careful assistant for a small museum of river boats. Answer visitors' "
    "questions about the boats, their engines, the people who built them and the rivers they "
    "worked on. Keep answers short, friendly and exact; say so when you do not know. "
) * 4


def complete(http: httpx.Client, url: str, key: str, max_tokens: int) -> dict:
    r = http.post(
        f"{url}/v1/completions",
        headers=AUTH,
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "prompt_cache_key": key,
        },
    )
    r.raise_for_status()
    return {**r.json(), "node": r.headers.get("x-llmsup-node")}


def throughput(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, dict]:
    """Completion tokens/s of `requests` requests, `clients` at a time; requests per node."""
    limits = httpx.Limits(max_connections=clients)
    with httpx.Client(timeout=300, limits=limits) as http:
        complete(http, url, "warm", 4)
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            done = list(
                pool.map(lambda i: complete(http, url, f"t{i}", max_tokens), range(requests))
            )
        elapsed = time.monotonic() - started
    nodes = {n: sum(d["node"] == n for d in done) for n in sorted({d["node"] for d in done})}
    return sum(d["usage"]["completion_tokens"] for d in done) / elapsed, nodes


def added_latency(direct: str, balanced: str, rounds: int) -> tuple[float, float]:
    """p50 of a one-token completion: (direct, through the balancer), in ms."""
    times: dict[str, list[float]] = {direct: [], balanced: []}
    with httpx.Client(timeout=60) as http:
        for url in times:
            complete(http, url, "lat", 1)  # connections open, prompt cached
        for _ in range(rounds):
            for url in times:
                started = time.perf_counter()
                complete(http, url, "lat", 1)
                times[url].append((time.perf_counter() - started) * 1000)
    return statistics.median(times[direct]), statistics.median(times[balanced])


def chats(url: str, conversations: int, turns: int) -> tuple[float, int, int]:
    """(cached share of turn 2+ prompt tokens, later turns on turn 1's node, later turns)."""

    def converse(c: int) -> list[tuple[str, dict]]:
        messages = [{"role": "system", "content": SYSTEM}]
        out = []
        with httpx.Client(timeout=120) as http:
            for t in range(turns):
                messages.append({"role": "user", "content": f"Question {t} of visitor {c}?"})
                r = http.post(
                    f"{url}/v1/chat/completions",
                    headers=AUTH,
                    json={
                        "model": MODEL,
                        "messages": messages,
                        "max_tokens": 16,
                        "temperature": 0,
                        "prompt_cache_key": f"visitor-{c}",
                    },
                )
                r.raise_for_status()
                body = r.json()
                out.append((r.headers["x-llmsup-node"], body["usage"]))
                messages.append(body["choices"][0]["message"])
        return out

    with ThreadPoolExecutor(conversations) as pool:
        talks = list(pool.map(converse, range(conversations)))
    later = [(talk[0][0], node, usage) for talk in talks for node, usage in talk[1:]]
    prompt = sum(u["prompt_tokens"] for _, _, u in later)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for _, _, u in later)
    stayed = sum(first == node for first, node, _ in later)
    return cached / prompt, stayed, len(later)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32, help="per throughput round per node")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=40, help="latency samples per path")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument(
        "--node-queue",
        type=int,
        default=0,
        help="each node's --queue-size (a fleet's nodes answer busy, HAProxy "
        "retries elsewhere: docs/fleet.md)",
    )
    args = ap.parse_args()
    why = fleetlab.unavailable()
    if why:
        print(f"perf/fleet.py: cannot make the lab here: {why}", file=sys.stderr)
        return 2
    lab = fleetlab.Lab(2, KEY, (*NODE_ARGS, "--queue-size", str(args.node_queue))).open()
    try:
        a, balanced = lab.hosts[0].url, lab.balancer.url
        one, _ = throughput(a, 8, args.requests, args.max_tokens)
        two, split = throughput(balanced, 16, 2 * args.requests, args.max_tokens)
        print(f"requests per node through HAProxy: {split}", file=sys.stderr)
        direct_ms, balanced_ms = added_latency(a, balanced, args.rounds)
        cached, stayed, later = chats(balanced, args.conversations, 4)
    finally:
        lab.close()
    rows = [
        (
            "throughput: 2 nodes via HAProxy / 1 node direct (tokens/s)",
            f"{two:.1f} / {one:.1f}",
            two / one,
            ">= 1.8",
        ),
        (
            "latency p50 added by HAProxy (ms)",
            f"{balanced_ms:.1f} - {direct_ms:.1f}",
            balanced_ms - direct_ms,
            "<= 15",
        ),
        (
            "chat via HAProxy: cached share of turn 2+ prompt tokens",
            f"later turns on turn 1's node: {stayed}/{later}",
            cached,
            ">= 0.8",
        ),
    ]
    print(f"{'row':<58} {'figures':<36} {'value':>7}  target")
    for name, figures, value, target in rows:
        print(f"{name:<58} {figures:<36} {value:>7.2f}  {target}")
    out = HERE / "results" / "fleet.json"
    out.write_bytes(
        orjson.dumps(
            {
                "command": "python perf/fleet.py " + " ".join(sys.argv[1:]),
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rows": [
                    dict(zip(("row", "figures", "value", "target"), r, strict=True)) for r in rows
                ],
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
