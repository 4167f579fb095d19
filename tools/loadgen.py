#!/usr/bin/env python3
"""Load generator for llmsup: open loop (Poisson arrivals) or closed loop (N clients).

    python tools/loadgen.py --mode closed --clients 4 --requests 8 --max-tokens 32
    python tools/loadgen.py --mode open --rate 5 --duration 20 --json

Reports throughput (requests/s, tokens/s), time to first token and end-to-end latency
percentiles, rejections by code; progress on stderr once a second; --json prints the
summary as JSON on stdout. One thread, one poll loop over all client sockets, so the
generator itself never limits the offered load it claims.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from dataclasses import dataclass, field

import orjson
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol.client import endpoint_from_state_dir


@dataclass
class Sent:
    client: int
    at: float
    first_token: float | None = None
    ended: float | None = None
    kind: bytes | None = None
    body: dict = field(default_factory=dict)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def prompt_of(words: int, n: int) -> str:
    # Distinct per request so no cache could make repeats look faster than they are.
    base = "the quick brown fox jumps over the lazy dog and runs far away".split()
    return f"Request {n}: " + " ".join(base[i % len(base)] for i in range(words))


class LoadGen:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        endpoint = args.endpoint or endpoint_from_state_dir(args.state_dir)
        self.ctx = zmq.Context.instance()
        self.socks = []
        for _ in range(args.clients):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self.socks.append(sock)
        self.poller = zmq.Poller()
        for sock in self.socks:
            self.poller.register(sock, zmq.POLLIN)
        self.sent: dict[bytes, Sent] = {}
        self.ids = itertools.count()
        self.rng = random.Random(args.seed)
        self.started = time.monotonic()

    def send(self, client: int) -> None:
        n = next(self.ids)
        rid = f"lg-{n}".encode()
        body = {
            "prompt": prompt_of(self.args.prompt_words, n),
            "max_tokens": self.args.max_tokens,
            "temperature": 0.0,
            "top_k": 1,
        }
        if self.args.timeout_ms:
            body["timeout_ms"] = self.args.timeout_ms
        self.socks[client].send_multipart([C.VERSION, C.COMPLETE, rid, orjson.dumps(body)])
        self.sent[rid] = Sent(client, time.monotonic())

    def outstanding(self, client: int | None = None) -> int:
        return sum(1 for s in self.sent.values() if s.ended is None and client in (None, s.client))

    def receive(self, timeout_ms: int) -> list[int]:
        """Handle replies; returns the clients whose request just ended."""
        ended = []
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    _, kind, rid, raw = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                s = self.sent.get(rid)
                if s is None or s.ended is not None:
                    continue
                now = time.monotonic()
                if kind == C.TOKEN and s.first_token is None:
                    s.first_token = now
                elif kind in C.TERMINAL_KINDS:
                    s.ended, s.kind, s.body = now, kind, orjson.loads(raw)
                    ended.append(s.client)
        return ended

    def run(self) -> dict:
        args = self.args
        deadline = self.started + args.duration if args.duration else None
        total = args.requests * (args.clients if args.mode == "closed" else 1)
        next_arrival = self.started
        last_progress = self.started
        if args.mode == "closed":
            for client in range(args.clients):
                self.send(client)
        while True:
            now = time.monotonic()
            sending = (deadline is None or now < deadline) and len(self.sent) < total
            if not sending and not self.outstanding():
                break
            if not sending and now > (deadline or now) + args.drain:
                break
            if args.mode == "open" and sending and now >= next_arrival:
                self.send(len(self.sent) % args.clients)
                next_arrival += self.rng.expovariate(args.rate)
                continue
            wait = 0.2 if args.mode == "closed" or not sending else next_arrival - now
            for client in self.receive(max(0, int(wait * 1000))):
                still = (deadline is None or time.monotonic() < deadline) and len(self.sent) < total
                if args.mode == "closed" and still:
                    self.send(client)
            if not args.quiet and now - last_progress >= 1:
                last_progress = now
                done = sum(1 for s in self.sent.values() if s.ended)
                print(
                    f"loadgen: {now - self.started:5.1f}s sent {len(self.sent)} ended {done} "
                    f"outstanding {self.outstanding()}",
                    file=sys.stderr,
                    flush=True,
                )
        for sock in self.socks:
            sock.close()
        return self.summary(time.monotonic() - self.started)

    def summary(self, elapsed: float) -> dict:
        done = [s for s in self.sent.values() if s.kind == C.DONE]
        errors: dict[str, int] = {}
        reject_ms = []
        for s in self.sent.values():
            if s.kind == C.ERROR:
                errors[s.body.get("code", "?")] = errors.get(s.body.get("code", "?"), 0) + 1
                if s.body.get("code") == C.E_OVERLOADED:
                    reject_ms.append((s.ended - s.at) * 1000)
        tokens = sum(s.body["usage"]["completion_tokens"] for s in done)
        ttft = [(s.first_token - s.at) * 1000 for s in done if s.first_token]
        e2e = [(s.ended - s.at) * 1000 for s in done]

        def pcts(values):
            return {f"p{p}": percentile(values, p) for p in (50, 90, 99)}

        return {
            "mode": self.args.mode,
            "clients": self.args.clients,
            "rate": self.args.rate if self.args.mode == "open" else None,
            "elapsed_s": round(elapsed, 3),
            "sent": len(self.sent),
            "completed": len(done),
            "errors": errors,
            "no_reply": sum(1 for s in self.sent.values() if s.ended is None),
            "requests_per_s": round(len(done) / elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 2),
            "completion_tokens": tokens,
            "ttft_ms": pcts(ttft),
            "latency_ms": pcts(e2e),
            "reject_ms": pcts(reject_ms),
        }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", help="connect here [default: the state dir's supervisor]")
    p.add_argument("--state-dir", help="find the supervisor here")
    p.add_argument("--mode", choices=("open", "closed"), default="closed")
    p.add_argument("--clients", type=int, default=1, help="client sockets (closed: concurrency)")
    p.add_argument("--rate", type=float, default=1.0, help="open loop: requests/s (Poisson)")
    p.add_argument(
        "--requests",
        type=int,
        default=10,
        help="closed: per client; open: in all (with no --duration)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds of sending")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to wait for replies")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout-ms", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.mode == "open" and args.duration:
        args.requests = 10**9
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = LoadGen(args).run()
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
