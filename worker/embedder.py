"""Embeddings from the worker's model (SPEC.md 3.15), in a llama.cpp context of their own.

The context shares the loaded model's weights (nothing is loaded twice) and has
embeddings on, with the model's pooling type, or mean pooling for a model that names none
(a generation model). It is created on the first embed request (its KV cache costs
memory) and never touches the generation context, so sequences being generated keep
their cells. Several inputs share one decode: one sequence per input, as many as fit the
batch; the memory is cleared between decodes.

A request is an Embedding the worker's loop advances one decode per step, beside the
generations (worker/loop.py): a batch of 2,048 texts takes seconds to minutes, and done
at once it would stall every sequence of the worker for that long and, past
--stall-timeout, get the worker killed as hung.
"""

from __future__ import annotations

import base64
import ctypes

import numpy

from llmsup.protocol import constants as C
from llmsup.worker.engine import RequestRejected

POOLING_NAMES = {1: "mean", 2: "cls", 3: "last", 4: "rank"}  # llama_pooling_type values
MAX_SEQS = 64  # inputs in one decode (llama.cpp's n_seq_max)
# Bytes a vector's number takes in a reply, at most: float32 written as JSON by orjson
# (shortest repr of the double, e.g. -0.012345678918063641, and a comma), or base64.
BYTES_PER_NUMBER = {"float": 24, "base64": 16 / 3}
REPLY_MARGIN = 64 * 1024  # the reply's other members


class Embedder:
    def __init__(self, llama, n_ctx: int, threads: int):
        from llama_cpp._internals import LlamaContext

        lib = llama.lib
        self.lib = lib
        self.llama = llama
        arch = llama.metadata.get("general.architecture", "")
        named = int(llama.metadata.get(f"{arch}.pooling_type", 0) or 0)
        if named == lib.LLAMA_POOLING_TYPE_RANK:
            raise RequestRejected(
                C.E_BAD_REQUEST, "this model ranks (pooling rank): it gives no embeddings", "model"
            )
        # A model that names no pooling (a generation model): the mean of its tokens' states.
        self.pooling = named if named in POOLING_NAMES else lib.LLAMA_POOLING_TYPE_MEAN
        # An embedding model's positions end at its trained context (BERT learns a table of
        # 512: llama.cpp aborts the process on a position past it); a generation model's
        # RoPE runs on, as its generation context does.
        trained = int(lib.llama_model_n_ctx_train(llama.model.model))
        if not llama.generates and 0 < trained < n_ctx:
            n_ctx = trained
        params = lib.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = self.pooling
        params.n_ctx = n_ctx
        params.kv_unified = True  # the inputs of a decode share the n_ctx cells
        params.n_seq_max = MAX_SEQS
        # A whole input in one ubatch: a non-causal model (BERT) attends to all its tokens.
        params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        self.context = LlamaContext(model=llama.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.n_ctx = n_ctx
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_embd = int(lib.llama_model_n_embd(llama.model.model))
        self.encoder_only = bool(lib.llama_model_has_encoder(llama.model.model)) and not bool(
            lib.llama_model_has_decoder(llama.model.model)
        )
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    @property
    def pooling_name(self) -> str:
        return POOLING_NAMES[self.pooling]

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.context.close()

    def most_inputs(self, encoding: str) -> int:
        """Inputs whose vectors fit one reply frame at this model's size."""
        per_vector = self.n_embd * BYTES_PER_NUMBER[encoding] + 16
        return int((C.MAX_FRAME_BYTES - REPLY_MARGIN) // per_vector)

    def start(self, texts, normalize: bool, truncate: bool, encoding: str) -> Embedding:
        """An embed request to advance (Embedding); RequestRejected for one that cannot be
        served, before any decode."""
        most = self.most_inputs(encoding)
        if len(texts) > most:
            other = "" if encoding == "base64" else f" (with base64: {self.most_inputs('base64')})"
            raise RequestRejected(
                C.E_BAD_REQUEST,
                f"input has {len(texts)} texts; {most} vectors of {self.n_embd} numbers fit one "
                f"reply as {encoding}{other}",
                "input",
            )
        inputs = [self.tokens_of(i, text, truncate) for i, text in enumerate(texts)]
        return Embedding(self, inputs, normalize, encoding)

    def tokens_of(self, index: int, text: str, truncate: bool) -> list[int]:
        tokens = self.llama.tokenize(text, True)
        if len(tokens) > self.n_ctx:
            if not truncate:
                # `field` goes with bad_request only (SPEC.md 5): the message names the input.
                raise RequestRejected(
                    C.E_CONTEXT_OVERFLOW,
                    f"input[{index}] has {len(tokens)} tokens; the context holds {self.n_ctx} "
                    "(truncate: true cuts it)",
                )
            tokens = tokens[: self.n_ctx]
        return tokens

    def decode(self, inputs: list[list[int]], into: numpy.ndarray) -> None:
        """One decode of these inputs (sequences 0..n-1); their pooled vectors `into`."""
        lib, batch = self.lib, self.batch
        lib.llama_memory_clear(self.memory, True)
        n = 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # an output row per token, which pooling reads
                n += 1
        batch.n_tokens = n
        status = (lib.llama_encode if self.encoder_only else lib.llama_decode)(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode of {len(inputs)} embedding inputs: status {status}")
        for seq in range(len(inputs)):
            pointer = lib.llama_get_embeddings_seq(self.ctx, seq)
            if not pointer:
                raise RuntimeError(f"no pooled embedding for sequence {seq}")
            into[seq] = numpy.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)
            )


class Embedding:
    """One embed request in progress, a decode of some of its inputs at a time. It stands
    in the worker loop's running jobs beside Generations (one slot, `prefilling` until its
    DONE; `usage` for an abort)."""

    seqs = 1
    prefilling = True
    tokens = ()  # generated tokens: none

    def __init__(self, embedder: Embedder, inputs: list[list[int]], normalize: bool, encoding):
        self.embedder = embedder
        self.inputs = inputs
        self.normalize = normalize
        self.encoding = encoding
        self.vectors = numpy.empty((len(inputs), embedder.n_embd), numpy.float32)
        self.next = 0  # the first input not decoded yet
        self.read = 0  # tokens decoded so far
        self.job_id = b""

    @property
    def finished(self) -> bool:
        return self.next == len(self.inputs)

    def advance(self, budget: int) -> None:
        """Decode the next inputs, as many as fit `budget` tokens (at least one whole
        input: a non-causal model reads an input in one ubatch) and one batch."""
        limit = min(budget, self.embedder.n_ctx)
        start = end = self.next
        used = 0
        while end < len(self.inputs) and end - start < MAX_SEQS:
            if end > start and used + len(self.inputs[end]) > limit:
                break
            used += len(self.inputs[end])
            end += 1
        self.embedder.decode(self.inputs[start:end], self.vectors[start:end])
        self.next, self.read = end, self.read + used

    def done_body(self) -> dict:
        vectors = self.vectors
        if self.normalize:
            norms = numpy.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= numpy.where(norms > 0, norms, 1)
        if self.encoding == "base64":
            out = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            out = vectors.tolist()
        return {
            "embeddings": out,
            "dimensions": self.embedder.n_embd,
            "usage": {"prompt_tokens": self.read},
            "pooling": self.embedder.pooling_name,
        }

    def usage(self) -> dict:
        return {"usage": {"prompt_tokens": self.read, "completion_tokens": 0}}

    def close(self, keep: bool = False) -> None:
        """Nothing to free: the embedding context is cleared before each decode."""
