"""OpenAI's requests on llmsup's terms: a request to /v1/completions or /v1/chat/completions
becomes a Job, a `complete` or `chat` body validated by llmsup's own codec (so the limits are
the protocol's). llmsup's replies become OpenAI's responses in responses.py, its errors
OpenAI's in errors.py. `n` is llmsup's own: n completions of one prompt, each a choice with
its index (SPEC.md 3.16); `best_of` above 1 is refused.

Sampling fields, penalties, logit_bias, response_format (json_object, json_schema) and
tools (tool_choice, parallel_tool_calls, tool messages and assistants' tool_calls) become
llmsup's own fields (SPEC.md 3.1, 3.11, 3.12), so llmsup's codec checks them. A field
llmsup does not know is ignored, as llama-server and vLLM ignore it, but never silently:
the response names it in X-Llmsup-Ignored-Params, /metrics counts it and the log says so
once per name. A known field with a value llmsup cannot honour (best_of above 1) is
refused with 400 naming it. `logprobs` (an integer 0 to 5 on completions, true or false
with `top_logprobs` 0 to 20 on chat) and `echo` (completions: the prompt before the
text, and with logprobs the prompt's, even with max_tokens 0) become llmsup's fields
(SPEC.md 3.13). Sampling parameters a request leaves out keep llmsup's
defaults (temperature 0.8, top_p 0.95, top_k 40), as llama-server's OpenAI endpoint keeps
its own. max_tokens defaults to 16 for completions, as OpenAI's does, and to "until the
context is full" for chat.

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
    # The OpenAI names the request used for llmsup's fields, for error messages.
    names: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # fields llmsup does not know
    show_logprobs: bool = False  # the response carries logprobs
    top_logprobs: int = 0  # the likeliest tokens listed at each place
    echo: str | None = None  # a completion's prompt, sent before its text (echo)
    echo_tokens: bool = False  # echo of a prompt of token ids: its text from its logprobs
    n: int = 1  # completions of the prompt: llmsup's `n` (SPEC.md 3.16)

    @property
    def echoes(self) -> bool:
        return self.echo is not None or self.echo_tokens

    @property
    def input_field(self) -> str:
        return "messages" if self.chat else "prompt"


# The codec's generation fields, passed to llmsup as they are (it checks them). top_k, min_p,
# repeat_penalty, repeat_last_n, grammar and json_schema are not OpenAI's, but llama-server
# takes them too (vLLM: top_k, min_p).
SAMPLING = tuple(sorted(codec.SAMPLING_FIELDS - {"max_tokens", "timeout_ms", "model"}))
# Other servers' names for llmsup's fields: vLLM's and Hugging Face's repetition_penalty.
ALIASES = {"repetition_penalty": "repeat_penalty"}
TOOLS = tuple(sorted(codec.TOOL_FIELDS))
# Fields accepted with any value: they ask for nothing llmsup would do differently.
IGNORED = {
    "user",
    "prompt_cache_key",  # the gateway routes on it (generate.client_of); llmsup needs nothing else
    "metadata",
    "service_tier",
    "stream",
    "stream_options",
}


def _empty(v: Any) -> bool:
    return v in ([], {})


# Fields accepted at their default value (or null) only: field -> (accepts, what it means).
DEFAULT_ONLY: dict[str, tuple[Any, str]] = {
    "functions": (_empty, "functions are not supported; use tools"),
    "function_call": (lambda v: v in ("none", "auto"), "functions are not supported; use tools"),
    "store": (lambda v: v is False, "stored completions are not supported"),
    "modalities": (lambda v: v == ["text"], "only the text modality is supported"),
    "best_of": (lambda v: v == 1, "only best_of=1 is supported"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "response_format",
    *SAMPLING,
    *ALIASES,
    *IGNORED,
    "n",
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
    "response_format",
    *SAMPLING,
    *ALIASES,
    *TOOLS,
    *IGNORED,
    *(set(DEFAULT_ONLY) - {"best_of", "suffix"}),
    "n",
    "logprobs",
    "top_logprobs",
    "echo",
}
# Refused on chat rather than ignored: a client that sends it expects the prompt back.
CHAT_DEFAULT_ONLY = {
    **DEFAULT_ONLY,
    "echo": (lambda v: v is False, "echo is for /v1/completions only"),
}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions' logprobs
MESSAGE_FIELDS = {"role", "content", "name", "refusal", "tool_calls", "tool_call_id"}
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _check_fields(
    req: dict[str, Any], allowed: set[str], default_only: dict = DEFAULT_ONLY
) -> list[str]:
    """The fields llmsup does not know (ignored, and named in the response); a known one
    with a value llmsup cannot honour is refused."""
    ignored = []
    for name, value in req.items():
        if name not in allowed:
            ignored.append(name)
            continue
        if value is not None and name in default_only:
            accepts, why = default_only[name]
            if not accepts(value):
                raise bad(
                    f"{name} {orjson.dumps(value).decode()[:100]}: {why}", name, "unsupported_value"
                )
    return ignored


def _sampling(req: dict[str, Any], body: dict[str, Any], names: dict[str, str]) -> None:
    """Copy the sampling fields into llmsup's body; response_format becomes json_schema."""
    body.update({k: req[k] for k in SAMPLING if req.get(k) is not None})
    for alias, name in ALIASES.items():
        if req.get(alias) is not None and name not in body:
            body[name] = req[alias]
            names[name] = alias
    fmt = req.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad(
                "response_format json_schema needs a json_schema object {name, schema, strict}",
                "response_format.json_schema",
            )
        schema = spec.get("schema", {"type": "object"})
        names["json_schema"] = "response_format.json_schema.schema"
    else:
        raise bad(
            'response_format type must be "text", "json_object" or "json_schema"',
            "response_format.type",
        )
    if "json_schema" in body or "grammar" in body:
        raise bad(
            "response_format cannot be combined with json_schema or grammar", "response_format"
        )
    body["json_schema"] = schema


