#!/usr/bin/env python3
"""Structured output and tool calls: llmsup under a JSON schema against itself unconstrained,
and against llama.cpp's llama-server (`--jinja`) with the same schema and the same tool, in
one run, through the same OpenAI HTTP route and the same client code.

    python perf/structured.py                  # 3 rounds, 1 and 4 clients
    python perf/structured.py --rounds 5 --clients 1,4

Both servers run SmolLM2-135M-Instruct (a chat template, which llama-server's --jinja
needs) on the same 2 threads with 4 sequences of 2048 tokens: llmsup 1 worker x 2 cores x
4 slots, llama-server -t 2 -np 4 -c 8192. Both stay up; each round runs llmsup's side and
then the baseline's (the order alternates between rounds). Each row is the median of the
rounds' paired ratios, with their range: the machines here are shared, and a whole round
moves with their load (by 20 % and more in the 2026-12-05 runs). Rows:

  schema/free   llmsup tokens/s under a JSON schema / the same requests unconstrained
                (1 client; target >= 0.9)
  schema vs ls  llmsup tokens/s under the schema / llama-server's under the same schema
                (response_format json_schema) at each client count (target >= 1.0)
  tool call     latency of a chat with one tool and tool_choice required, request to
                parsed call, llmsup / llama-server (target <= 1.0). llama-server --jinja
                ignores `tools` with SmolLM2's template (it renders no tools: a text
                answer, even with tool_choice required); it is then asked for the same call
                by hand: llmsup's generic-format system message and the call's JSON schema
                as response_format, the same prompt and constraint llmsup uses.

Tokens/s is every completion token of C clients, each sending --requests greedy requests
back to back, over the wall time. The outputs are cut by max_tokens (a schema of a long
list, a prompt asking for one), so both sides generate the same number of tokens.
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
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

from servers import HttpServer, llama_server_binary  # noqa: E402
from testkit import free_port  # noqa: E402

from llmsup.protocol import codec  # noqa: E402
from llmsup.protocol import constants as C  # noqa: E402
from llmsup.supervisor.models.fetch import fetch  # noqa: E402
from llmsup.worker import tools  # noqa: E402

MODEL = "smollm2-135m-instruct"  # --model sets another catalog model for the whole run
THREADS, SLOTS, CTX = 2, 4, 2048
MAX_TOKENS = 160
ASK = [
    {
        "role": "user",
        "content": "List forty famous novels with their authors, one string per novel.",
    }
]
SCHEMA = {
    "type": "object",
    "properties": {
        "novels": {
            "type": "array",
            "items": {"type": "string", "maxLength": 80},
            "maxItems": 60,
        }
    },
    "required": ["novels"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TOOL_ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def post(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
        return data
    finally:
        conn.close()


def generation(schema: bool) -> dict:
    body = {"model": MODEL, "messages": ASK, "max_tokens": MAX_TOKENS, "temperature": 0}
    if schema:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "novels", "schema": SCHEMA, "strict": True},
        }
    return body


def tokens_per_s(port: int, body: dict, clients: int, requests: int) -> float:
    """Completion tokens of `clients` threads x `requests` requests over the wall time."""
    counts: list[int] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(requests):
                counts.append(post(port, body)["usage"]["completion_tokens"])
        except BaseException as exc:  # collected: the caller raises it
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def tool_body() -> dict:
    return {
        "model": MODEL,
        "messages": TOOL_ASK,
        "tools": [TOOL],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 100,
    }


def by_hand_body() -> dict:
    """The same call asked for without `tools`: the system message and the JSON schema
    llmsup makes of the tool (worker/tools.py, llama.cpp's generic format), sent as
    response_format. For a server that ignores `tools` with this model's template."""
    chat = codec.parse_body(C.CHAT, tool_body())
    (system, *rest) = tools.prompt_messages(chat)
    schema = tools.output_schema(chat, None)
    return {
        "model": MODEL,
        "messages": [{"role": m.role, "content": m.content} for m in (system, *rest)],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "call", "schema": schema, "strict": True},
        },
        "temperature": 0,
        "max_tokens": 100,
    }


def call_of(reply: dict) -> dict | None:
    """The tool call in an answer: OpenAI's tool_calls, or the by-hand JSON's."""
    message = reply["choices"][0]["message"]
    if message.get("tool_calls"):
        function = message["tool_calls"][0]["function"]
        return {"name": function["name"], "arguments": json.loads(function["arguments"])}
    try:
        return json.loads(message.get("content") or "").get("tool_call")
    except (ValueError, AttributeError):
        return None


