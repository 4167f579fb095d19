#!/usr/bin/env python3
"""Ollama's /api/chat against llmsup's own OpenAI route /v1/chat/completions: the same
gateway, the same model, the same greedy prompt, in one run.

    python perf/ollama_api.py                  # 3 rounds, 1 and 4 clients
    python perf/ollama_api.py --rounds 1       # a quick look (under a minute)

llmsup runs 1 worker x 2 cores x 4 slots (SmolLM2-135M-Instruct, 2048 tokens a slot) with
--http. Both routes are streamed (NDJSON and server-sent events: where the gateway's cost
per token is), C clients each sending --requests requests back to back; tokens/s is every
completion token (Ollama's eval_count, OpenAI's usage) over the wall time. Each round runs
both routes, the order alternating; the row is the median of the rounds' paired ratios
/api/chat / /v1/chat/completions (target >= 0.98), with their range.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

from testkit import free_port  # noqa: E402

sys.path.insert(0, HERE)
from structured import table  # noqa: E402  (one table for perf's rows)
from together import run_together  # noqa: E402

MODEL = "smollm2-135m-instruct"
THREADS, SLOTS, CTX = 2, 4, 2048
MAX_TOKENS = 200
ASK = [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}]


def ollama_body() -> dict:
    return {
        "model": MODEL,
        "messages": ASK,
        "stream": True,
        "options": {"temperature": 0, "num_predict": MAX_TOKENS},
    }


def openai_body() -> dict:
    return {
        "model": MODEL,
        "messages": ASK,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }


def ollama_tokens(data: bytes) -> int:
    last = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    if not last.get("done"):
        raise RuntimeError(f"/api/chat did not end with done: {last}")
    return last["eval_count"]


def openai_tokens(data: bytes) -> int:
    for event in reversed(data.split(b"\n\n")):
        if event.startswith(b"data: {"):
            usage = json.loads(event[6:]).get("usage")
            if usage:
                return usage["completion_tokens"]
    raise RuntimeError("/v1/chat/completions sent no usage")


ROUTES = {
    "/api/chat": (ollama_body, ollama_tokens),
    "/v1/chat/completions": (openai_body, openai_tokens),
}


def stream(port: int, path: str) -> int:
    """One streamed request, read to its end: its completion tokens."""
    make, count = ROUTES[path]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(make()), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:200]!r}")
        return count(data)
    finally:
        conn.close()


def tokens_per_s(port: int, path: str, clients: int, requests: int) -> tuple[float, list[int]]:
    counts: list[int] = []

    def client() -> None:
        for _ in range(requests):
            counts.append(stream(port, path))

    elapsed = run_together([client] * clients)
    return sum(counts) / elapsed, counts


class Llmsup:
    """llmsup with its HTTP gateway: 1 worker x THREADS cores x SLOTS slots."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmsup-perf", dir="/tmp")
        self.port = free_port()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", self.dir]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    def __enter__(self) -> Llmsup:
        started = self.cli(
            "start", "--model", MODEL, "--workers", "1", "--cores-per-worker", str(THREADS),
            "--slots-per-worker", str(SLOTS), "--ctx-size", str(CTX),
            "--http", f"127.0.0.1:{self.port}",
        )  # fmt: skip
        if started.returncode != 0:
            self.cli("stop", "--timeout", "10")
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(started.stderr)
        return self

    def __exit__(self, *exc) -> None:
        self.cli("stop", "--timeout", "10")
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(rounds: int, clients: list[int], requests: int) -> list[dict]:
    seen: dict[tuple, list[float]] = {}
    tokens: dict[tuple, list[int]] = {}
    with Llmsup() as ours:
        for path in ROUTES:  # warm up: page the weights in
            stream(ours.port, path)
        for r in range(rounds):
            order = list(ROUTES) if r % 2 == 0 else list(reversed(ROUTES))
            for c in clients:
                for path in order:
                    rate, counts = tokens_per_s(ours.port, path, c, requests)
                    seen.setdefault((path, c), []).append(rate)
                    tokens.setdefault((path, c), []).extend(counts)
            figures = ", ".join(f"{p} x{c} {v[-1]:.1f}" for (p, c), v in seen.items())
            print(f"ollama round {r + 1}: {figures}", file=sys.stderr, flush=True)
    cmd = f"python perf/ollama_api.py --rounds {rounds} --requests {requests}"
    cmd += f" --clients {','.join(map(str, clients))}"
    rows = []
    for c in clients:
        ours_key, base_key = ("/api/chat", c), ("/v1/chat/completions", c)
        ratios = sorted(o / b for o, b in zip(seen[ours_key], seen[base_key], strict=True))
        per_request = " vs ".join(f"{statistics.mean(tokens[k]):.0f}" for k in (ours_key, base_key))
        rows.append(
            {
                "name": f"Ollama /api/chat vs OpenAI /v1/chat/completions, {c} client(s)",
                "llmsup": statistics.median(seen[ours_key]),
                "baseline": statistics.median(seen[base_key]),
                "ratio": statistics.median(ratios),
                "unit": "tokens/s",
                "better": "higher",
                "target": ">= 0.98",
                "command": cmd,
                "note": f"target >= 0.98; median of {rounds} paired round(s), range "
                f"{ratios[0]:.2f}-{ratios[-1]:.2f}; completion tokens a request: {per_request}",
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2, help="per client per round")
    p.add_argument("--clients", default="1,4", help="client counts, comma-separated")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(table(measure(args.rounds, clients, args.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
