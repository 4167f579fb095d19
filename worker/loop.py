"""The worker's event loop: take jobs from the supervisor, step generations, stream tokens.

The loop blocks on the socket while idle and only peeks at it between decode steps while
generating, so a new job or a stop is seen within one token.
"""

from __future__ import annotations

import logging
import time

import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import scoreboard as sb
from llmsup.worker import faults
from llmsup.worker.engine import Engine, Generation, RequestRejected

log = logging.getLogger("llmsup.worker")


class WorkerLoop:
    def __init__(self, sock: zmq.Socket, engine: Engine, slots: int, board=None, row: int = 0):
        self.sock = sock
        self.engine = engine
        self.slots = slots
        self.running: dict[bytes, Generation] = {}
        self.stopping = False
        self.board = board  # scoreboard row, written only from this (the decode) thread
        self.row = row
        self.served = 0
        self.faults = faults.enabled()
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
                self.handle_messages()
            for job_id in list(self.running):
                self.step_job(job_id)

    def handle_messages(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == C.S_STOP:
                self.stopping = True
                self.report(state=sb.DRAINING)
            elif frames[0] == C.S_JOB and len(frames) == 4:
                self.start_job(frames[1], frames[2], codec.loads(frames[3]))
            elif frames[0] == C.S_CANCEL and len(frames) == 3:
                self.cancel_job(frames[1], codec.loads(frames[2]))
            else:
                log.error("unexpected message from the supervisor: %r", frames[:2])

    def start_job(self, job_id: bytes, verb: bytes, body: dict) -> None:
        if len(self.running) >= self.slots:
            # The supervisor sends jobs only against credits; this is a bug there.
            self.send_error(job_id, C.E_INTERNAL, "worker got a job with no free slot")
            return
        # The job id is a sequence number followed by the client's request id.
        self.beat(state=sb.PREFILL, request_id=job_id[8:], request_started=time.monotonic(),
                  tokens=0)  # fmt: skip
        try:
            if self.faults and verb == C.COMPLETE:
                faults.inject(body["prompt"])
            if verb == C.TOKENIZE:
                tokens = self.engine.tokenize(body["text"])
                self.send(C.W_DONE, job_id, {"tokens": tokens, "count": len(tokens)})
                self.job_ended()
                return
            self.running[job_id] = self.engine.start(verb, body)
        except RequestRejected as exc:
            self.send_error(job_id, exc.code, exc.message)
            self.job_ended()
        except Exception as exc:
            log.exception("job %s failed to start", job_id)
            self.send_error(job_id, C.E_WORKER_FAILED, f"{type(exc).__name__}: {exc}")
            self.job_ended()

    def step_job(self, job_id: bytes) -> None:
        gen = self.running[job_id]
        try:
            step = gen.step()
        except Exception as exc:
            log.exception("job %s failed while decoding", job_id)
            self.finish(job_id)
            self.send_error(job_id, C.E_WORKER_FAILED, f"{type(exc).__name__}: {exc}")
            return
        self.beat(state=sb.DECODE, tokens=len(gen.tokens))
        if step.text:
            self.send(C.W_TOKEN, job_id, {"text": step.text})
        if step.finish_reason is not None:
            self.finish(job_id)
            self.send(C.W_DONE, job_id, {"finish_reason": step.finish_reason, **gen.usage()})

    def cancel_job(self, job_id: bytes, why: dict) -> None:
        """Stop a job between two tokens; its answer counts what it produced so far."""
        gen = self.running.get(job_id)
        if gen is None:
            return  # already finished: its DONE is on the way and ends it instead
        self.finish(job_id)
        self.send(
            C.W_ERROR, job_id, {**codec.error_body(why["code"], why["message"]), **gen.usage()}
        )

    def finish(self, job_id: bytes) -> None:
        self.running.pop(job_id).close()
        self.job_ended()

    def job_ended(self) -> None:
        self.served += 1
        if self.running:
            self.report(served=self.served)
        else:
            self.report(served=self.served, request_id=b"", tokens=0,
                        state=sb.DRAINING if self.stopping else sb.IDLE)  # fmt: skip

    def send(self, kind: bytes, job_id: bytes, body: dict) -> None:
        self.sock.send_multipart([kind, job_id, codec.dumps(body)])

    def send_error(self, job_id: bytes, code: str, message: str) -> None:
        self.send(C.W_ERROR, job_id, codec.error_body(code, message))