def tool_call_ms(port: int, body: dict, requests: int) -> float:
    """Median latency of a chat that must call the tool, request to parsed call."""
    times = []
    for _ in range(requests):
        started = time.monotonic()
        reply = post(port, body)
        if not call_of(reply):
            raise RuntimeError(f"no tool call in the answer: {reply['choices'][0]}")
        times.append((time.monotonic() - started) * 1000)
    return sorted(times)[len(times) // 2]


class Llmsup:
    """llmsup with its HTTP gateway: 1 worker x THREADS cores x SLOTS slots."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="llmsup-perf", dir="/tmp")
        self.port = free_port()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", self.dir]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    def __enter__(self) -> Llmsup:
        started = self.cli(
            "start",
            "--model",
            MODEL,
            "--workers",
            "1",
            "--cores-per-worker",
            str(THREADS),
            "--slots-per-worker",
            str(SLOTS),
            "--ctx-size",
            str(CTX),
            "--http",
            f"127.0.0.1:{self.port}",
        )
        if started.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(started.stderr)
        return self

    def __exit__(self, *exc) -> None:
        self.cli("stop", "--timeout", "10")
        shutil.rmtree(self.dir, ignore_errors=True)


class LlamaServer(HttpServer):
    name = "llama-server"

    def __init__(self, binary: str):
        super().__init__(
            [
                binary,
                "-m",
                str(fetch(MODEL)),
                "-t",
                str(THREADS),
                "-tb",
                str(THREADS),
                "-np",
                str(SLOTS),
                "-c",
                str(SLOTS * CTX),
                "--jinja",
            ]
        )


def measure(rounds: int, clients: list[int], requests: int) -> list[dict]:
    binary = llama_server_binary()
    seen: dict[tuple, list[float]] = {}  # every round's figure, by (side, what)

    def keep(key: tuple, value: float) -> None:
        seen.setdefault(key, []).append(value)

    with Llmsup() as ours, LlamaServer(binary) as theirs:
        sides = {"llmsup": ours.port, "llama-server": theirs.port}
        # llama-server --jinja answers `tools` with a call only where the model's template
        # renders tools; SmolLM2's does not, and it then ignores them (a text answer, even
        # with tool_choice required). Then it gets the same call asked for by hand.
        calls = {"llmsup": tool_body(), "llama-server": tool_body()}
        native = call_of(post(theirs.port, tool_body())) is not None
        if not native:
            calls["llama-server"] = by_hand_body()
        for name, port in sides.items():  # warm up: page the weights in, convert schemas
            post(port, {**generation(True), "max_tokens": 8})
            tool_call_ms(port, calls[name], 1)
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                port = sides[name]
                keep((name, "free"), tokens_per_s(port, generation(False), 1, requests))
                for c in clients:
                    keep((name, c), tokens_per_s(port, generation(True), c, requests))
                keep((name, "tool"), tool_call_ms(port, calls[name], requests + 2))
            figures = ", ".join(f"{k[0]} {k[1]} {v[-1]:.1f}" for k, v in seen.items())
            print(f"round {r + 1}: {figures}", flush=True)
    cmd = f"python perf/structured.py --rounds {rounds} --requests {requests}"
    pairs = [
        (
            "JSON schema / unconstrained, llmsup, 1 client",
            ("llmsup", 1),
            ("llmsup", "free"),
            "tok/s",
            "higher",
            ">= 0.9",
        ),
        (
            "unconstrained vs llama-server, 1 client (reference)",
            ("llmsup", "free"),
            ("llama-server", "free"),
            "tok/s",
            "higher",
            "-",
        ),
        *(
            (
                f"JSON schema vs llama-server, {c} client(s)",
                ("llmsup", c),
                ("llama-server", c),
                "tok/s",
                "higher",
                ">= 1.0",
            )
            for c in clients
        ),
        (
            "tool call round trip vs llama-server --jinja"
            + ("" if native else " (asked by hand: it ignores tools with this model's template)"),
            ("llmsup", "tool"),
            ("llama-server", "tool"),
            "ms",
            "lower",
            "<= 1.0",
        ),
    ]
    rows = []
    for name, ours_key, base_key, unit, better, target in pairs:
        # Each round's two figures were measured back to back: their ratio is paired, and
        # the median of those ratios is the row's (the machine's load moves whole rounds).
        ratios = sorted(o / b for o, b in zip(seen[ours_key], seen[base_key], strict=True))
        rows.append(
            {
                "name": name,
                "llmsup": statistics.median(seen[ours_key]),
                "baseline": statistics.median(seen[base_key]),
                "ratio": statistics.median(ratios),
                "unit": unit,
                "better": better,
                "target": target,
                "command": cmd,
                "note": f"target {target}; median of {rounds} paired rounds, "
                f"range {ratios[0]:.2f}-{ratios[-1]:.2f}",
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3, help="per client per round")
    p.add_argument("--clients", default="1,4", help="client counts, comma-separated")
    p.add_argument("--model", default=MODEL, help="a catalog model (both sides serve it)")
    args = p.parse_args()
    globals()["MODEL"] = args.model
    rows = measure(args.rounds, [int(c) for c in args.clients.split(",")], args.requests)
    print(f"\n{'row':<72} {'llmsup':>8} {'baseline':>8} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['name']:<72} {row['llmsup']:>8.1f} {row['baseline']:>8.1f} "
            f"{row['ratio']:>6.2f}  {row['unit']}, {row['better']} is better; {row['note']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
