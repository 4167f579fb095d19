"""llama.cpp in this process: one model, one context of `slots` sequences, and every call
into llama.cpp the worker makes (decoding, logits and sampling, tokens and chat templates,
KV cells and sequence states). The engine (engine.py) decides what to decode; this module
only does it.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os

import numpy

from llmsup.protocol.messages import Message
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

_u8p = ctypes.POINTER(ctypes.c_uint8)

_llama_errors: collections.deque[str] = collections.deque(maxlen=4)
_llama_log = logging.getLogger("llmsup.worker.llama")
_log_callback = None


def _route_llama_logs(llama_cpp) -> None:
    """Log llama.cpp's warnings and errors (in the worker's log format), and keep the last
    errors."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            line = text.decode(errors="replace").rstrip()
            _llama_log.log(logging.ERROR if level == 4 else logging.WARNING, "%s", line)
            if level == 4:
                _llama_errors.append(line)

    _log_callback = callback  # ctypes must keep the callback alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class Llama:
    """A loaded model and its context: `slots` sequences of `n_ctx` cells each (one KV
    stream per sequence), a batch of `n_batch` rows, `threads` ggml threads."""

    def __init__(self, model_path: str, threads: int, n_ctx: int, slots: int, n_batch: int):
        import llama_cpp  # imported here so that tools can import this module cheaply
        from llama_cpp._internals import LlamaContext, LlamaModel

        self.lib = llama_cpp  # the ctypes binding, for perf/ and tests
        _route_llama_logs(llama_cpp)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_seq_max = slots
        params.kv_unified = False  # one KV stream per sequence: see Engine.step
        params.n_batch = params.n_ubatch = n_batch
        params.n_outputs_max = slots  # logits of at most one token per sequence per decode
        params.n_threads = params.n_threads_batch = threads
        # Flash attention where the backend has it, as llama-server does: on our CPUs it
        # is faster from 1 to 8 sequences (2 threads, greedy: 89.6 vs 82.2 tok/s for one
        # sequence, 175 vs 160 for eight; docs/architecture.md "llama.cpp settings").
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
            self.context = LlamaContext(model=self.model, params=params, verbose=False)
        except Exception as exc:
            # llama-cpp-python's exception says only "failed to load"; llama.cpp said why.
            why = "; ".join(line for line in _llama_errors if "failed to load" not in line)
            raise RuntimeError(f"{exc}: {why}" if why else str(exc)) from None
        self.ctx = self.context.ctx  # the llama_context pointer
        # One thread needs no pool: ggml runs a 1-thread graph on the calling thread.
        self.threadpool = ThreadPool(self.ctx, threads) if threads > 1 else None
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)  # per sequence
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # Every token with its logit, as llama.cpp's samplers take them (sampler.py, only
        # for a grammar): one buffer, the worker samples one sequence at a time.
        self.token_ids = numpy.arange(self.n_vocab, dtype=numpy.int32)
        self.candidates = numpy.zeros(
            self.n_vocab, numpy.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        )
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model.model))  # 0: no sliding window
        self.metadata = self.model.metadata()
        self._chat = self._chat_formatter()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # Logits of at most this many rows per decode (llama.cpp aborts past it): an echo's
        # prompt, which needs every row's, is read in chunks of this many (engine.py).
        self.n_outputs_max = params.n_outputs_max
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(64)
        n_params = llama_cpp.llama_model_n_params(self.model.model)
        # Which saved sequence states this context can load: the prefix cache's key.
        self.ctx_key = context_key(model_path, params, n_params, llama_cpp.__version__)

    def close(self) -> None:
        if self._batch is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if self.threadpool is not None:
            self.threadpool.close()
        self.context.close()
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

            def format_jinja(messages: tuple[Message, ...]) -> tuple[str, bool]:
                # The template reads OpenAI-style dicts. It writes the BOS token itself.
                dicts = [{"role": m.role, "content": m.content} for m in messages]
                return jinja(messages=dicts).prompt, False

            return format_jinja
        builtin = BUILTIN_CHAT_TEMPLATES.get(self.metadata.get("general.architecture", ""))
        if builtin:
            return lambda messages: (self._apply_builtin_template(builtin, messages), True)
        return None

    def _apply_builtin_template(self, name: bytes, messages: tuple[Message, ...]) -> str:
        llama_cpp = self.lib
        encoded = [(m.role.encode(), m.content.encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(encoded))(
            *[llama_cpp.llama_chat_message(role, content) for role, content in encoded]
        )
        needed = llama_cpp.llama_chat_apply_template(name, chat, len(encoded), True, None, 0)
        buf = ctypes.create_string_buffer(needed + 1)
        llama_cpp.llama_chat_apply_template(name, chat, len(encoded), True, buf, needed + 1)
        return buf.value.decode()

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    @property
    def generates(self) -> bool:
        """False for an embedding model (BERT, EmbeddingGemma): its attention is not
        causal and it has no output layer, so llama.cpp aborts the process on the decode
        of a generation; it serves `embed` only."""
        arch = self.metadata.get("general.architecture", "")
        return self.metadata.get(f"{arch}.attention.causal", "true") != "false"

    def format_chat(self, messages: tuple[Message, ...]) -> tuple[str, bool]:
        """A conversation as the model's prompt, and whether a BOS token goes before it
        (has_chat_template must be true)."""
        return self._chat(messages)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.model.tokenize(text.encode(), add_bos=add_bos, special=True)

    def piece(self, token: int) -> bytes:
        return self.model.detokenize([token])

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes as llama-server shows them (special tokens as their text), for
        logprobs and detokenize; cached: a vocabulary's pieces do not change."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = self.lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            if n < 0:  # longer than the buffer: -n bytes
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            piece = self._pieces[token] = bytes(buf.raw[:n])
        return piece

    def detokenize(self, tokens) -> str:
        """Token ids (each below n_vocab) as text, as llama-server's /detokenize writes it."""
        return b"".join(self.token_bytes(t) for t in tokens).decode(errors="replace")

    @property
    def vocab(self):
        """The llama_vocab pointer (sampler.py's grammar takes it)."""
        return self._vocab

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self._vocab, token))

    # --- decoding and sampling -------------------------------------------------------------

    def decode_rows(self, rows) -> int:
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
        return self.lib.llama_decode(self.ctx, batch)

    def logits(self, index: int) -> numpy.ndarray:
        """The logits of the last decode's row `index` (-1: the last), a view into
        llama.cpp's buffer that the next decode overwrites."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, index)
        return numpy.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def sample(self, sampler, index: int) -> int:
        """The next token from the logits of the last decode's row `index`: from a sampler
        chain (sampler.py), or with None the greedy one: one argmax over llama.cpp's logits,
        the first highest, as llama.cpp's greedy sampler picks. llama_sampler_sample copies
        all 262k logits into a candidate array first: 0.30 ms per token here against 0.02
        for the argmax (perf/engine.py), 2.4 ms of each 45-55 ms step at 8."""
        if sampler is None:
            logits = self.lib.llama_get_logits_ith(self.ctx, index)
            return int(numpy.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        return self.lib.llama_sampler_sample(sampler, self.ctx, index)

    def free_sampler(self, sampler) -> None:
        self.lib.llama_sampler_free(sampler)

    # --- KV cells and sequence states ----------------------------------------------------------

    def kv_tokens(self, seq: int) -> int:
        """Cells sequence `seq` holds in the KV cache (0 when it is empty)."""
        return self.lib.llama_memory_seq_pos_max(self._memory, seq) + 1

    def clear(self, seq: int) -> None:
        """Empty sequence `seq`'s KV cells."""
        self.lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def cut(self, seq: int, n: int) -> None:
        """Keep only the first `n` cells of sequence `seq`."""
        self.lib.llama_memory_seq_rm(self._memory, seq, n, -1)

    def state_size(self, seq: int) -> int:
        return self.lib.llama_state_seq_get_size_ext(self.ctx, seq, 0)

    def save_state(self, seq: int, address: int, size: int) -> int:
        """Write sequence `seq`'s state to `size` bytes at `address`; the bytes written."""
        return self.lib.llama_state_seq_get_data_ext(
            self.ctx, ctypes.cast(address, _u8p), size, seq, 0
        )

    def copy_cells(self, src: int, dsts: list[int]) -> bool:
        """Put sequence `src`'s cells into each of `dsts` (emptied first), through one
        state of `src`; False if llama.cpp refused (then the `dsts` are emptied)."""
        size = self.state_size(src)
        buf = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buf)
        ok = self.save_state(src, address, size) == size
        for dst in dsts:
            self.clear(dst)
            ok = ok and self.load_state(dst, address, size) == size
        if not ok:
            for dst in dsts:
                self.clear(dst)
        return ok

    def load_state(self, seq: int, address: int, size: int) -> int:
        """Load a state of `size` bytes at `address` into sequence `seq`; the bytes read
        (0: llama.cpp refused it)."""
        return self.lib.llama_state_seq_set_data_ext(
            self.ctx, ctypes.cast(address, _u8p), size, seq, 0
        )


def context_key(model_path: str, params, n_params: int, llama_version: str) -> bytes:
    """What a saved state needs of the context that loads it: the same model file and the
    same KV-cache shape (types, streams, sizes, flash attention, sliding-window cache)."""
    st = os.stat(model_path)
    parts = (
        os.path.realpath(model_path),
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
        n_params,
        params.n_ctx,
        params.n_seq_max,
        params.n_ubatch,
        params.kv_unified,
        params.swa_full,
        params.flash_attn_type,
        params.type_k,
        params.type_v,
        llama_version,
    )
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
