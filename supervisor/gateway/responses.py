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
    call on a string and one concatenation."""

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
        if job.chat:
            prefix = self._chunk({"delta": {"content": "\0"}})
        else:
            prefix = self._chunk({"text": "\0"})
        self.prefix, self.suffix = prefix.split(b'"\\u0000"')
        self.legacy = logprobs.Legacy(job.top_logprobs)  # a completion's text_offset
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

    def _chunk(self, choice: dict[str, Any], finish: str | None = None, lps: Any = None) -> bytes:
        chunk = {
            **self.head,
            "choices": [{"index": 0, **choice, "logprobs": lps, "finish_reason": finish}],
        }
        if self.job.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    # Streamed.
    def start(self) -> bytes:
        """A chat stream opens with the assistant's role, as OpenAI's does; a completion
        with echo with its prompt (unless that waits for its logprobs)."""
        if self.job.chat:
            return self._chunk({"delta": {"role": "assistant", "content": ""}})
        if self.job.echo is not None and self.held is None:
            self.legacy.skip(self.job.echo)
            return self._chunk({"text": self.job.echo})
        return b""

    def token(self, body: dict[str, Any]) -> bytes:
        text = body["text"]
        if self.held is not None:
            self.held.append(body)
            return b""
        if not self.job.show_logprobs:
            return self.prefix + orjson.dumps(text) + self.suffix
        return self._token_chunk(text, body.get("logprobs") or [])

    def _token_chunk(self, text: str, entries: list[dict[str, Any]]) -> bytes:
        if not self.job.show_logprobs:
            return self._chunk({"text": text})
        if self.job.chat:
            return self._chunk({"delta": {"content": text}}, None, logprobs.chat(entries))
        return self._chunk({"text": text}, None, self.legacy.shape(entries))

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
        last += b"".join(self._call_chunks(done.get("tool_calls") or []))
        tail = done.get("logprobs")  # entries of tokens without text, after the last frame
        lps = None
        if self.job.show_logprobs:
            lps = logprobs.chat(tail or []) if self.job.chat else self.legacy.shape(tail or [])
        last += self._chunk({"delta": {}} if self.job.chat else {"text": ""}, reason, lps)
        if self.job.include_usage:
            last += (
                b"data: "
                + orjson.dumps({**self.head, "choices": [], "usage": usage(done)})
                + b"\n\n"
            )
        return last + DONE_EVENT

    def _call_chunks(self, calls: list[dict[str, Any]]) -> list[bytes]:
        """OpenAI's streamed tool calls: per call, a delta with its index, id, type and
        name, then its arguments in fragments. llmsup has each call whole when it is
        made (its arguments must be complete JSON): they follow each other at the end."""
        chunks = []
        for index, call in enumerate(calls):
            function = call["function"]
            head = {"index": index, "id": call["id"], "type": "function"}
            head["function"] = {"name": function["name"], "arguments": ""}
            chunks.append(self._chunk({"delta": {"tool_calls": [head]}}))
            arguments = function["arguments"]
            for at in range(0, len(arguments), ARGUMENT_FRAGMENT):
                piece = arguments[at : at + ARGUMENT_FRAGMENT]
                fragment = {"index": index, "function": {"arguments": piece}}
                chunks.append(self._chunk({"delta": {"tool_calls": [fragment]}}))
        return chunks

    @staticmethod
    def error(err: ApiError) -> bytes:
        """A stream that fails midway ends with an error event, never a silent cut."""
        return b"data: " + orjson.dumps(err.body()) + b"\n\n" + DONE_EVENT

    # Whole.
    def whole(
        self, text: str, done: dict[str, Any], entries: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        reason = done.get("finish_reason", C.FINISH_STOP)
        entries = [*(entries or ()), *(done.get("logprobs") or ())]
        lps = None
        if self.job.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            if done.get("tool_calls"):
                message["content"] = text or None  # OpenAI's: null beside calls
                message["tool_calls"] = done["tool_calls"]
            choice = {"index": 0, "message": message}
            if self.job.show_logprobs:
                lps = logprobs.chat(entries)
        else:
            if self.job.echoes:
                entries = [*(done.get("prompt_logprobs") or ()), *entries]
                text = self.echo_text(done) + text
            choice = {"index": 0, "text": text}
            if self.job.show_logprobs:
                lps = self.legacy.shape(entries)
        choice.update({"logprobs": lps, "finish_reason": reason})
        return {**self.head, "choices": [choice], "usage": usage(done)}
