"""One llama.cpp model and context in this process, decoding many sequences at once.

The context holds `slots` sequences, each in its own KV-cache stream of `n_ctx` cells.
`Engine.step()` runs one step for every sequence in flight: the next token of every
generating sequence, in the groups the step plan says (see plan_groups), and a bounded
number of prompt tokens (oldest prompts first), so a long prompt delays the others by at
most one chunk per token. Sampling runs in a llama.cpp sampler chain per sequence (greedy:
one argmax over llama.cpp's logits). A sequence is a Generation (generation.py).
"""

from __future__ import annotations

import collections
import ctypes
import sys
import time

import numpy

from llmsup.protocol import constants as C
from llmsup.worker import prefix
from llmsup.worker.generation import Generation, Step
from llmsup.worker.threadpool import ThreadPool

# llama.cpp's own templates for model families whose GGUF files often lack one.
BUILTIN_CHAT_TEMPLATES = {
    "gemma": b"gemma",
    "gemma2": b"gemma",
    "gemma3": b"gemma",
    "qwen2": b"chatml",
    "qwen3": b"chatml",
    "phi3": b"phi3",
}

DEFAULT_PREFILL_CHUNK = 256
# Prompts read in the same step share one decode from this many on (see _prompt_decodes).
BATCHED_PROMPTS_FROM = 4


