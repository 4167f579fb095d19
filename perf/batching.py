"""Continuous batching benchmark: aggregate tokens/s by concurrency and layout, and the cost
of serving a single stream through llmsup instead of calling llama-cpp-python in-process.

    .venv/bin/python perf/batching.py                      # the full table (about 6 minutes)
    .venv/bin/python perf/batching.py --layouts 2x1x4 --clients 4     # one row

A layout is WORKERSxTHREADSxSLOTS (threads = cores per worker). Every request is the same
greedy completion of --max-tokens tokens; C client threads each send --requests requests
back to back, and aggregate tokens/s is all completion tokens over the wall time. Figures
are noisy on a shared machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
sys.path.insert(0, HERE)

from together import run_together  # noqa: E402

from llmsup.protocol.client import Client  # noqa: E402
from llmsup.supervisor.models.fetch import default_model  # noqa: E402

PROMPT = "Once upon a time"
DEFAULT_LAYOUT = "2x1x4"  # the default `llmsup start` layout on a 2-core machine
SINGLE_SLOT = "2x1x1"  # the layout before batching: one sequence per worker


def parse_layout(text: str) -> tuple[int, int, int]:
    workers, threads, slots = (int(x) for x in text.split("x"))
    return workers, threads, slots


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, nearest rank (no interpolation: few samples per run)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


class Llmsup:
    """`llmsup start` with a layout in a private state dir; stopped on exit. Layout None:
    no layout flags, i.e. whatever `llmsup start` picks on this machine."""

    def __init__(self, layout: str | None, ctx: int):
        self.state_dir = tempfile.mkdtemp(prefix="llmsup-bench")
        # The model every baseline here loads (default_model()), whatever llmsup's default.
        self.args = ["--model", "gemma3-270m", "--ctx-size", str(ctx), "--queue-size", "64"]
        if layout is not None:
            workers, threads, slots = parse_layout(layout)
            self.args += [
                "--workers",
                str(workers),
                "--cores-per-worker",
                str(threads),
                "--slots-per-worker",
                str(slots),
            ]

    def cli(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", self.state_dir]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            # Not SystemExit: perf/run.py reports one failed benchmark and runs the others.
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr}")

    def layout(self) -> str:
        """The layout running, WORKERSxTHREADSxSLOTS (workers alike, as `llmsup start` makes
        them; threads: a worker's CPUs, one llama.cpp thread each), read back from the
        supervisor so that a default layout is known too."""
        with Client(state_dir=self.state_dir, timeout=60) as client:
            workers = client.status()["workers"]
        return f"{len(workers)}x{len(workers[0]['cores'])}x{workers[0]['slots']}"

    def __enter__(self) -> Llmsup:
        self.cli("start", *self.args)
        return self

    def __exit__(self, *exc) -> None:
        self.cli("stop")
        shutil.rmtree(self.state_dir, ignore_errors=True)


class ClientRun(NamedTuple):
    tokens_per_s: float  # completion tokens of all clients over the wall time
    ttft_ms: list[float]  # send to first token, every request
    latency_ms: list[float]  # send to last token, every request


def run_clients(clients: int, requests: int, one_request) -> ClientRun:
    """C threads, each calling one_request() -> (tokens, TTFT ms) `requests` times back to
    back."""
    counts = [0] * clients
    ttfts: list[float] = []
    latencies: list[float] = []

    def client_thread(i: int) -> None:
        for _ in range(requests):
            started = time.monotonic()
            tokens, ttft = one_request()
            latencies.append((time.monotonic() - started) * 1000)
            counts[i] += tokens
            ttfts.append(ttft)

    elapsed = run_together([lambda i=i: client_thread(i) for i in range(clients)])
    return ClientRun(sum(counts) / elapsed, ttfts, latencies)


def llmsup_request(state_dir: str, max_tokens: int):
    """One greedy completion through llmsup: (completion tokens, TTFT in ms)."""

    def one() -> tuple[int, float]:
        with Client(state_dir=state_dir, timeout=600) as client:
            return timed_completion(client, max_tokens)

    return one


def timed_completion(client: Client, max_tokens: int) -> tuple[int, float]:
    """One greedy completion of PROMPT on `client`: (completion tokens, TTFT in ms)."""
    started = time.monotonic()
    stream = client.complete(PROMPT, max_tokens=max_tokens, temperature=0.0, top_k=1)
    first = None
    for _ in stream:
        first = first or time.monotonic()
    return stream.done["usage"]["completion_tokens"], (first - started) * 1000


def aggregate(inst: Llmsup, clients: int, requests: int, max_tokens: int) -> float:
    """Completion tokens per second over all clients."""
    return run_clients(clients, requests, llmsup_request(inst.state_dir, max_tokens)).tokens_per_s


def single_stream_llmsup(inst: Llmsup, requests: int, max_tokens: int) -> float:
    """Tokens/s one client sees: completion tokens over request time (prefill included)."""
    with Client(state_dir=inst.state_dir, timeout=600) as client:
        client.complete(PROMPT, max_tokens=4, temperature=0.0, top_k=1).text()  # warm up
        tokens, started = 0, time.monotonic()
        for _ in range(requests):
            stream = client.complete(PROMPT, max_tokens=max_tokens, temperature=0.0, top_k=1)
            stream.text()
            tokens += stream.done["usage"]["completion_tokens"]
        return tokens / (time.monotonic() - started)


_llm = None


def single_stream_in_process(threads: int, ctx: int, requests: int, max_tokens: int) -> float:
    """The same requests through llama_cpp.Llama in this process, pinned like a worker."""
    import llama_cpp

    os.sched_setaffinity(0, list(range(threads)))
    global _llm
    if _llm is None:
        _llm = llama_cpp.Llama(
            str(default_model()),
            n_ctx=ctx,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    llm = _llm
    llm.create_completion(PROMPT, max_tokens=4, temperature=0.0, top_k=1)  # warm up
    tokens, started = 0, time.monotonic()
    for _ in range(requests):
        llm.reset()  # no prefix reuse, as in llmsup
        out = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0, top_k=1)
        tokens += out["usage"]["completion_tokens"]
    elapsed = time.monotonic() - started
    os.sched_setaffinity(0, range(os.cpu_count()))
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layouts",
        default=f"{DEFAULT_LAYOUT},{SINGLE_SLOT}",
        help="comma-separated WORKERSxTHREADSxSLOTS; the first is compared with each other one",
    )
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2, help="per client")
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="measure each row this many times and keep the best (other "
        "people's load only ever slows a run down)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ctx-size", type=int, default=1024)
    parser.add_argument("--no-single-stream", action="store_true")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    here = "perf/batching.py"
    common = (
        f"--requests {args.requests} --repeat {args.repeat} "
        f"--max-tokens {args.max_tokens} --ctx-size {args.ctx_size}"
    )
    print(f"model {default_model().name}, prompt {PROMPT!r}, greedy, {args.max_tokens} tokens")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start\n")

    # Every layout runs at once (idle workers cost no CPU) and the measurements alternate
    # between them, so a burst of someone else's load does not land on one layout only.
    table: dict[str, dict[int, float]] = {layout: {} for layout in layouts}
    with contextlib.ExitStack() as stack:
        instances = {
            layout: stack.enter_context(Llmsup(layout, args.ctx_size)) for layout in layouts
        }
        for inst in instances.values():
            aggregate(inst, 1, 1, 4)  # warm up
        for c in clients:
            for _ in range(args.repeat):
                for layout, inst in instances.items():
                    tps = aggregate(inst, c, args.requests, args.max_tokens)
                    table[layout][c] = max(tps, table[layout].get(c, 0.0))
            for layout in layouts:
                print(
                    f"{layout:>8}  {c} clients  {table[layout][c]:7.1f} tok/s   "
                    f"{here} --layouts {layout} --clients {c} {common} --no-single-stream",
                    flush=True,
                )
    base = layouts[0]
    if len(layouts) > 1:
        print(f"\naggregate tokens/s, {base} over each other layout:")
        for other in layouts[1:]:
            for c in clients:
                ratio = table[base][c] / table[other][c]
                print(
                    f"  {c} clients: {table[base][c]:6.1f} / {table[other][c]:6.1f} = "
                    f"{ratio:4.2f}x   {here} --layouts {base},{other} --clients {c} "
                    f"{common} --no-single-stream"
                )

    if not args.no_single_stream:
        _, threads, _ = parse_layout(base)
        with Llmsup(base, args.ctx_size) as inst:
            ours = max(
                single_stream_llmsup(inst, args.requests * 2, args.max_tokens)
                for _ in range(args.repeat)
            )
        n = args.requests * 2
        ref = max(
            single_stream_in_process(threads, args.ctx_size, n, args.max_tokens)
            for _ in range(args.repeat)
        )
        print(
            f"\nsingle stream, {threads} thread(s): llmsup {base} {ours:.1f} tok/s, in-process "
            f"llama-cpp-python {ref:.1f} tok/s = {ours / ref:.2f}x   {here} --layouts {base} "
            f"--clients 1 {common}"
        )


if __name__ == "__main__":
    main()
