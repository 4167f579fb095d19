#!/usr/bin/env python3
"""`n` completions of one prompt (SPEC.md 3.16) against n separate requests of the same
prompt sent at once, through llmsup's OpenAI gateway, in one run (issue 28: target at
least 1.3 for n = 4).

    python perf/nseq.py                     # 3 rounds
    python perf/nseq.py --rounds 1

Each round sends one POST /v1/completions with n = N, and N requests of n = 1 at once (from
N threads), the same prompt (a few hundred tokens) and max_tokens, sampled at temperature
1 with seeds s, s + 1, ... on both sides and the end-of-generation tokens banned, so both
make N x max_tokens tokens of the same kind; tokens/s is the completion tokens over the
wall time of the request (or of the last of the N). The
sides alternate which goes first each round, with a different seed each round so that no
side meets the other's prompt in the cache; the ratio is the median of the rounds' ratios.
llmsup runs 1 worker x 2 cores x 4 slots, as perf/structured.py's, once with its prefix
cache (the default: N requests of one prompt that arrive together read it once too, the
later ones restore it) and once with --cache-mb 0 (each reads it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from structured import Llmsup, post, table  # noqa: E402
from together import run_together  # noqa: E402

MODEL = "smollm2-135m-instruct"
NO_END = {"0": -100, "2": -100, "4": -100}  # SmolLM2's end-of-generation tokens
PARAGRAPH = (
    "The harbour town woke slowly. Fishing boats came in with the tide, gulls argued over "
    "the nets, and the baker on the corner opened his shutters to the smell of bread. "
)


def prompt(words: int) -> str:
    """A story opening of about `words` words, then the line the completions continue."""
    text = PARAGRAPH * max(1, words // len(PARAGRAPH.split()))
    return text + "\nWhat happened next that morning was"


def complete(port: int, body: dict) -> int:
    """POST /v1/completions; the completion tokens of its answer (all choices)."""
    data = post(port, body, "/v1/completions")
    assert len(data["choices"]) == body.get("n", 1)
    return data["usage"]["completion_tokens"]


def tokens_per_s(port: int, text: str, n: int, together: bool, seed: int, max_tokens: int) -> float:
    """One request of n completions (`together`), or n requests of one sent at once."""
    base = {
        "model": MODEL,
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "logit_bias": NO_END,  # every completion makes max_tokens: the sides' work is equal
    }
    counts: list[int] = []
    bodies = (
        [{**base, "n": n, "seed": seed}]
        if together
        else [{**base, "seed": seed + i} for i in range(n)]
    )
    elapsed = run_together([lambda b=b: counts.append(complete(port, b)) for b in bodies])
    return sum(counts) / elapsed


def measure(rounds: int, n: int = 4, words: int = 300, max_tokens: int = 32) -> list[dict]:
    """A row with the prefix cache (llmsup's default) and one without it."""
    return [measure_one(rounds, n, words, max_tokens, cache) for cache in (True, False)]


def measure_one(rounds: int, n: int, words: int, max_tokens: int, cache: bool) -> dict:
    text = prompt(words)
    seen: dict[str, list[float]] = {"n": [], "separate": []}
    with Llmsup(MODEL, *(() if cache else ("--cache-mb", "0"))) as ours:
        for together in (True, False):  # the weights' pages, the gateway's connections
            tokens_per_s(ours.port, f"Warm up {together}. {text}", n, together, 1, 8)
        for r in range(rounds):
            order = ["n", "separate"] if r % 2 == 0 else ["separate", "n"]
            for side in order:
                # A seed of its own per side and round, and a prompt no earlier request
                # began with: it is read afresh on either side, as a new prompt is (the N
                # separate requests share it: the prefix cache reads it once for them too).
                seed = 1000 * r + (0 if side == "n" else 500)
                fresh = f"Take {r}-{side}. {text}"
                figure = tokens_per_s(ours.port, fresh, n, side == "n", seed, max_tokens)
                seen[side].append(figure)
            shown = ", ".join(f"{k} {v[-1]:.1f}" for k, v in seen.items())
            label = "cache" if cache else "no cache"
            print(f"nseq {label} round {r + 1}: {shown} tok/s", file=sys.stderr, flush=True)
    ratios = sorted(a / b for a, b in zip(seen["n"], seen["separate"], strict=True))
    return {
        "name": f"n={n} tokens/s vs {n} requests at once, {MODEL}, ~{words}-word prompt, "
        f"{max_tokens} tokens each" + ("" if cache else ", --cache-mb 0"),
        "llmsup": statistics.median(seen["n"]),
        "baseline": statistics.median(seen["separate"]),
        "ratio": statistics.median(ratios),
        "unit": "tokens/s",
        "better": "higher",
        "command": f"python perf/nseq.py --rounds {rounds}",
        "note": f"target >= 1.3; median of {rounds} paired round(s), "
        f"range {ratios[0]:.2f}-{ratios[-1]:.2f}"
        + (
            "; the prefix cache reads the separate requests' shared prompt once too"
            if cache
            else "; each separate request reads the prompt"
        ),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--words", type=int, default=300, help="about how long the prompt is")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    rows = measure(args.rounds, args.n, args.words, args.max_tokens)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
