"""OpenAI's requests on llmsup's terms: a request to /v1/completions or /v1/chat/completions
becomes a Job, a `complete` or `chat` body validated by llmsup's own codec (so the limits are
the protocol's). llmsup's replies become OpenAI's responses in responses.py, its errors
OpenAI's in errors.py.

What an OpenAI client sends routinely is accepted when it asks for nothing llmsup cannot
do (n 1, penalties 0, logit_bias {}, tools [], response_format text, stream_options,
user, metadata, service_tier, store false, ...); a value that would need a feature llmsup
does not have is refused with 400 naming the field, never silently ignored. Sampling
parameters a request leaves out keep llmsup's defaults (temperature 0.8, top_p 0.95, top_k
40), as llama-server's OpenAI endpoint keeps its own. max_tokens defaults to 16 for
completions, as OpenAI's does, and to "until the context is full" for chat.

`model` names one of the models llmsup serves (GET /v1/models; llmsup's `model` field,
SPEC.md 3.1); without it (or null) the request runs on llmsup's default. A name llmsup
does not serve is refused with OpenAI's 404 `model_not_found` (param "model") listing the
served ones, never silently swapped for another model: a placeholder such as
"gpt-3.5-turbo" is refused too. Responses carry the name of the model that answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import bad

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Job:
    """One OpenAI request, translated: the llmsup verb and body, and how to answer."""

    chat: bool
    verb: bytes
    body: dict[str, Any]
    model: str | None  # as the request named it
    stream: bool = False
    include_usage: bool = False
    # The OpenAI name the request used for llmsup's max_tokens, for error messages.
    names: dict[str, str] = field(default_factory=dict)

    @property
    def input_field(self) -> str:
        return "messages" if self.chat else "prompt"


# Fields passed to llmsup as they are (llmsup's codec checks them). top_k is not OpenAI's,
# but llama-server and vLLM take it too.
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop")
# Fields accepted with any value: they ask for nothing llmsup would do differently.
IGNORED = {
    "user",
    "prompt_cache_key",  # the gateway routes on it (generate.client_of); llmsup needs nothing else
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "stream",
    "stream_options",
}


def _empty(v: Any) -> bool:
    return v in ([], {})


# Fields accepted at their default value (or null) only: field -> (accepts, what it means).
DEFAULT_ONLY: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v == 1, "only n=1 is supported"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported; use 0"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported; use 0"),
    "logit_bias": (_empty, "logit_bias is not supported; use {} or null"),
    "logprobs": (lambda v: v is False, "logprobs are not supported"),
    "top_logprobs": (lambda v: v == 0, "logprobs are not supported"),
    "response_format": (lambda v: v == {"type": "text"}, "only response_format text is supported"),
    "tools": (_empty, "tools are not supported"),
    "tool_choice": (lambda v: v in ("none", "auto"), "tools are not supported"),
    "functions": (_empty, "functions are not supported"),
    "function_call": (lambda v: v in ("none", "auto"), "functions are not supported"),
    "store": (lambda v: v is False, "stored completions are not supported"),
    "modalities": (lambda v: v == ["text"], "only the text modality is supported"),
    "echo": (lambda v: v is False, "echo is not supported"),
    "best_of": (lambda v: v == 1, "only best_of=1 is supported"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    *SAMPLING,
    *IGNORED,
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "echo",
    "best_of",
    "suffix",
}
CHAT_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    *SAMPLING,
    *IGNORED,
    *(set(DEFAULT_ONLY) - {"echo", "best_of", "suffix"}),
}
MESSAGE_FIELDS = {"role", "content", "name", "refusal", "tool_calls", "function_call"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _check_fields(req: dict[str, Any], allowed: set[str]) -> None:
    for name, value in req.items():
        if name not in allowed:
            raise bad(f"unknown parameter {name!r}", name, "unknown_parameter")
        if value is not None and name in DEFAULT_ONLY:
            accepts, why = DEFAULT_ONLY[name]
            if not accepts(value):
                raise bad(
                    f"{name} {orjson.dumps(value).decode()[:100]}: {why}", name, "unsupported_value"
                )


def _stream_options(req: dict[str, Any]) -> tuple[bool, bool]:
    stream = req.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = req.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise bad(
            "stream_options.include_usage must be true or false", "stream_options.include_usage"
        )
    return bool(stream), bool(include)


def _model(req: dict[str, Any]) -> str | None:
    """The model the request names (None: none, llmsup's default). Whether llmsup serves
    it is the gateway's next check (state.Gateway.model_for)."""
    model = req.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    return model


def _validated(verb: bytes, body: dict[str, Any], job_names: dict[str, str]) -> dict[str, Any]:
    """The body as llmsup's codec validates it (defaults filled in): a bad value is
    refused here with the field's OpenAI name, without a round trip to llmsup."""
    try:
        return codec.parse_request([C.VERSION, verb, b"-", codec.dumps(body)]).body.to_body()
    except codec.ProtocolError as exc:
        name = exc.field or ""
        head, _, rest = name.partition("[")
        param = job_names.get(head, head) + (f"[{rest}" if rest else "")
        raise bad(
            exc.message.replace(head, param, 1) if head else exc.message, param or None
        ) from None


def completion_job(req: dict[str, Any]) -> Job:
    _check_fields(req, COMPLETION_FIELDS)
    stream, include_usage = _stream_options(req)
    prompt = req.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad(
                "prompt must be a string or a list of one string (token ids and "
                "several prompts are not supported)",
                "prompt",
            )
        prompt = prompt[0]
    body = {"prompt": prompt, **{k: req[k] for k in SAMPLING if req.get(k) is not None}}
    max_tokens = req.get("max_tokens")
    body["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    body = _validated(C.COMPLETE, body, {})
    return Job(False, C.COMPLETE, body, _model(req), stream, include_usage)


def _content(i: int, message: dict[str, Any]) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad("only text content parts are supported", where)
            if not isinstance(part.get("text"), str):
                raise bad("a text content part needs a string text", where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad("content must be a string or a list of text parts", where)


def _messages(req: dict[str, Any]) -> list[dict[str, str]]:
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("each message must be an object", f"messages[{i}]")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise bad(
                f"role must be one of {', '.join(ROLES)} (tools are not supported)",
                f"messages[{i}].role",
            )
        for name, value in message.items():
            if name not in MESSAGE_FIELDS:
                raise bad(
                    f"unknown message field {name!r}", f"messages[{i}].{name}", "unknown_parameter"
                )
            if name in ("tool_calls", "function_call") and value not in (None, []):
                raise bad(
                    "tool calls are not supported", f"messages[{i}].{name}", "unsupported_value"
                )
        out.append({"role": role, "content": _content(i, message)})
    return out


def chat_job(req: dict[str, Any]) -> Job:
    _check_fields(req, CHAT_FIELDS)
    stream, include_usage = _stream_options(req)
    body: dict[str, Any] = {"messages": _messages(req)}
    body.update({k: req[k] for k in SAMPLING if req.get(k) is not None})
    names = {}
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        if req.get(name) is not None:
            body["max_tokens"] = req[name]
            names = {"max_tokens": name}
    body.setdefault("max_tokens", C.MAX_TOKENS_LIMIT)  # llmsup stops when the context is full
    body = _validated(C.CHAT, body, names)
    return Job(True, C.CHAT, body, _model(req), stream, include_usage, names)
