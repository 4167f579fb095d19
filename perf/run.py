#!/usr/bin/env python3
"""llmsup benchmarks: each figure next to a baseline measured in the same run, as a ratio.

    python perf/run.py --quick            # a few minutes
    python perf/run.py --full             # longer runs; writes perf/RESULTS.md too
    python perf/run.py --only throughput --clients 4 --layout 1x2x8     # some rows

Prints a table and writes perf/results/latest.json (the previous run is kept as
previous.json, so regressions show as a change against it). Every row carries the command
that reproduces it. Machines here are noisy and shared: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psutil
import zmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import chat as chat_bench  # noqa: E402
import nseq as nseq_bench  # noqa: E402
import ollama_api as ollama_bench  # noqa: E402
import prefix as prefix_bench  # noqa: E402
import structured as structured_bench  # noqa: E402
from baselines import bare_broker_round_trips, in_process_tokens_per_s  # noqa: E402
from batching import pct  # noqa: E402
from servers import METRICS, SERVERS, compare  # noqa: E402

from llmsup.protocol import constants as C  # noqa: E402
from llmsup.protocol.client import Client  # noqa: E402
from llmsup.supervisor.models.fetch import default_model  # noqa: E402
from llmsup.worker import faults  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


class Instance:
    """An llmsup started with the CLI in its own state dir, stopped on exit."""

    def __init__(self, *args: str, env: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="llmsup-perf", dir="/tmp")
        self.env = {**os.environ, **(env or {})}
        run = self.cli("start", "--model", "gemma3-270m", *args)  # the baselines' model
        if run.returncode != 0:
            raise RuntimeError(run.stderr)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", self.dir],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
        )

    def client(self) -> Client:
        return Client(state_dir=self.dir, timeout=300)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    @property
    def pid(self) -> int:
        return int(Path(self.dir, "supervisor.pid").read_text())

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc) -> None:
        self.cli("stop", "--timeout", "10")
        shutil.rmtree(self.dir, ignore_errors=True)


def row(name, value, baseline, unit, command, better="higher", note=""):
    ratio = value / baseline if baseline else None
    return {
        "name": name,
        "llmsup": value,
        "baseline": baseline,
        "ratio": ratio,
        "unit": unit,
        "better": better,
        "command": command,
        "note": note,
    }


# --- 1. streaming efficiency ------------------------------------------------------------------


def streaming_efficiency(quick: bool) -> list[dict]:
    max_tokens = 64 if quick else 128
    rounds = 2 if quick else 3
    ours, base = [], []
    with Instance("--workers", "1", "--cores-per-worker", "1") as inst:
        core = inst.status()["workers"][0]["cores"]
        with inst.client() as client:
            client.complete("warm up", max_tokens=4, temperature=0).text()
            for _ in range(rounds):
                stream = client.complete(PROMPT, max_tokens=max_tokens, temperature=0, top_k=1)
                started = time.monotonic()
                stream.text()
                elapsed = time.monotonic() - started
                ours.append(stream.done["usage"]["completion_tokens"] / elapsed)
                base.append(in_process_tokens_per_s(PROMPT, max_tokens, core))
    cmd = "python perf/run.py --only streaming"
    return [
        row(
            "streaming tokens/s, 1 worker x 1 core vs in-process llama-cpp-python",
            statistics.median(ours),
            statistics.median(base),
            "tokens/s",
            cmd,
            note="target ratio >= 0.97",
        )
    ]


# --- 2. routing overhead ----------------------------------------------------------------------


def round_trips(sock: zmq.Socket, verb: bytes, body: bytes, n: int) -> list[float]:
    times = []
    for i in range(n):
        rid = str(i).encode()
        started = time.perf_counter()
        sock.send_multipart([C.VERSION, verb, rid, body])
        while True:
            frames = sock.recv_multipart()
            if frames[1] in C.TERMINAL_KINDS and frames[2] == rid:
                break
        times.append((time.perf_counter() - started) * 1e6)
    return times


def pipelined_rate(sock: zmq.Socket, verb: bytes, body: bytes, n: int) -> float:
    started = time.perf_counter()
    window = 64
    sent = done = 0
    while done < n:
        while sent < n and sent - done < window:
            sock.send_multipart([C.VERSION, verb, str(sent).encode(), body])
            sent += 1
        frames = sock.recv_multipart()
        if frames[1] in C.TERMINAL_KINDS:
            done += 1
    return n / (time.perf_counter() - started)


def routing_overhead(quick: bool) -> list[dict]:
    n = 500 if quick else 3000
    bare = bare_broker_round_trips(n)
    with Instance("--workers", "1", "--cores-per-worker", "1") as inst:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(inst.status()["endpoint"])
        round_trips(sock, C.PING, b"{}", 50)  # warm up
        ping = round_trips(sock, C.PING, b"{}", n)
        tok = round_trips(sock, C.TOKENIZE, orjson.dumps({"text": "Hello world"}), n // 2)
        rate = pipelined_rate(sock, C.PING, b"{}", n * 4)
        sock.close()
    cmd = "python perf/run.py --only routing"
    return [
        row(
            "ping round trip p50 vs bare pyzmq broker",
            pct(ping, 50),
            bare["ping_p50_us"],
            "us",
            cmd,
            better="lower",
            note="target ratio <= 1.3",
        ),
        row(
            "ping round trip p99 vs bare pyzmq broker",
            pct(ping, 99),
            bare["ping_p99_us"],
            "us",
            cmd,
            better="lower",
        ),
        row(
            "tokenize round trip p50 (through a worker) vs bare broker -> worker echo",
            pct(tok, 50),
            bare["echo_p50_us"],
            "us",
            cmd,
            better="lower",
        ),
        row("pipelined pings/s vs bare broker", rate, bare["pipelined_per_s"], "req/s", cmd),
    ]


# --- 3. overload ------------------------------------------------------------------------------


def overload(quick: bool) -> list[dict]:
    duration = 6 if quick else 20
    with Instance("--workers", "2", "--cores-per-worker", "1", "--queue-size", "8") as inst:
        proc = psutil.Process(inst.pid)
        peak = proc.memory_info().rss
        # Capacity: measure it first with a closed loop of 2 clients.
        cap = loadgen(
            inst, "--mode", "closed", "--clients", "2", "--requests", "3", "--max-tokens", "24"
        )
        capacity = cap["requests_per_s"]
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.wait(0.1):
                peak = max(peak, proc.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        over = loadgen(
            inst,
            "--mode",
            "open",
            "--rate",
            f"{4 * capacity:.2f}",
            "--duration",
            str(duration),
            "--max-tokens",
            "24",
            "--clients",
            "8",
        )
        stop.set()
        sampler.join()
    cmd = "python perf/run.py --only overload"
    rejected = over["errors"].get(C.E_OVERLOADED, 0)
    return [
        row(
            f"overload 4x capacity ({4 * capacity:.1f} req/s): time to reject p99",
            over["reject_ms"]["p99"] or 0.0,
            None,
            "ms",
            cmd,
            better="lower",
            note=f"{rejected} of {over['sent']} rejected, {over['completed']} completed",
        ),
        row(
            "overload: accepted-request latency p99 vs unloaded p99",
            over["latency_ms"]["p99"],
            cap["latency_ms"]["p99"],
            "ms",
            cmd,
            better="lower",
            note="bounded by queue size x service time",
        ),
        row("overload: supervisor peak RSS", peak / (1 << 20), None, "MiB", cmd, better="lower"),
    ]


def loadgen(inst: Instance, *args: str) -> dict:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "loadgen.py"),
            "--state-dir",
            inst.dir,
            "--json",
            "--quiet",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr)
    return orjson.loads(run.stdout)


# --- 4. recovery ------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def recovery(quick: bool) -> list[dict]:
    rounds = 2 if quick else 5
    kills, hangs = [], []
    env = {faults.ENV: faults.ENABLE_VALUE}
    # A 1 s crash window: each kill, 1.1 s after the last, is a first crash (0.5 s backoff),
    # and our own kills never add up to a crash loop.
    with Instance(
        "--workers",
        "1",
        "--cores-per-worker",
        "1",
        "--stall-timeout",
        "2",
        "--crash-loop",
        "1000",
        "1",
        env=env,
    ) as inst:
        for _ in range(rounds):
            before = inst.status()["workers"][0]["pid"]
            started = time.monotonic()
            os.kill(before, signal.SIGKILL)

            def replaced(before=before):
                w = inst.status()["workers"][0]
                return w["state"] == "ready" and w["pid"] != before

            wait_for(replaced, 60)
            with inst.client() as client:
                client.complete("Hi", max_tokens=1, temperature=0).text()
            kills.append(time.monotonic() - started)
            time.sleep(1.1)  # past the crash backoff window's first step
        for _ in range(max(1, rounds // 2)):
            before = inst.status()["workers"][0]["pid"]
            with inst.client() as client:
                started = time.monotonic()
                client.send(C.COMPLETE, {"prompt": f"{faults.PREFIX}hang", "max_tokens": 2})

                def hang_seen(before=before):
                    return inst.status()["workers"][0]["pid"] != before

                wait_for(hang_seen, 60, 0.02)
                hangs.append(time.monotonic() - started)
                wait_for(lambda: inst.status()["workers"][0]["state"] == "ready", 60)
    cmd = "python perf/run.py --only recovery"
    return [
        row(
            "SIGKILL of a worker -> replacement served a request",
            statistics.median(kills),
            None,
            "s",
            cmd,
            better="lower",
            note="includes model load and the 0.5 s backoff",
        ),
        row(
            "hang -> detected and killed, stall timeout 2 s",
            statistics.median(hangs),
            2.0,
            "s",
            cmd,
            better="lower",
            note="ratio vs the stall timeout itself",
        ),
    ]


# --- 5. memory --------------------------------------------------------------------------------


def pss_of(inst: Instance) -> tuple[float, float]:
    workers = [psutil.Process(w["pid"]) for w in inst.status()["workers"]]
    pss = sum(p.memory_full_info().pss for p in workers)
    return pss / (1 << 20), psutil.Process(inst.pid).memory_info().rss / (1 << 20)


def memory(quick: bool) -> list[dict]:
    with Instance("--workers", "1", "--cores-per-worker", "1") as one:
        with one.client() as c:
            c.complete("Hi", max_tokens=4).text()
        pss1, sup_rss = pss_of(one)
    with Instance("--workers", "2", "--cores-per-worker", "1") as two:
        for _ in range(2):
            with two.client() as c:
                c.complete("Hi", max_tokens=4).text()
        pss2, _ = pss_of(two)
    cmd = "python perf/run.py --only memory"
    return [
        row(
            "total PSS of 2 workers vs 1 worker (weights mmap'd and shared)",
            pss2,
            pss1,
            "MiB",
            cmd,
            better="lower",
            note="2.0 would mean nothing is shared",
        ),
        row("supervisor RSS", sup_rss, None, "MiB", cmd, better="lower"),
    ]


# --- 6. idle cost -----------------------------------------------------------------------------


def idle_cost(quick: bool) -> list[dict]:
    seconds = 10 if quick else 60
    with Instance("--workers", "2", "--cores-per-worker", "1") as inst:
        procs = [psutil.Process(inst.pid)] + [
            psutil.Process(w["pid"]) for w in inst.status()["workers"]
        ]
        time.sleep(2)
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(seconds)
        after = [sum(p.cpu_times()[:2]) for p in procs]
    used = [(a - b) / seconds * 100 for a, b in zip(after, before, strict=True)]
    cmd = "python perf/run.py --only idle"
    return [
        row(f"idle supervisor CPU over {seconds} s", used[0], None, "%", cmd, better="lower"),
        row(
            f"idle workers CPU over {seconds} s (sum)",
            sum(used[1:]),
            None,
            "%",
            cmd,
            better="lower",
        ),
    ]


# --- 7. aggregate throughput against other servers ---------------------------------------------

CLIENTS = (1, 2, 4, 8)


def client_counts(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def throughput(
    quick: bool, layout: str | None = None, clients: tuple[int, ...] = CLIENTS
) -> list[dict]:
    """llmsup against llama-server and llama_cpp.server (perf/servers.py): for each client
    count and metric, one row per other server, llmsup / it as the ratio."""
    requests, max_tokens, repeat = (1, 32, 1) if quick else (2, 64, 3)
    results = compare(clients, requests, max_tokens, layout, repeat=repeat)
    rows = []
    for r in results:
        cmd = f"python perf/run.py --only throughput --clients {r['clients']}"
        cmd += "" if quick else " --full"
        cmd += f" --layout {layout}" if layout else ""
        for key, label, unit, better in METRICS:
            for other in SERVERS[1:]:
                note = ""
                if key == "tokens_per_s":
                    note = (
                        f"each client {requests} request(s) of {max_tokens} tokens; {r['config']}"
                    )
                rows.append(
                    row(
                        f"throughput {r['clients']} clients, llmsup {r['layout']}: "
                        f"{label} vs {other}",
                        r["llmsup"][key],
                        r[other][key],
                        unit,
                        cmd,
                        better=better,
                        note=note,
                    )
                )
    return rows


# --- 8. multi-turn chat against llama-server ----------------------------------------------------


def chat_variants(quick: bool) -> list[tuple[str, int, int]]:
    """(llmsup layout, conversations, turns) of each chat workload: the default layout with
    4 conversations, 2 single-core workers (--full only), more conversations than slots."""
    turns = 4 if quick else 6
    variants = [(chat_bench.DEFAULT_LAYOUT, 4, turns), (chat_bench.DEFAULT_LAYOUT, 16, turns)]
    if not quick:
        variants.insert(1, ("2x1x8", 4, turns))
    return variants


def chat(quick: bool) -> list[dict]:
    """perf/chat.py's workloads: llmsup / llama-server for wall time, TTFT of turns 2+ and a
    new conversation's TTFT once the system prompt is cached."""
    rows = []
    for layout, conversations, turns in chat_variants(quick):
        results = chat_bench.compare(conversations, turns, layout)
        print(
            chat_bench.summary(results, conversations, turns, layout), file=sys.stderr, flush=True
        )
        ours, base = results["llmsup"], results["llama-server"]
        cmd = chat_bench.command(conversations, turns, layout)
        what = f"chat {conversations} conversations x {turns} turns, llmsup {layout}"
        cached = (
            f"cached prompt tokens: llmsup {ours.cached_tokens} of {ours.prompt_tokens}, "
            f"llama-server {base.cached_tokens} of {base.prompt_tokens}"
        )
        rows += [
            row(
                f"{what}: wall time vs llama-server",
                ours.wall_s,
                base.wall_s,
                "s",
                cmd,
                better="lower",
                note=f"target <= 0.8; {cached}",
            ),
            row(
                f"{what}: TTFT median turns 2+ vs llama-server",
                ours.ttft_later_ms,
                base.ttft_later_ms,
                "ms",
                cmd,
                better="lower",
                note="target <= 1.0",
            ),
            row(
                f"{what}: new conversation TTFT, system prompt cached, vs llama-server",
                ours.fresh_ttft_ms,
                base.fresh_ttft_ms,
                "ms",
                cmd,
                better="lower",
                note="target <= 0.5",
            ),
        ]
    return rows


