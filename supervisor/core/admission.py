"""What a client request gets on arrival: ping, status and cancel are answered at once; a
generation request is checked (not stopping, no duplicate id, a served model that loaded),
then admitted into the ledger or refused with `overloaded` and a retry-after estimate. A
mixin of Supervisor (server.py); every refusal is a ProtocolError its caller replies with.
"""

from __future__ import annotations

import time

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import messages as M
from llmsup.protocol.codec import ProtocolError
from llmsup.supervisor.core.workerproc import WorkerState


class Admission:
    def accept_request(self, client: bytes, request: codec.Request) -> None:
        body = request.body
        if isinstance(body, M.Ping):
            pong = {"pong": True, "version": C.VERSION.decode(), "instance": self.instance}
            self.reply(client, request.request_id, pong)
            return
        if isinstance(body, M.Status):
            self.reply(client, request.request_id, self.status())
            return
        if isinstance(body, M.Cancel):
            found = self.ledger.cancel(client, body.target)
            self.reply(client, request.request_id, {"found": found})
            return
        if self.stopping:
            raise ProtocolError(C.E_SHUTTING_DOWN, "llmsup is stopping; retry on another server")
        if self.ledger.get(client, request.request_id) is not None:
            shown = request.request_id.decode(errors="replace")
            raise ProtocolError(
                C.E_DUPLICATE_ID, f"request id '{shown}' is already in flight from this client"
            )
        model = self.model_of(body)
        seqs = self.sequences_of(body)
        tokens = M.estimate_prompt_tokens(body)
        # The queue's bounds apply to waiting: a request that free slots take at once
        # never waits, whatever --queue-size says.
        waits = self.queue or max(self.free_slots(model).values(), default=0) < seqs
        if waits and (refusal := self.queue.refusal(client, tokens)) is not None:
            raise ProtocolError(
                C.E_OVERLOADED, f"{refusal}; retry later", retry_after_ms=self.retry_after_ms()
            )
        if self.no_worker_left():
            raise ProtocolError(C.E_WORKER_LOST, "every worker is failed or fatal; see status")
        self.ledger.admit(client, request.request_id, body, tokens, model)
        self.placement.used(model, time.monotonic())
        self.placement.asked_keep_alive(model, getattr(body, "keep_alive_s", None))
        self.stats.accepted += 1
        self.dispatch_jobs()

    def model_of(self, body: M.Work) -> str:
        """The model a request runs on; ProtocolError if it is not served here or failed."""
        model = body.model or self.config.default_model
        if model not in self.config.models:
            served = ", ".join(self.config.models)
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"model '{model}' is not served here; models: {served}",
                field="model",
            )
        if (reason := self.placement.failure(model, time.monotonic())) is not None:
            raise ProtocolError(C.E_WORKER_FAILED, f"model {model} did not load: {reason}")
        return model

    def sequences_of(self, body: M.Work) -> int:
        """The slots a request needs on one worker (its `n`); ProtocolError naming `n` when
        that is more than a worker here has."""
        seqs = M.sequences(body)
        slots = self.config.slots_per_worker
        if seqs > slots:
            raise ProtocolError(
                C.E_BAD_REQUEST,
                f"n is {seqs}; a worker here runs at most {slots} sequences at once, "
                "so n must be at most that (--slots-per-worker)",
                field="n",
            )
        return seqs

    def retry_after_ms(self) -> int:
        slots = sum(w.slots for w in self.workers if w.state == WorkerState.READY)
        return self.stats.retry_after_ms(len(self.queue), slots)
