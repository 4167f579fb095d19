"""Typed values of what a request asks for, parsed once at the edge (codec.py).

The supervisor, the worker codec (workerwire.py) and the engine all use these; none of
them reads a wire dict. Sampling defaults live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmsup.protocol import constants as C


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a generation picks its tokens and when it ends; the defaults are the protocol's."""

    max_tokens: int = C.DEFAULT_MAX_TOKENS
    temperature: float = C.DEFAULT_TEMPERATURE
    top_p: float = C.DEFAULT_TOP_P
    top_k: int = C.DEFAULT_TOP_K
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_body(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
        }


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Complete:
    """Continue a raw prompt."""

    verb: ClassVar[bytes] = C.COMPLETE
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    timeout_ms: int | None = None  # the supervisor's business; workers ignore it
    model: str | None = None  # a model's name (None: the server's default); the supervisor's

    def as_text(self) -> str:
        return self.prompt

    def to_body(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "model": self.model,
            "timeout_ms": self.timeout_ms,
            **self.sampling.to_body(),
        }


@dataclass(frozen=True, slots=True)
class Chat:
    """Answer a conversation, formatted by the model's chat template."""

    verb: ClassVar[bytes] = C.CHAT
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    timeout_ms: int | None = None
    model: str | None = None

    def as_text(self) -> str:
        """The conversation as one string with role separators (routing and estimates)."""
        return "".join(f"\x00{m.role}\x01{m.content}" for m in self.messages)

    def to_body(self) -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        return {
            "messages": messages,
            "model": self.model,
            "timeout_ms": self.timeout_ms,
            **self.sampling.to_body(),
        }


@dataclass(frozen=True, slots=True)
class Tokenize:
    verb: ClassVar[bytes] = C.TOKENIZE
    text: str
    model: str | None = None
    timeout_ms: None = None  # never waits long enough to need one

    def as_text(self) -> str:
        return self.text

    def to_body(self) -> dict[str, Any]:
        return {"text": self.text, "model": self.model}


@dataclass(frozen=True, slots=True)
class Cancel:
    verb: ClassVar[bytes] = C.CANCEL
    target: bytes

    def to_body(self) -> dict[str, Any]:
        return {"target": self.target.decode()}


@dataclass(frozen=True, slots=True)
class Ping:
    verb: ClassVar[bytes] = C.PING

    def to_body(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class Status:
    verb: ClassVar[bytes] = C.STATUS

    def to_body(self) -> dict[str, Any]:
        return {}


# What a worker runs: the verbs that need a worker slot.
Work = Complete | Chat | Tokenize
Body = Complete | Chat | Tokenize | Cancel | Ping | Status


def estimate_prompt_tokens(work: Work) -> int:
    """Prompt size before tokenization: UTF-8 bytes / 4, about right for English text
    (the queue's token bound; chat adds a few bytes per message for the template)."""
    if isinstance(work, Chat):
        size = sum(len(m.content.encode()) + 8 for m in work.messages)
    else:
        size = len(work.as_text().encode())
    return size // 4 + 1
