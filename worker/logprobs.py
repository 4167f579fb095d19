"""Token log-probabilities from a decode's logits, as OpenAI and llama-server report them.

A logprob is the log-softmax of the model's raw logits over the whole vocabulary: before
logit_bias, the penalties, a grammar, top-k/top-p/min-p and temperature (llama-server's
`n_probs` with `post_sampling_probs` off, OpenAI's `logprobs`). Computed only for requests
that ask (SPEC.md 3.13): one pass over the row's n_vocab logits per token (0.2-0.5 ms for
Gemma 3's 262,144).

An entry is {"token": id, "text": its piece, "bytes": its bytes, "logprob": x,
"top_logprobs": [{"token", "text", "bytes", "logprob"}, ...]}, the likeliest first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy


def log_softmax(row: numpy.ndarray) -> float:
    """The log-sum-exp of a row of logits: logprob(t) = row[t] - it. In float32 with a
    float64 sum (Gemma 3's 262,144 logits: about 0.3 ms)."""
    peak = float(row.max())
    return peak + math.log(float(numpy.exp(row - peak).sum(dtype=numpy.float64)))


def entry(llama, row: numpy.ndarray, token: int, top: int) -> dict[str, Any]:
    """The entry of `token` chosen from (or read after) logits `row`, with the `top`
    likeliest tokens of that row."""
    lse = log_softmax(row)
    out = describe(llama, token, float(row[token]) - lse)
    out["top_logprobs"] = [describe(llama, t, float(row[t]) - lse) for t in likeliest(row, top)]
    return out


def likeliest(x: numpy.ndarray, k: int) -> list[int]:
    """The ids of the k largest values, largest first (ties: lower id first)."""
    if k <= 0:
        return []
    idx = numpy.argpartition(x, -k)[-k:]
    return [int(t) for t in sorted(idx.tolist(), key=lambda t: (-x[t], t))]


def describe(llama, token: int, logprob: float | None) -> dict[str, Any]:
    raw = llama.token_bytes(token)
    return {
        "token": token,
        "text": raw.decode(errors="replace"),
        "bytes": list(raw),
        "logprob": logprob,
    }
