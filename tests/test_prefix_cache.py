"""The prompt-prefix cache through real supervisors, workers and states on the real model."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from llmsup.protocol.client import LlmsupError
from llmsup.worker import faults
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(240)

SYSTEM = (
    "You are the ship's navigator on a long voyage across the northern sea. You answer in "
    "short, exact sentences, you name the stars you steer by, and you never guess a "
    "position you have not measured. "
) * 6


def turn_prompt(history: list[tuple[str, str]], message: str) -> str:
    """Gemma 3's turn format, the system prompt folded into the first user turn."""
    text = ""
    for i, (user, reply) in enumerate(history):
        first = f"{SYSTEM}\n\n" if i == 0 else ""
        text += f"<start_of_turn>user\n{first}{user}<end_of_turn>\n"
        text += f"<start_of_turn>model\n{reply}<end_of_turn>\n"
    first = f"{SYSTEM}\n\n" if not history else ""
    return text + f"<start_of_turn>user\n{first}{message}<end_of_turn>\n<start_of_turn>model\n"


def complete(inst, prompt: str, max_tokens: int = 16) -> tuple[str, dict]:
    with inst.client(timeout=120) as client:
        stream = client.complete(prompt, max_tokens=max_tokens, temperature=0)
        return stream.text(), stream.done["usage"]


def test_next_turn_and_a_new_conversation_continue_from_the_cache(instance_factory):
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    reply, first = complete(inst, turn_prompt([], "Which star do we steer by tonight?"))
    assert first["cached_tokens"] == 0
    # The next turn resends the whole conversation: all of the first turn is there.
    history = [("Which star do we steer by tonight?", reply)]
    _, second = complete(inst, turn_prompt(history, "And how far to the coast?"))
    assert second["cached_tokens"] >= first["prompt_tokens"] - 4
    assert second["cached_tokens"] < second["prompt_tokens"]
    # A new conversation shares only the system prompt (and the turn marker before it).
    _, other = complete(inst, turn_prompt([], "What is the weather ahead?"))
    assert other["cached_tokens"] >= 0.9 * (first["prompt_tokens"] - 20)
    # A chat request: its system prompt is saved at its end as it is read, so a second
    # conversation that shares only it continues from there.
    with inst.client(timeout=120) as client:
        system = {"role": "system", "content": "Speak like a lighthouse keeper. " * 20}
        one = client.chat([system, {"role": "user", "content": "Hello."}], max_tokens=4)
        one.text()
        two = client.chat([system, {"role": "user", "content": "Any ships?"}], max_tokens=4)
        two.text()
    assert two.done["usage"]["cached_tokens"] >= 100
    cache = inst.status()["cache"]
    assert cache["hits"] >= 3 and cache["misses"] >= 1 and cache["tokens_reused"] > 0
    assert inst.top()["cache"]["hits"] == cache["hits"]