def prefix_cache(quick: bool) -> list[dict]:
    """perf/prefix.py: restoring a cached prefix vs reading it cold, swa_full's cost, and the
    next turn of a chat restored on the other worker vs continued in place."""
    rounds = 3 if quick else 5
    r = prefix_bench.restore_vs_prefill(rounds)
    s = prefix_bench.swa_full_cost()
    w = prefix_bench.cross_vs_same_worker(rounds)
    return [
        row(
            f"prefix cache: restore a {r['prompt_tokens']}-token prefix vs read it cold "
            "(engine alone, 1 thread)",
            r["restore_ms"],
            r["cold_ms"],
            "ms",
            "python perf/prefix.py --only restore",
            better="lower",
            note=f"target <= 0.03; saving it {r['save_ms']:.1f} ms, {r['state_mb']:.1f} MB; "
            f"logits continued from another prompt's prefix vs cold: up to "
            f"{r['logit_diff']:.2f} apart, same greedy token {r['same_token']}",
        ),
        row(
            "prefix cache: state of a 1000-token sequence, swa_full vs llmsup's window cache",
            s["full"]["state_mb"],
            s["window"]["state_mb"],
            "MB",
            "python perf/prefix.py --only swa",
            better="lower",
            note=f"a decode there {s['full']['step_ms']:.1f} vs {s['window']['step_ms']:.1f} ms",
        ),
        row(
            "prefix cache: next-turn TTFT restored on the other worker vs in place (2x1x1)",
            w["cross_ms"],
            w["same_ms"],
            "ms",
            "python perf/prefix.py --only workers",
            better="lower",
            note="target <= 1.3",
        ),
    ]


