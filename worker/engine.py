"""The step scheduler: one llama.cpp context (llama.py) decoding many sequences at once.

The context holds `slots` sequences, each in its own KV-cache stream of `n_ctx` cells.
`Engine.step()` runs one step for every sequence in flight: the next token of every
generating sequence, in the groups the step plan says (see plan_groups), and a bounded
number of prompt tokens (oldest prompts first), so a long prompt delays the others by at
most one chunk per token. Sampling runs in a llama.cpp sampler chain per sequence (greedy:
one argmax over llama.cpp's logits). A sequence is a Generation (generation.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy
import orjson

from llmsup.protocol import constants as C
from llmsup.protocol import schema_subset
from llmsup.protocol.messages import Chat, Complete, Embed, Message, sequences
from llmsup.worker import grammar, prefix, tools
from llmsup.worker.generation import Delta, Generation

DEFAULT_PREFILL_CHUNK = 256
# Prompts read in the same step share one decode from this many on, if each is shorter
# than SHARED_DECODE_BELOW tokens (see _prompt_decodes).
BATCHED_PROMPTS_FROM = 4
SHARED_DECODE_BELOW = 16


class RequestRejected(Exception):
    """A request this model cannot serve; `code` is a protocol error code, `field` the
    request field it is about (if one)."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class DecodeError(RuntimeError):
    """llama_decode failed: the sequences in that batch are lost; `results` holds what the
    other sequences produced earlier in the same step (still to be streamed)."""

    def __init__(self, message: str, generations: list[Generation]):
        super().__init__(message)
        self.generations = generations
        self.results: list[tuple[Generation, Delta]] = []


