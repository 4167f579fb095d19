"""The request ledger: the one owner of every accepted request, from admission to its one
terminal reply.

A request (a `Job`) is in one state:

    QUEUED --dispatch--> RUNNING --stop--> ENDING
       |                    |                |
       +------- end --------+------ end -----+--> ENDED

QUEUED: in the fair queue. RUNNING: on a worker, holding one of its slots (`n` of them
for a request of several completions, all on that worker). ENDING: on a
worker that was told to stop it (a cancel, its deadline, its client gone, a stop); the
worker's answer ends it. Every event is one method here (admit, dispatch, token,
finished, cancel, expire, client_gone, worker_lost, end_all) and every way out goes
through `_end`, which sends the terminal frame and removes the job from every index at
once: the fair queue, the per-worker assignment, the per-client table, the deadline timer
(whose entries hold a job id, never a prompt, and are compacted when mostly stale). A
client that went away is remembered only while it still owns a job.

A worker's free slots are its slots minus the jobs assigned to it here, so no message,
lost or malformed, can leak a slot.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import messages as M
from llmsup.protocol import workerwire as wire
from llmsup.supervisor.core.fairqueue import FairQueue

log = logging.getLogger("llmsup.supervisor")

STALE_DEADLINES_MIN = 256  # below this many stale timer entries, never compact


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ENDING = "ending"
    ENDED = "ended"


@dataclass(eq=False, slots=True)
class Job:
    """One accepted request: who asked, under what id, what for, and where it is."""

    job_id: bytes  # an 8-byte sequence number, then the client's request id
    client: bytes
    request_id: bytes
    work: M.Work
    prompt_tokens: int  # estimated, for the queue's token bound
    model: str = ""  # the name of the model it runs on (the request's, or the default)
    accepted_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which it is deadline_exceeded
    state: State = State.QUEUED
    worker: object | None = None  # the pool's Worker, while RUNNING or ENDING
    dispatched_at: float = 0.0
    tokens_sent: int = 0
    tokens_at_beat: int = -1  # tokens_sent at the last heartbeat tick (RUNNING frames)
    retried: bool = False  # requeued once after its worker died before its first token
    stop_code: str | None = None  # why it is ENDING

    @property
    def seqs(self) -> int:
        """The worker slots it holds while RUNNING or ENDING: one per completion (`n`)."""
        return M.sequences(self.work)


# send(client, frames) -> None, or why the client cannot be reached
ClientSend = Callable[[bytes, list[bytes]], str | None]
WorkerSend = Callable[[object, list[bytes]], None]


class Ledger:
    def __init__(
        self, queue: FairQueue, send_client: ClientSend, send_worker: WorkerSend, instance: str
    ):
        self.queue = queue
        self._send_client = send_client
        self._send_worker = send_worker
        self.instance = instance  # this supervisor's id, in ACCEPTED frames
        self.by_client: dict[bytes, dict[bytes, Job]] = {}  # client -> request id -> job
        self.by_job_id: dict[bytes, Job] = {}
        self.assigned: dict[object, dict[bytes, Job]] = {}  # worker -> its jobs by job id
        self.deadlines: list[tuple[float, int, bytes]] = []  # heap of (when, seq, job id)
        self.gone: set[bytes] = set()  # clients that went away while owning jobs
        self.timed = 0  # open jobs with a deadline: the timer's other entries are stale
        self.seq = itertools.count(1)
        self.on_answered: Callable[[Job], None] = lambda job: None  # a worker answered it

    def __len__(self) -> int:
        return len(self.by_job_id)

    # --- questions ----------------------------------------------------------------------

    def get(self, client: bytes, request_id: bytes) -> Job | None:
        return self.by_client.get(client, {}).get(request_id)

    def jobs_on(self, worker) -> Collection[Job]:
        return self.assigned.get(worker, {}).values()

    def free_slots(self, worker) -> int:
        return worker.slots - sum(job.seqs for job in self.assigned.get(worker, {}).values())

    # --- events -------------------------------------------------------------------------

    def admit(
        self, client: bytes, request_id: bytes, work: M.Work, prompt_tokens: int, model: str
    ) -> Job:
        """A request passed admission: it is queued, and its client told so at once."""
        job = Job(
            next(self.seq).to_bytes(8, "big") + request_id,
            client,
            request_id,
            work,
            prompt_tokens,
            model=model,
        )
        if work.timeout_ms is not None:
            job.deadline = job.accepted_at + work.timeout_ms / 1000
            heapq.heappush(self.deadlines, (job.deadline, next(self.seq), job.job_id))
            self.timed += 1
        self.by_client.setdefault(client, {})[request_id] = job
        self.by_job_id[job.job_id] = job
        self.queue.push(job)
        body = {"instance": self.instance, "queue_depth": len(self.queue)}
        self.send(client, codec.reply_frames(C.ACCEPTED, request_id, body))
        return job

    def dispatch(self, job: Job, worker) -> None:
        """QUEUED -> RUNNING: the job leaves the queue (the caller popped it) for a worker."""
        job.state = State.RUNNING
        job.worker = worker
        job.dispatched_at = time.monotonic()
        self.assigned.setdefault(worker, {})[job.job_id] = job
        self._send_worker(worker, wire.job_order(job.job_id, job.work))

    def requeue(self, job: Job) -> None:
        """Back to the front of the queue (its worker died before it produced anything)."""
        self._unassign(job)
        job.state = State.QUEUED
        job.retried = True
        self.queue.push(job, front=True)

    def token(self, worker, event: wire.JobEvent) -> None:
        job = self.assigned.get(worker, {}).get(event.job_id)
        if job is None:
            return  # already ended (failed on stop): the worker's answer follows
        job.tokens_sent += 1
        self.send(job.client, [C.VERSION, C.TOKEN, job.request_id, event.body])

    def finished(self, worker, event: wire.JobEvent) -> None:
        """The worker answered a job (DONE or ERROR): forward it, the job has ended."""
        job = self.assigned.get(worker, {}).get(event.job_id)
        if job is None:
            return
        self.on_answered(job)
        kind = C.DONE if event.kind == C.W_DONE else C.ERROR
        self._end(job, [C.VERSION, kind, job.request_id, event.body])

    def cancel(self, client: bytes, target: bytes) -> bool:
        """A client cancels one of its own requests; other clients' ids are never looked at."""
        job = self.get(client, target)
        if job is None:
            return False
        self.stop(job, C.E_CANCELLED, "cancelled by the client")
        return True

    def stop(self, job: Job, code: str, message: str) -> None:
        """End a job early: at once if queued, within one token if running."""
        if job.state is State.QUEUED:
            self.fail(job, code, message)
        elif job.state is State.RUNNING:
            job.state = State.ENDING
            job.stop_code = code
            self._send_worker(job.worker, wire.abort_order(job.job_id, code, message))

    def expire(self, now: float) -> None:
        """Every job whose timeout_ms has passed is stopped with deadline_exceeded."""
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self.deadlines)
            job = self.by_job_id.get(job_id)
            if job is None:
                continue  # ended before its deadline
            job.deadline = None  # its timer entry is gone
            self.timed -= 1
            where = "in the queue" if job.state is State.QUEUED else "while generating"
            self.stop(job, C.E_DEADLINE, f"timeout_ms {job.work.timeout_ms} passed {where}")

    def client_gone(self, client: bytes, why: str) -> None:
        """Stop everything a client has queued or running instead of generating into the
        void; it is remembered (its frames are not sent) only until it owns nothing."""
        mine = list(self.by_client.get(client, {}).values())
        if not mine:
            return
        self.gone.add(client)
        log.warning("client %s %s: cancelling %d request(s)", client.hex(), why, len(mine))
        for job in mine:
            self.stop(job, C.E_CANCELLED, f"the client {why}")

    def worker_lost(self, worker, reason: str, may_retry: bool) -> None:
        """A worker died. A job it had not produced anything for is retried once elsewhere
        (if `may_retry`), first in line; a stopped one ends with why it was stopped; the
        rest end with worker_lost."""
        jobs = sorted(self.jobs_on(worker), key=lambda j: j.accepted_at, reverse=True)
        for job in jobs:
            if job.state is State.ENDING:
                self.fail(job, job.stop_code, "stopped as asked; its worker then died")
            elif job.tokens_sent == 0 and not job.retried and may_retry:
                self.requeue(job)
                log.info(
                    "request %r retried after worker %d died",
                    job.request_id,
                    worker.worker_id,
                    extra={"request": job.request_id, "worker": worker.worker_id},
                )
            else:
                self.fail(job, C.E_WORKER_LOST, f"worker {worker.worker_id} died: {reason}")
        self.assigned.pop(worker, None)

    def fail_queued(self, code: str, message: str, model: str | None = None) -> None:
        """Every waiting job (of `model`, if given) ends with this error."""
        for job in list(self.queue):
            if model is None or job.model == model:
                self.fail(job, code, message)

    def end_all(self, code: str, message: str) -> int:
        """Every open job gets its terminal error now (the drain time is up)."""
        jobs = list(self.by_job_id.values())
        for job in jobs:
            self.fail(job, code, message)
        return len(jobs)

    def heartbeat(self, loading: Collection[str] = ()) -> None:
        """A QUEUED or RUNNING frame for every job that got no frame since the last tick:
        liveness for the client (SPEC.md "Liveness"), and a probe of whether it is still
        there (a send to a disconnected client fails). A job whose model is `loading`
        says so in its QUEUED frames."""
        position: dict[bytes, int] = {}
        depth = len(self.queue)
        for job in list(self.queue):
            position[job.client] = position.get(job.client, 0) + 1
            body = {"position": position[job.client], "queue_depth": depth}
            if job.model in loading:
                body["loading"] = job.model
            self.send(job.client, codec.reply_frames(C.QUEUED, job.request_id, body))
        for jobs in list(self.assigned.values()):
            for job in list(jobs.values()):
                if job.tokens_sent == job.tokens_at_beat:
                    body = {"tokens_sent": job.tokens_sent}
                    self.send(job.client, codec.reply_frames(C.RUNNING, job.request_id, body))
                job.tokens_at_beat = job.tokens_sent

    # --- the one way out --------------------------------------------------------------------

    def fail(self, job: Job, code: str, message: str) -> None:
        body = codec.error_body(code, message, tokens_sent=job.tokens_sent)
        self._end(job, codec.reply_frames(C.ERROR, job.request_id, body))

    def _end(self, job: Job, frames: list[bytes]) -> None:
        """ENDED: out of every index, then its terminal frame (unless its client is gone)."""
        if job.state is State.QUEUED:
            self.queue.remove(job)
        else:
            self._unassign(job)
        job.state = State.ENDED
        del self.by_job_id[job.job_id]
        mine = self.by_client[job.client]
        del mine[job.request_id]
        if not mine:
            del self.by_client[job.client]
        if job.deadline is not None:
            self.timed -= 1
            self._compact_deadlines()
        if job.client in self.gone:
            if not mine:
                self.gone.discard(job.client)  # owns nothing now: forgotten
            return
        self.send(job.client, frames)

    def _unassign(self, job: Job) -> None:
        jobs = self.assigned.get(job.worker)
        if jobs is not None:
            jobs.pop(job.job_id, None)
        job.worker = None

    def _compact_deadlines(self) -> None:
        """Drop the timer's entries of ended jobs once they are most of it."""
        stale = len(self.deadlines) - self.timed
        if stale >= STALE_DEADLINES_MIN and stale * 2 >= len(self.deadlines):
            self.deadlines = [d for d in self.deadlines if d[2] in self.by_job_id]
            heapq.heapify(self.deadlines)

    # --- the client socket ------------------------------------------------------------------

    def send(self, client: bytes, frames: list[bytes]) -> None:
        if client in self.gone:
            return
        why = self._send_client(client, frames)
        if why is not None:
            self.client_gone(client, why)
