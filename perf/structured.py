#!/usr/bin/env python3
"""Structured output and tool calls: llmsup under a JSON schema against itself unconstrained,
and against llama.cpp's llama-server (`--jinja`) with the same schema and the same tool, in
one run, through the same OpenAI HTTP route and the same client code.

    python perf/structured.py                  # 3 rounds, 1 and 4 clients, SmolLM2
    python perf/structured.py --rounds 5 --clients 1,4
    python perf/structured.py --model smollm2-135m-instruct,gemma3-270m   # both, in turn

Both servers run the model (SmolLM2-135M-Instruct by default: a chat template, which
llama-server's --jinja needs; Gemma 3 270M, the perf model of the other benchmarks, has
none in its GGUF) on the same 2 threads with 4 sequences of 2048 tokens: llmsup 1 worker x
2 cores x 4 slots, llama-server -t 2 -tb 2 -np 4 -c 8192, as perf/servers.py sizes it
(threads = llmsup's cores, parallel slots = its sequences, the same context in all). Both
stay up; each round runs llmsup's side and then the baseline's (the order alternates
between rounds). Each row is the median of the rounds' paired ratios, with their range:
the machines here are shared, and a whole round moves with their load (by 20 % and more in
the 2026-12-05 runs). Rows, per model:

  schema/free   llmsup tokens/s under a JSON schema / the same requests unconstrained
                (1 client; target >= 0.9)
  free vs ls    llmsup tokens/s unconstrained / llama-server's, 1 client (reference: tells
                the grammar's cost from the rest)
  schema vs ls  llmsup tokens/s under the schema / llama-server's under the same schema
                (response_format json_schema) at each client count (target >= 1.0)
  tool call     latency of a chat with one tool and tool_choice required, request to
                parsed call, llmsup / llama-server (target <= 1.0). llama-server --jinja
                ignores `tools` where the model's template renders none (SmolLM2's; Gemma's
                fallback, ChatML): a text answer, even with tool_choice required. It is
                then asked for the same call by hand: llmsup's generic-format system
                message and the call's JSON schema as response_format, the same prompt and
                constraint llmsup uses; the row's name says which.

Tokens/s is every completion token (from usage) of C clients, each sending --requests
greedy requests back to back, over the wall time. The outputs are cut by max_tokens (a
schema of a long list, a prompt asking for one), so both sides generate the same number of
tokens; each row's note gives the completion tokens a request took on each side.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

from servers import HttpServer, llama_server_binary  # noqa: E402
from testkit import free_port  # noqa: E402
from together import run_together  # noqa: E402

from llmsup.protocol import codec  # noqa: E402
from llmsup.protocol import constants as C  # noqa: E402
from llmsup.supervisor.models.fetch import fetch  # noqa: E402
from llmsup.worker import tools  # noqa: E402

MODEL = "smollm2-135m-instruct"
THREADS, SLOTS, CTX = 2, 4, 2048
MAX_TOKENS = 160
TOOL_MAX_TOKENS = 100
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


def post(port: int, body: dict, path: str = "/v1/chat/completions") -> dict:
    """POST a JSON body to a local server; its JSON answer (RuntimeError unless 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
        return data
    finally:
        conn.close()


def get(port: int, path: str) -> dict | None:
    """A GET's JSON body, None unless 200 (llmsup's gateway has no /props)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    finally:
        conn.close()


def generation(model: str, schema: bool) -> dict:
    body = {"model": model, "messages": ASK, "max_tokens": MAX_TOKENS, "temperature": 0}
    if schema:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "novels", "schema": SCHEMA, "strict": True},
        }
    return body


def tokens_per_s(port: int, body: dict, clients: int, requests: int) -> tuple[float, list]:
    """Completion tokens of `clients` threads x `requests` requests over the wall time, and
    each request's usage."""
    usages: list[dict] = []

    def client() -> None:
        for _ in range(requests):
            usages.append(post(port, body)["usage"])

    elapsed = run_together([client] * clients)
    return sum(u["completion_tokens"] for u in usages) / elapsed, usages


def tool_body(model: str) -> dict:
    return {
        "model": model,
        "messages": TOOL_ASK,
        "tools": [TOOL],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": TOOL_MAX_TOKENS,
    }


def by_hand_body(model: str) -> dict:
    """The same call asked for without `tools`: the system message and the JSON schema
    llmsup makes of the tool (worker/tools.py, llama.cpp's generic format), sent as
    response_format. For a server that ignores `tools` with this model's template."""
    chat = codec.parse_body(C.CHAT, tool_body(model))
    (system, *rest) = tools.prompt_messages(chat)
    schema = tools.output_schema(chat, None)
    return {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in (system, *rest)],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "call", "schema": schema, "strict": True},
        },
        "temperature": 0,
        "max_tokens": TOOL_MAX_TOKENS,
    }


