"""The completions of one request with `n` above 1 (SPEC.md 3.16), as the worker loop runs
them: n sequences of the engine that share the request's prompt, read once (the leader
reads it, the others take a copy: Engine.fork), each sampled on its own and finished on its
own. Each one's text is streamed with its `index`; the request is answered once, when the
last has finished, with one DONE that holds every choice.

To the loop a Choices is a job like a Generation: `prefilling`, `tokens`, `usage()`,
`close()`.
"""

from __future__ import annotations

import time
from typing import Any

from llmsup.protocol import constants as C
from llmsup.worker.generation import Delta, Generation


class Choices:
    def __init__(self, leader: Generation, job_id: bytes):
        self.job_id = job_id
        self.gens = [leader, *leader.followers]  # by index
        for gen in self.gens:
            gen.job_id = job_id
        self.ended: dict[int, dict[str, Any]] = {}  # index -> its entry of DONE's choices
        self.ended_at: float | None = None  # when the last one finished

    @property
    def seqs(self) -> int:
        return len(self.gens)

    @property
    def prefilling(self) -> bool:
        return self.gens[0].prefilling

    @property
    def tokens(self) -> list[int]:
        return [t for gen in self.gens for t in gen.tokens]

    @property
    def finished(self) -> bool:
        return len(self.ended) == len(self.gens)

    def stream(self, gen: Generation, step: Delta) -> list[tuple[bytes, bytes, dict]]:
        """What one choice's step sends: its text with its index; when it has finished, its
        sequence is freed at once and its entry kept for DONE."""
        messages = []
        entries = step.logprobs
        if step.text:
            token: dict[str, Any] = {"text": step.text, "index": gen.index}
            if entries is not None:
                token["logprobs"], entries = entries, None
            messages.append((C.W_TOKEN, self.job_id, token))
        if step.finish_reason is not None:
            gen.close(keep=True)
            choice: dict[str, Any] = {
                "index": gen.index,
                "finish_reason": step.finish_reason,
                "completion_tokens": len(gen.tokens),
            }
            if gen.tool_calls:
                choice["tool_calls"] = [call.to_body() for call in gen.tool_calls]
            if entries:  # tokens of no text after its last token frame
                choice["logprobs"] = entries
            self.ended[gen.index] = choice  # type: ignore[index]
            if self.finished:
                self.ended_at = time.monotonic()
        return messages

    def done_body(self) -> dict[str, Any]:
        """DONE: finish_reason (and tool_calls) of choice 0, for clients that read only
        those; usage and timings of the whole request; every choice in `choices`."""
        first = self.ended[0]
        body: dict[str, Any] = {"finish_reason": first["finish_reason"], **self.usage()}
        if "tool_calls" in first:
            body["tool_calls"] = first["tool_calls"]
        body["choices"] = [self.ended[i] for i in range(len(self.gens))]
        return body

    def usage(self) -> dict[str, Any]:
        """The prompt counted once, the completions' tokens summed; the generation time
        from the first token to the end of the last choice."""
        leader = self.gens[0]
        body = leader.usage()
        completion = sum(len(gen.tokens) for gen in self.gens)
        body["usage"]["completion_tokens"] = completion
        end = self.ended_at or time.monotonic()
        first = leader.first_token_at or end
        decode_s = end - first
        after_first = sum(max(0, len(gen.tokens) - 1) for gen in self.gens)
        body["timings"]["generation_ms"] = round(decode_s * 1000, 3)
        body["timings"]["tokens_per_second"] = (
            round(after_first / decode_s, 2) if decode_s > 0 and after_first else None
        )
        return body

    def close(self, keep: bool = False) -> None:
        """Release every choice's sequence still held (those that finished already were)."""
        for gen in self.gens:
            gen.close(keep)
