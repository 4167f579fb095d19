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
from llmsup.supervisor.gateway.errors import ApiError
from llmsup.supervisor.gateway.openai_api import Job

DONE_EVENT = b"data: [DONE]\n\n"
QUEUED_COMMENT = b": queued\n\n"  # an SSE comment: keeps a waiting stream's connection busy
RUNNING_COMMENT = b": running\n\n"  # the same while its prompt is read


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

    @property
    def object(self) -> str:
        if self.job.chat:
            return "chat.completion.chunk" if self.job.stream else "chat.completion"
        return "text_completion"

    def _chunk(self, choice: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            **self.head,
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
        }
        if self.job.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    # Streamed.
    def start(self) -> bytes:
        """A chat stream opens with the assistant's role, as OpenAI's does."""
        return (
            self._chunk({"delta": {"role": "assistant", "content": ""}}) if self.job.chat else b""
        )

    def token(self, text: str) -> bytes:
        return self.prefix + orjson.dumps(text) + self.suffix

    def finish(self, done: dict[str, Any]) -> bytes:
        reason = done.get("finish_reason", C.FINISH_STOP)
        last = self._chunk({"delta": {}} if self.job.chat else {"text": ""}, reason)
        if self.job.include_usage:
            last += (
                b"data: "
                + orjson.dumps({**self.head, "choices": [], "usage": usage(done)})
                + b"\n\n"
            )
        return last + DONE_EVENT

    @staticmethod
    def error(err: ApiError) -> bytes:
        """A stream that fails midway ends with an error event, never a silent cut."""
        return b"data: " + orjson.dumps(err.body()) + b"\n\n" + DONE_EVENT

    # Whole.
    def whole(self, text: str, done: dict[str, Any]) -> dict[str, Any]:
        reason = done.get("finish_reason", C.FINISH_STOP)
        if self.job.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
            }
        else:
            choice = {"index": 0, "text": text}
        choice.update({"logprobs": None, "finish_reason": reason})
        return {**self.head, "choices": [choice], "usage": usage(done)}
