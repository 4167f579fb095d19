#!/usr/bin/env python3
"""The OpenAI HTTP gateway's cost: aggregate tokens/s through it against llama.cpp's
llama-server (and llmsup's own ZeroMQ path), the TTFT it adds over ZeroMQ, and its CPU
per streamed token.

    .venv/bin/python perf/gateway.py                          # 1, 2, 4, 8 clients
    .venv/bin/python perf/gateway.py --clients 1,4 --requests 2 --ttft-requests 5   # short

llmsup runs its default layout unless --layout WORKERSxTHREADSxSLOTS says otherwise, with
the gateway (`python -m llmsup.supervisor.gateway`) in front of it; llama-server gets as
many threads as llmsup has cores, as many parallel slots as llmsup has sequences, the same
context per sequence (perf/servers.py's settings). Both are asked by the same client code:
POST /v1/completions, streamed, stream_options.include_usage, greedy, the same prompt and
body; tokens are the final usage chunk's completion_tokens. The direct path is llmsup's
Python client on the same prompt. All three run at once (idle, they cost nothing) and are
measured in turn at each client count, so a burst of someone else's load does not land
on one only. C clients each send --requests requests back to back; aggregate tokens/s is
all completion tokens over the wall time. TTFT: from send to the first token's arrival,
one client, the gateway and the direct path alternating. Gateway CPU: its process's user
+ system seconds (psutil) over the tokens it streamed, per client count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import psutil  # noqa: E402
from batching import PROMPT, ClientRun, Llmsup, llmsup_request, parse_layout, pct, run_clients  # noqa: E402
from servers import HttpServer, LlamaServer, free_port, llama_server_binary, post_stream  # noqa: E402

WARM_UP_TOKENS = 4


class Gateway(HttpServer):
    """The gateway in front of an llmsup endpoint, on a free loopback port."""

    name = "gateway"

    def __init__(self, endpoint: str, loop: str = "uvloop"):
        self.port = free_port()
        self.cmd = [
            "env",  # execs the gateway: same pid, so cpu_seconds is the gateway's
            f"LLMSUP_GATEWAY_LOOP={loop}",
            sys.executable,
            "-m",
            "llmsup.supervisor.gateway",
            "--endpoint",
            endpoint,
            "--listen",
            f"127.0.0.1:{self.port}",
        ]

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system


def openai_request(port: int, max_tokens: int):
    """One greedy streamed /v1/completions request: (completion tokens, TTFT in ms). The
    same function, hence the same bytes and parsing, for the gateway and llama-server."""

    def one() -> tuple[int, float]:
        started, events = post_stream(
            port,
            "/v1/completions",
            {
                "prompt": PROMPT,
                "max_tokens": max_tokens,
                "temperature": 0,
                "top_k": 1,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        first, tokens = None, None
        for event in events:
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    first = first or time.monotonic()
        if tokens is None:
            raise RuntimeError(f"no usage chunk from the server on port {port}")
        return tokens, ((first or time.monotonic()) - started) * 1000

    return one


def measure_ttft(gateways: list[Gateway], state_dir: str, requests: int, max_tokens: int) -> dict:
    """TTFT p50 of one client through each gateway and through ZeroMQ, in turn."""
    via_http = [openai_request(g.port, max_tokens) for g in gateways]
    via_zmq = llmsup_request(state_dir, max_tokens)
    http_ms: list[list[float]] = [[] for _ in gateways]
    zmq_ms = []
    for _ in range(requests):
        for one, times in zip(via_http, http_ms, strict=True):
            times.append(one()[1])
        zmq_ms.append(via_zmq()[1])
    return {
        "gateway_ms": pct(http_ms[0], 50),
        "direct_ms": pct(zmq_ms, 50),
        "added_ms": pct(http_ms[0], 50) - pct(zmq_ms, 50),
        "asyncio_added_ms": pct(http_ms[1], 50) - pct(zmq_ms, 50),
    }


def compare(
    clients: list[int],
    requests: int,
    max_tokens: int,
    layout: str | None,
    ctx: int,
    ttft_requests: int,
    direct: bool,
) -> dict:
    binary = llama_server_binary()
    results: dict = {"rows": []}
    with Llmsup(layout, ctx) as inst:
        results["layout"] = inst.layout()
        workers, threads, slots = parse_layout(results["layout"])
        threads, slots = workers * threads, workers * slots
        results["config"] = f"llama-server -t {threads} -np {slots} -c {slots * ctx}"
        with open(os.path.join(inst.state_dir, "supervisor.json")) as f:
            endpoint = json.load(f)["endpoint"]
        with (
            Gateway(endpoint) as gateway,
            Gateway(endpoint, loop="asyncio") as standard,
            LlamaServer(binary, threads, slots, ctx, max_tokens) as server,
        ):
            through_gateway = openai_request(gateway.port, max_tokens)
            through_standard = openai_request(standard.port, max_tokens)
            through_server = openai_request(server.port, max_tokens)
            through_zmq = llmsup_request(inst.state_dir, max_tokens)
            for warm in (
                openai_request(gateway.port, WARM_UP_TOKENS),
                openai_request(standard.port, WARM_UP_TOKENS),
                openai_request(server.port, WARM_UP_TOKENS),
                llmsup_request(inst.state_dir, WARM_UP_TOKENS),
            ):
                warm()
            results["ttft"] = measure_ttft([gateway, standard], inst.state_dir, ttft_requests, 8)
            for c in clients:
                row: dict = {"clients": c}
                if direct:
                    row["direct"] = run_clients(c, requests, through_zmq).tokens_per_s
                cpu, started = gateway.cpu_seconds(), time.monotonic()
                run: ClientRun = run_clients(c, requests, through_gateway)
                cpu, wall = gateway.cpu_seconds() - cpu, time.monotonic() - started
                row["gateway"] = run.tokens_per_s
                streamed = run.tokens_per_s * wall
                row["gateway_cpu_us_per_token"] = cpu / streamed * 1e6
                row["gateway_ttft_p50_ms"] = pct(run.ttft_ms, 50)
                cpu, started = standard.cpu_seconds(), time.monotonic()
                run = run_clients(c, requests, through_standard)
                cpu, wall = standard.cpu_seconds() - cpu, time.monotonic() - started
                row["asyncio"] = run.tokens_per_s
                row["asyncio_cpu_us_per_token"] = cpu / (run.tokens_per_s * wall) * 1e6
                server_run = run_clients(c, requests, through_server)
                row["llama-server"] = server_run.tokens_per_s
                row["llama-server_ttft_p50_ms"] = pct(server_run.ttft_ms, 50)
                results["rows"].append(row)
                print(
                    f"perf: {c} clients: gateway {row['gateway']:.1f} tok/s, llama-server "
                    f"{row['llama-server']:.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def print_table(results: dict, direct: bool) -> None:
    head = "| clients | gateway tok/s | llama-server tok/s | gateway / llama-server |"
    rule = "|---|---|---|---|"
    if direct:
        head += " llmsup ZeroMQ tok/s | gateway / ZeroMQ |"
        rule += "---|---|"
    print(f"\n{head} TTFT p50 gateway / llama-server | gateway CPU per token |\n{rule}---|---|")
    for r in results["rows"]:
        line = (
            f"| {r['clients']} | {r['gateway']:.1f} | {r['llama-server']:.1f} | "
            f"{r['gateway'] / r['llama-server']:.2f} |"
        )
        if direct:
            line += f" {r['direct']:.1f} | {r['gateway'] / r['direct']:.2f} |"
        line += (
            f" {r['gateway_ttft_p50_ms']:.0f} / {r['llama-server_ttft_p50_ms']:.0f} ms | "
            f"{r['gateway_cpu_us_per_token']:.0f} µs |"
        )
        print(line)
    t = results["ttft"]
    print(
        f"\nTTFT p50, one client, 8 tokens: gateway {t['gateway_ms']:.1f} ms, ZeroMQ "
        f"{t['direct_ms']:.1f} ms: the gateway adds {t['added_ms']:.1f} ms (on asyncio's own "
        f"loop instead of uvloop: {t['asyncio_added_ms']:.1f} ms)"
    )
    print("gateway on asyncio's own loop: " + "; ".join(
        f"{r['clients']} clients {r['asyncio']:.1f} tok/s, {r['asyncio_cpu_us_per_token']:.0f} µs"
        for r in results["rows"]
    ))  # fmt: skip
    print(
        f"llmsup layout {results['layout']}; {results['config']}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    p.add_argument("--layout", default=None, help="llmsup WORKERSxTHREADSxSLOTS")
    p.add_argument("--ttft-requests", type=int, default=20, help="per path")
    p.add_argument("--no-direct", action="store_true", help="skip llmsup's ZeroMQ path")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = compare(
        args.clients,
        args.requests,
        args.max_tokens,
        args.layout,
        args.ctx,
        args.ttft_requests,
        not args.no_direct,
    )
    print_table(results, not args.no_direct)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
