"""The request ledger on its own (supervisor/core/ledger.py): every event in every state, and
that ending a request leaves nothing behind in any index."""

from __future__ import annotations

import orjson
import pytest

from llmsup.protocol import constants as C
from llmsup.protocol import workerwire as wire
from llmsup.protocol.messages import Complete
from llmsup.supervisor.core import ledger as L
from llmsup.supervisor.core.fairqueue import FairQueue
from llmsup.supervisor.core.ledger import Ledger, State


class FakeWorker:
    def __init__(self, worker_id: int = 0, slots: int = 2):
        self.worker_id = worker_id
        self.slots = slots


class Wire:
    """The two sockets: what was sent to whom; clients in `unreachable` fail their sends."""

    def __init__(self):
        self.to_clients: list[tuple[bytes, bytes, bytes, dict]] = []
        self.to_workers: list[tuple[FakeWorker, list[bytes]]] = []
        self.unreachable: set[bytes] = set()

    def send_client(self, client: bytes, frames: list[bytes]) -> str | None:
        if client in self.unreachable:
            return "disconnected"
        self.to_clients.append((client, frames[1], frames[2], orjson.loads(bytes(frames[3]))))
        return None

    def send_worker(self, worker, frames: list[bytes]) -> None:
        self.to_workers.append((worker, frames))

    def kinds(self, client: bytes = b"c", request_id: bytes | None = None) -> list[bytes]:
        return [
            k
            for c, k, r, _ in self.to_clients
            if c == client and (request_id is None or r == request_id)
        ]

    def terminal(self, request_id: bytes) -> list[tuple[bytes, dict]]:
        return [
            (k, b) for _, k, r, b in self.to_clients if r == request_id and k in C.TERMINAL_KINDS
        ]


@pytest.fixture
def setup():
    w = Wire()
    ledger = Ledger(FairQueue(100, 50, 10**6), w.send_client, w.send_worker, "0123456789abcdef")
    return ledger, w


def admit(ledger, client=b"c", rid=b"r1", timeout_ms=None):
    return ledger.admit(client, rid, Complete("hello", timeout_ms=timeout_ms), 2, "m")


def event(kind: bytes, job, body: dict | None = None) -> wire.JobEvent:
    return wire.JobEvent(kind, job.job_id, orjson.dumps(body or {"text": "x"}))


def assert_gone(ledger: Ledger, job) -> None:
    """ENDED, and in no index."""
    assert job.state is State.ENDED
    assert job.job_id not in ledger.by_job_id
    assert ledger.get(job.client, job.request_id) is None
    assert job not in list(ledger.queue)
    assert all(job not in jobs.values() for jobs in ledger.assigned.values())
    assert job.worker is None


def running(ledger, w, worker=None, rid=b"r1", **kw):
    job = admit(ledger, rid=rid, **kw)
    assert ledger.queue.remove(job)  # what the supervisor's pop does, for this job
    ledger.dispatch(job, worker or FakeWorker())
    return job


# --- admission and dispatch --------------------------------------------------------------


def test_admit_queues_and_acknowledges_at_once(setup):
    ledger, w = setup
    job = admit(ledger)
    assert job.state is State.QUEUED and list(ledger.queue) == [job]
    assert ledger.get(b"c", b"r1") is job and len(ledger) == 1
    ((client, kind, rid, body),) = w.to_clients
    assert (client, kind, rid) == (b"c", C.ACCEPTED, b"r1")
    assert body == {"instance": "0123456789abcdef", "queue_depth": 1}
    assert job.job_id[8:] == b"r1" and len(job.job_id) == 10


def test_dispatch_assigns_and_sends_the_order(setup):
    ledger, w = setup
    worker = FakeWorker(slots=2)
    job = running(ledger, w, worker)
    assert job.state is State.RUNNING and job.worker is worker
    assert list(ledger.jobs_on(worker)) == [job] and ledger.free_slots(worker) == 1
    ((to, frames),) = w.to_workers
    order = wire.decode_order(frames)
    assert to is worker and order.job_id == job.job_id and order.work == job.work


# --- every event in every state ----------------------------------------------------------


def test_token_streams_while_running_and_ending(setup):
    ledger, w = setup
    worker = FakeWorker()
    job = running(ledger, w, worker)
    ledger.token(worker, event(C.W_TOKEN, job))
    ledger.cancel(b"c", b"r1")  # -> ENDING
    ledger.token(worker, event(C.W_TOKEN, job))
    assert job.tokens_sent == 2 and w.kinds().count(C.TOKEN) == 2


def test_events_for_unknown_jobs_or_from_another_worker_change_nothing(setup):
    ledger, w = setup
    worker, other = FakeWorker(0), FakeWorker(1)
    job = running(ledger, w, worker)
    sent = len(w.to_clients)
    ledger.token(other, event(C.W_TOKEN, job))
    ledger.finished(other, event(C.W_DONE, job))
    stranger = wire.JobEvent(C.W_DONE, b"\0" * 8 + b"zz", b"{}")
    ledger.finished(worker, stranger)
    assert len(w.to_clients) == sent and job.state is State.RUNNING and job.tokens_sent == 0


