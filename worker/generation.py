"""One sequence of the engine: its prompt, where it is in its KV stream, the text it made.

Text is decoded incrementally (a token can end inside a UTF-8 character) and held back
only while it could still be the start of a stop string.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy

from llmsup.protocol import constants as C
from llmsup.protocol.messages import Sampling, ToolCall
from llmsup.worker import logprobs, tools
from llmsup.worker.sampler import Sampler

if TYPE_CHECKING:
    from llmsup.worker.engine import Engine


@dataclass
class Delta:
    text: str  # text to stream now (may be empty while held back or mid-character)
    finish_reason: str | None = None  # set on the last step
    # With logprobs: the entries of the tokens whose text this delta releases (logprobs.py);
    # set only with text or on the last step.
    logprobs: list[dict] | None = None


@dataclass(eq=False)  # one sequence is equal only to itself (leaders and followers share a prompt)
class Generation:
    """One sequence: its prompt, where it is in its KV stream, and the text it produced."""

    engine: Engine
    seq: int | None  # sequence id in the context; None once released
    prompt: list[int]
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached_tokens: int = 0  # prompt tokens it found in the prefix cache, not read
    save_at: list[int] = field(default_factory=list)  # where the prefix cache saves a state
    waiting_for: tuple[Generation, int] | None = None  # (prompt being read, up to where)
    prompt_ids: numpy.ndarray | None = None  # the prompt as an int32 array (the prefix cache)
    pending: int | None = None  # sampled, streamed, not yet decoded: the next input
    job_id: bytes = b""  # the worker loop's name for it
    grammar: str | None = None  # GBNF every token must fit (sampler.py)
    answer: tools.Answer | None = None  # a chat with tools: its output, read as it streams
    tool_calls: list[ToolCall] = field(default_factory=list)  # what the answer called
    echo: bool = False  # read every prompt row's logits: prompt_logprobs in DONE
    # A request of n completions (SPEC.md 3.16): which one this is (None: a request of one),
    # and on the first (the leader, which reads the prompt) the others, which take a copy
    # of its cells and its last logits row when it has read it (Engine.step); a follower
    # names its leader.
    index: int | None = None
    followers: list[Generation] = field(default_factory=list)
    leader: Generation | None = None
    _held: str = ""

    def __post_init__(self):
        if self.prompt_ids is None:
            self.prompt_ids = numpy.asarray(self.prompt, numpy.int32)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_tokens = min(self.sampling.max_tokens, self.engine.n_ctx - len(self.prompt))
        self._llama = self.engine.llama  # for each token's text: one lookup fewer per token
        plain = self.sampling.greedy and self.sampling.plain and self.grammar is None
        # None: the greedy fast path, one argmax (Llama.sample).
        self.sampler = None if plain else Sampler(self._llama, self.sampling, self.grammar)
        self._logprobs = self.sampling.logprobs
        # (where its text starts among the decoded characters, entry) of tokens not yet sent
        self._entries: list[tuple[int, dict]] = []
        self._chars = 0  # characters decoded from the generated tokens so far
        # The prompt's entries, filled as an echo is read; the first token's has no
        # logprob (nothing comes before it): null, and top_logprobs null.
        self.prompt_logprobs: list[dict] | None = None
        if self.echo:
            first = logprobs.describe(self._llama, self.prompt[0], None)
            self.prompt_logprobs = [{**first, "top_logprobs": None}]

    @property
    def prefilling(self) -> bool:
        """It has prompt tokens to read (a follower reads none: it copies its leader's)."""
        return self.n_past < len(self.prompt) and self.leader is None

    def pick(self, index: int) -> int | None:
        """The next token from the last decode's row `index` (None: the grammar admits none)."""
        if self.sampler is None:
            return self._llama.sample(None, index)
        return self.sampler.pick(index)

    def take(self, index: int) -> Delta:
        """Pick the next token from the last decode's row `index` and accept it; with
        logprobs, note its entry first (from that row, before the next decode)."""
        if self._max_tokens <= 0:  # an echo of max_tokens 0: the prompt's logprobs only
            self.first_token_at = self.first_token_at or time.monotonic()
            self.pending = None
            return Delta("", C.FINISH_LENGTH, [])
        token = self.pick(index)
        if self._logprobs and token is not None and not self._llama.is_end_of_generation(token):
            row = self._llama.logits(index)
            self._entries.append(
                (self._chars, logprobs.entry(self._llama, row, token, self.sampling.top_logprobs))
            )
        return self.accept(token)

    def read_prompt_rows(self, first_index: int, start: int, n: int) -> None:
        """An echo's chunk of `n` prompt tokens from position `start` was decoded with
        every row's logits, rows first_index...: each gives the next prompt token's entry."""
        assert self.prompt_logprobs is not None
        top = self.sampling.top_logprobs
        for j in range(n):
            if start + j + 1 < len(self.prompt):
                row = self._llama.logits(first_index + j)
                token = self.prompt[start + j + 1]
                self.prompt_logprobs.append(logprobs.entry(self._llama, row, token, top))

    def accept(self, token: int | None) -> Delta:
        """Take a sampled token: the text to stream, and whether this sequence is done."""
        delta = self._accept(token)
        if self.answer is None:
            return delta
        text = self.answer.feed(delta.text)
        if delta.finish_reason is None:
            return Delta(text)
        rest, self.tool_calls = self.answer.finish(delta.finish_reason == C.FINISH_STOP)
        reason = C.FINISH_TOOL_CALLS if self.tool_calls else delta.finish_reason
        return Delta(text + rest, reason)

    def _accept(self, token: int | None) -> Delta:
        self.pending = None
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token is None:  # the grammar admits no token: the output cannot be completed
            return self._delta(self._flush(), C.FINISH_LENGTH)
        if self._llama.is_end_of_generation(token):
            return self._delta(self._flush(), C.FINISH_STOP)
        self.tokens.append(token)
        piece = self._utf8.decode(self._llama.piece(token))
        text = self._held + piece
        starts_at = self._chars - len(self._held)  # where `text` starts among all decoded
        self._chars += len(piece)
        stop = self.sampling.stop
        for s in stop:
            at = text.find(s)
            if at >= 0:
                self._held = ""
                return self._delta(text[:at], C.FINISH_STOP, cut=starts_at + at)
        keep = _longest_stop_prefix(text, stop)
        self._held = text[len(text) - keep :] if keep else ""
        emit = text[: len(text) - keep]
        if len(self.tokens) >= self._max_tokens:
            return self._delta(emit + self._flush(), C.FINISH_LENGTH)
        self.pending = token
        return self._delta(emit)

    def _delta(self, text: str, finish: str | None = None, cut: int | None = None) -> Delta:
        """A Delta, with the entries of the tokens it releases: those whose text it
        carries (a token whose text is held back goes with a later one), all that are left
        on the last step, but none whose text lies past a stop string's start (`cut`)."""
        if not self._logprobs or (not text and finish is None):
            return Delta(text, finish)
        entries = [e for at, e in self._entries if cut is None or at < cut]
        self._entries = []
        return Delta(text, finish, entries)

    def _flush(self) -> str:
        text, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return text

    def close(self, keep: bool = False) -> None:
        """Release the sequence (idempotent); `keep`: it finished, its cells may serve the
        next prompt that continues it."""
        self.engine.release(self, keep)

    def kv_tokens(self) -> numpy.ndarray:
        """The tokens whose cells the sequence holds: the prompt and the tokens decoded
        after it (the last sampled one never is)."""
        return numpy.asarray([*self.prompt, *self.tokens][: self.n_past], numpy.int32)

    def done_body(self, finish_reason: str) -> dict:
        """The DONE body: why it ended, its calls (a chat with tools), usage and timings."""
        body = {"finish_reason": finish_reason, **self.usage()}
        if self.tool_calls:
            body["tool_calls"] = [call.to_body() for call in self.tool_calls]
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.prompt_logprobs
        return body

    def usage(self) -> dict:
        now = time.monotonic()
        first = self.first_token_at or now
        decode_s = now - first
        return {
            "usage": {
                "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.tokens),
                "cached_tokens": self.cached_tokens,
            },
            "timings": {
                "prompt_ms": round((first - self.started) * 1000, 3),
                "generation_ms": round(decode_s * 1000, 3),
                "tokens_per_second": round((len(self.tokens) - 1) / decode_s, 2)
                if decode_s > 0 and len(self.tokens) > 1
                else None,
            },
        }


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
