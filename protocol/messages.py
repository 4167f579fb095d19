"""Typed values of what a request asks for, parsed once at the edge (codec.py).

The supervisor, the worker codec (workerwire.py) and the engine all use these; none of
them reads a wire dict. Sampling defaults live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = C.DEFAULT_REPEAT_LAST_N
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), in the request's order
    grammar: str | None = None  # GBNF the output must match
    json_schema: str | None = None  # compact JSON of a schema the output must match
    logprobs: bool = False  # each token's logprob in its frame (SPEC.md 3.13)
    top_logprobs: int = 0  # and the likeliest this many tokens' at each place

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def unbiased(self) -> bool:
        """No penalty and no logit bias: the logits are the model's."""
        return (
            self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repeat_penalty == 1
            and not self.logit_bias
        )

    @property
    def plain(self) -> bool:
        """No penalty, bias or constraint: greedy decoding is then one argmax."""
        return self.unbiased and self.grammar is None and self.json_schema is None

    def to_body(self) -> dict[str, Any]:
        body = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
        }
        # The fields added after the first release go only where they are set: a body
        # stays what a server without them accepts (SPEC.md 7).
        for name, default in EXTRA_DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                body[name] = value
        if self.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        if self.json_schema is not None:
            body["json_schema"] = orjson.loads(self.json_schema)
        return body