@pytest.mark.parametrize("kind, reply", [(C.W_DONE, C.DONE), (C.W_ERROR, C.ERROR)])
def test_finished_forwards_the_answer_and_frees_the_slot(setup, kind, reply):
    ledger, w = setup
    worker = FakeWorker(slots=1)
    answered = []
    ledger.on_answered = answered.append
    job = running(ledger, w, worker)
    assert ledger.free_slots(worker) == 0
    ledger.finished(worker, event(kind, job, {"finish_reason": "stop"}))
    assert_gone(ledger, job)
    assert ledger.free_slots(worker) == 1 and answered == [job]
    assert w.terminal(b"r1") == [(reply, {"finish_reason": "stop"})]


def test_cancel_of_a_queued_job_ends_it_at_once(setup):
    ledger, w = setup
    job = admit(ledger)
    assert ledger.cancel(b"c", b"r1") is True
    assert_gone(ledger, job)
    ((kind, body),) = w.terminal(b"r1")
    assert kind == C.ERROR and body["code"] == C.E_CANCELLED and body["tokens_sent"] == 0


def test_cancel_of_a_running_job_asks_the_worker_and_waits_for_its_answer(setup):
    ledger, w = setup
    worker = FakeWorker()
    job = running(ledger, w, worker)
    assert ledger.cancel(b"c", b"r1") is True
    assert job.state is State.ENDING and job.stop_code == C.E_CANCELLED
    order = wire.decode_order(w.to_workers[-1][1])
    assert isinstance(order, wire.AbortOrder) and order.code == C.E_CANCELLED
    assert w.terminal(b"r1") == [] and ledger.free_slots(worker) == 1  # still holds its slot
    assert ledger.cancel(b"c", b"r1") is True  # again while ENDING: nothing more is sent
    assert len(w.to_workers) == 2
    ledger.finished(worker, event(C.W_ERROR, job, {"code": "cancelled", "message": "m"}))
    assert_gone(ledger, job)
    assert len(w.terminal(b"r1")) == 1


def test_cancel_names_only_the_clients_own_requests(setup):
    ledger, w = setup
    job = admit(ledger, client=b"a")
    assert ledger.cancel(b"b", b"r1") is False and job.state is State.QUEUED
    assert ledger.cancel(b"a", b"nope") is False


@pytest.mark.parametrize("where", ["queued", "running"])
def test_deadline(setup, where):
    ledger, w = setup
    worker = FakeWorker()
    job = (
        admit(ledger, timeout_ms=1000)
        if where == "queued"
        else running(ledger, w, worker, timeout_ms=1000)
    )
    ledger.expire(job.accepted_at + 0.5)
    assert job.state is not State.ENDED and job.stop_code is None
    ledger.expire(job.accepted_at + 1.0)
    assert not ledger.deadlines and ledger.timed == 0
    if where == "queued":
        assert_gone(ledger, job)
        assert w.terminal(b"r1")[0][1]["code"] == C.E_DEADLINE
    else:
        assert job.state is State.ENDING and job.stop_code == C.E_DEADLINE
        ledger.finished(worker, event(C.W_ERROR, job, {"code": C.E_DEADLINE, "message": "m"}))
        assert_gone(ledger, job)


def test_deadline_after_the_job_ended_does_nothing(setup):
    ledger, w = setup
    job = admit(ledger, timeout_ms=1000)
    ledger.cancel(b"c", b"r1")
    sent = len(w.to_clients)
    ledger.expire(job.accepted_at + 2)
    assert len(w.to_clients) == sent and not ledger.deadlines


def test_client_gone_stops_its_jobs_and_is_forgotten_once_they_end(setup):
    ledger, w = setup
    worker = FakeWorker()
    queued = admit(ledger, rid=b"q")
    run = running(ledger, w, worker, rid=b"r")
    other = admit(ledger, client=b"other", rid=b"o")
    w.unreachable.add(b"c")
    ledger.client_gone(b"c", "disconnected")
    assert_gone(ledger, queued)
    assert run.state is State.ENDING and b"c" in ledger.gone
    ledger.finished(worker, event(C.W_ERROR, run, {"code": "cancelled", "message": "m"}))
    assert_gone(ledger, run)
    assert ledger.gone == set() and b"c" not in ledger.by_client  # forgotten
    assert other.state is State.QUEUED


def test_a_failed_send_counts_as_the_client_gone(setup):
    ledger, w = setup
    worker = FakeWorker()
    job = running(ledger, w, worker)
    w.unreachable.add(b"c")
    ledger.token(worker, event(C.W_TOKEN, job))
    assert job.state is State.ENDING and job.stop_code == C.E_CANCELLED


