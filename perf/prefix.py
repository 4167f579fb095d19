#!/usr/bin/env python3
"""The prefix cache's own costs, each against its baseline in the same run.

    .venv/bin/python perf/prefix.py                # all
    .venv/bin/python perf/prefix.py --only restore
    .venv/bin/python perf/prefix.py --only swa
    .venv/bin/python perf/prefix.py --only workers --rounds 5

restore: the engine alone, in this process, 1 thread: reading a ~600-token chat prefix cold
(prefill until the first token) against restoring its saved state from the shared-memory
arena into another sequence (lookup, llama_state_seq_set_data_ext in place, cut back), and
what saving it cost. Target: restore at most 3% of the cold read.

swa: why a long sliding-window state is continued only at its end (one restored and cut
back, against a cold read of the same tokens), and what llama.cpp's swa_full would cost
(whole-context caches in the sliding-window layers, so that any saved state could be cut
back anywhere): the state of a 1000-token sequence and a decode at its end, against the
window-sized cache llmsup keeps.

exact: the whole stack, 1 worker x 1 core x 1 slot, with the cache against without it
(--cache-mb 0) on the same chats: whether each next turn, which continues from the cells of
the previous reply (decoded one token at a time, where a cold read computes them in a prompt
chunk), gives the same greedy text; and the worker's prompt_ms of each new conversation that
found the system prompt cached.

workers: the whole stack, 2 workers x 1 core x 1 slot: time to first token of a chat's next
turn continued in place on the worker that served the turn before (nothing to restore),
against the same on the other worker, which restores the state the first one saved. A
request that shares the conversation's start keeps the first worker busy in the
cross-worker case (routing prefers the worker that holds a prefix); an unrelated one keeps
the other busy in the same-worker case, so both run with one busy neighbour. Target: the
cross-worker TTFT within 1.3x of the same-worker one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chat import LlmsupServer, gemma_prompt  # noqa: E402

from llmsup.protocol.arena import Arena  # noqa: E402
from llmsup.protocol.messages import Complete, Sampling  # noqa: E402
from llmsup.supervisor.models.fetch import default_model  # noqa: E402

SYSTEM = (
    "You are the quartermaster of a merchant ship. Keep every answer short and exact, "
    "count what is in the hold before you promise it, and say so when you do not know. "
) * 18  # about 600 tokens with the turn markers


def chat_prompt(message: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The next turn of a chat in Gemma 3's turn format (chat.gemma_prompt), our system prompt."""
    users = [user for user, _ in history]
    return gemma_prompt([*users, message], [reply for _, reply in history], SYSTEM)


def work(prompt: str, max_tokens: int = 1) -> Complete:
    return Complete(prompt, Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=1))


def restore_vs_prefill(rounds: int) -> dict:
    from llmsup.worker.engine import Engine

    arena = Arena.create(f"llmsup-perf-{os.getpid()}-{uuid.uuid4().hex[:6]}", 256)
    try:
        eng = Engine(str(default_model()), threads=1, n_ctx=2048, slots=2, arena=arena)
        cache, prompt = eng.cache, chat_prompt("How many barrels of water are left?")
        cold, restore, save = [], [], []
        diff, same_token = split_read(eng, arena)
        for _ in range(rounds):
            eng.cache = None  # read cold, nothing saved on the way
            started = time.perf_counter()
            gen = eng.start(work(prompt))
            while not eng.step():
                pass
            cold.append((time.perf_counter() - started) * 1000)
            eng.cache = cache
            started = time.perf_counter()
            assert cache.save(gen.seq, gen.kv_tokens()[: len(gen.prompt)])
            save.append((time.perf_counter() - started) * 1000)
            gen.close()  # its cells are emptied: only the arena has the prefix now
            # The next turn: the prompt again and more (a sliding-window state continues
            # only at its end, so not the same prompt alone).
            more = eng.tokenize("<end_of_turn>\n<start_of_turn>user\nAnd the food?", False)
            started = time.perf_counter()
            seq, n_past, _ = cache.place(numpy.asarray(gen.prompt + more, numpy.int32), [1])
            restore.append((time.perf_counter() - started) * 1000)
            assert seq == 1 and n_past == len(gen.prompt), (seq, n_past)
            state_mb = arena.stats()["bytes_used"] / (1 << 20)
            cache.forget(1)
            arena.clear()  # empty again for the next round
        eng.cache = None
        eng.close()
    finally:
        arena.close()
    return {
        "prompt_tokens": len(gen.prompt),
        "cold_ms": min(cold),
        "restore_ms": min(restore),
        "save_ms": min(save),
        "state_mb": state_mb,
        "logit_diff": diff,
        "same_token": same_token,
    }