def _n(req: dict[str, Any], body: dict[str, Any]) -> None:
    """OpenAI's `n` is llmsup's (its codec checks it; the supervisor refuses more than a
    worker's slots)."""
    if req.get("n") is not None:
        body["n"] = req["n"]


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
    ignored = _check_fields(req, COMPLETION_FIELDS)
    stream, include_usage = _stream_options(req)
    prompt = _prompt(req.get("prompt"))
    names: dict[str, str] = {}
    body: dict[str, Any] = {"prompt": prompt}
    if isinstance(prompt, list):  # token ids: llmsup's `tokens`
        body = {"tokens": prompt}
        names["tokens"] = "prompt"
    _sampling(req, body, names)
    _n(req, body)
    max_tokens = req.get("max_tokens")
    body["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    top = _completion_logprobs(req)
    if top is not None:
        body.update(logprobs=True, top_logprobs=top)
        names["top_logprobs"] = "logprobs"
    echo = req.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad("echo must be true or false", "echo")
    tokens = isinstance(prompt, list)
    if echo and (top is not None or body["max_tokens"] == 0 or tokens):
        # llmsup's echo is the prompt's logprobs; max_tokens 0 (the prompt alone) needs it,
        # and a prompt of token ids gets its text from them.
        body.update(echo=True, logprobs=True)
    body = _validated(C.COMPLETE, body, names)
    job = Job(False, C.COMPLETE, body, _model(req), stream, include_usage, names, ignored)
    job.show_logprobs, job.top_logprobs = top is not None, top or 0
    job.n = body.get("n", 1)
    if echo:
        job.echo = None if tokens else prompt
        job.echo_tokens = tokens
    return job


def _prompt(prompt: Any) -> str | list[int]:
    """A completion's prompt: a string, token ids, or a list of one of either (one choice:
    several prompts are not supported)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    raise bad(
        "prompt must be a string, a list of token ids, or a list of one of either "
        "(several prompts are not supported)",
        "prompt",
    )


def _completion_logprobs(req: dict[str, Any]) -> int | None:
    """The legacy `logprobs`: how many of the likeliest tokens to list (None: no logprobs)."""
    value = req.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad("logprobs must be an integer (or null)", "logprobs")
    if not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise bad(
            f"logprobs is {value}; it must be from 0 to {MAX_COMPLETION_LOGPROBS}", "logprobs"
        )
    return value


def _content(i: int, message: dict[str, Any]) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") in ("assistant", "tool"):
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


def _messages(req: dict[str, Any]) -> list[dict[str, Any]]:
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("each message must be an object", f"messages[{i}]")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise bad(f"role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        for name in message:
            if name not in MESSAGE_FIELDS:
                raise bad(
                    f"unknown message field {name!r}", f"messages[{i}].{name}", "unknown_parameter"
                )
        clean: dict[str, Any] = {"role": role, "content": _content(i, message)}
        if message.get("tool_calls"):  # [] and null: none, as OpenAI takes them
            clean["tool_calls"] = message["tool_calls"]
        if message.get("tool_call_id") is not None:
            clean["tool_call_id"] = message["tool_call_id"]
        out.append(clean)
    return out


def chat_job(req: dict[str, Any]) -> Job:
    ignored = _check_fields(req, CHAT_FIELDS, CHAT_DEFAULT_ONLY)
    stream, include_usage = _stream_options(req)
    body: dict[str, Any] = {"messages": _messages(req)}
    names: dict[str, str] = {}
    _sampling(req, body, names)
    _n(req, body)
    body.update({k: req[k] for k in ("logprobs", "top_logprobs") if req.get(k) is not None})
    if req.get("tools"):  # [] and null: no tools, as OpenAI takes them
        body.update({k: req[k] for k in TOOLS if req.get(k) is not None})
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        if req.get(name) is not None:
            body["max_tokens"] = req[name]
            names["max_tokens"] = name
    body.setdefault("max_tokens", C.MAX_TOKENS_LIMIT)  # llmsup stops when the context is full
    body = _validated(C.CHAT, body, names)
    job = Job(True, C.CHAT, body, _model(req), stream, include_usage, names, ignored)
    job.show_logprobs = bool(body.get("logprobs"))
    job.top_logprobs = body.get("top_logprobs", 0)
    job.n = body.get("n", 1)
    return job
