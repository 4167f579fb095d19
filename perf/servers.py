#!/usr/bin/env python3
"""Aggregate throughput: llmsup against llama.cpp's llama-server and llama-cpp-python's own
server on the same cores, same model, same total context, in one run.

    python perf/servers.py                     # 1, 2, 4, 8 clients
    python perf/servers.py --clients 4 --requests 3 --layout 1x2x8

perf/run.py's `throughput` benchmark runs the same comparison (compare() below) as rows of
its table. llama-server is built from the llama.cpp source vendored in llama-cpp-python's
sdist by perf/build-llama-server.sh (into the cache, never committed). llmsup runs its
default layout unless --layout WORKERSxTHREADSxSLOTS says otherwise; llama-server gets as
many threads as llmsup has cores, as many parallel slots as llmsup has sequences and the
same context in all; `python -m llama_cpp.server` gets those threads and one sequence's
context (it serves one request at a time). Each of C clients sends --requests greedy
completions back to back; aggregate tokens/s is all completion tokens over the wall time;
TTFT is from send to the first streamed token, latency from send to the last.
"""

from __future__ import annotations

import argparse
import configparser
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from batching import (  # noqa: E402
    PROMPT,
    ClientRun,
    Llmsup,
    llmsup_request,
    parse_layout,
    pct,
    run_clients,
)
from testkit import free_port, stop_process  # noqa: E402

from llmsup.supervisor.models.fetch import default_model  # noqa: E402

SERVERS = ("llmsup", "llama-server", "llama_cpp.server")  # measured in this order
# What compare() reports for each server: key, label, unit, which way is better.
METRICS = (
    ("tokens_per_s", "aggregate tokens/s", "tokens/s", "higher"),
    ("ttft_p50_ms", "TTFT p50", "ms", "lower"),
    ("ttft_p99_ms", "TTFT p99", "ms", "lower"),
    ("latency_p99_ms", "end-to-end latency p99", "ms", "lower"),
)
WARM_UP_TOKENS = 4


# --- HTTP servers -------------------------------------------------------------------------------


def sse_events(resp: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON bodies of a server-sent event stream's `data:` lines, up to `[DONE]`."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[6:])


def post_stream(port: int, path: str, body: dict) -> tuple[float, Iterator[dict]]:
    """POST body and return (the time it was sent, its event stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.monotonic()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})

    def events() -> Iterator[dict]:
        try:
            yield from sse_events(conn.getresponse())
        finally:
            conn.close()

    return started, events()


class HttpServer:
    """A server process on a free loopback port, up once `health` answers 200; stopped on
    exit. Its output goes to a temporary file, not a pipe nobody reads (a full pipe would
    block the server mid-benchmark)."""

    name = "server"
    health = "/health"

    def __init__(self, cmd: list[str]):
        self.port = free_port()
        self.cmd = [*cmd, "--host", "127.0.0.1", "--port", str(self.port)]

    def __enter__(self) -> HttpServer:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_healthy(120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.health)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s")

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)
        self.log.close()


class LlamaServer(HttpServer):
    """llama.cpp's llama-server: `slots` sequences at once in one batch, `ctx` tokens each."""

    name = "llama-server"

    def __init__(self, binary: str, threads: int, slots: int, ctx: int, max_tokens: int):
        super().__init__(
            [
                binary,
                "-m",
                str(default_model()),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "-np",
                str(slots),
                "-c",
                str(slots * ctx),
            ]
        )
        self.max_tokens = max_tokens

    def request(self, max_tokens: int | None = None) -> tuple[int, float]:
        """One greedy completion: (completion tokens, TTFT in ms)."""
        started, events = post_stream(
            self.port,
            "/completion",
            {
                "prompt": PROMPT,
                "n_predict": max_tokens or self.max_tokens,
                "temperature": 0,
                "top_k": 1,
                "stream": True,
                "cache_prompt": False,
            },
        )
        first, tokens = None, 0
        for event in events:
            if event.get("stop"):
                tokens = event.get("tokens_predicted", tokens)
                break
            first = first or time.monotonic()
            tokens += 1
        return tokens, ((first or time.monotonic()) - started) * 1000


class LlamaCppPythonServer(HttpServer):
    """`python -m llama_cpp.server`: one llama_cpp.Llama, one request at a time, through its
    OpenAI-compatible /v1/completions."""

    name = "llama_cpp.server"
    health = "/v1/models"

    def __init__(self, threads: int, ctx: int, max_tokens: int):
        # interrupt_requests off: by default a waiting request cuts the streaming one short,
        # which would count as fewer tokens, not as queueing. Everything else: its defaults.
        super().__init__(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(default_model()),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--n_ctx",
                str(ctx),
                "--interrupt_requests",
                "false",
            ]
        )
        self.max_tokens = max_tokens

    def request(self, max_tokens: int | None = None) -> tuple[int, float]:
        """One greedy completion: (completion tokens, TTFT in ms)."""
        max_tokens = max_tokens or self.max_tokens
        started, events = post_stream(
            self.port,
            "/v1/completions",
            {
                "prompt": PROMPT,
                "max_tokens": max_tokens,
                "temperature": 0,
                "top_k": 1,
                "stream": True,
            },
        )
        first, chunks, finish = None, 0, None
        for event in events:
            choice = event["choices"][0]
            finish = choice.get("finish_reason") or finish
            if choice["text"]:
                first = first or time.monotonic()
                chunks += 1
        # Its stream has no usage. A chunk is a token, except that a character split over
        # several tokens comes in one chunk: a run cut by max_tokens has exactly that many.
        tokens = max_tokens if finish == "length" else chunks
        return tokens, ((first or time.monotonic()) - started) * 1000


