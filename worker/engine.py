"""One llama.cpp model in this process, and generations stepped one token at a time.

The worker loop calls `Generation.step()` between socket polls, so it stays responsive
while a sequence decodes. Text is decoded incrementally (a token can end inside a UTF-8
character) and held back only while it could still be the start of a stop string.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import sys
import time
from dataclasses import dataclass, field

from llmsup.protocol import constants as C

# llama.cpp's own templates for model families whose GGUF files often lack one.
BUILTIN_CHAT_TEMPLATES = {
    "gemma": b"gemma",
    "gemma2": b"gemma",
    "gemma3": b"gemma",
    "qwen2": b"chatml",
    "qwen3": b"chatml",
    "phi3": b"phi3",
}


class RequestRejected(Exception):
    """A request this model cannot serve; `code` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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


@dataclass
class Step:
    text: str  # text to stream now (may be empty while held back or mid-character)
    finish_reason: str | None = None  # set on the last step


class Engine:
    def __init__(self, model_path: str, threads: int, n_ctx: int):
        import llama_cpp  # imported here so that tools can import this module cheaply

        self._llama_cpp = llama_cpp
        _route_llama_logs(llama_cpp)
        try:
            self.llm = llama_cpp.Llama(
                model_path=model_path,
                n_threads=threads,
                n_threads_batch=threads,
                n_ctx=n_ctx,
                n_batch=min(512, n_ctx),
                use_mmap=True,
                verbose=False,
            )
        except Exception as exc:
            # llama-cpp-python's exception says only "failed to load"; llama.cpp said why.
            why = "; ".join(line for line in _llama_errors if "failed to load" not in line)
            raise RuntimeError(f"{exc}: {why}" if why else str(exc)) from None
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab
        self._chat = self._chat_formatter()

    def _chat_formatter(self):
        """A function from messages to (prompt, add_bos), or None without a template."""
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = self.llm._model
            eos, bos = model.token_eos(), model.token_bos()
            jinja = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
            # The template writes the BOS token itself.
            return lambda messages: (jinja(messages=messages).prompt, False)
        builtin = BUILTIN_CHAT_TEMPLATES.get(self.llm.metadata.get("general.architecture", ""))
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

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def piece(self, token: int) -> bytes:
        return self.llm.detokenize([token])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def prompt_tokens(self, verb: bytes, body: dict) -> list[int]:
        if verb == C.CHAT:
            if self._chat is None:
                raise RequestRejected(
                    C.E_BAD_REQUEST, "this model has no chat template; use complete instead"
                )
            prompt, add_bos = self._chat(body["messages"])
            tokens = self.llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
        else:
            tokens = self.tokenize(body["prompt"])
        if len(tokens) >= self.n_ctx:
            raise RequestRejected(
                C.E_CONTEXT_OVERFLOW,
                f"prompt has {len(tokens)} tokens; the context is {self.n_ctx} "
                "(start llmsup with a larger --ctx-size or shorten the prompt)",
            )
        return tokens

    def start(self, verb: bytes, body: dict) -> Generation:
        return Generation(self, self.prompt_tokens(verb, body), body)


@dataclass
class Generation:
    engine: Engine
    prompt: list[int]
    params: dict
    tokens: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    _held: str = ""

    def __post_init__(self):
        p = self.params
        llm = self.engine.llm
        if p["seed"] is not None:
            llm.set_seed(p["seed"])
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_tokens = min(p["max_tokens"], self.engine.n_ctx - len(self.prompt))
        # No KV prefix reuse across requests: a prompt evaluated in other batch splits gives
        # slightly different logits, and greedy output must depend on the request alone.
        llm.reset()
        self._tokens_iter = llm.generate(
            self.prompt,
            top_k=p["top_k"],
            top_p=p["top_p"],
            min_p=0.0,
            temp=p["temperature"],
            repeat_penalty=1.0,
        )

    def step(self) -> Step:
        """Decode one token (the first call also prefills the prompt)."""
        token = next(self._tokens_iter)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.engine.is_end_of_generation(token):
            return Step(self._flush(), C.FINISH_STOP)
        self.tokens.append(token)
        text = self._held + self._utf8.decode(self.engine.piece(token))
        stop = self.params["stop"]
        for s in stop:
            at = text.find(s)
            if at >= 0:
                self._held = ""
                return Step(text[:at], C.FINISH_STOP)
        keep = _longest_stop_prefix(text, stop)
        self._held = text[len(text) - keep :] if keep else ""
        emit = text[: len(text) - keep]
        if len(self.tokens) >= self._max_tokens:
            return Step(emit + self._flush(), C.FINISH_LENGTH)
        return Step(emit)

    def _flush(self) -> str:
        text, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return text

    def close(self) -> None:
        self._tokens_iter.close()

    def usage(self) -> dict:
        now = time.monotonic()
        first = self.first_token_at or now
        decode_s = now - first
        return {
            "usage": {
                "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.tokens),
            },
            "timings": {
                "prompt_ms": round((first - self.started) * 1000, 3),
                "generation_ms": round(decode_s * 1000, 3),
                "tokens_per_second": round((len(self.tokens) - 1) / decode_s, 2)
                if decode_s > 0 and len(self.tokens) > 1
                else None,
            },
        }


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