# --- 10. structured output and tool calls (perf/structured.py) -------------------------------


def structured(quick: bool) -> list[dict]:
    """JSON-schema decoding against unconstrained and against llama-server; a tool call's
    round trip against llama-server --jinja (perf/structured.py). SmolLM2 (a chat template,
    which llama-server --jinja needs for chat); --full adds Gemma 3, the other rows' model.
    Each row: the median of the rounds' paired ratios."""
    rounds, requests = (1, 1) if quick else (3, 3)
    models = [structured_bench.MODEL] + ([] if quick else ["gemma3-270m"])
    rows = []
    for model in models:
        rows += structured_bench.measure(rounds, [1, 4], requests, model)
    for r in rows:
        r["command"] = "python perf/run.py --only structured" + ("" if quick else " --full")
    return rows


# --- 11. Ollama's /api/chat against the OpenAI route (perf/ollama_api.py) -----------------------


def ollama(quick: bool) -> list[dict]:
    """/api/chat tokens/s / /v1/chat/completions', same gateway, model and prompt, streamed;
    1 and 4 clients, the median of the rounds' paired ratios (target >= 0.98)."""
    rounds, requests = (1, 1) if quick else (3, 2)
    rows = ollama_bench.measure(rounds, [1, 4], requests)
    for r in rows:
        r["command"] = "python perf/run.py --only ollama" + ("" if quick else " --full")
    return rows


