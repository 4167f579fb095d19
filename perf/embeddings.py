#!/usr/bin/env python3
"""Embeddings per second: llmsup's POST /v1/embeddings against llama.cpp's llama-server
`--embeddings` on the same model, pooling (mean: the catalog's models name none), cores and
slots, in one run (issue 28: target at least 1.0 at 1 and 8 concurrent clients).

    python perf/embeddings.py                     # 3 rounds, 1 and 8 clients
    python perf/embeddings.py --rounds 1 --requests 2

Each client sends --requests requests of BATCH short texts back to back; embeddings/s is
all texts embedded over the wall time. The sides alternate which goes first each round;
the ratio is the median of the rounds' ratios. Both normalize (L2) and return floats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from servers import HttpServer, llama_server_binary  # noqa: E402
from structured import CTX, SLOTS, THREADS, Llmsup, post, table  # noqa: E402
from together import run_together  # noqa: E402

from llmsup.supervisor.models.fetch import fetch  # noqa: E402

MODEL = "smollm2-135m-instruct"
BATCH = 8
SENTENCES = [
    "The cat sat on the mat and watched the rain.",
    "Stock markets fell sharply after the announcement.",
    "A recipe for bread needs flour, water, salt and time.",
    "The train to Lyon leaves at nine from platform four.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "She tuned the violin before the evening concert.",
    "Rust prevents data races at compile time.",
    "The glacier has retreated two kilometres since 1950.",
]


class LlamaServer(HttpServer):
    name = "llama-server"

    def __init__(self, binary: str, model: str):
        super().__init__(
            [binary, "-m", str(fetch(model)), "-t", str(THREADS), "-tb", str(THREADS)]
            + ["-np", str(SLOTS), "-c", str(SLOTS * CTX), "--embeddings", "--pooling", "mean"]
        )


def embed(port: int, texts: list[str], model: str) -> int:
    body = {"input": texts, "model": model, "encoding_format": "float"}
    return len(post(port, body, "/v1/embeddings")["data"])


def embeddings_per_s(port: int, clients: int, requests: int, model: str) -> float:
    done: list[int] = []

    def client(c: int) -> None:
        for r in range(requests):
            texts = [f"{s} ({c}.{r})" for s in SENTENCES[:BATCH]]  # not all identical
            done.append(embed(port, texts, model))

    elapsed = run_together([lambda c=c: client(c) for c in range(clients)])
    return sum(done) / elapsed


def measure(rounds: int, clients: list[int], requests: int, model: str) -> list[dict]:
    seen: dict[tuple, list[float]] = {}
    with Llmsup(model) as ours, LlamaServer(llama_server_binary(), model) as theirs:
        sides = {"llmsup": ours.port, "llama-server": theirs.port}
        for port in sides.values():  # warm up: the embedding context, the weights' pages
            embeddings_per_s(port, 1, 1, model)
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                for c in clients:
                    figure = embeddings_per_s(sides[name], c, requests, model)
                    seen.setdefault((name, c), []).append(figure)
            shown = ", ".join(f"{k[0]} {k[1]}c {v[-1]:.1f}" for k, v in seen.items())
            print(f"embeddings round {r + 1}: {shown}", file=sys.stderr, flush=True)
    command = f"python perf/embeddings.py --rounds {rounds} --requests {requests}"
    rows = []
    for c in clients:
        ours_all, theirs_all = seen[("llmsup", c)], seen[("llama-server", c)]
        ratios = sorted(a / b for a, b in zip(ours_all, theirs_all, strict=True))
        rows.append(
            {
                "name": f"embeddings/s {model}, {c} client(s) x {BATCH} texts",
                "llmsup": statistics.median(ours_all),
                "baseline": statistics.median(theirs_all),
                "ratio": statistics.median(ratios),
                "unit": "embeddings/s",
                "better": "higher",
                "command": command,
                "note": f"vs llama-server --embeddings --pooling mean; target >= 1.0; "
                f"median of {rounds} paired round(s), range {ratios[0]:.2f}-{ratios[-1]:.2f}",
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=4, help="per client per round")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--model", default=MODEL)
    args = p.parse_args()
    rows = measure(
        args.rounds, [int(c) for c in args.clients.split(",")], args.requests, args.model
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