def test_a_client_that_owns_nothing_is_never_remembered(setup):
    ledger, w = setup
    for i in range(1000):
        ledger.client_gone(b"c%d" % i, "disconnected")
    assert ledger.gone == set()


@pytest.mark.parametrize("stopping", [False, True])
def test_worker_lost(setup, stopping):
    ledger, w = setup
    worker = FakeWorker(slots=3)
    fresh = running(ledger, w, worker, rid=b"fresh")
    streamed = running(ledger, w, worker, rid=b"streamed")
    ledger.token(worker, event(C.W_TOKEN, streamed))
    running(ledger, w, worker, rid=b"stopped")
    ledger.cancel(b"c", b"stopped")
    ledger.worker_lost(worker, "killed by SIGKILL", may_retry=not stopping)
    assert worker not in ledger.assigned
    assert w.terminal(b"streamed")[0][1]["code"] == C.E_WORKER_LOST
    assert w.terminal(b"stopped")[0][1]["code"] == C.E_CANCELLED
    if stopping:
        assert w.terminal(b"fresh")[0][1]["code"] == C.E_WORKER_LOST
    else:
        assert fresh.state is State.QUEUED and fresh.retried and list(ledger.queue) == [fresh]
        assert fresh.worker is None
        # A retried job whose next worker dies too is not retried again.
        ledger.queue.pop()
        other = FakeWorker(1)
        ledger.dispatch(fresh, other)
        ledger.worker_lost(other, "crashed", may_retry=True)
        assert_gone(ledger, fresh)
        assert w.terminal(b"fresh")[0][1]["code"] == C.E_WORKER_LOST


def test_end_all_and_fail_queued(setup):
    ledger, w = setup
    worker = FakeWorker()
    a = admit(ledger, rid=b"a")
    b = admit(ledger, rid=b"b")
    ledger.fail_queued(C.E_WORKER_LOST, "no worker")
    assert_gone(ledger, a)
    assert_gone(ledger, b)
    c = running(ledger, w, worker, rid=b"c")
    d = admit(ledger, rid=b"d")
    assert ledger.end_all(C.E_SHUTTING_DOWN, "stopped") == 2
    for job in (c, d):
        assert_gone(ledger, job)
    assert len(ledger) == 0 and ledger.by_client == {} and not ledger.queue
    assert ledger.free_slots(worker) == worker.slots


def test_every_request_gets_exactly_one_terminal_frame(setup):
    """Whatever happens to it: a run of many mixed events."""
    ledger, w = setup
    worker = FakeWorker(slots=4)
    jobs = [
        admit(ledger, rid=b"j%d" % i, timeout_ms=1000 if i % 3 == 0 else None) for i in range(30)
    ]
    for job in jobs[:4]:
        ledger.queue.pop()
        ledger.dispatch(job, worker)
    ledger.cancel(b"c", b"j1")
    ledger.cancel(b"c", b"j10")
    ledger.finished(worker, event(C.W_DONE, jobs[2]))
    ledger.expire(jobs[0].accepted_at + 5)
    ledger.worker_lost(worker, "crashed", may_retry=True)
    ledger.end_all(C.E_SHUTTING_DOWN, "stopped")
    for job in jobs:
        assert len(w.terminal(job.request_id)) == 1, job.request_id
    assert len(ledger) == 0 and not ledger.deadlines or ledger.timed == 0


# --- heartbeats and memory -----------------------------------------------------------------


def test_heartbeat_queued_every_tick_running_only_when_silent(setup):
    ledger, w = setup
    worker = FakeWorker(slots=2)
    silent = running(ledger, w, worker, rid=b"silent")
    talking = running(ledger, w, worker, rid=b"talking")
    waiting = admit(ledger, rid=b"waiting")
    for _ in range(3):
        ledger.token(worker, event(C.W_TOKEN, talking))
        ledger.heartbeat()
    # The first tick after dispatch only marks: silence is bounded by two ticks.
    assert w.kinds(request_id=b"silent").count(C.RUNNING) == 2
    assert w.kinds(request_id=b"talking").count(C.RUNNING) == 0
    assert w.kinds(request_id=b"waiting").count(C.QUEUED) == 3
    assert waiting.state is State.QUEUED and silent.state is State.RUNNING


def test_the_deadline_timer_holds_no_prompt_and_is_compacted(setup):
    ledger, w = setup
    for i in range(5 * L.STALE_DEADLINES_MIN):
        admit(ledger, rid=b"r%d" % i, timeout_ms=86_400_000)
        ledger.cancel(b"c", b"r%d" % i)
    assert all(isinstance(entry[2], bytes) for entry in ledger.deadlines)
    assert len(ledger.deadlines) < 2 * L.STALE_DEADLINES_MIN
    assert len(ledger) == 0 and ledger.timed == 0