def test_a_turn_on_another_worker_restores_what_the_first_computed(instance_factory):
    inst = instance_factory("--workers", "2", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    reply, first = complete(inst, turn_prompt([], "Which star do we steer by tonight?"))
    served = [w for w in inst.status()["workers"] if w["served"] == 1]
    assert len(served) == 1
    # Its worker dies: the next turn goes to the other one, which never saw the prompt.
    os.kill(served[0]["pid"], signal.SIGKILL)
    history = [("Which star do we steer by tonight?", reply)]
    _, second = complete(inst, turn_prompt(history, "And how far to the coast?"))
    assert second["cached_tokens"] >= first["prompt_tokens"] - 4
    status = inst.status()
    assert status["cache"]["hits_shared"] == 1
    other = [w for w in status["workers"] if w["id"] != served[0]["id"]][0]
    assert other["served"] == 1


def test_greedy_output_of_a_hit_equals_the_cold_output(instance_factory):
    cold = instance_factory("--workers", "1", "--cores-per-worker", "1", "--cache-mb", "0")
    warm = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert cold.start().returncode == 0 and warm.start().returncode == 0
    questions = [
        "Which star do we steer by tonight?",
        "What is the weather ahead?",
        "How much water is left on board?",
    ]
    for i, question in enumerate(questions):
        prompt = turn_prompt([], question)
        expected, cold_usage = complete(cold, prompt, max_tokens=24)
        got, usage = complete(warm, prompt, max_tokens=24)
        assert cold_usage["cached_tokens"] == 0
        if i:
            assert usage["cached_tokens"] > 200  # the system prompt came from the cache
        assert got == expected, f"question {i}: hit {got!r} != cold {expected!r}"
    # --cache-mb 0: no cache at all, as before it existed.
    assert cold.status()["cache"] is None
    assert "cache" not in cold.segments()
    cache = warm.segments()["cache"]
    assert os.path.exists(f"/dev/shm/{cache}")
    assert warm.stop().returncode == 0
    assert not os.path.exists(f"/dev/shm/{cache}")


def test_a_small_cache_evicts_and_never_exceeds_its_size(instance_factory):
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1", "--cache-mb", "16")
    assert inst.start().returncode == 0
    for i in range(4):  # ~4-5 MB a state: four conversations do not fit in 16 MB
        prompt = f"Log entry {i}: " + f"the wind turned {i} points and the sea rose. " * 25
        _, usage = complete(inst, prompt, max_tokens=4)
        cache = inst.status()["cache"]
        assert cache["bytes_used"] <= cache["bytes_limit"] <= 16 << 20
    assert cache["evictions"] >= 1
    # The last conversation is still there.
    _, usage = complete(inst, prompt, max_tokens=4)
    assert usage["cached_tokens"] >= usage["prompt_tokens"] - 4


def test_a_worker_killed_while_writing_leaves_no_entry(instance_factory):
    env = {faults.ENV: faults.ENABLE_VALUE}
    inst = instance_factory(
        "--workers", "1", "--cores-per-worker", "1", "--crash-loop", "5", "60", env=env
    )
    assert inst.start().returncode == 0
    text = "the keeper wrote down every ship that passed the rock. " * 10
    with pytest.raises(LlmsupError) as info:
        complete(inst, f"{faults.PREFIX}cache-crash:{text}")
    assert info.value.code == "worker_lost"  # it died twice: once, then on its retry
    wait_until(lambda: inst.status()["workers"][0]["state"] == "ready", timeout=60)
    cache = inst.status()["cache"]
    assert cache["entries"] == 0 and cache["bytes_used"] == 0 and cache["saves"] == 0
    # The cache works on: the same text without the fault is read, saved, then reused.
    _, cold = complete(inst, text)
    _, warm = complete(inst, text)
    assert cold["cached_tokens"] == 0 and warm["cached_tokens"] >= cold["prompt_tokens"] - 4


def test_too_small_a_cache_is_refused_naming_the_flag(instance_factory):
    inst = instance_factory("--cache-mb", "4")
    result = inst.start()
    assert result.returncode != 0
    assert "--cache-mb 4 is below the minimum of 16 MB (0 turns it off)" in result.stderr


def test_prompts_arriving_together_read_their_shared_prefix_once(instance_factory):
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1", "--slots-per-worker", "4")
    assert inst.start().returncode == 0
    questions = [
        "Which star do we steer by tonight?",
        "What is the weather ahead?",
        "How much water is left on board?",
    ]
    usages: dict[int, dict] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            usages[i] = complete(inst, turn_prompt([], questions[i]), max_tokens=4)[1]
        except BaseException as exc:  # collected: an assert in a thread fails nothing
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(usages) == 3
    # One of them read the system prompt; the others waited for it and restored it.
    cached = sorted(u["cached_tokens"] for u in usages.values())
    assert cached[0] == 0 and all(c >= 200 for c in cached[1:]), usages
    assert inst.status()["cache"]["misses"] == 1


def test_a_second_conversation_starts_from_a_checkpoint_of_a_long_system_prompt(
    instance_factory,
):
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    system = SYSTEM * 3  # ~750 tokens: past Gemma 3's 512-token window
    questions = ("Which star tonight?", "What weather ahead?", "Any land in sight?")
    prompts = [
        f"<start_of_turn>user\n{system}\n\n{q}<end_of_turn>\n<start_of_turn>model\n"
        for q in questions
    ]
    _, first = complete(inst, prompts[0], max_tokens=2)
    _, second = complete(inst, prompts[1], max_tokens=2)
    _, third = complete(inst, prompts[2], max_tokens=2)
    assert first["prompt_tokens"] > 700 and first["cached_tokens"] == 0
    # The first read left checkpoints every 256 tokens; the second found where they part.
    assert second["cached_tokens"] == 512
    assert third["cached_tokens"] >= first["prompt_tokens"] - 12


def test_the_same_long_prompt_again_reads_only_its_last_token(instance_factory):
    # A retry or a "regenerate": past the sliding window, a state of the whole prompt could
    # not be cut back by the one token whose logits are needed.
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    prompt = f"<start_of_turn>user\n{SYSTEM * 3}\n\nAny land?<end_of_turn>\n<start_of_turn>model\n"
    _, first = complete(inst, prompt, max_tokens=8)
    _, again = complete(inst, prompt, max_tokens=8)
    assert first["prompt_tokens"] > 700 and first["cached_tokens"] == 0
    assert again["cached_tokens"] == again["prompt_tokens"] - 1


def test_a_short_prompt_again_continues_in_place_and_answers_the_same(instance_factory):
    # Shorter than any arena entry (HEAD_TOKENS), but the free sequence still holds it.
    inst = instance_factory("--workers", "1", "--cores-per-worker", "1")
    assert inst.start().returncode == 0
    first_text, first = complete(inst, "Once upon a time", max_tokens=12)
    again_text, again = complete(inst, "Once upon a time", max_tokens=12)
    assert first["prompt_tokens"] < 16 and first["cached_tokens"] == 0
    assert again["cached_tokens"] == again["prompt_tokens"] - 1
    assert again_text == first_text
    # A prompt that shares only its first words with what is held reads all of itself.
    _, other = complete(inst, "Once upon the hill", max_tokens=4)  # BOS and two words
    assert other["cached_tokens"] == 0


def test_engine_under_random_prompts_cancels_and_evictions_keeps_its_sequences_whole():
    """The engine alone, in this process: prompts sharing starts of many lengths arrive at
    random, some are cancelled mid-read or mid-generation, a small arena evicts all the
    time. Every sequence's cells must match what it has read, and nothing half-written may
    be left."""
    import random
    import uuid

    from llmsup.protocol.arena import Arena
    from llmsup.protocol.arena_layout import WRITING
    from llmsup.protocol.messages import Complete, Sampling
    from llmsup.supervisor.models.fetch import default_model
    from llmsup.worker.engine import Engine

    rng = random.Random(3)
    parts = [
        "The keeper lit the lamp. ",
        "Ships passed in the night. ",
        "The sea was calm. ",
        "A storm came from the north. ",
        "Gulls cried over the rocks. ",
    ]

    def work() -> Complete:
        start = "".join(parts[(i * 7) % 5] for i in range(rng.choice([5, 40, 80])))
        rest = "".join(rng.choice(parts) for _ in range(rng.choice([2, 10, 30])))
        greedy = Sampling(max_tokens=rng.choice([1, 4, 16]), temperature=0.0, top_p=1.0, top_k=40)
        return Complete(start + rest, greedy)

    arena = Arena.create(f"llmsup-test-{uuid.uuid4().hex[:8]}", 48)
    engine = Engine(
        str(default_model()), threads=1, n_ctx=1024, slots=4, prefill_chunk=64, arena=arena
    )
    finished = cancelled = 0
    try:
        while finished + cancelled < 40:
            while engine.free_seqs and rng.random() < 0.5:
                engine.start(work())
            if not engine.running:
                continue
            if rng.random() < 0.1:
                rng.choice(engine.running).close()
                cancelled += 1
                continue
            for gen in engine.running:
                if gen.waiting_for is None:
                    assert engine.kv_tokens(gen.seq) == gen.n_past
            for gen, step in engine.step():
                if step.finish_reason:
                    gen.close(keep=True)
                    finished += 1
        stats = arena.stats()
        assert stats["hits"] > 10 and stats["evictions"] > 0
        assert WRITING not in list(arena.entries["state"])
        assert stats["bytes_used"] <= stats["bytes_limit"]
    finally:
        engine.close()
        arena.close()


@pytest.mark.parametrize("in_arena", [True, False], ids=["restored", "copied"])
def test_a_prompt_is_not_continued_where_it_would_split_the_batch(in_arena):
    """llama.cpp decodes a batch in one go only if its sequence ids are consecutive. With
    sequence 0 busy, a prompt whose prefix sequence 2 holds goes to sequence 1 instead: the
    prefix comes from the arena, or (not there) is copied across, and the reply is the one
    a cold read gives. With nothing busy it is continued where it is."""
    import uuid

    from llmsup.protocol.arena import Arena
    from llmsup.protocol.messages import Complete, Sampling
    from llmsup.supervisor.models.fetch import default_model
    from llmsup.worker.engine import Engine

    def greedy(n: int) -> Sampling:
        return Sampling(max_tokens=n, temperature=0.0, top_p=1.0, top_k=40)

    arena = Arena.create(f"llmsup-test-{uuid.uuid4().hex[:8]}", 48)
    engine = Engine(str(default_model()), threads=1, n_ctx=512, slots=4, arena=arena)

    def run(gens) -> dict:
        """Step until `gens` have finished (the others running are stepped too)."""
        texts = {id(g): "" for g in gens}
        while any(g.seq is not None for g in gens):
            for gen, step in engine.step():
                texts[id(gen)] = texts.get(id(gen), "") + step.text
                if step.finish_reason:
                    gen.close(keep=True)
        return texts

    try:
        starts = [f"Log of day {d}: " + SYSTEM[: 120 + 40 * d] for d in range(3)]
        first = [
            engine.start(Complete(text, greedy(40 if d == 0 else 8)))
            for d, text in enumerate(starts)
        ]
        assert [g.seq for g in first] == [0, 1, 2]
        texts = run(first[1:])  # steps sequence 0 too, which goes on
        assert first[0].seq == 0 and engine.free_seqs and 2 in engine.cache.held
        follow = starts[2] + texts[id(first[2])] + " And then"
        if not in_arena:
            arena.clear()
        before = arena.stats()
        gen = engine.start(Complete(follow, greedy(8)))
        assert gen.seq == 1  # not 2: sequences 0 and 2 would be two decodes a step
        assert gen.cached_tokens >= len(engine.cache.held[2]) - 1
        assert engine.kv_tokens(1) == gen.n_past
        moved = "hits_shared" if in_arena else "hits_slot"
        assert arena.stats()[moved] == before[moved] + 1
        first[0].close()
        hit = run([gen])[id(gen)]
        # Nothing busy now: the same prompt again is continued in place, where it ended.
        again = engine.start(Complete(follow, greedy(8)))
        assert again.seq == 1 and again.cached_tokens >= gen.cached_tokens
        assert run([again])[id(again)] == hit
        # Cold, for comparison: the same prompt with nothing cached, read from scratch.
        for seq in range(4):
            engine.cache.forget(seq)
        arena.clear()
        cold = engine.start(Complete(follow, greedy(8)))
        assert cold.cached_tokens == 0
        assert run([cold])[id(cold)] == hit
    finally:
        engine.close()
        arena.close()


def test_a_long_prompt_gets_its_first_token_in_the_step_that_reads_its_end():
    """A prompt longer than the sliding window is cut one token short of its end for a
    save (a retry then reads one token); that last token is read right after the save, in
    the same step, not a step later."""
    import uuid

    from llmsup.protocol.arena import Arena
    from llmsup.protocol.messages import Complete, Sampling
    from llmsup.supervisor.models.fetch import default_model
    from llmsup.worker.engine import Engine

    arena = Arena.create(f"llmsup-test-{uuid.uuid4().hex[:8]}", 48)
    engine = Engine(
        str(default_model()), threads=1, n_ctx=1024, slots=2, prefill_chunk=256, arena=arena
    )
    try:
        greedy = Sampling(max_tokens=2, temperature=0.0, top_p=1.0, top_k=40)
        gen = engine.start(Complete(SYSTEM * 3, greedy))
        assert len(gen.prompt) > engine.llama.n_swa and len(gen.prompt) - 1 in gen.save_at
        windows = -(-len(gen.prompt) // 256)
        steps = 0
        while not gen.tokens:
            engine.step()
            steps += 1
        assert steps == windows
        # The state one token short of the end was saved: the same prompt again reads one.
        gen.close()
        again = engine.start(Complete(SYSTEM * 3, greedy))
        assert again.cached_tokens == len(again.prompt) - 1
        again.close()
    finally:
        engine.close()
        arena.close()