class RequestRejected(Exception):
    """A request this model cannot serve; `code` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class DecodeError(RuntimeError):
    """llama_decode failed: the sequences in that batch are lost; `results` holds what the
    other sequences produced earlier in the same step (still to be streamed)."""

    def __init__(self, message: str, generations: list[Generation]):
        super().__init__(message)
        self.generations = generations
        self.results: list[tuple[Generation, Step]] = []


_llama_errors: collections.deque[str] = collections.deque(maxlen=4)
_log_callback = None


def _route_llama_logs(llama_cpp) -> None:
    """Send llama.cpp's warnings and errors to stderr, and keep the last errors."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            line = text.decode(errors="replace").rstrip()
            sys.stderr.write(line + "\n")
            if level == 4:
                _llama_errors.append(line)

    _log_callback = callback  # ctypes must keep the callback alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class Engine:
    """The model, one context with `slots` sequences, and the batch that steps them."""

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
        import llama_cpp  # imported here so that tools can import this module cheaply
        from llama_cpp._internals import LlamaContext, LlamaModel

        self._llama_cpp = llama_cpp
        _route_llama_logs(llama_cpp)
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        n_batch = max(prefill_chunk, slots)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_seq_max = slots
        params.kv_unified = False  # one KV stream per sequence: see Engine.step
        params.n_batch = params.n_ubatch = n_batch
        params.n_outputs_max = slots  # logits of at most one token per sequence per decode
        params.n_threads = params.n_threads_batch = threads
        # Flash attention where the backend has it, as llama-server does: on our CPUs it
        # is faster from 1 to 8 sequences (2 threads, greedy: 89.6 vs 82.2 tok/s for one
        # sequence, 175 vs 160 for eight; README "llama.cpp settings").
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        # A sliding-window layer keeps only its window (plus a batch) per sequence, not
        # n_ctx cells: Gemma 3's KV cache shrinks about 4x at 2048 tokens. Its cost to the
        # prefix cache (a long state is continued only at its end) is met with checkpoints,
        # and swa_full would not lift it (saved states hold the window anyway): prefix.py.
        params.swa_full = False
        try:
            model_params = llama_cpp.llama_model_default_params()
            model_params.use_mmap = True
            self.model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
            self.ctx = LlamaContext(model=self.model, params=params, verbose=False)
        except Exception as exc:
            # llama-cpp-python's exception says only "failed to load"; llama.cpp said why.
            why = "; ".join(line for line in _llama_errors if "failed to load" not in line)
            raise RuntimeError(f"{exc}: {why}" if why else str(exc)) from None
        # One thread needs no pool: ggml runs a 1-thread graph on the calling thread.
        self.threadpool = ThreadPool(self.ctx.ctx, threads) if threads > 1 else None
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx.ctx)  # per sequence
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.metadata = self.model.metadata()
        self._chat = self._chat_formatter()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.free_seqs = list(range(slots))  # sequence ids (= KV streams) not in use
        self.running: list[Generation] = []  # in order of arrival
        self.step_ms = self.measure_step_costs()
        self.step_plan = plan_groups(self.step_ms)
        n_params = llama_cpp.llama_model_n_params(self.model.model)
        self.ctx_key = prefix.context_key(model_path, params, n_params, llama_cpp.__version__)
        # The prompt-prefix cache: None with --cache-mb 0 (sequences are then emptied).
        self.cache = prefix.PrefixCache(self, arena, row) if arena is not None else None

    def close(self) -> None:
        for gen in list(self.running):
            self.cancel(gen)
        if self._batch is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.threadpool is not None:
            self.threadpool.close()
        self.ctx.close()
        self.model.close()

    # --- tokens and templates --------------------------------------------------------------

    def _chat_formatter(self):
        """A function from messages to (prompt, add_bos), or None without a template."""
        template = self.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = self.model
            eos, bos = model.token_eos(), model.token_bos()
            jinja = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
            # The template writes the BOS token itself.
            return lambda messages: (jinja(messages=messages).prompt, False)
        builtin = BUILTIN_CHAT_TEMPLATES.get(self.metadata.get("general.architecture", ""))
        if builtin:
            return lambda messages: (self._apply_builtin_template(builtin, messages), True)
        return None

    def _apply_builtin_template(self, name: bytes, messages: list[dict]) -> str:
        llama_cpp = self._llama_cpp
        encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(encoded))(
            *[llama_cpp.llama_chat_message(role, content) for role, content in encoded]
        )
        needed = llama_cpp.llama_chat_apply_template(name, chat, len(encoded), True, None, 0)
        buf = ctypes.create_string_buffer(needed + 1)
        llama_cpp.llama_chat_apply_template(name, chat, len(encoded), True, buf, needed + 1)
        return buf.value.decode()

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.model.tokenize(text.encode(), add_bos=add_bos, special=True)

    def piece(self, token: int) -> bytes:
        return self.model.detokenize([token])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def prompt_tokens(self, verb: bytes, body: dict) -> list[int]:
        if verb == C.CHAT:
            if self._chat is None:
                raise RequestRejected(
                    C.E_BAD_REQUEST, "this model has no chat template; use complete instead"
                )
            prompt, add_bos = self._chat(body["messages"])
            tokens = self.tokenize(prompt, add_bos=add_bos)
        else:
            tokens = self.tokenize(body["prompt"])
        if len(tokens) >= self.n_ctx:
            raise RequestRejected(
                C.E_CONTEXT_OVERFLOW,
                f"prompt has {len(tokens)} tokens; the context per slot is {self.n_ctx} "
                "(start llmsup with a larger --ctx-size or shorten the prompt)",
            )
        return tokens

    # --- sequences -------------------------------------------------------------------------

    def start(self, verb: bytes, body: dict) -> Generation:
        """Admit a request into a free sequence, holding the longest cached prefix of its
        prompt (prefix.py); the rest of the prompt is read by the next steps."""
        prompt = self.prompt_tokens(verb, body)
        if not self.free_seqs:
            raise RequestRejected(C.E_INTERNAL, "no free sequence slot in this worker")
        ids = numpy.asarray(prompt, numpy.int32)
        if self.cache is None:
            # The lowest free id: llama.cpp puts consecutive sequence ids in one ubatch.
            seq, n_past = min(self.free_seqs), 0
        else:
            seq, n_past, shared = self.cache.place(ids, self.free_seqs)
        self.free_seqs.remove(seq)
        gen = Generation(self, seq, prompt, body, n_past=n_past, cached_tokens=n_past,
                         prompt_ids=ids)  # fmt: skip
        if self.cache is not None:
            system_end = self._system_prompt_end(body["messages"], ids) if verb == C.CHAT else 0
            self.cache.plan_saves(gen, self.running, system_end, shared)
        self.running.append(gen)
        return gen

    def _system_prompt_end(self, messages: list[dict], prompt: numpy.ndarray) -> int:
        """Where a chat's leading system messages end in its prompt (0: none): the prompt's
        common prefix with the same system messages followed by another user message, so
        whatever the template does around them."""
        k = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        if k == 0 or k == len(messages):
            return 0
        text, add_bos = self._chat([*messages[:k], {"role": "user", "content": "\u2063"}])
        return prefix.shared_prefix(numpy.asarray(self.tokenize(text, add_bos), numpy.int32),
                                    prompt)  # fmt: skip

    def cancel(self, gen: Generation, keep: bool = False) -> None:
        """Drop a sequence now: its sampler and slot are free on return. With `keep` (it
        finished) its KV cells stay for a prompt that continues it, and its state goes to
        the prefix cache; otherwise they are emptied."""
        if gen.seq is None:
            return  # already released
        if self.cache is None:
            self._llama_cpp.llama_memory_seq_rm(self._memory, gen.seq, -1, -1)
        elif keep:
            self.cache.keep(gen.seq, gen.kv_tokens())
        else:
            self.cache.forget(gen.seq)
        if gen.sampler is not None:
            self._llama_cpp.llama_sampler_free(gen.sampler)
            gen.sampler = None
        self.free_seqs.append(gen.seq)
        gen.seq = None
        self.running.remove(gen)

    def kv_tokens(self, seq: int) -> int:
        """Cells sequence `seq` holds in the KV cache (0 when it is free)."""
        return self._llama_cpp.llama_memory_seq_pos_max(self._memory, seq) + 1

    def step(self) -> list[tuple[Generation, Step]]:
        """One decoding step for every sequence in flight; returns what each produced.

        The pending tokens of the generating sequences are decoded in the groups that
        `step_plan` gives for their number (cheapest on this machine, measured at start),
        then up to `prefill_chunk` tokens of the prompts not yet read, oldest first, in
        decodes of their own (see _prompt_decodes; a prompt's first token is sampled when
        its last chunk is in). So prompts arriving together are read in one step: the
        eighth of eight does not wait for seven steps of everyone's tokens. Prompt and
        tokens are not merged into one batch: with one KV stream per sequence llama.cpp
        splits such a batch into ubatches of equally many tokens per sequence anyway, and
        the prompt's logits would then depend on the other traffic.
        """
        results: list[tuple[Generation, Step]] = []
        generating = sorted((g for g in self.running if g.pending is not None),
                            key=lambda g: g.seq)  # fmt: skip
        try:
            start = 0
            for size in self.step_plan[len(generating)]:
                group = generating[start : start + size]
                start += size
                self._decode([(g, [g.pending], True) for g in group])
                for i, gen in enumerate(group):
                    results.append((gen, gen.accept(self._sample(gen, i))))
            for chunks in self._prompt_decodes():
                self._decode(chunks)
                index = -1  # batch index of each chunk's last token
                for gen, chunk, last in chunks:
                    index += len(chunk)
                    if self.cache is not None:
                        self.cache.after_read(gen)
                    if last:
                        results.append((gen, gen.accept(self._sample(gen, index))))
        except DecodeError as exc:
            exc.results = results  # what the sequences decoded earlier in this step produced
            raise
        return results

    def _prompt_decodes(self) -> list[list[tuple[Generation, list[int], bool]]]:
        """This step's prompt reading: decodes of (sequence, tokens, is its last chunk).

        Oldest prompt first, as many as fit in `prefill_chunk` tokens (the oldest always),
        each cut at multiples of `prefill_chunk` as it would be alone. Up to 3 prompts
        are read in a decode each, so their logits are those they get alone; 4 or more in
        one decode, which costs about what two cost apart (the weights are read once).
        In one batch a prompt's logits do change: from 4 rows llama.cpp computes the
        repacked Q4_K matmuls 4 rows at a time and a row's kernel, hence its rounding,
        depends on where it falls (perf/engine.py: two 6-token prompts together, logits
        off by up to 1.2). That is where greedy exactness ends anyway (README "Exactness").
        A chunk also ends where the prefix cache saves a state (plan_saves), and a prompt
        that waits for another to read their common prefix is passed over until it has.
        """
        chunks = []
        budget = self.prefill_chunk
        for gen in self.running:
            if not gen.prefilling or (self.cache is not None and self.cache.waiting(gen)):
                continue
            end = (gen.n_past // self.prefill_chunk + 1) * self.prefill_chunk
            if gen.save_at:
                end = min(end, gen.save_at[0])
            chunk = gen.prompt[gen.n_past : end]
            if chunks and len(chunk) > budget:
                break
            budget -= len(chunk)
            chunks.append((gen, chunk, gen.n_past + len(chunk) == len(gen.prompt)))
        if len(chunks) >= BATCHED_PROMPTS_FROM:
            return [chunks]
        return [[chunk] for chunk in chunks]

    def measure_step_costs(self, rounds: int = 2) -> list[float]:
        """Milliseconds one decode of k generating tokens takes here, for k = 0..slots.

        Decoding k sequences in one batch does not always beat k decodes of one: on the
        AMD EPYC machines here llama.cpp multiplies the 262k-row Q8_0 output matrix with a
        4-row GEMM kernel (llamafile's tinyBLAS) for 2-7 tokens, which computes far slower
        than the memory-bound single-token path (1 thread: 13.5 ms for 1 token, 46 for 2,
        67 for 4, 84 for 8); on the Intel Xeon ones batching pays from 2 tokens. So the
        step plan comes from a measurement, best of `rounds`, made with throwaway tokens in
        every sequence, whose cells are removed after.
        """
        costs = [0.0] + [float("inf")] * self.slots
        positions = [0] * self.slots

        def decode(k: int) -> float:
            rows = [(0, positions[seq], seq, True) for seq in range(k)]  # any token will do
            started = time.perf_counter()
            if self._decode_rows(rows) != 0:
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
                self._llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return costs

    def _decode(self, parts: list[tuple[Generation, list[int], bool]]) -> None:
        """Decode tokens of several sequences in one batch; `logits` for each part's last."""
        rows = (
            (token, gen.n_past + j, gen.seq, logits and j == len(tokens) - 1)
            for gen, tokens, logits in parts
            for j, token in enumerate(tokens)
        )
        rc = self._decode_rows(rows)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}", [gen for gen, _, _ in parts])
        for gen, tokens, _ in parts:
            gen.n_past += len(tokens)

    def _decode_rows(self, rows) -> int:
        """llama_decode of (token, position, sequence, logits?) rows; its return code."""
        batch = self._batch
        n = 0
        for token, pos, seq, logits in rows:
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
            n += 1
        batch.n_tokens = n
        return self._llama_cpp.llama_decode(self.ctx.ctx, batch)

    def _sample(self, gen: Generation, index: int) -> int:
        if gen.sampler is None:  # greedy: see _sampler
            logits = self._llama_cpp.llama_get_logits_ith(self.ctx.ctx, index)
            return int(numpy.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        return self._llama_cpp.llama_sampler_sample(gen.sampler, self.ctx.ctx, index)

    def _sampler(self, params: dict):
        """A llama.cpp sampler chain for one sequence, as llama-cpp-python builds it; None
        for greedy decoding, which _sample does as one argmax over llama.cpp's logits (the
        first highest, as llama.cpp's greedy sampler picks). llama_sampler_sample copies
        all 262k logits into a candidate array first: 0.30 ms per token here against
        0.02 for the argmax (perf/engine.py), 2.4 ms of each 45-55 ms step at 8."""
        llama_cpp = self._llama_cpp
        temperature = params["temperature"]
        if temperature == 0:
            return None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        seed = params["seed"] if params["seed"] is not None else llama_cpp.LLAMA_DEFAULT_SEED
        for sampler in (
            llama_cpp.llama_sampler_init_top_k(params["top_k"]),
            llama_cpp.llama_sampler_init_top_p(params["top_p"], 1),
            llama_cpp.llama_sampler_init_temp(temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain


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
