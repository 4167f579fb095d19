"""The worker's event loop: take jobs from the supervisor, step generations, stream tokens.

The loop blocks on the socket while idle and only peeks at it between decode steps while
generating, so a new job or a stop is seen within one token. A job that wakes an idle
worker waits up to GATHER_MS for the jobs right behind it, so a burst starts together.
Each step decodes the next token of every running job at once (continuous batching: see
Engine.step); a job joins at the next step after it arrives and leaves, freeing its
sequence, as soon as it finishes. The generating jobs' tokens of a step go out in one
message, and a prompt's first token in one of its own as soon as the prompt is read. An
embed job takes a slot too and advances one decode of its inputs per step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import scoreboard as sb
from llmsup.protocol import workerwire as wire
from llmsup.protocol.messages import Complete, Detokenize, Embed, Tokenize, Work, sequences
from llmsup.worker import faults
from llmsup.worker.choices import Choices
from llmsup.worker.embedder import Embedding
from llmsup.worker.engine import DecodeError, Engine, RequestRejected
from llmsup.worker.generation import Delta, Generation

log = logging.getLogger("llmsup.worker")

# How long a worker that was idle waits for more jobs before its first step. Clients that
# finish in the same step send their next requests within a few ms of each other; gathered,
# their prompts are read in one step (perf: 4 clients' TTFT p50 60 ms instead of 86-131).
GATHER_MS = 2
# A malformed message from the supervisor is logged at most once per this many seconds.
DROP_LOG_S = 10.0


class WorkerLoop:
    def __init__(self, sock: zmq.Socket, engine: Engine, slots: int, board=None, row: int = 0):
        self.sock = sock
        self.engine = engine
        self.slots = slots
        # Job id -> its sequence, its n sequences (a request of n completions), or the
        # embed request it is computing.
        self.running: dict[bytes, Generation | Choices | Embedding] = {}
        self.stopping = False
        self.board = board  # scoreboard row, written only from this (the decode) thread
        self.row = row
        self.served = 0
        self.faults = faults.enabled()
        self.dropped = 0  # malformed orders since the last one logged
        self.drop_logged_at = float("-inf")
        self.report(state=sb.IDLE)

    def report(self, **fields) -> None:
        if self.board is not None:
            self.board.write_worker(self.row, **fields)

    def beat(self, **fields) -> None:
        if self.board is not None:
            self.board.beat(self.row, **fields)

    def run(self) -> None:
        while not (self.stopping and not self.running):
            timeout = 0 if self.running else None
            if self.sock.poll(timeout, zmq.POLLIN):
                idle = not self.running
                self.handle_messages()
                if idle and self.running:
                    self.gather_burst()
            if self.running:
                self.step()

    def gather_burst(self) -> None:
        """Take the jobs arriving within GATHER_MS of one that found the worker idle, so a
        burst is read in one first step instead of one prompt per step."""
        deadline = time.monotonic() + GATHER_MS / 1000
        while self.busy() < self.slots:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0 or not self.sock.poll(left_ms, zmq.POLLIN):
                return
            self.handle_messages()

    def handle_messages(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                order = wire.decode_order(frames)
            except wire.WireError as exc:
                self.drop(exc)
                continue
            if isinstance(order, wire.JobOrder):
                if order.job_id in self.running:  # a bug there; the running one goes on
                    self.drop(wire.WireError(f"job {order.job_id!r} is already running"))
                    continue
                self.start_job(order.job_id, order.work)
            elif isinstance(order, wire.AbortOrder):
                self.abort_job(order.job_id, order.code, order.message)
            else:
                self.stopping = True
                self.report(state=sb.DRAINING)

    def drop(self, exc: wire.WireError) -> None:
        """A malformed order changes nothing; it is logged at most once per DROP_LOG_S, with
        the number dropped since the last line, so a flood cannot fill the log."""
        self.dropped += 1
        now = time.monotonic()
        if now - self.drop_logged_at >= DROP_LOG_S:
            log.error(
                "dropped %d malformed message(s) from the supervisor; the last: %s",
                self.dropped,
                exc,
            )
            self.dropped = 0
            self.drop_logged_at = now

    def busy(self) -> int:
        """Slots held: a sequence per job, n for a job of n completions (as the
        supervisor counts them, until the job's DONE)."""
        return sum(job.seqs if isinstance(job, Choices) else 1 for job in self.running.values())

    def start_job(self, job_id: bytes, work: Work) -> None:
        if self.busy() + sequences(work) > self.slots:
            # The supervisor sends a job only to a worker with a free slot: a bug there.
            self.send_error(job_id, C.E_INTERNAL, "worker got a job with no free slot")
            return
        # The job id is a sequence number followed by the client's request id.
        self.beat(
            state=sb.PREFILL, request_id=job_id[8:], request_started=time.monotonic(), tokens=0
        )
        try:
            if self.faults and isinstance(work, Complete):
                faults.inject(work.prompt)
            if isinstance(work, Tokenize):
                tokens = self.engine.tokenize(work.text, work.add_special)
                done: dict[str, Any] = {"tokens": tokens, "count": len(tokens)}
                if work.with_pieces:
                    done["pieces"] = [self.engine.piece(t) for t in tokens]
                self.send((C.W_DONE, job_id, done))
                self.job_ended()
                return
            if isinstance(work, Detokenize):
                text = self.engine.detokenize(work.tokens)
                self.send((C.W_DONE, job_id, {"text": text}))
                self.job_ended()
                return
            if isinstance(work, Embed):  # its decodes are made in the steps (advance_embeddings)
                job = self.engine.start_embedding(work)
                job.job_id = job_id
                self.running[job_id] = job
                return
            gen = self.engine.start(work)
            gen.job_id = job_id
            self.running[job_id] = Choices(gen, job_id) if gen.followers else gen
        except RequestRejected as exc:
            self.send_error(job_id, exc.code, exc.message, exc.field)
            self.job_ended()
        except Exception as exc:
            log.exception("job %s failed to start", job_id, extra={"request": job_id[8:]})
            self.send_error(job_id, C.E_WORKER_FAILED, f"{type(exc).__name__}: {exc}")
            self.job_ended()

    def step(self) -> None:
        """One batched decoding step for every running job, streamed as it goes (stream),
        then a decode of each embed job's next inputs."""
        try:
            if self.engine.running:
                self.engine.step(self.stream)
        except DecodeError as exc:  # those sequences are lost, the others go on
            log.exception("llama_decode failed; failing %d job(s)", len(exc.generations))
            self.fail(exc.generations, exc)
            self.stream(exc.results)
        except Exception as exc:
            log.exception("decoding step failed; failing all %d job(s)", len(self.running))
            self.fail(list(self.running.values()), exc)
            return
        self.advance_embeddings()
        if not self.running:
            return  # the last job's end reported the worker idle (job_ended)
        prefill = any(gen.prefilling for gen in self.running.values())
        self.beat(
            state=sb.PREFILL if prefill else sb.DECODE,
            tokens=sum(len(gen.tokens) for gen in self.running.values()),
        )

    def advance_embeddings(self) -> None:
        """One decode of each embed job's next inputs: beside generating sequences at most
        a prompt chunk of tokens (what a prompt being read costs them per step), alone as
        many as the embedding context takes in one decode."""
        sharing = bool(self.engine.running)
        for job in [job for job in self.running.values() if isinstance(job, Embedding)]:
            try:
                job.advance(self.engine.prefill_chunk if sharing else job.embedder.n_ctx)
            except Exception as exc:
                log.exception("embedding decode failed", extra={"request": job.job_id[8:]})
                self.fail([job], exc)
                continue
            if job.finished:
                done = job.done_body()
                self.finish(job.job_id)
                self.send((C.W_DONE, job.job_id, done))

    def stream(self, results: list[tuple[Generation, Delta]]) -> None:
        """Send what decodes produced, in one message: the generating jobs' tokens of a
        step together (one wake-up of each process on the way per step, not per sequence,
        while the cores are busy decoding the next), a prompt's first token on its own as
        soon as it is read."""
        messages = []
        for gen, step in results:
            job = self.running.get(gen.job_id)
            if job is None:
                continue  # its job failed in this step (a sibling's decode, DecodeError)
            if isinstance(job, Choices):
                messages.extend(job.stream(gen, step))
                if job.finished:
                    self.finish(gen.job_id, keep=True)
                    messages.append((C.W_DONE, gen.job_id, job.done_body()))
                continue
            entries = step.logprobs
            if step.text:
                token = {"text": step.text}
                if entries is not None:
                    token["logprobs"], entries = entries, None
                messages.append((C.W_TOKEN, gen.job_id, token))
            if step.finish_reason is not None:
                self.finish(gen.job_id, keep=True)
                done = gen.done_body(step.finish_reason)
                if entries:  # tokens of no text after the last token frame
                    done["logprobs"] = entries
                messages.append((C.W_DONE, gen.job_id, done))
        if messages:
            self.send(*messages)

    def abort_job(self, job_id: bytes, code: str, message: str) -> None:
        """Stop a job between two tokens; its answer counts what it produced so far."""
        gen = self.release(job_id)
        if gen is None:
            return  # already finished: its DONE is on the way and ends it instead
        error = {**codec.error_body(code, message), **gen.usage()}
        self.send((C.W_ERROR, job_id, error))

    def fail(self, generations: list[Generation | Choices | Embedding], exc: Exception) -> None:
        """Their jobs end with worker_failed, each once (a job of n completions may have
        several sequences among them)."""
        for job_id in dict.fromkeys(gen.job_id for gen in generations):
            if job_id in self.running:
                self.finish(job_id)
                self.send_error(job_id, C.E_WORKER_FAILED, f"{type(exc).__name__}: {exc}")

    def release(self, job_id: bytes) -> Generation | Choices | Embedding | None:
        """Drop a running job now: its sequence's KV cells and its slot are free on return.

        Sends nothing: the caller answers the job (which frees its slot in the ledger).
        Returns the generation (for its usage), or None if the job is not running.
        """
        gen = self.running.get(job_id)
        if gen is not None:
            self.finish(job_id)
        return gen

    def finish(self, job_id: bytes, keep: bool = False) -> None:
        """The job is over: free its sequence (`keep`: it finished, its cells may serve the
        next prompt that continues it; not after a failure or a cancel)."""
        self.running.pop(job_id).close(keep)
        self.job_ended()

    def job_ended(self) -> None:
        self.served += 1
        if self.running:
            self.report(served=self.served)
        else:
            self.report(
                served=self.served,
                request_id=b"",
                tokens=0,
                state=sb.DRAINING if self.stopping else sb.IDLE,
            )

    def send(self, *messages: tuple[bytes, bytes, dict[str, Any]]) -> None:
        """(kind, job id, body) messages, in one ZeroMQ message (SPEC.md appendix A)."""
        self.sock.send_multipart(wire.event_report(messages))

    def send_error(self, job_id: bytes, code: str, message: str, field: str | None = None) -> None:
        extra = {"field": field} if field is not None else {}
        self.send((C.W_ERROR, job_id, codec.error_body(code, message, **extra)))