def split_read(eng, arena: Arena) -> tuple[float, bool]:
    """A prompt read cold against the same prompt continued from the system prompt that
    two others left in the cache (the second saves a state where they diverge): the largest
    difference of the logits of the next token, and whether the greedy token is the same."""
    cache = eng.cache
    others = [chat_prompt("How many barrels of water are left?"), chat_prompt("Any rum?")]
    logits = []
    for cached in (False, True):
        eng.cache = cache if cached else None
        for other in others if cached else ():
            gen = eng.start(work(other))
            while not eng.step():
                pass
            gen.close()
        gen = eng.start(work(chat_prompt("Is the cheese dry?")))
        assert gen.cached_tokens > (500 if cached else -1)
        while not eng.step():
            pass
        logits.append(eng.llama.logits(-1).copy())
        gen.close()
    eng.cache = cache
    arena.clear()
    cold, hit = logits
    return float(numpy.abs(cold - hit).max()), bool(cold.argmax() == hit.argmax())


def cut_back_error(saved: int = 920, cut: int = 676, more: int = 30) -> float:
    """Why a sliding-window state is continued only at its end: a `saved`-token state,
    restored and cut back to `cut` tokens, then `more` tokens decoded, against the same
    tokens read cold: the largest difference of the next logits."""
    import ctypes

    from llmsup.worker.engine import Engine

    eng = Engine(str(default_model()), threads=2, n_ctx=2048, slots=2)
    llama_cpp, ctx = eng.llama.lib, eng.llama.ctx
    toks = [100 + (i * 7) % 900 for i in range(saved)]

    def read(seq: int, start: int, end: int) -> numpy.ndarray:
        for p in range(start, end, 64):
            rows = [
                (toks[i], i, seq, i == min(end, p + 64) - 1) for i in range(p, min(end, p + 64))
            ]
            assert eng.llama.decode_rows(rows) == 0
        return eng.llama.logits(-1).copy()

    read(0, 0, saved)
    size = llama_cpp.llama_state_seq_get_size_ext(ctx, 0, 0)
    state = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data_ext(ctx, state, size, 0, 0) == size
    assert llama_cpp.llama_state_seq_set_data_ext(ctx, state, size, 1, 0) == size
    eng.llama.cut(1, cut)
    restored = read(1, cut, cut + more)
    eng.llama.clear(0)
    cold = read(0, 0, cut + more)
    eng.close()
    return float(numpy.abs(restored - cold).max())


def swa_full_cost(tokens: int = 1000) -> dict:
    """What `swa_full` (whole-context sliding-window caches, so any state can be cut back
    anywhere) would cost: the state of a `tokens`-long sequence and a decode there, 1 slot
    of 2048 tokens, 2 threads, llmsup's other settings."""
    import llama_cpp
    from llama_cpp._internals import LlamaContext, LlamaModel

    model_params = llama_cpp.llama_model_default_params()
    model = LlamaModel(path_model=str(default_model()), params=model_params, verbose=False)
    out = {}
    for full in (False, True):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = 2048, 1, False
        params.n_batch = params.n_ubatch = 256
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.swa_full = full
        ctx = LlamaContext(model=model, params=params, verbose=False)
        batch = llama_cpp.llama_batch_init(256, 0, 1)

        def decode(start: int, n: int, batch=batch, ctx=ctx) -> None:
            for j in range(n):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = (
                    100 + (start + j) % 500,
                    start + j,
                    1,
                )
                batch.seq_id[j][0], batch.logits[j] = 0, j == n - 1
            batch.n_tokens = n
            assert llama_cpp.llama_decode(ctx.ctx, batch) == 0

        for start in range(0, tokens, 256):
            decode(start, min(256, tokens - start))
        started = time.perf_counter()
        for i in range(20):
            decode(tokens + i, 1)
        step_ms = (time.perf_counter() - started) * 1000 / 20
        size = llama_cpp.llama_state_seq_get_size_ext(ctx.ctx, 0, 0)
        out["full" if full else "window"] = {"state_mb": size / (1 << 20), "step_ms": step_ms}
        llama_cpp.llama_batch_free(batch)
        ctx.close()
    model.close()
    return out


def ttft(client, prompt: str) -> tuple[float, dict]:
    started = time.monotonic()
    stream = client.complete(prompt, max_tokens=8, temperature=0)
    first = None
    for text in stream:
        if text and first is None:
            first = time.monotonic() - started
    return first or (time.monotonic() - started), stream.done["usage"]