EXTRA_DEFAULTS = {
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repeat_penalty": 1.0,
    "repeat_last_n": C.DEFAULT_REPEAT_LAST_N,
    "grammar": None,
    "logprobs": False,
    "top_logprobs": 0,
}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a tool, as the model made it: `arguments` is JSON text."""

    id: str
    name: str
    arguments: str

    def to_body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: `parameters` is the compact JSON of its schema."""

    name: str
    description: str = ""
    parameters: str = '{"type":"object","properties":{}}'

    def to_body(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": orjson.loads(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            body["tool_calls"] = [call.to_body() for call in self.tool_calls]
        if self.tool_call_id is not None:
            body["tool_call_id"] = self.tool_call_id
        return body


@dataclass(frozen=True, slots=True)
class Complete:
    """Continue a raw prompt."""

    verb: ClassVar[bytes] = C.COMPLETE
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    timeout_ms: int | None = None  # the supervisor's business; workers ignore it
    model: str | None = None  # a model's name (None: the server's default); the supervisor's
    echo: bool = False  # DONE carries the prompt's logprobs too (SPEC.md 3.13)
    tokens: tuple[int, ...] | None = None  # the prompt as token ids (then `prompt` is "")
    keep_alive_s: float | None = None  # the supervisor's: None, its --keep-alive; -1 forever
    n: int = 1  # completions of the prompt, each in a sequence of its own (SPEC.md 3.16)

    def as_text(self) -> str:
        if self.tokens is not None:  # routing compares starts: the ids' will do
            return "\x02" + " ".join(map(str, self.tokens[:4096]))
        return self.prompt

    def to_body(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt": self.prompt}
        if self.tokens is not None:
            prompt = {"tokens": list(self.tokens)}
        body = {
            **prompt,
            "model": self.model,
            "timeout_ms": self.timeout_ms,
            **self.sampling.to_body(),
            **_keep_alive_body(self.keep_alive_s),
        }
        if self.echo:
            body["echo"] = True
        return {**body, **_n_body(self.n)}


@dataclass(frozen=True, slots=True)
class Chat:
    """Answer a conversation, formatted by the model's chat template."""

    verb: ClassVar[bytes] = C.CHAT
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    timeout_ms: int | None = None
    model: str | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # "none", "auto", "required", or the name of a tool to call
    parallel_tool_calls: bool = False  # llama-server's default: one call per answer
    keep_alive_s: float | None = None
    n: int = 1

    def as_text(self) -> str:
        """The conversation as one string with role separators (routing and estimates)."""
        return "".join(f"\x00{m.role}\x01{m.content}" for m in self.messages)

    def to_body(self) -> dict[str, Any]:
        body = {
            "messages": [m.to_body() for m in self.messages],
            "model": self.model,
            "timeout_ms": self.timeout_ms,
            **self.sampling.to_body(),
            **_keep_alive_body(self.keep_alive_s),
        }
        if self.tools:
            body["tools"] = [tool.to_body() for tool in self.tools]
            body["parallel_tool_calls"] = self.parallel_tool_calls
            choice = self.tool_choice
            body["tool_choice"] = (
                choice
                if choice in C.TOOL_CHOICES
                else {"type": "function", "function": {"name": choice}}
            )
        return {**body, **_n_body(self.n)}


def _n_body(n: int) -> dict[str, Any]:
    """n only above 1 (added within LLMSUP1, SPEC.md 7)."""
    return {"n": n} if n != 1 else {}


def sequences(work: Work) -> int:
    """The worker slots a request holds while it runs: one per completion."""
    return getattr(work, "n", 1)


def _keep_alive_body(keep_alive_s: float | None) -> dict[str, Any]:
    """keep_alive_s only where it is set (added within LLMSUP1, SPEC.md 7)."""
    return {} if keep_alive_s is None else {"keep_alive_s": keep_alive_s}


@dataclass(frozen=True, slots=True)
class Tokenize:
    verb: ClassVar[bytes] = C.TOKENIZE
    text: str
    model: str | None = None
    timeout_ms: None = None  # never waits long enough to need one
    add_special: bool = True  # the BOS token, if the model uses one (as a prompt gets it)
    with_pieces: bool = False  # DONE has each token's text too

    def as_text(self) -> str:
        return self.text

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"text": self.text, "model": self.model}
        # Added within LLMSUP1: sent only when not the default (SPEC.md 7).
        if not self.add_special:
            body["add_special"] = False
        if self.with_pieces:
            body["with_pieces"] = True
        return body


@dataclass(frozen=True, slots=True)
class Detokenize:
    """Token ids back to text (SPEC.md 3.14)."""

    verb: ClassVar[bytes] = C.DETOKENIZE
    tokens: tuple[int, ...]
    model: str | None = None
    timeout_ms: None = None  # never waits long enough to need one

    def as_text(self) -> str:
        return ""  # nothing to route on: no prompt

    def to_body(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "model": self.model}


@dataclass(frozen=True, slots=True)
class Embed:
    """Texts to embedding vectors (SPEC.md 3.15)."""

    verb: ClassVar[bytes] = C.EMBED
    inputs: tuple[str, ...]
    model: str | None = None
    timeout_ms: None = None
    normalize: bool = True  # to unit length (L2), as llama-server and Ollama return them
    truncate: bool = False  # an input over the context: cut to it, else context_overflow
    encoding: str = "float"  # or "base64": little-endian float32

    def as_text(self) -> str:
        return ""  # nothing to route on: embeddings are not continued from the cache

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"input": list(self.inputs), "model": self.model}
        if not self.normalize:
            body["normalize"] = False
        if self.truncate:
            body["truncate"] = True
        if self.encoding != "float":
            body["encoding_format"] = self.encoding
        return body


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
Work = Complete | Chat | Tokenize | Detokenize | Embed
Body = Complete | Chat | Tokenize | Detokenize | Embed | Cancel | Ping | Status


def estimate_prompt_tokens(work: Work) -> int:
    """Prompt size before tokenization: UTF-8 bytes / 4, about right for English text
    (the queue's token bound; chat adds a few bytes per message for the template)."""
    if isinstance(work, Chat):
        size = sum(len(m.content.encode()) + 8 for m in work.messages)
        size += sum(len(t.parameters) + len(t.description) for t in work.tools)
    elif isinstance(work, Detokenize):
        return len(work.tokens) // 64 + 1  # no prompt to read: a lookup per id
    elif isinstance(work, Embed):
        size = sum(len(text.encode()) for text in work.inputs)
    elif isinstance(work, Complete) and work.tokens is not None:
        return len(work.tokens) + 1
    else:
        size = len(work.as_text().encode())
    return size // 4 + 1