# --- 12. n completions of one prompt against n requests of it (perf/nseq.py) ----------------------


def nseq(quick: bool) -> list[dict]:
    """n=4 tokens/s / 4 requests of the same prompt sent at once', same gateway; with the
    prefix cache and without; the median of the rounds' paired ratios (target >= 1.3)."""
    rows = nseq_bench.measure(1 if quick else 3)
    for r in rows:
        r["command"] = "python perf/run.py --only nseq" + ("" if quick else " --full")
    return rows


BENCHMARKS = {
    "streaming": streaming_efficiency,
    "routing": routing_overhead,
    "overload": overload,
    "recovery": recovery,
    "memory": memory,
    "idle": idle_cost,
    "throughput": throughput,
    "chat": chat,
    "prefix": prefix_cache,
    "structured": structured,
    "ollama": ollama,
    "nseq": nseq,
}


# --- report -----------------------------------------------------------------------------------


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def table(rows: list[dict], previous: dict[str, dict]) -> str:
    lines = [
        "| benchmark | llmsup | baseline | ratio | unit | previous ratio (or value) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        prev = previous.get(r["name"])
        before = "-"
        if prev:
            before = fmt(prev["ratio"] if prev["ratio"] is not None else prev["llmsup"])
        lines.append(
            f"| {r['name']} | {fmt(r['llmsup'])} | {fmt(r['baseline'])} | "
            f"{fmt(r['ratio'])} | {r['unit']} | {before} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "model": default_model().name,
    }


NOTES_MARK = "<!-- notes: kept across runs -->"


def write_results(m: dict, text: str) -> None:
    """RESULTS.md: this run's table, then the hand-written notes below NOTES_MARK."""
    path = HERE / "RESULTS.md"
    notes = "\n"
    if path.exists() and NOTES_MARK in path.read_text():
        notes = path.read_text().split(NOTES_MARK, 1)[1]
    path.write_text(
        f"# llmsup benchmark results\n\nLatest full run: {m['date']} on {m['cpu']}, "
        f"{m['cores']} cores, Python {m['python']}, model {m['model']}.\n"
        "Reproduce: `python perf/run.py --full` (each row: `--only NAME`). The last column is\n"
        f"the previous run's figure, so a regression shows at a glance.\n\n{text}\n\n"
        f"{NOTES_MARK}{notes}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes (default)")
    mode.add_argument(
        "--full", action="store_true", help="longer runs; a run of them all updates RESULTS.md"
    )
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=None)
    p.add_argument("--layout", help="throughput: llmsup WORKERSxTHREADSxSLOTS [default: its own]")
    p.add_argument(
        "--clients",
        type=client_counts,
        default=CLIENTS,
        help="throughput: concurrent clients [default: 1,2,4,8]",
    )
    args = p.parse_args(argv)
    benchmarks = {
        **BENCHMARKS,
        "throughput": functools.partial(throughput, layout=args.layout, clients=args.clients),
    }
    quick = not args.full
    RESULTS.mkdir(exist_ok=True)
    latest = RESULTS / "latest.json"
    previous = {}
    if latest.exists():
        previous = {r["name"]: r for r in orjson.loads(latest.read_bytes())["rows"]}
    rows = []
    for name in args.only or BENCHMARKS:
        print(f"perf: running {name} ...", file=sys.stderr, flush=True)
        try:
            rows += benchmarks[name](quick)
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            print(f"perf: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append(
                row(
                    f"{name}: FAILED ({type(exc).__name__})",
                    0.0,
                    None,
                    "-",
                    f"python perf/run.py --only {name}",
                )
            )
    report = {"machine": machine(), "mode": "quick" if quick else "full", "rows": rows}
    if latest.exists():
        latest.replace(RESULTS / "previous.json")
    latest.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    text = table(rows, previous)
    print(text)
    # Only a whole full run replaces RESULTS.md's table: a row's command (--only, --clients,
    # --layout) would otherwise leave it with that row alone.
    if args.full and not args.only and args.clients == CLIENTS and args.layout is None:
        write_results(report["machine"], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
