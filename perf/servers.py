#!/usr/bin/env python3
"""Aggregate throughput: llmsup against llama.cpp's llama-server on the same cores, same
model, same total context, in one run.

    python perf/servers.py                     # 1, 2, 4, 8 clients
    python perf/servers.py --clients 4 --requests 3

llama-server is built from the llama.cpp source vendored in llama-cpp-python's sdist by
perf/build-llama-server.sh (into the cache, never committed). llmsup runs its default
layout (2 workers x 1 thread x 4 slots = 8 sequences); llama-server runs with 2 threads
and 8 parallel slots, and both get 8 x --ctx tokens of context in all. Each of C clients
sends --requests greedy completions back to back; aggregate tokens/s is all completion
tokens over the wall time; TTFT is from send to the first streamed token.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from batching import Llmsup, llmsup_request, run_clients  # noqa: E402

from llmsup.supervisor.model import default_model  # noqa: E402

PROMPT = "Once upon a time"
SLOTS = 8  # total sequences at once, both servers


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


# --- llama-server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: str):
        self.port = free_port()
        self.cmd = [
            binary, "-m", str(default_model()), "-t", "2", "-tb", "2", "-np", str(SLOTS),
            "-c", str(SLOTS * ARGS.ctx), "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("llama-server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request(self) -> tuple[int, float]:
        body = json.dumps({"prompt": PROMPT, "n_predict": ARGS.max_tokens, "temperature": 0,
                           "top_k": 1, "stream": True, "cache_prompt": False})  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        started = time.monotonic()
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first, tokens = None, 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("stop"):
                tokens = event.get("tokens_predicted", tokens)
                break
            first = first or time.monotonic()
            tokens += 1
        conn.close()
        return tokens, ((first or time.monotonic()) - started) * 1000


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    built = subprocess.run(["bash", os.path.join(HERE, "build-llama-server.sh")],
                           capture_output=True, text=True)  # fmt: skip
    if built.returncode != 0:
        raise SystemExit(f"building llama-server failed:\n{built.stderr[-3000:]}")
    binary = built.stdout.strip().splitlines()[-1]
    rows = []
    for clients in ARGS.clients:
        with Llmsup(ARGS.layout, ARGS.ctx) as inst:
            one = llmsup_request(inst.state_dir, ARGS.max_tokens)
            ours, our_ttft = run_clients(clients, ARGS.requests, one)
        with LlamaServer(binary) as server:
            theirs, their_ttft = run_clients(clients, ARGS.requests, server.request)
        rows.append({
            "clients": clients, "llmsup_tokens_per_s": ours, "llama_server_tokens_per_s": theirs,
            "ratio": ours / theirs, "llmsup_ttft_p99_ms": pct(our_ttft, 99),
            "llama_server_ttft_p99_ms": pct(their_ttft, 99),
            "layout": ARGS.layout,
            "command": f"python perf/servers.py --clients {clients} --requests {ARGS.requests}"
            f" --layout {ARGS.layout}",
        })  # fmt: skip
        r = rows[-1]
        print(f"{clients} clients: llmsup {ours:.1f} tok/s, llama-server {theirs:.1f} tok/s, "
              f"ratio {r['ratio']:.2f}; TTFT p99 {r['llmsup_ttft_p99_ms']:.0f} vs "
              f"{r['llama_server_ttft_p99_ms']:.0f} ms", flush=True)  # fmt: skip
    print("\n| clients | llmsup tok/s | llama-server tok/s | ratio | TTFT p99 llmsup | "
          "TTFT p99 llama-server |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['clients']} | {r['llmsup_tokens_per_s']:.1f} | "
              f"{r['llama_server_tokens_per_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['llmsup_ttft_p99_ms']:.0f} ms | "
              f"{r['llama_server_ttft_p99_ms']:.0f} ms |")  # fmt: skip
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    p.add_argument("--layout", default="2x1x4", help="llmsup WORKERSxTHREADSxSLOTS (8 slots)")
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None

if __name__ == "__main__":
    sys.exit(main())
