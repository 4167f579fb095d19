"""Decode a few tokens in this process: proves the llama.cpp build runs on this CPU."""

import sys
import time

from llmsup.protocol.messages import Complete, Sampling
from llmsup.worker.engine import Engine


def main(model: str) -> None:
    engine = Engine(model, threads=1, n_ctx=256)
    work = Complete(
        "The capital of France is", Sampling(max_tokens=8, temperature=0.0, top_p=1.0, top_k=1)
    )
    started = time.monotonic()
    gen = engine.start(work)
    text, finished = "", False
    while not finished:
        for _, step in engine.step():
            text += step.text
            finished = step.finish_reason is not None
    gen.close()
    elapsed = time.monotonic() - started
    print(f"llama.cpp decode ok: {len(gen.tokens)} tokens in {elapsed:.2f}s: {text!r}")


if __name__ == "__main__":
    main(sys.argv[1])