class Engine:
    """One llama.cpp context with `slots` sequences, and the steps that decode them."""

    def __init__(
        self,
        model_path: str,
        threads: int,
        n_ctx: int,
        slots: int = 1,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        arena=None,
        row: int = 0,
    ):
        from llmsup.worker.llama import Llama  # loads llama_cpp: tools import this cheaply

        self.slots = slots
        self.prefill_chunk = prefill_chunk
        self.threads = threads
        self.embedder = None  # embedder.Embedder: its context is made on the first embed
        self.llama = Llama(model_path, threads, n_ctx, slots, n_batch=max(prefill_chunk, slots))
        self.n_ctx = self.llama.n_ctx  # per sequence
        self.free_seqs = list(range(slots))  # sequence ids (= KV streams) not in use
        self.running: list[Generation] = []  # in order of arrival
        self.step_ms = self.measure_step_costs()
        self.step_plan = plan_groups(self.step_ms)
        # The prompt-prefix cache: None with --cache-mb 0 (sequences are then emptied).
        self.cache = prefix.PrefixCache(self, arena, row) if arena is not None else None

    def close(self) -> None:
        for gen in list(self.running):
            self.release(gen)
        if self.embedder is not None:
            self.embedder.close()
        self.llama.close()

    def start_embedding(self, work: Embed):
        """An embed request to advance a decode at a time (embedder.Embedding), or
        RequestRejected."""
        from llmsup.worker.embedder import Embedder  # imports this module: here, not above

        if self.embedder is None:
            self.embedder = Embedder(self.llama, self.n_ctx, self.threads)
        return self.embedder.start(work.inputs, work.normalize, work.truncate, work.encoding)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llama.tokenize(text, add_bos)

    def piece(self, token: int) -> str | list[int]:
        """A token's text, or its bytes where they are not UTF-8 (llama-server's pieces)."""
        raw = self.llama.token_bytes(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return list(raw)

    def detokenize(self, tokens) -> str:
        self.check_ids(tokens)
        return self.llama.detokenize(tokens)

    def check_ids(self, tokens) -> None:
        """RequestRejected (field tokens) for the first id past this model's vocabulary."""
        n_vocab = self.llama.n_vocab
        for i, token in enumerate(tokens):
            if token >= n_vocab:
                raise RequestRejected(
                    C.E_BAD_REQUEST,
                    f"tokens[{i}] is {token}; this model's token ids are 0 to {n_vocab - 1}",
                    "tokens",
                )

    def prompt_tokens(self, work: Complete | Chat) -> list[int]:
        if not self.llama.generates:
            raise RequestRejected(
                C.E_BAD_REQUEST,
                f"{self.llama.metadata.get('general.name') or 'this model'} is an embedding "
                "model (its attention is not causal): it serves embed, not complete or chat",
            )
        if isinstance(work, Chat):
            if not self.llama.has_chat_template:
                raise RequestRejected(
                    C.E_BAD_REQUEST, "this model has no chat template; use complete instead"
                )
            prompt, add_bos = self.llama.format_chat(tools.prompt_messages(work))
            tokens = self.llama.tokenize(prompt, add_bos=add_bos)
        elif work.tokens is not None:  # as given: no BOS added (llama-server's way)
            self.check_ids(work.tokens)
            tokens = list(work.tokens)
        else:
            tokens = self.llama.tokenize(work.prompt)
        if len(tokens) >= self.n_ctx:
            raise RequestRejected(
                C.E_CONTEXT_OVERFLOW,
                f"prompt has {len(tokens)} tokens; the context per slot is {self.n_ctx} "
                "(start llmsup with a larger --ctx-size or shorten the prompt)",
            )
        return tokens

    # --- sequences -------------------------------------------------------------------------

    def start(self, work: Complete | Chat) -> Generation:
        """Admit a request into a free sequence, holding the longest cached prefix of its
        prompt (prefix.py); the rest of the prompt is read by the next steps. A request of
        n completions takes n sequences: this one reads the prompt, and its `followers`
        take a copy of it when it is read (_follow, fork)."""
        prompt = self.prompt_tokens(work)
        n = sequences(work)
        if len(self.free_seqs) < n:
            raise RequestRejected(
                C.E_INTERNAL, f"{n} sequence(s) asked for; {len(self.free_seqs)} free here"
            )
        chat_with_tools = isinstance(work, Chat) and tools.uses_tools(work)
        echo = isinstance(work, Complete) and work.echo
        if echo:
            echo_limit(len(prompt), work.sampling.top_logprobs)
        gbnf = constraint(work)  # before a slot is taken: a bad schema takes none
        ids = numpy.asarray(prompt, numpy.int32)
        if self.cache is None or echo:
            # The lowest free id: llama.cpp puts consecutive sequence ids in one ubatch. An
            # echo reads its whole prompt (every row's logits) and leaves the cache alone.
            seq, n_past = min(self.free_seqs), 0
            if self.cache is not None:
                self.cache.forget(seq)
        else:
            seq, n_past, shared = self.cache.place(ids, self.free_seqs)
        self.free_seqs.remove(seq)
        try:
            gen = Generation(
                self,
                seq,
                prompt,
                work.sampling,
                n_past=n_past,
                cached_tokens=n_past,
                prompt_ids=ids,
                grammar=gbnf,
                answer=tools.Answer() if chat_with_tools else None,
                echo=echo,
            )
        except ValueError as exc:  # the sampler refused it (llama.cpp's grammar parser, a bias)
            self.free_seqs.append(seq)
            if self.cache is not None:
                self.cache.forget(seq)
            else:
                self.llama.clear(seq)
            raise RequestRejected(C.E_BAD_REQUEST, str(exc)) from None
        if self.cache is not None and not echo:
            chat = isinstance(work, Chat)
            system_end = self._system_prompt_end(tools.prompt_messages(work), ids) if chat else 0
            self.cache.plan_saves(gen, self.running, system_end, shared)
        self.running.append(gen)
        if n > 1:
            self._follow(gen, work, n)
        return gen

    def _follow(self, leader: Generation, work: Complete | Chat, n: int) -> None:
        """The other n - 1 completions of a request: sequences that read no prompt but take
        the leader's cells and its last logits row once it has read it (fork), each sampled
        with its own sampler: seed + i for the i-th when the request has a seed."""
        leader.index = 0
        seed = work.sampling.seed
        chat_with_tools = isinstance(work, Chat) and tools.uses_tools(work)
        try:
            for i in range(1, n):
                sampling = work.sampling
                if seed is not None:
                    sampling = dataclasses.replace(sampling, seed=(seed + i) % (C.MAX_SEED + 1))
                seq = min(self.free_seqs)  # consecutive ids decode in one ubatch
                follower = Generation(
                    self,
                    seq,
                    leader.prompt,
                    sampling,
                    prompt_ids=leader.prompt_ids,
                    grammar=leader.grammar,
                    answer=tools.Answer() if chat_with_tools else None,
                    index=i,
                    leader=leader,
                )
                self.free_seqs.remove(seq)
                if self.cache is not None:
                    self.cache.forget(seq)  # what it held is overwritten by the copy
                leader.followers.append(follower)
                self.running.append(follower)
        except ValueError as exc:  # the sampler refused it (as it would have the leader)
            for gen in [*leader.followers, leader]:
                self.release(gen)
            raise RequestRejected(C.E_BAD_REQUEST, str(exc)) from None

    def fork(self, leader: Generation) -> None:
        """The leader's prompt is read: its followers get a copy of its cells, so the
        prompt is read once for all n. llama.cpp's own llama_memory_seq_cp copies between
        KV streams only at the next decode, a whole stream (n_ctx cells) at a time, and a
        state saved or restored before that decode (the prefix cache does both between
        steps) would see the cells not yet copied; a state copy is done on return and
        moves only the cells in use."""
        targets = [f.seq for f in leader.followers]
        if not self.llama.copy_cells(leader.seq, targets):
            raise DecodeError(
                f"copying sequence {leader.seq}'s cells to {targets} failed",
                [leader, *leader.followers],
            )
        for follower in leader.followers:
            follower.n_past = leader.n_past
            follower.cached_tokens = leader.cached_tokens
            if self.cache is not None:
                self.cache.copied(leader.seq, follower.seq)

    def _system_prompt_end(self, messages: tuple[Message, ...], prompt: numpy.ndarray) -> int:
        """Where a chat's leading system messages end in its prompt (0: none): the prompt's
        common prefix with the same system messages followed by another user message, so
        whatever the template does around them."""
        k = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
        if k == 0 or k == len(messages):
            return 0
        text, add_bos = self.llama.format_chat((*messages[:k], Message("user", "\u2063")))
        return prefix.shared_prefix(
            numpy.asarray(self.llama.tokenize(text, add_bos), numpy.int32), prompt
        )

    def release(self, gen: Generation, keep: bool = False) -> None:
        """Drop a sequence now: its sampler and slot are free on return. With `keep` (it
        finished) its KV cells stay for a prompt that continues it, and its state goes to
        the prefix cache; otherwise they are emptied."""
        if gen.seq is None:
            return  # already released
        if self.cache is None:
            self.llama.clear(gen.seq)
        elif keep and not gen.echo:
            self.cache.keep(gen.seq, gen.kv_tokens())
        else:
            self.cache.forget(gen.seq)
        if gen.sampler is not None:
            gen.sampler.close()
            gen.sampler = None
        self.free_seqs.append(gen.seq)
        gen.seq = None
        self.running.remove(gen)

    def kv_tokens(self, seq: int) -> int:
        """Cells sequence `seq` holds in the KV cache (0 when it is free)."""
        return self.llama.kv_tokens(seq)

    def step(
        self,
        emit: Callable[[list[tuple[Generation, Delta]]], None] | None = None,
    ) -> list[tuple[Generation, Delta]]:
        """One decoding step for every sequence in flight; returns what each produced, and
        hands it to `emit` as it comes (the generating sequences' tokens before any prompt
        is read, each prompt's first token right after the decode that read it).

        The pending tokens of the generating sequences are decoded in the groups that
        `step_plan` gives for their number (cheapest on this machine, measured at start),
        then up to `prefill_chunk` tokens of the prompts not yet read, oldest first, in
        decodes of their own (see _prompt_decodes; a prompt's first token is sampled when
        its last chunk is in). So prompts arriving together are read in one step: the
        eighth of eight does not wait for seven steps of everyone's tokens, and the first
        does not wait for the other seven to be read. Prompt and tokens are not merged into
        one batch: with one KV stream per sequence llama.cpp splits such a batch into
        ubatches of equally many tokens per sequence anyway, and the prompt's logits would
        then depend on the other traffic.
        """
        results: list[tuple[Generation, Delta]] = []
        emitted = 0

        def flush() -> None:
            nonlocal emitted
            if emit is not None and len(results) > emitted:
                emit(results[emitted:])
                emitted = len(results)

        generating = sorted((g for g in self.running if g.pending is not None), key=lambda g: g.seq)
        try:
            start = 0
            for size in self.step_plan[len(generating)]:
                group = generating[start : start + size]
                start += size
                self._decode([(g, [g.pending], True) for g in group])
                for i, gen in enumerate(group):
                    results.append((gen, gen.take(i)))
            for chunks in self._prompt_decodes():
                flush()
                self._decode(chunks)
                index = -1  # batch index of each chunk's last token
                for gen, chunk, last in chunks:
                    index += len(chunk)
                    if gen.echo:
                        gen.read_prompt_rows(
                            index - len(chunk) + 1, gen.n_past - len(chunk), len(chunk)
                        )
                    elif self.cache is not None:
                        self.cache.after_read(gen)
                    if last:
                        results.append((gen, gen.take(index)))
                        if gen.followers:  # n completions: each samples the same row
                            self.fork(gen)
                            results.extend((f, f.take(index)) for f in gen.followers)
            flush()
        except DecodeError as exc:
            exc.results = results[emitted:]  # what decoded earlier in this step, not emitted
            raise
        return results

    def _prompt_decodes(self) -> list[list[tuple[Generation, list[int], bool]]]:
        """This step's prompt reading: decodes of (sequence, tokens, is its last chunk).

        Oldest prompt first, as many as fit in `prefill_chunk` tokens (the oldest always),
        each cut at multiples of `prefill_chunk` as it would be alone, each read in a decode
        of its own, so its logits are those it gets alone and its first token is streamed
        as soon as it is read (step's `emit`). Only short prompts share a decode, 4 or more
        of them, where that pays: after 600 tokens of context each, 4 prompts of 4 tokens
        took 88 ms in one decode against 116 apart, 4 of 31 took 426 against 473, and apart
        the first of those was read after 121 ms instead of 426 (perf/engine.py, 2 threads):
        the median 4-prompt turn of a chat has its first tokens sooner.
        In one batch a prompt's logits do change: from 4 rows llama.cpp computes the
        repacked Q4_K matmuls 4 rows at a time and a row's kernel, hence its rounding,
        depends on where it falls (perf/engine.py: two 6-token prompts together, logits
        off by up to 1.2). That is where greedy exactness ends anyway (docs/architecture.md,
        "Exactness").
        A chunk also ends where the prefix cache saves a state (plan_saves), and a prompt
        that waits for another to read their common prefix is passed over until it has.
        """
        per_prompt: list[list[tuple[Generation, list[int], bool]]] = []
        budget = self.prefill_chunk
        for gen in self.running:
            if not gen.prefilling or (self.cache is not None and self.cache.waiting(gen)):
                continue
            chunks = self._prompt_chunks(gen, budget)
            if not chunks:
                break
            budget -= sum(len(chunk) for _, chunk, _ in chunks)
            per_prompt.append(chunks)

        def short(chunks) -> bool:  # an echo's chunk has a row of logits per token: alone
            return (
                len(chunks) == 1
                and len(chunks[0][1]) < SHARED_DECODE_BELOW
                and not chunks[0][0].echo
            )

        shared = [chunks[0] for chunks in per_prompt if short(chunks)]
        if len(shared) < BATCHED_PROMPTS_FROM:
            return [[chunk] for chunks in per_prompt for chunk in chunks]
        return [shared, *([c] for chunks in per_prompt if not short(chunks) for c in chunks)]

    def _prompt_chunks(
        self, gen: Generation, budget: int
    ) -> list[tuple[Generation, list[int], bool]]:
        """The chunks of `gen`'s prompt this step reads, in order, up to the end of its
        current `prefill_chunk` window and within `budget` tokens (a window is at most the
        whole budget, so the first prompt's always fits). A chunk ends at the window's end,
        the prompt's end or a save point, and the next one up to the window's end follows
        in the same step: a prompt cut one token short of its end for a save gets its first
        token now, not a step later after every other prompt waiting."""
        window_end = (gen.n_past // self.prefill_chunk + 1) * self.prefill_chunk
        chunks, start = [], gen.n_past
        cuts = [p for p in gen.save_at if p > start]
        if gen.echo:  # every row's logits: at most n_outputs_max rows a decode
            step = self.llama.n_outputs_max
            cuts = list(range(start + step, window_end, step))
        for at in [*cuts, window_end]:
            end = min(at, window_end, len(gen.prompt))
            chunk = gen.prompt[start:end]
            if len(chunk) > budget:
                break
            budget -= len(chunk)
            chunks.append((gen, chunk, end == len(gen.prompt)))
            start = end
            if end in (window_end, len(gen.prompt)):
                break
        return chunks

    def measure_step_costs(self, rounds: int = 2) -> list[float]:
        """Milliseconds one decode of k generating tokens takes here, for k = 0..slots.

        Decoding k sequences in one batch does not always beat k decodes of one: on the
        AMD EPYC machines here llama.cpp multiplies the 262k-row Q8_0 output matrix with a
        4-row GEMM kernel (llamafile's tinyBLAS) for 2-7 tokens, which computes far slower
        than the single-token path (1 thread on one EPYC: 13.5 ms for 1 token, 46 for 2, 67
        for 4, 84 for 8; on another, 21.9 for 1 and 46-49 for 2); on the Intel Xeon ones
        batching pays from 2 tokens. Costs differ from machine to machine, so the
        step plan comes from a measurement, best of `rounds`, made with throwaway tokens in
        every sequence, whose cells are removed after.
        """
        costs = [0.0] + [float("inf")] * self.slots
        positions = [0] * self.slots

        def decode(k: int) -> float:
            rows = [(0, positions[seq], seq, True) for seq in range(k)]  # any token will do
            started = time.perf_counter()
            if self.llama.decode_rows(rows) != 0:
                raise RuntimeError(f"llama_decode of {k} calibration tokens failed")
            elapsed = (time.perf_counter() - started) * 1000
            for seq in range(k):
                positions[seq] += 1
            return elapsed

        try:
            decode(self.slots)  # pages the weights in
            for _ in range(rounds):
                for k in range(1, self.slots + 1):
                    costs[k] = min(costs[k], decode(k))
        finally:
            for seq in range(self.slots):
                self.llama.clear(seq)
        return costs

    def _decode(self, parts: list[tuple[Generation, list[int], bool]]) -> None:
        """Decode tokens of several sequences in one batch; `logits` for each part's last
        (and for every row of an echo's prompt)."""
        rows = (
            (token, gen.n_past + j, gen.seq, (logits and j == len(tokens) - 1) or every)
            for gen, tokens, logits in parts
            for every in (gen.echo and gen.prefilling,)
            for j, token in enumerate(tokens)
        )
        rc = self.llama.decode_rows(rows)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}", [gen for gen, _, _ in parts])
        for gen, tokens, _ in parts:
            gen.n_past += len(tokens)


def echo_limit(prompt_tokens: int, top_logprobs: int) -> None:
    """An echo's prompt_logprobs go in its DONE frame: refuse one that would not fit."""
    entries = prompt_tokens * (1 + top_logprobs)
    if entries > C.MAX_ECHO_ENTRIES:
        raise RequestRejected(
            C.E_BAD_REQUEST,
            f"echo of a prompt of {prompt_tokens} tokens with top_logprobs {top_logprobs} "
            f"makes {entries} logprob entries; the limit is {C.MAX_ECHO_ENTRIES} "
            "(prompt tokens x (1 + top_logprobs))",
            "echo",
        )


def constraint(work: Complete | Chat) -> str | None:
    """The GBNF a request's output must match, or None: its grammar, its json_schema's, or
    in a chat with tools the generic format's (tools.py); RequestRejected if none can be
    made."""
    sampling = work.sampling
    try:
        if isinstance(work, Chat) and tools.uses_tools(work):
            schema = tools.output_schema(work, sampling.json_schema)
            return grammar.from_schema(orjson.dumps(schema).decode())
        if sampling.json_schema is not None:
            return grammar.from_schema(sampling.json_schema)
    except (grammar.GrammarError, schema_subset.SchemaError) as exc:
        raise RequestRejected(C.E_BAD_REQUEST, str(exc)) from None
    return sampling.grammar


def plan_groups(costs: list[float]) -> list[list[int]]:
    """For n = 0..len(costs)-1 generating sequences, the group sizes to decode them in
    that take the least time per step, given costs[k] = time of one decode of k tokens."""
    best = [0.0] + [float("inf")] * (len(costs) - 1)
    last = [0] * len(costs)
    for n in range(1, len(costs)):
        for k in range(1, n + 1):
            if best[n - k] + costs[k] < best[n]:
                best[n], last[n] = best[n - k] + costs[k], k
    plans: list[list[int]] = []
    for n in range(len(costs)):
        sizes, m = [], n
        while m:
            sizes.append(last[m])
            m -= last[m]
        plans.append(sorted(sizes, reverse=True))
    return plans
