"""What the gateway sends back: JSON responses, ApiError as one, and the response objects
of one generation request (Shaper): OpenAI's completion and chat objects whole, or their
server-sent event chunks, with the comments that keep a waiting stream's connection busy.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway import logprobs
from llmsup.supervisor.gateway.errors import ApiError
from llmsup.supervisor.gateway.openai_api import Job

DONE_EVENT = b"data: [DONE]\n\n"
QUEUED_COMMENT = b": queued\n\n"  # an SSE comment: keeps a waiting stream's connection busy
RUNNING_COMMENT = b": running\n\n"  # the same while its prompt is read
ARGUMENT_FRAGMENT = 64  # characters of a tool call's arguments per streamed chunk


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(err: ApiError) -> web.Response:
    return json_response(err.body(), err.status, err.headers)


def queued_comment(body: dict[str, Any]) -> bytes:
    """The SSE comment for a `queued` frame: `: loading MODEL` while the request waits for
    its model to load (SPEC.md 4), else `: queued`."""
    loading = body.get("loading")
    if isinstance(loading, str) and loading.isprintable():
        return b": loading " + loading.encode() + b"\n\n"
    return QUEUED_COMMENT


def usage(done: dict[str, Any]) -> dict[str, Any]:
    u = done.get("usage") or {}
    prompt, completion = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
    }


class Shaper:
    """The response objects of one request. A stream chunk is a prebuilt byte prefix, the
    token's text as a JSON string and a prebuilt suffix: per token there is one orjson
    call on a string and one concatenation. A request of n completions (`n` above 1) has a
    choice per index: llmsup's token frames carry the index, its DONE the choices."""

    def __init__(self, job: Job, model: str):
        self.job = job
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())
        self.model = model
        self.head = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": model,
            "system_fingerprint": None,
        }
        self.prefixes: list[tuple[bytes, bytes]] = []  # by index: a chunk before, after its text
        for index in range(job.n):
            if job.chat:
                prefix = self._chunk({"delta": {"content": "\0"}}, index=index)
            else:
                prefix = self._chunk({"text": "\0"}, index=index)
            head, tail = prefix.split(b'"\\u0000"')
            self.prefixes.append((head, tail))
        # A completion's text_offset, by index.
        self.legacies = [logprobs.Legacy(job.top_logprobs) for _ in range(job.n)]
        # A streamed echo with logprobs: the prompt's come with DONE, and go first, so the
        # chunks wait for it (a prompt alone, max_tokens 0, is the usual case).
        self.held: list[dict[str, Any]] | None = (
            [] if job.stream and (job.echo_tokens or (job.echo and job.show_logprobs)) else None
        )

    @property
    def object(self) -> str:
        if self.job.chat:
            return "chat.completion.chunk" if self.job.stream else "chat.completion"
        return "text_completion"

    def _chunk(
        self, choice: dict[str, Any], finish: str | None = None, lps: Any = None, index: int = 0
    ) -> bytes:
        chunk = {
            **self.head,
            "choices": [{"index": index, **choice, "logprobs": lps, "finish_reason": finish}],
        }
        if self.job.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    # Streamed.
    def start(self) -> bytes:
        """A chat stream opens with the assistant's role, as OpenAI's does; a completion
        with echo with its prompt (unless that waits for its logprobs)."""
        indexes = range(self.job.n)
        if self.job.chat:
            role = {"delta": {"role": "assistant", "content": ""}}
            return b"".join(self._chunk(role, index=i) for i in indexes)
        if self.job.echo is not None and self.held is None:
            for legacy in self.legacies:
                legacy.skip(self.job.echo)
            return b"".join(self._chunk({"text": self.job.echo}, index=i) for i in indexes)
        return b""

    def token(self, body: dict[str, Any]) -> bytes:
        text = body["text"]
        if self.held is not None:
            self.held.append(body)
            return b""
        index = body.get("index", 0)
        if not 0 <= index < self.job.n:
            return b""  # not a choice of this request: llmsup would not send it
        if not self.job.show_logprobs:
            head, tail = self.prefixes[index]
            return head + orjson.dumps(text) + tail
        return self._token_chunk(text, body.get("logprobs") or [], index)

    def _token_chunk(self, text: str, entries: list[dict[str, Any]], index: int = 0) -> bytes:
        if not self.job.show_logprobs:
            return self._chunk({"text": text}, index=index)
        if self.job.chat:
            lps = logprobs.chat(entries)
            return self._chunk({"delta": {"content": text}}, None, lps, index)
        return self._chunk({"text": text}, None, self.legacies[index].shape(entries), index)

    def echo_text(self, done: dict[str, Any]) -> str:
        """The echoed prompt: as sent, or the text of its token ids (their bytes joined)."""
        if self.job.echo is not None:
            return self.job.echo
        entries = done.get("prompt_logprobs") or ()
        return b"".join(bytes(e["bytes"]) for e in entries).decode(errors="replace")

    def finish(self, done: dict[str, Any]) -> bytes:
        reason = done.get("finish_reason", C.FINISH_STOP)
        last = b""
        if self.held is not None:  # the echo's prompt, then the tokens that waited for it
            last += self._token_chunk(self.echo_text(done), done.get("prompt_logprobs") or [])
            last += b"".join(
                self._token_chunk(b["text"], b.get("logprobs") or []) for b in self.held
            )
            self.held = []
        for choice in choices_of(done):
            index = choice["index"]
            last += b"".join(self._call_chunks(choice.get("tool_calls") or [], index))
            tail = choice.get("logprobs")  # entries of tokens without text, after its last frame
            lps = None
            if self.job.show_logprobs:
                legacy = self.legacies[index]
                lps = logprobs.chat(tail or []) if self.job.chat else legacy.shape(tail or [])
            empty = {"delta": {}} if self.job.chat else {"text": ""}
            last += self._chunk(empty, choice.get("finish_reason", reason), lps, index)
        if self.job.include_usage:
            last += (
                b"data: "
                + orjson.dumps({**self.head, "choices": [], "usage": usage(done)})
                + b"\n\n"
            )
        return last + DONE_EVENT

    def _call_chunks(self, calls: list[dict[str, Any]], choice: int = 0) -> list[bytes]:
        """OpenAI's streamed tool calls: per call, a delta with its index, id, type and
        name, then its arguments in fragments. llmsup has each call whole when it is
        made (its arguments must be complete JSON): they follow each other at the end."""
        chunks = []
        for index, call in enumerate(calls):
            function = call["function"]
            head = {"index": index, "id": call["id"], "type": "function"}
            head["function"] = {"name": function["name"], "arguments": ""}
            chunks.append(self._chunk({"delta": {"tool_calls": [head]}}, index=choice))
            arguments = function["arguments"]
            for at in range(0, len(arguments), ARGUMENT_FRAGMENT):
                piece = arguments[at : at + ARGUMENT_FRAGMENT]
                fragment = {"index": index, "function": {"arguments": piece}}
                chunks.append(self._chunk({"delta": {"tool_calls": [fragment]}}, index=choice))
        return chunks

    @staticmethod
    def error(err: ApiError) -> bytes:
        """A stream that fails midway ends with an error event, never a silent cut."""
        return b"data: " + orjson.dumps(err.body()) + b"\n\n" + DONE_EVENT

    # Whole.
    def whole(
        self,
        texts: dict[int, str],
        done: dict[str, Any],
        entries: dict[int, list[dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        """The response of a request answered whole: a choice per completion, by index, from
        its streamed `texts` (and logprob `entries`) and DONE."""
        entries = entries or {}
        choices = [
            self._whole_choice(c, texts.get(c["index"], ""), entries.get(c["index"], []), done)
            for c in choices_of(done)
        ]
        return {**self.head, "choices": choices, "usage": usage(done)}

    def _whole_choice(
        self, choice: dict[str, Any], text: str, entries: list[dict[str, Any]], done: dict
    ) -> dict[str, Any]:
        index = choice["index"]
        entries = [*entries, *(choice.get("logprobs") or ())]
        lps = None
        if self.job.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            if choice.get("tool_calls"):
                message["content"] = text or None  # OpenAI's: null beside calls
                message["tool_calls"] = choice["tool_calls"]
            out = {"index": index, "message": message}
            if self.job.show_logprobs:
                lps = logprobs.chat(entries)
        else:
            if self.job.echoes:
                entries = [*(done.get("prompt_logprobs") or ()), *entries]
                text = self.echo_text(done) + text
            out = {"index": index, "text": text}
            if self.job.show_logprobs:
                lps = self.legacies[index].shape(entries)
        out.update({"logprobs": lps, "finish_reason": choice.get("finish_reason", C.FINISH_STOP)})
        return out


def choices_of(done: dict[str, Any]) -> list[dict[str, Any]]:
    """DONE's completions, by index (SPEC.md 3.16); a request of one has its one in DONE
    itself: finish_reason, tool_calls and the tail of logprobs."""
    choices = done.get("choices")
    if isinstance(choices, list) and choices:
        return choices
    one = {"index": 0, "finish_reason": done.get("finish_reason", C.FINISH_STOP)}
    for name in ("tool_calls", "logprobs"):
        if done.get(name):
            one[name] = done[name]
    return [one]
