"""Continuous batching: one worker decoding several sequences at once in one llama.cpp context.

Through a real supervisor with 1 worker x 3 slots on the default model, and (for cancel) the
engine in this process on the same model.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from llmsup.protocol.messages import Complete, Sampling
from llmsup.supervisor.models.fetch import default_model
from llmsup.worker.engine import BATCHED_PROMPTS_FROM, SHARED_DECODE_BELOW, Engine, plan_groups
from tests.conftest import Instance, wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}
SLOTS = 3
# "Once upon a time" has near-ties early on: a difference in its logits shows in its text.
PROMPTS = ["Once upon a time", "In 1492, Columbus", "The best way to learn"]


@pytest.fixture(scope="module")
def batching():
    inst = Instance(
        "--workers",
        "1",
        "--cores-per-worker",
        "2",
        "--slots-per-worker",
        str(SLOTS),
        "--ctx-size",
        "2048",
    )
    result = inst.start()
    assert result.returncode == 0, result.stderr
    yield inst
    # The long-prompt test leaves its background stream running: fail it at once (status 3).
    stopped = inst.stop("--timeout", "2")
    assert stopped.returncode in (0, 3), stopped.stderr
    shutil.rmtree(inst.state_dir, ignore_errors=True)


def run_concurrently(inst: Instance, jobs: list[tuple[str, int]]) -> list[dict]:
    """Each (prompt, max_tokens) from its own client thread, all released at once; returns
    per job its text, done body and the monotonic time of each token frame. A client thread's
    exception is raised here."""
    barrier = threading.Barrier(len(jobs), timeout=60)  # broken, not stuck, if one fails

    def one(prompt: str, max_tokens: int) -> dict:
        with inst.client(timeout=120) as client:
            barrier.wait()
            stream = client.complete(prompt, max_tokens=max_tokens, **GREEDY)
            times, pieces = [], []
            for piece in stream:
                times.append(time.monotonic())
                pieces.append(piece)
            return {"text": "".join(pieces), "done": stream.done, "times": times}

    pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="batching-client")
    try:
        futures = [pool.submit(one, *job) for job in jobs]
        finished, running = wait(futures, timeout=180)
        for future in futures:
            if future in finished:
                future.result()  # re-raises a client thread's failure
        assert not running, f"{len(running)} client threads still running after 180s"
        results = [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert all(r["done"] for r in results), "every stream ended with its done frame"
    return results


def worker_status(inst: Instance) -> dict:
    return inst.status()["workers"][0]


def test_ready_reports_slots_and_context_per_slot(batching):
    w = worker_status(batching)
    assert w["slots"] == SLOTS
    assert w["free_slots"] == SLOTS


def test_greedy_output_is_the_same_alone_and_batched(batching):
    with batching.client() as client:
        alone = [client.complete(p, max_tokens=24, **GREEDY).text() for p in PROMPTS]
    together = run_concurrently(batching, [(p, 24) for p in PROMPTS])
    # They really ran side by side: each one's tokens arrived while the others streamed.
    spans = [(r["times"][0], r["times"][-1]) for r in together]
    assert max(s for s, _ in spans) < min(e for _, e in spans)
    assert [r["text"] for r in together] == alone
    assert all(r["done"]["usage"]["completion_tokens"] == 24 for r in together)


def test_all_slots_used_under_load_and_freed_after(batching):
    seen: list[tuple[int, int]] = []  # (free slots, queue depth)
    jobs = [(p, 48) for p in PROMPTS] + [("The capital of France is", 8)]

    def watch() -> bool:
        status = batching.status()
        seen.append((status["workers"][0]["free_slots"], status["queue"]["depth"]))
        return seen[-1] == (0, 1)  # every slot busy and the fourth request waiting

    # The load runs in a thread; its outcome (or its exception) comes back through the future.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batching-load")
    try:
        load = pool.submit(run_concurrently, batching, jobs)
        full = wait_until(watch, timeout=30, interval=0.02)
        results = load.result(timeout=200)  # re-raises a failed or incomplete client
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert full, f"never saw all {SLOTS} slots busy with one request queued: {seen[-5:]}"
    assert len(results) == len(jobs)
    assert all(
        1 <= r["done"]["usage"]["completion_tokens"] <= n
        for r, (_, n) in zip(results, jobs, strict=True)
    ), results
    freed = wait_until(lambda: worker_status(batching)["free_slots"] == SLOTS, timeout=10)
    assert freed, worker_status(batching)
    assert batching.status()["queue"]["depth"] == 0


def test_long_prompt_is_read_in_chunks_between_tokens_of_running_streams(batching):
    with batching.client() as client:
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 150
        n_prompt = len(client.tokenize(long_prompt))
    assert 1400 < n_prompt < 2000  # about 7 chunks of 256 tokens
    marks: dict[str, float] = {}
    running: dict = {}

    seen_enough = threading.Event()

    def stream_short() -> None:
        # Long enough to outlast the prefill on a slow machine; left running when done.
        with batching.client(timeout=120) as client:
            stream = client.complete("Once upon a time", max_tokens=1500, **GREEDY)
            running["times"] = times = []
            for _ in stream:
                times.append(time.monotonic())
                if seen_enough.is_set():
                    return

    runner = threading.Thread(target=stream_short, daemon=True)
    runner.start()
    assert wait_until(lambda: len(running.get("times", ())) >= 5, timeout=30)
    with batching.client(timeout=120) as client:
        marks["sent"] = time.monotonic()
        stream = client.complete(long_prompt, max_tokens=2, **GREEDY)
        for _ in stream:
            marks.setdefault("first", time.monotonic())
        marks.setdefault("first", time.monotonic())
        done = stream.done
    time.sleep(0.5)  # a token or two after the prefill, then the stream may go
    seen_enough.set()
    runner.join(30)
    assert done["usage"]["prompt_tokens"] == n_prompt
    during = [t for t in running["times"] if marks["sent"] <= t <= marks["first"]]
    prefill_s = marks["first"] - marks["sent"]
    # Interleaving: the running stream kept getting tokens while the long prompt was read,
    # about one per chunk; read in one go it would have got none.
    assert len(during) >= 3, f"{len(during)} tokens during a {prefill_s:.2f}s prefill"
    ticks = [marks["sent"], *during, marks["first"]]
    longest_gap = max(b - a for a, b in zip(ticks, ticks[1:], strict=False))
    assert longest_gap < prefill_s / 2, (longest_gap, prefill_s)


@pytest.fixture(scope="module")
def engine():
    eng = Engine(str(default_model()), threads=1, n_ctx=512, slots=2, prefill_chunk=64)
    yield eng
    eng.close()


def body(prompt: str, max_tokens: int) -> Complete:
    return Complete(prompt, Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=1))


def run_alone(eng: Engine, prompt: str, max_tokens: int) -> str:
    gen = eng.start(body(prompt, max_tokens))
    text, finished = "", False
    while not finished:
        for g, step in eng.step():
            assert g is gen
            text += step.text
            finished = step.finish_reason is not None
    gen.close()
    return text


def run_to_the_end(eng: Engine, gens: list, texts: dict | None = None) -> list[str]:
    """Step until every sequence is done; the text of each of gens (after `texts`)."""
    texts = texts or {id(g): "" for g in gens}
    while eng.running:
        for g, step in eng.step():
            texts[id(g)] += step.text
            if step.finish_reason is not None:
                g.close()
    return [texts[id(g)] for g in gens]


def test_cancel_frees_the_sequence_and_its_kv_cells(engine):
    reference = run_alone(engine, "The three primary colors are", 16)
    assert engine.free_seqs == [0, 1] or sorted(engine.free_seqs) == [0, 1]
    # One sequence mid-generation, another mid-prompt (a 200-token prompt, 64 per step).
    generating = engine.start(body("Once upon a time", 64))
    reading = engine.start(body("Tell me a story. " * 40, 8))
    for _ in range(3):
        engine.step()
    assert generating.tokens and reading.prefilling
    seqs = (generating.seq, reading.seq)
    assert all(engine.kv_tokens(s) > 0 for s in seqs)
    assert engine.free_seqs == []
    engine.release(generating)
    engine.release(reading)
    assert sorted(engine.free_seqs) == [0, 1] and not engine.running
    assert all(engine.kv_tokens(s) == 0 for s in seqs)
    engine.release(generating)  # a second cancel is harmless
    # The freed sequences (same ids, same KV streams) serve the next requests unchanged.
    assert run_alone(engine, "The three primary colors are", 16) == reference


def test_worker_loop_cancel_is_one_call(engine):
    """WorkerLoop.release(job_id) drops a running job: slot and KV cells free, nothing sent."""
    import zmq

    from llmsup.protocol import codec
    from llmsup.protocol import constants as C
    from llmsup.worker.loop import WorkerLoop

    reference = run_alone(engine, "The three primary colors are", 12)
    ctx = zmq.Context.instance()
    ours, theirs = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    theirs.bind("inproc://loop-cancel")
    ours.connect("inproc://loop-cancel")
    try:
        loop = WorkerLoop(ours, engine, slots=2)
        loop.start_job(b"\0\0\0\0\0\0\0\1job-1", body("Once upon a time", 64))
        for _ in range(4):
            loop.step()
        seq = loop.running[b"\0\0\0\0\0\0\0\1job-1"].seq
        streamed = theirs.poll(1000) and theirs.recv_multipart()
        assert streamed[:2] == [C.W_TOKEN, b"\0\0\0\0\0\0\0\1job-1"]
        gen = loop.release(b"\0\0\0\0\0\0\0\1job-1")
        assert gen is not None and gen.tokens and not loop.running
        assert sorted(engine.free_seqs) == [0, 1] and engine.kv_tokens(seq) == 0
        assert loop.release(b"\0\0\0\0\0\0\0\1job-1") is None
        while theirs.poll(0):
            assert theirs.recv_multipart()[0] == C.W_TOKEN  # only tokens from before
        loop.start_job(b"\0\0\0\0\0\0\0\1job-2", body("The three primary colors are", 12))
        messages = []  # (kind, job id, body): a step's come in one message
        while loop.running:
            loop.step()
        while theirs.poll(100):
            frames = theirs.recv_multipart()
            messages += [tuple(frames[i : i + 3]) for i in range(0, len(frames), 3)]
        text = "".join(codec.loads(m[2])["text"] for m in messages if m[0] == C.W_TOKEN)
        assert messages[-1][:2] == (C.W_DONE, b"\0\0\0\0\0\0\0\1job-2")
        assert text == reference
    finally:
        ours.close(0)
        theirs.close(0)


def test_worker_loop_gathers_jobs_that_arrive_together(engine):
    """A job that finds the worker idle waits for the ones right behind it, so the first
    step reads all their prompts; with nothing behind it, the wait is short."""
    import zmq

    from llmsup.protocol import workerwire
    from llmsup.worker.loop import WorkerLoop

    ctx = zmq.Context.instance()
    ours, theirs = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    theirs.bind("inproc://loop-gather")
    ours.connect("inproc://loop-gather")

    def send_job(job: bytes, prompt: str) -> None:
        theirs.send_multipart(workerwire.job_order(job, body(prompt, 4)))

    try:
        loop = WorkerLoop(ours, engine, slots=2)
        send_job(b"\0\0\0\0\0\0\0\1job-1", "Once upon a time")
        assert ours.poll(1000)
        loop.handle_messages()
        assert set(loop.running) == {b"\0\0\0\0\0\0\0\1job-1"}
        send_job(b"\0\0\0\0\0\0\0\1job-2", "In 1492, Columbus")  # right behind the first
        loop.gather_burst()
        assert set(loop.running) == {b"\0\0\0\0\0\0\0\1job-1", b"\0\0\0\0\0\0\0\1job-2"}
        loop.step()
        assert all(gen.tokens for gen in loop.running.values())  # both read in one step
        while loop.running:
            loop.step()
        send_job(b"\0\0\0\0\0\0\0\1job-3", "Once upon a time")  # alone: gathering gives up soon
        assert ours.poll(1000)
        loop.handle_messages()
        started = time.monotonic()
        loop.gather_burst()
        assert time.monotonic() - started < 0.5 and set(loop.running) == {b"\0\0\0\0\0\0\0\1job-3"}
        while loop.running:
            loop.step()
    finally:
        ours.close(0)
        theirs.close(0)


def test_step_plan_takes_the_cheapest_grouping():
    # Measured on our machines, 1 thread (ms per decode of k tokens): 2-7 tokens in one
    # batch cost more than decoding them one by one, 8 cost less.
    one_thread = [0.0, 13.5, 46, 57, 67, 100, 111, 121, 84]
    plans = plan_groups(one_thread)
    assert plans[:5] == [[], [1], [1, 1], [1, 1, 1], [1, 1, 1, 1]]
    assert plans[8] == [8]
    # 2 threads: batching pays from 3 tokens; 5 are a batch of 4 and one alone.
    two_threads = [0.0, 11.3, 24.1, 29.0, 34.1, 51.0, 55.3, 60.3, 40.8]
    plans = plan_groups(two_threads)
    assert plans[2] == [1, 1] and plans[3] == [3] and plans[5] == [4, 1] and plans[8] == [8]
    assert all(sum(plan) == n for n, plan in enumerate(plans))


def test_calibration_leaves_the_kv_cache_empty(engine):
    assert len(engine.step_ms) == engine.slots + 1 and engine.step_ms[0] == 0
    assert all(0 < ms < 10_000 for ms in engine.step_ms[1:])
    assert len(engine.step_plan) == engine.slots + 1
    assert all(engine.kv_tokens(seq) == 0 for seq in range(engine.slots))


def test_split_and_batched_steps_give_the_same_greedy_text(engine):
    prompts = ["The three primary colors are", "In 1492, Columbus"]
    alone = [run_alone(engine, p, 16) for p in prompts]
    saved = engine.step_plan
    try:
        for plan in ([1, 1], [2]):  # one decode per sequence, then both in one batch
            engine.step_plan = [[], [1], plan]
            gens = [engine.start(body(p, 16)) for p in prompts]
            assert run_to_the_end(engine, gens) == alone, plan
    finally:
        engine.step_plan = saved


def test_waiting_prompts_are_read_in_one_step_and_keep_their_greedy_text(engine):
    """Prompts waiting together are all read in the next step, each in a decode of its own
    as it would be alone, so its text does not change (in one batch it could: see
    Engine._prompt_decodes)."""
    pairs = [
        ["The three primary colors are", "The best way to learn"],  # 6 tokens each
        ["In 1492, Columbus", "Once upon a time"],
    ]  # 9 and 5
    decodes: list[int] = []
    real_decode = engine._decode

    def counting_decode(parts):
        decodes.append(len(parts))
        real_decode(parts)

    for prompts in pairs:
        alone = [run_alone(engine, p, 16) for p in prompts]
        gens = [engine.start(body(p, 16)) for p in prompts]
        engine._decode = counting_decode
        try:
            first = engine.step()
        finally:
            engine._decode = real_decode
        assert decodes == [1, 1], prompts
        decodes.clear()
        assert [g for g, _ in first] == gens and not any(g.prefilling for g in gens)
        texts = {id(g): step.text for g, step in first}
        assert run_to_the_end(engine, gens, texts) == alone, prompts


def test_four_waiting_prompts_share_one_decode():
    """From BATCHED_PROMPTS_FROM prompts waiting at once, they are read in one decode."""
    eng = Engine(str(default_model()), threads=1, n_ctx=128, slots=BATCHED_PROMPTS_FROM)
    decodes: list[int] = []
    real_decode = eng._decode
    eng._decode = lambda parts: (decodes.append(len(parts)), real_decode(parts))
    try:
        for n in (BATCHED_PROMPTS_FROM - 1, BATCHED_PROMPTS_FROM):
            gens = [eng.start(body(p, 2)) for p in [*PROMPTS, "The cat"][:n]]
            first = eng.step()
            assert decodes == ([1] * n if n < BATCHED_PROMPTS_FROM else [n]), n
            assert [g for g, _ in first] == gens and all(g.tokens for g in gens)
            decodes.clear()
            for g in gens:
                eng.release(g)
    finally:
        eng.close()


def test_long_prompts_waiting_together_are_read_apart_and_answered_as_each_is_read():
    """Prompts of SHARED_DECODE_BELOW tokens or more are read in a decode each, even four
    at once, and each one's first token is handed on right after its decode, before the
    next prompt is read; the tokens of the sequences already generating go first."""
    eng = Engine(str(default_model()), threads=1, n_ctx=256, slots=5)
    events: list[tuple] = []
    real_decode = eng._decode
    eng._decode = lambda parts: (events.append(("decode", len(parts))), real_decode(parts))
    long = [
        f"{p}, said the keeper of the lighthouse on the northern cape, and the sea"
        for p in [*PROMPTS, "The cat"]
    ]
    try:
        running = eng.start(body("The cat", 8))
        eng.step()  # its prompt is read: it generates from now on
        gens = [eng.start(body(p, 2)) for p in long]
        assert all(len(g.prompt) >= SHARED_DECODE_BELOW for g in gens)
        events.clear()
        results = eng.step(lambda out: events.append(("emit", [g for g, _ in out])))
        assert events == [
            ("decode", 1),
            ("emit", [running]),
            *(e for g in gens for e in (("decode", 1), ("emit", [g]))),
        ]
        assert [g for g, _ in results] == [running, *gens]
    finally:
        eng.close()
