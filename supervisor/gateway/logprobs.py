"""llmsup's logprob entries (SPEC.md 3.13) in OpenAI's two shapes.

llmsup gives one entry per model token: {"token": id, "text", "bytes", "logprob",
"top_logprobs": [{"token", "text", "bytes", "logprob"}, ...]} (an echoed prompt's first
token has a null logprob and null top_logprobs). /v1/chat/completions shows them as
`choices[].logprobs.content[]` ({token, logprob, bytes, top_logprobs}); /v1/completions in
the legacy shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of
text to logprob per token, the chosen token among them, as OpenAI's and vLLM's hold it)
and `text_offset` (where each token starts in the choice's text, in characters).
"""

from __future__ import annotations

from typing import Any


def chat(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs`."""
    return {"content": [_chat_token(e) for e in entries], "refusal": None}


def _chat_token(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": entry["text"],
        "logprob": entry["logprob"],
        "bytes": entry["bytes"],
        "top_logprobs": [
            {"token": t["text"], "logprob": t["logprob"], "bytes": t["bytes"]}
            for t in entry.get("top_logprobs") or ()
        ],
    }


class Legacy:
    """A completion's `logprobs` in the legacy shape, chunk by chunk: `text_offset` goes on
    counting from one chunk to the next (from the echoed prompt's start, with echo)."""

    def __init__(self, top: int):
        self.top = top
        self.offset = 0

    def shape(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for entry in entries:
            text = entry["text"]
            out["tokens"].append(text)
            out["token_logprobs"].append(entry["logprob"])
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            top = entry.get("top_logprobs")
            if top is None:  # an echoed prompt's first token
                out["top_logprobs"].append(None)
                continue
            likeliest = {t["text"]: t["logprob"] for t in top[: self.top]}
            likeliest.setdefault(text, entry["logprob"])
            out["top_logprobs"].append(likeliest)
        return out

    def skip(self, text: str) -> None:
        """Text sent without entries (an echoed prompt whose logprobs were not asked for)."""
        self.offset += len(text)