def llama_server_binary() -> str:
    """The path of llama-server, built into the cache first if it is not there yet."""
    built = subprocess.run(
        ["bash", os.path.join(HERE, "build-llama-server.sh")], stdout=subprocess.PIPE, text=True
    )
    if built.returncode != 0:
        raise RuntimeError("perf/build-llama-server.sh failed (its output is above)")
    return built.stdout.strip().splitlines()[-1]


def perf_extra() -> list[str]:
    """The requirements of setup.cfg's [perf] extra."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return [
        line.strip() for line in cfg["options.extras_require"]["perf"].splitlines() if line.strip()
    ]


def llama_cpp_server_importable() -> bool:
    check = [sys.executable, "-c", "import llama_cpp.server.app"]
    return subprocess.run(check, capture_output=True).returncode == 0


def ensure_llama_cpp_server() -> None:
    """Install the [perf] extra if llama_cpp.server cannot import its dependencies. Its
    requirements themselves, not `pip install -e .[perf]`: that leaves llmsup's own
    installation, and llama-cpp-python's build, as they are."""
    if llama_cpp_server_importable():
        return
    extra = perf_extra()
    print(
        f"perf: python -m llama_cpp.server needs the [perf] extra of setup.cfg; installing "
        f"{' '.join(extra)} into {sys.prefix}",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *extra], check=True)
    if not llama_cpp_server_importable():
        raise RuntimeError("llama_cpp.server still does not import after installing the extra")


# --- the comparison -----------------------------------------------------------------------------


def figures(run: ClientRun) -> dict[str, float]:
    return {
        "tokens_per_s": run.tokens_per_s,
        "ttft_p50_ms": pct(run.ttft_ms, 50),
        "ttft_p99_ms": pct(run.ttft_ms, 99),
        "latency_p99_ms": pct(run.latency_ms, 99),
    }


def keep_best(best: dict[str, dict], name: str, run: ClientRun) -> None:
    """Keep the figures of `name`'s run with the most tokens/s."""
    if name not in best or run.tokens_per_s > best[name]["tokens_per_s"]:
        best[name] = figures(run)


def compare(
    clients: Iterable[int],
    requests: int,
    max_tokens: int,
    layout: str | None = None,
    ctx: int = 2048,
    repeat: int = 1,
) -> list[dict]:
    """For each client count, the METRICS of each of SERVERS, one server running at a time
    (they would fight for the cores), in turn per client count so that a burst of someone
    else's load does not land on one server only. Each server is started afresh, warmed up
    with one short request, then measured. llmsup and llama-server, the pair the target is
    about, are measured `repeat` times each, alternating, and keep their best run
    (figures of the run with the most tokens/s: other people's load only ever slows a run
    down); llama_cpp.server, several times slower, runs once. One dict per client count:
    clients, layout (llmsup's, as it ran), config (the others' settings) and one METRICS
    dict per server."""
    binary = llama_server_binary()
    ensure_llama_cpp_server()
    results = []
    for c in clients:
        result: dict = {"clients": c}
        best: dict[str, dict] = {}
        for _ in range(repeat):
            # A fresh server's first request pays for allocations: each gets a short one.
            with Llmsup(layout, ctx) as inst:
                result["layout"] = inst.layout()
                llmsup_request(inst.state_dir, WARM_UP_TOKENS)()
                run = run_clients(c, requests, llmsup_request(inst.state_dir, max_tokens))
                keep_best(best, "llmsup", run)
            workers, threads, slots = parse_layout(result["layout"])
            threads, slots = workers * threads, workers * slots
            with LlamaServer(binary, threads, slots, ctx, max_tokens) as server:
                server.request(WARM_UP_TOKENS)
                keep_best(best, server.name, run_clients(c, requests, server.request))
        result["config"] = (
            f"llama-server -t {threads} -np {slots} -c {slots * ctx}; "
            f"llama_cpp.server n_threads {threads}, n_ctx {ctx}; "
            f"llmsup and llama-server best of {repeat}"
        )
        with LlamaCppPythonServer(threads, ctx, max_tokens) as server:
            server.request(WARM_UP_TOKENS)
            keep_best(best, server.name, run_clients(c, requests, server.request))
        result.update(best)
        results.append(result)
        print(
            f"perf: {c} clients: "
            + ", ".join(f"{name} {result[name]['tokens_per_s']:.1f} tok/s" for name in SERVERS),
            file=sys.stderr,
            flush=True,
        )
    return results


# --- main ---------------------------------------------------------------------------------------


def print_table(results: list[dict]) -> None:
    print(
        "\n| clients | server | tok/s | TTFT p50 | TTFT p99 | latency p99 | llmsup / this |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in results:
        for name in SERVERS:
            f = r[name]
            ratio = r["llmsup"]["tokens_per_s"] / f["tokens_per_s"]
            print(
                f"| {r['clients']} | {name} | {f['tokens_per_s']:.1f} | "
                f"{f['ttft_p50_ms']:.0f} ms | {f['ttft_p99_ms']:.0f} ms | "
                f"{f['latency_p99_ms']:.0f} ms | {ratio:.2f} |"
            )
    print(f"\nllmsup layout {results[0]['layout']}; {results[0]['config']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="per client, back to back")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure llmsup and llama-server this many times, keep the best",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    p.add_argument(
        "--layout", default=None, help="llmsup WORKERSxTHREADSxSLOTS [default: llmsup start's]"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = compare(
        args.clients, args.requests, args.max_tokens, args.layout, args.ctx, args.repeat
    )
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
