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
Python client on the same prompt. Two more gateways run beside the default one, for what
their choices are worth: one on asyncio's own event loop instead of uvloop
(LLMSUP_GATEWAY_LOOP), one that reaches llmsup through a libzmq socket instead of its own
ZMTP link (LLMSUP_GATEWAY_LINK). All run at once (idle, they cost nothing) and are measured
in turn at each client count, so a burst of someone else's load does not land on one
only; --rounds repeats that over all client counts, and the table gives the mean and each
round's range. C clients each send --requests requests back to back; aggregate tokens/s is
all completion tokens over the wall time. TTFT: from send to the first token's arrival,
one client, every gateway and the direct path in rotation, each on a connection made
before (the ZeroMQ client connects first, as the openai SDK keeps its HTTP connections),
and the default gateway once more over a new HTTP connection per request. CPU per
streamed token: the gateway's and the supervisor's processes' user + system seconds
(psutil) over the tokens streamed, per client count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import batching  # noqa: E402
import psutil  # noqa: E402
from batching import PROMPT, ClientRun, Llmsup, llmsup_request, parse_layout, pct, run_clients  # noqa: E402
from servers import HttpServer, LlamaServer, free_port, llama_server_binary, post_stream, sse_events  # noqa: E402

from llmsup.protocol.client import Client  # noqa: E402

WARM_UP_TOKENS = 4


class Gateway(HttpServer):
    """The gateway in front of an llmsup endpoint, on a free loopback port."""

    name = "gateway"

    def __init__(self, endpoint: str, loop: str = "uvloop", link: str = "zmtp"):
        self.port = free_port()
        self.cmd = [
            "env",  # execs the gateway: same pid, so cpu_seconds(proc.pid) is the gateway's
            f"LLMSUP_GATEWAY_LOOP={loop}",
            f"LLMSUP_GATEWAY_LINK={link}",
            sys.executable,
            "-m",
            "llmsup.supervisor.gateway",
            "--endpoint",
            endpoint,
            "--listen",
            f"127.0.0.1:{self.port}",
        ]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


