#!/usr/bin/env python3
"""The worker's engine alone, in this process: the figures docs/architecture.md "Step plan",
"Continuous batching" and "Worker layout" quote for it.

    .venv/bin/python perf/engine.py                 # 2 threads, 8 slots (the default layout)
    .venv/bin/python perf/engine.py --threads 1

Prints: the step costs the engine measured at start (ms per decode of 1..slots tokens); one
decode of N five-token prompts apart vs together, and how far the logits of a 6-token prompt
read beside another move from its logits alone; 4 prompts of 4, 16 and 31 tokens read after
600 tokens of context each, apart vs together, and when the first of them is read apart (why
only short prompts share a decode: Engine._prompt_decodes); one token for each of 4
sequences in one decode, on sequences 0-3 vs 0, 5, 6, 7 (llama.cpp splits a batch where the
ids are not consecutive: PrefixCache.place); a greedy token from llama_sampler_sample vs
the argmax the engine uses; and tokens/s stepping 1, 2, 4, 8 sequences of the same greedy
request (2 requests each, best of 2), the ceiling llmsup's stack is measured against.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmsup.protocol.messages import Complete, Sampling  # noqa: E402
from llmsup.supervisor.models.fetch import default_model  # noqa: E402
from llmsup.worker.engine import Engine  # noqa: E402

PROMPT = "Once upon a time"  # 5 tokens with BOS, as perf/servers.py sends


def work(max_tokens: int) -> Complete:
    return Complete(PROMPT, Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=1))


def best_ms(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


def clear(eng: Engine) -> None:
    for seq in range(eng.slots):
        eng.llama.clear(seq)


def read_prompts(eng: Engine, prompts: list[list[int]], together: bool) -> list[numpy.ndarray]:
    """Decode each prompt into its own sequence, apart or in one batch; each one's logits."""
    rows = [
        [(t, j, seq, j == len(p) - 1) for j, t in enumerate(p)] for seq, p in enumerate(prompts)
    ]
    batches = [[r for part in rows for r in part]] if together else rows
    logits = []
    for batch in batches:
        assert eng.llama.decode_rows(batch) == 0
        ends = [i for i, r in enumerate(batch) if r[3]]
        logits += [logits_at(eng, i).copy() for i in ends]
    clear(eng)
    return logits


def after_context(
    eng: Engine, seqs: list[int], lengths: list[int], together: bool, context: int = 600
) -> list[float]:
    """Give each of `seqs` `context` tokens, then read a prompt of lengths[i] tokens into
    each, apart or in one decode: the ms each decode took (apart: one per prompt)."""
    clear(eng)
    for seq in seqs:
        for start in range(0, context, 200):
            n = min(200, context - start)
            assert (
                eng.llama.decode_rows(
                    [(100 + j % 50, start + j, seq, j == n - 1) for j in range(n)]
                )
                == 0
            )
    rows = [
        [(200 + j, context + j, seq, j == n - 1) for j in range(n)]
        for seq, n in zip(seqs, lengths, strict=True)
    ]
    batches = [[r for part in rows for r in part]] if together else rows
    times = []
    for batch in batches:
        started = time.perf_counter()
        assert eng.llama.decode_rows(batch) == 0
        times.append((time.perf_counter() - started) * 1000)
    clear(eng)
    return times


def one_token_each_ms(eng: Engine, seqs: list[int], rounds: int = 3) -> float:
    """One decode of a token for each of `seqs` (each holding 8 tokens), best of `rounds`."""
    clear(eng)
    for seq in seqs:
        assert eng.llama.decode_rows([(100 + j, j, seq, j == 7) for j in range(8)]) == 0
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        assert eng.llama.decode_rows([(300, 8, seq, True) for seq in seqs]) == 0
        times.append((time.perf_counter() - started) * 1000)
        for seq in seqs:
            eng.llama.cut(seq, 8)
    clear(eng)
    return min(times)


def logits_at(eng: Engine, index: int) -> numpy.ndarray:
    return eng.llama.logits(index)


def stepping(eng: Engine, n: int, max_tokens: int) -> float:
    """Tokens/s of n sequences of the same greedy request, 2 requests each."""
    tokens, started = 0, time.perf_counter()
    for _ in range(2):
        for _ in range(n):
            eng.start(work(max_tokens))
        while eng.running:
            for gen, step in eng.step():
                if step.finish_reason is not None:
                    tokens += gen.usage()["usage"]["completion_tokens"]
                    gen.close()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    os.sched_setaffinity(0, list(range(args.threads)))
    eng = Engine(str(default_model()), threads=args.threads, n_ctx=2048, slots=args.slots)
    print(f"{args.threads} thread(s), {args.slots} slots, model {default_model().name}")
    print(
        "step costs, ms per decode of 1..slots tokens:",
        " ".join(f"{ms:.1f}" for ms in eng.step_ms[1:]),
    )

    prompt = eng.tokenize(PROMPT)
    for n in (2, 4, 8):
        if n <= args.slots:
            apart = best_ms(lambda n=n: read_prompts(eng, [prompt] * n, together=False))
            together = best_ms(lambda n=n: read_prompts(eng, [prompt] * n, together=True))
            print(
                f"{n} prompts of {len(prompt)} tokens: {apart:.1f} ms apart, "
                f"{together:.1f} ms in one decode"
            )
    six = eng.tokenize("The three primary colors are")
    alone = read_prompts(eng, [six], together=False)[0]
    beside = read_prompts(eng, [six, six], together=True)[0]
    print(
        f"a {len(six)}-token prompt read beside another: logits differ from alone by up to "
        f"{float(abs(alone - beside).max()):.2f}"
    )

    if args.slots >= 4:
        for n in (4, 16, 31):
            apart = min(
                (after_context(eng, [0, 1, 2, 3], [n] * 4, False) for _ in range(2)), key=sum
            )
            together = min(sum(after_context(eng, [0, 1, 2, 3], [n] * 4, True)) for _ in range(2))
            print(
                f"4 prompts of {n} tokens after 600 of context: {together:.0f} ms in one "
                f"decode, {sum(apart):.0f} ms apart, the first read after {apart[0]:.0f} ms"
            )
    if args.slots >= 8:
        print(
            f"one token each for 4 sequences: 0-3 {one_token_each_ms(eng, [0, 1, 2, 3]):.1f} "
            f"ms, 0,5,6,7 {one_token_each_ms(eng, [0, 5, 6, 7]):.1f} ms"
        )

    rows = [(t, j, 0, j == len(prompt) - 1) for j, t in enumerate(prompt)]
    assert eng.llama.decode_rows(rows) == 0
    last = len(prompt) - 1
    lc = eng.llama.lib  # llama.cpp's greedy sampler, as the engine used it before
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    calls = 200
    sampled = best_ms(lambda: [eng.llama.sample(chain, last) for _ in range(calls)]) / calls
    argmax = best_ms(lambda: [eng.llama.sample(None, last) for _ in range(calls)]) / calls
    eng.llama.free_sampler(chain)
    clear(eng)
    print(
        f"one token: llama_sampler_sample {sampled:.3f} ms, argmax over the logits {argmax:.3f} ms"
    )

    for n in (1, 2, 4, 8):
        if n <= args.slots:
            tps = max(stepping(eng, n, args.max_tokens) for _ in range(2))
            print(f"{n} sequence(s): {tps:.1f} tok/s")
    eng.close()


if __name__ == "__main__":
    main()