def native_call(reply: dict) -> dict | None:
    """The first of OpenAI's tool_calls in an answer, its arguments parsed; None if none."""
    calls = reply["choices"][0]["message"].get("tool_calls")
    if not calls:
        return None
    function = calls[0]["function"]
    return {"name": function["name"], "arguments": json.loads(function["arguments"])}


def call_of(reply: dict, native: bool) -> dict | None:
    """The tool call in an answer: OpenAI's tool_calls (native), or the by-hand JSON's."""
    if native:
        return native_call(reply)
    try:
        call = json.loads(reply["choices"][0]["message"].get("content") or "").get("tool_call")
    except (ValueError, AttributeError):
        return None
    return call if isinstance(call, dict) and call.get("name") == TOOL["function"]["name"] else None


def tool_call_ms(port: int, body: dict, requests: int) -> tuple[float, list]:
    """Median latency of a chat that must call the tool, request to parsed call, and each
    answer's usage. An answer without the call is an error."""
    times, usages = [], []
    native = "tools" in body
    for _ in range(requests):
        started = time.monotonic()
        reply = post(port, body)
        if not call_of(reply, native):
            raise RuntimeError(f"no tool call in the answer: {reply['choices'][0]}")
        times.append((time.monotonic() - started) * 1000)
        usages.append(reply["usage"])
    return sorted(times)[len(times) // 2], usages


class Llmsup:
    """llmsup with its HTTP gateway: 1 worker x THREADS cores x SLOTS slots."""

    def __init__(self, model: str, *extra: str):
        self.model = model
        self.extra = extra  # more `llmsup start` arguments (perf/nseq.py: --cache-mb 0)
        self.dir = tempfile.mkdtemp(prefix="llmsup-perf", dir="/tmp")
        self.port = free_port()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", self.dir]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    def __enter__(self) -> Llmsup:
        started = self.cli(
            "start",
            "--model",
            self.model,
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
            *self.extra,
        )
        if started.returncode != 0:
            self.cli("stop", "--timeout", "10")  # whatever a half-done start left running
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(started.stderr)
        return self

    def __exit__(self, *exc) -> None:
        self.cli("stop", "--timeout", "10")
        shutil.rmtree(self.dir, ignore_errors=True)


class LlamaServer(HttpServer):
    name = "llama-server"

    def __init__(self, binary: str, model: str):
        super().__init__(
            [
                binary,
                "-m",
                str(fetch(model)),
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


def command(rounds: int, clients: list[int], requests: int, model: str) -> str:
    cmd = f"python perf/structured.py --rounds {rounds} --requests {requests}"
    cmd += f" --clients {','.join(map(str, clients))}"
    return cmd + ("" if model == MODEL else f" --model {model}")


def measure(rounds: int, clients: list[int], requests: int, model: str = MODEL) -> list[dict]:
    """The rows of one model (see the module's docstring)."""
    binary = llama_server_binary()
    seen: dict[tuple, list[float]] = {}  # every round's figure, by (side, what)
    used: dict[tuple, list[dict]] = {}  # every request's usage, likewise
    schema_clients = sorted({1, *clients})  # 1 client: the schema/free row's too

    def keep(key: tuple, figure: tuple[float, list]) -> None:
        seen.setdefault(key, []).append(figure[0])
        used.setdefault(key, []).extend(figure[1])

    with Llmsup(model) as ours, LlamaServer(binary, model) as theirs:
        sides = {"llmsup": ours.port, "llama-server": theirs.port}
        # llama-server --jinja answers `tools` with a call only where the model's template
        # renders tools; SmolLM2's does not, and it then ignores them (a text answer, even
        # with tool_choice required). Then it gets the same call asked for by hand.
        calls = {"llmsup": tool_body(model), "llama-server": tool_body(model)}
        probe = post(theirs.port, tool_body(model))
        native = native_call(probe) is not None
        caps = (get(theirs.port, "/props") or {}).get("chat_template_caps", {})
        if not native:
            calls["llama-server"] = by_hand_body(model)
            answer = (probe["choices"][0]["message"].get("content") or "")[:60]
            print(
                f"structured: llama-server --jinja answered tools with text, no tool call "
                f"(/props supports_tools {caps.get('supports_tools')}): {answer!r}...; "
                "asking it by hand",
                file=sys.stderr,
                flush=True,
            )
        for name, port in sides.items():  # warm up: page the weights in, convert schemas
            post(port, {**generation(model, True), "max_tokens": 8})
            tool_call_ms(port, calls[name], 1)
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                port = sides[name]
                keep((name, "free"), tokens_per_s(port, generation(model, False), 1, requests))
                for c in schema_clients:
                    keep((name, c), tokens_per_s(port, generation(model, True), c, requests))
                keep((name, "tool"), tool_call_ms(port, calls[name], requests + 2))
            figures = ", ".join(f"{k[0]} {k[1]} {v[-1]:.1f}" for k, v in seen.items())
            print(f"structured {model} round {r + 1}: {figures}", file=sys.stderr, flush=True)
    cmd = command(rounds, clients, requests, model)
    how = (
        "native tool_calls"
        if native
        else "asked by hand: it ignores tools with this model's template, "
        + f"/props supports_tools {caps.get('supports_tools')}"
    )
    pairs = [
        (
            "JSON schema / unconstrained, llmsup, 1 client",
            ("llmsup", 1),
            ("llmsup", "free"),
            "tokens/s",
            "higher",
            ">= 0.9",
        ),
        (
            "unconstrained vs llama-server, 1 client (reference)",
            ("llmsup", "free"),
            ("llama-server", "free"),
            "tokens/s",
            "higher",
            "-",
        ),
        *(
            (
                f"JSON schema vs llama-server, {c} client(s)",
                ("llmsup", c),
                ("llama-server", c),
                "tokens/s",
                "higher",
                ">= 1.0",
            )
            for c in clients
        ),
        (
            f"tool call round trip vs llama-server --jinja ({how})",
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
        # The work of a request on each side: equal, unless the templates or the outputs
        # differ (Gemma's tool call: llama-server falls back to ChatML, and spaces its JSON).
        tokens = "; prompt/completion tokens a request, figure vs baseline: " + " vs ".join(
            "/".join(
                f"{statistics.mean(u[kind] for u in used[key]):.0f}"
                for kind in ("prompt_tokens", "completion_tokens")
            )
            for key in (ours_key, base_key)
        )
        rows.append(
            {
                "name": f"structured {model}: {name}",
                "llmsup": statistics.median(seen[ours_key]),
                "baseline": statistics.median(seen[base_key]),
                "ratio": statistics.median(ratios),
                "unit": unit,
                "better": better,
                "target": target,
                "command": cmd,
                "note": f"target {target}; median of {rounds} paired round(s), "
                f"range {ratios[0]:.2f}-{ratios[-1]:.2f}{tokens}",
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """perf/run.py's table, with each row's command and note."""
    lines = [
        "| benchmark | llmsup | baseline | ratio | unit | command | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['llmsup']:.1f} | {r['baseline']:.1f} | {r['ratio']:.2f} | "
            f"{r['unit']}, {r['better']} is better | `{r['command']}` | {r['note']} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3, help="per client per round")
    p.add_argument("--clients", default="1,4", help="client counts, comma-separated")
    p.add_argument(
        "--model", default=MODEL, help="catalog models, comma-separated (both sides serve each)"
    )
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for model in args.model.split(","):
        rows += measure(args.rounds, clients, args.requests, model)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