BODY = {
    "prompt": PROMPT,
    "temperature": 0,
    "top_k": 1,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def kept_request(port: int, max_tokens: int):
    """openai_request over one connection made beforehand and kept: (tokens, TTFT ms)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.connect()
    body = json.dumps({**BODY, "max_tokens": max_tokens})

    def one() -> tuple[int, float]:
        started = time.monotonic()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        first, tokens = None, None
        for event in sse_events(response):
            first, tokens = first_and_tokens(event, first, tokens)
        response.read()  # the chunked stream's end, so that the connection can be reused
        if tokens is None:
            raise RuntimeError(f"no usage chunk from the server on port {port}")
        return tokens, ((first or time.monotonic()) - started) * 1000

    return one


def first_and_tokens(event: dict, first: float | None, tokens: int | None):
    """(when the first text arrived, completion tokens) after one more event."""
    if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
    for choice in event.get("choices") or ():
        if choice.get("text"):
            first = first or time.monotonic()
    return first, tokens


def openai_request(port: int, max_tokens: int):
    """One greedy streamed /v1/completions request: (completion tokens, TTFT in ms). The
    same function, hence the same bytes and parsing, for the gateway and llama-server."""

    def one() -> tuple[int, float]:
        started, events = post_stream(port, "/v1/completions", {**BODY, "max_tokens": max_tokens})
        first, tokens = None, None
        for event in events:
            first, tokens = first_and_tokens(event, first, tokens)
        if tokens is None:
            raise RuntimeError(f"no usage chunk from the server on port {port}")
        return tokens, ((first or time.monotonic()) - started) * 1000

    return one


def kept_llmsup_request(state_dir: str, max_tokens: int):
    """llmsup_request over one Client connected beforehand and kept."""
    client = Client(state_dir=state_dir, timeout=600)
    client.__enter__()  # closed at exit with the process: this is a benchmark script

    return lambda: batching.timed_completion(client, max_tokens)


def measure_ttft(gateways: dict, state_dir: str, requests: int, max_tokens: int) -> dict:
    """TTFT p50 of one client through each gateway and through ZeroMQ, in turn, each on a
    kept connection; and through the default gateway over a new connection per request."""
    paths = {name: kept_request(g.port, max_tokens) for name, g in gateways.items()}
    paths["new connection"] = openai_request(gateways["gateway"].port, max_tokens)
    paths["ZeroMQ"] = kept_llmsup_request(state_dir, max_tokens)
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for i in range(requests):
        # Rotated, so that no path always comes right after the same other one (and pays
        # for whatever that one's request left the worker doing).
        for name in order[i % len(order) :] + order[: i % len(order)]:
            times[name].append(paths[name]()[1])
    p50 = {name: pct(t, 50) for name, t in times.items()}
    return {"p50_ms": p50, "added_ms": {n: p50[n] - p50["ZeroMQ"] for n in paths}}


def compare(
    clients: list[int],
    requests: int,
    max_tokens: int,
    layout: str | None,
    ctx: int,
    ttft_requests: int,
    direct: bool,
    rounds: int = 1,
) -> dict:
    binary = llama_server_binary()
    results: dict = {"rows": []}
    with Llmsup(layout, ctx) as inst:
        results["layout"] = inst.layout()
        workers, threads, slots = parse_layout(results["layout"])
        threads, slots = workers * threads, workers * slots
        results["config"] = f"llama-server -t {threads} -np {slots} -c {slots * ctx}"
        with open(os.path.join(inst.state_dir, "supervisor.json")) as f:
            info = json.load(f)
        endpoint, supervisor = info["endpoint"], info["pid"]
        with (
            Gateway(endpoint) as gateway,
            Gateway(endpoint, loop="asyncio") as on_asyncio,
            Gateway(endpoint, link="libzmq") as on_libzmq,
            LlamaServer(binary, threads, slots, ctx, max_tokens) as server,
        ):
            gateways = {"gateway": gateway, "asyncio": on_asyncio, "libzmq": on_libzmq}
            paths = {name: openai_request(g.port, max_tokens) for name, g in gateways.items()}
            paths["llama-server"] = openai_request(server.port, max_tokens)
            if direct:
                paths["direct"] = llmsup_request(inst.state_dir, max_tokens)
            for port in [g.port for g in gateways.values()] + [server.port]:
                openai_request(port, WARM_UP_TOKENS)()
            llmsup_request(inst.state_dir, WARM_UP_TOKENS)()
            results["ttft"] = measure_ttft(gateways, inst.state_dir, ttft_requests, 8)
            # Rounds over all client counts, so that a slow spell of a shared machine lands
            # on every count and path alike; per round, each path in turn.
            runs = {c: {name: [] for name in paths} for c in clients}
            for r in range(rounds):
                for c in clients:
                    for name, one in paths.items():
                        gw = gateways.get(name)
                        pids = {"cpu": gw.proc.pid, "supervisor_cpu": supervisor} if gw else {}
                        cpu = {k: cpu_seconds(pid) for k, pid in pids.items()}
                        started = time.monotonic()
                        run: ClientRun = run_clients(c, requests, one)
                        wall = time.monotonic() - started
                        used = {k: cpu_seconds(pid) - cpu[k] for k, pid in pids.items()}
                        runs[c][name].append((run, wall, used))
                    line = runs[c]
                    print(
                        f"perf: round {r + 1}, {c} clients: gateway "
                        f"{line['gateway'][-1][0].tokens_per_s:.1f} tok/s, llama-server "
                        f"{line['llama-server'][-1][0].tokens_per_s:.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
            results["rows"] = [summarize(c, runs[c]) for c in clients]
    return results


def summarize(clients: int, runs: dict) -> dict:
    """A client count's row: each path's tokens/s (mean over rounds) and TTFT p50 (over all
    its requests), each round's gateway / llama-server, CPU per token over all rounds."""
    row: dict = {"clients": clients}
    for name, rounds in runs.items():
        row[name] = statistics.mean(run.tokens_per_s for run, _, _ in rounds)
        row[f"{name}_ttft_p50_ms"] = pct([t for run, _, _ in rounds for t in run.ttft_ms], 50)
        streamed = sum(run.tokens_per_s * wall for run, wall, _ in rounds)
        for k in rounds[0][2]:
            row[f"{name}_{k}_us_per_token"] = sum(u[k] for _, _, u in rounds) / streamed * 1e6
    pairs = zip(runs["gateway"], runs["llama-server"], strict=True)
    row["ratios"] = [g.tokens_per_s / s.tokens_per_s for (g, _, _), (s, _, _) in pairs]
    return row


def print_table(results: dict, direct: bool) -> None:
    head = "| clients | gateway tok/s | llama-server tok/s | gateway / llama-server |"
    rule = "|---|---|---|---|"
    if direct:
        head += " llmsup ZeroMQ tok/s | gateway / ZeroMQ |"
        rule += "---|---|"
    head += " TTFT p50 gateway / llama-server | CPU per token: gateway, supervisor |"
    print(f"\n{head}\n{rule}---|---|")
    for r in results["rows"]:
        spread = f" ({min(r['ratios']):.2f}-{max(r['ratios']):.2f})" if len(r["ratios"]) > 1 else ""
        line = (
            f"| {r['clients']} | {r['gateway']:.1f} | {r['llama-server']:.1f} | "
            f"{r['gateway'] / r['llama-server']:.2f}{spread} |"
        )
        if direct:
            line += f" {r['direct']:.1f} | {r['gateway'] / r['direct']:.2f} |"
        line += (
            f" {r['gateway_ttft_p50_ms']:.0f} / {r['llama-server_ttft_p50_ms']:.0f} ms | "
            f"{r['gateway_cpu_us_per_token']:.0f}, "
            f"{r['gateway_supervisor_cpu_us_per_token']:.0f} µs |"
        )
        print(line)
    t = results["ttft"]
    p50, added = t["p50_ms"], t["added_ms"]
    print(
        f"\nTTFT p50, one client, 8 tokens, connected beforehand: gateway {p50['gateway']:.1f} ms, "
        f"ZeroMQ {p50['ZeroMQ']:.1f} ms: the gateway adds {added['gateway']:.1f} ms (on asyncio's "
        f"own loop {added['asyncio']:.1f} ms, through libzmq {added['libzmq']:.1f} ms; over a "
        f"new HTTP connection per request {added['new connection']:.1f} ms)"
    )
    for name, what in (("asyncio", "on asyncio's own loop"), ("libzmq", "through libzmq")):
        print(
            f"gateway {what}: "
            + "; ".join(
                f"{r['clients']} clients {r[name]:.1f} tok/s ({r[name] / r['gateway']:.2f} of the "
                f"default's), {r[f'{name}_cpu_us_per_token']:.0f} µs"
                for r in results["rows"]
            )
        )
    print(
        f"llmsup layout {results['layout']}; {results['config']}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="per client, back to back")
    p.add_argument("--rounds", type=int, default=1, help="of every client count and path")
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
        args.rounds,
    )
    print_table(results, not args.no_direct)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