def cross_vs_same_worker(rounds: int) -> dict:
    same, cross, cached = [], [], []
    with LlmsupServer("2x1x1", ["--cache-mb", "256"]) as inst:
        with client_of(inst) as client:
            client.complete("warm up", max_tokens=2).text()
        for r in range(rounds):
            for where, times in (("same", same), ("cross", cross)):
                question = f"Voyage {where} {r}: how many barrels of water are left?"
                with client_of(inst) as client:
                    reply = client.complete(
                        chat_prompt(question), max_tokens=16, temperature=0
                    ).text()
                history = [(question, reply)]
                # The neighbour: shares the conversation's start (goes to the worker that
                # holds it) or not (goes to the other one); it runs while the turn is read.
                busy = (
                    chat_prompt("Count the sails.", history)
                    if where == "cross"
                    else ("Write a long song about the sea. " * 4)
                )
                neighbour = threading.Thread(target=lambda p=busy: run_one(inst, p, 200))
                neighbour.start()
                time.sleep(0.5)
                with client_of(inst) as client:
                    seconds, usage = ttft(client, chat_prompt("And the food?", history))
                neighbour.join()
                times.append(seconds * 1000)
                cached.append((where, usage["cached_tokens"], usage["prompt_tokens"]))
        with client_of(inst) as client:
            hits = client.status()["cache"]
    return {
        "same_ms": statistics.median(same),
        "cross_ms": statistics.median(cross),
        "same_all": same,
        "cross_all": cross,
        "cached": cached,
        "cache": hits,
    }


def next_turns_hit_vs_cold(rounds: int) -> dict:
    same, cached, prompt_ms = 0, [], []
    with (
        LlmsupServer("1x1x1", ["--cache-mb", "0"]) as cold,
        LlmsupServer("1x1x1", ["--cache-mb", "256"]) as warm,
    ):
        for r in range(rounds):
            question = f"Voyage {r}: how many barrels of water are left?"
            with client_of(warm) as client:
                stream = client.complete(chat_prompt(question), max_tokens=32, temperature=0)
                reply = stream.text()
            if r:  # the system prompt was cached by the turns before
                prompt_ms.append(stream.done["timings"]["prompt_ms"])
            texts = []
            for inst in (cold, warm):
                with client_of(inst) as client:
                    stream = client.complete(
                        chat_prompt("And the food?", [(question, reply)]),
                        max_tokens=32,
                        temperature=0,
                    )
                    texts.append(stream.text())
            cached.append(stream.done["usage"]["cached_tokens"])
            same += texts[0] == texts[1]
    return {"same": same, "rounds": rounds, "cached": cached, "prompt_ms": prompt_ms}


def client_of(inst):
    from llmsup.protocol.client import Client

    return Client(state_dir=inst.state_dir, timeout=300)


def run_one(inst, prompt: str, max_tokens: int) -> None:
    with client_of(inst) as client:
        client.complete(prompt, max_tokens=max_tokens, temperature=0).text()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("restore", "swa", "exact", "workers"))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.only in (None, "restore"):
        r = restore_vs_prefill(args.rounds)
        print(
            f"restore a {r['prompt_tokens']}-token prefix: {r['restore_ms']:.2f} ms; read it "
            f"cold: {r['cold_ms']:.0f} ms; ratio {r['restore_ms'] / r['cold_ms']:.4f} "
            f"(target <= 0.03); saving it: {r['save_ms']:.2f} ms, {r['state_mb']:.1f} MB; "
            f"continued from another prompt's prefix vs read cold: logits differ by up to "
            f"{r['logit_diff']:.3f}, same greedy token: {r['same_token']}"
        )
    if args.only in (None, "swa"):
        r = swa_full_cost()
        print(
            f"1000-token sequence, swa_full vs window: state {r['full']['state_mb']:.1f} vs "
            f"{r['window']['state_mb']:.1f} MB, a decode there {r['full']['step_ms']:.1f} vs "
            f"{r['window']['step_ms']:.1f} ms"
        )
        print(
            f"a 920-token state restored and cut back to 676 tokens: next logits up to "
            f"{cut_back_error():.2f} from a cold read"
        )
    if args.only in (None, "exact"):
        r = next_turns_hit_vs_cold(args.rounds)
        print(
            f"next turns, cache vs none: {r['same']} of {r['rounds']} greedy texts equal "
            f"(cached tokens {r['cached']}); new conversations' prompt_ms with the system "
            f"prompt cached: {[round(ms) for ms in r['prompt_ms']]}"
        )
    if args.only in (None, "workers"):
        r = cross_vs_same_worker(args.rounds)
        print(
            f"next-turn TTFT, restored on the other worker: {r['cross_ms']:.0f} ms (each: "
            f"{[round(x) for x in r['cross_all']]}); in place on the same: {r['same_ms']:.0f} "
            f"ms ({[round(x) for x in r['same_all']]}); ratio {r['cross_ms'] / r['same_ms']:.2f}"
            f" (target <= 1.3); cached/prompt tokens {r['cached']}"
        )


if __name__ == "__main__":
    main()
