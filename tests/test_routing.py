"""Which free worker a request goes to (supervisor/core/routing.py), on its own."""

from __future__ import annotations

from dataclasses import dataclass

from llmsup.protocol.messages import Complete
from llmsup.supervisor.core.routing import Router, common_length

SYSTEM = "You are the ship's navigator. Answer briefly, name the stars you steer by. " * 8


@dataclass(eq=False)
class FakeWorker:
    worker_id: int
    free: int
    served: int = 0
    slots: int = 8


def dispatch(router: Router, workers: list[FakeWorker], prompt: str) -> FakeWorker:
    worker = router.pick({w: w.free for w in workers if w.free > 0}, Complete(prompt))
    worker.free -= 1
    return worker


def test_conversations_that_share_a_system_prompt_spread_over_idle_workers():
    router = Router(prefer_prefix=True)
    workers = [FakeWorker(0, 8), FakeWorker(1, 8)]
    chosen = [dispatch(router, workers, f"{SYSTEM}question {i}").worker_id for i in range(4)]
    assert sorted(chosen) == [0, 0, 1, 1]  # not all four on the worker that saw one first


def test_among_equally_loaded_workers_the_one_holding_the_conversation_wins():
    router = Router(prefer_prefix=True)
    workers = [FakeWorker(0, 8), FakeWorker(1, 8)]
    first = dispatch(router, workers, f"{SYSTEM}question 0")
    other = dispatch(router, workers, "something else entirely, long enough " * 10)
    assert other is not first
    first.free += 1  # both finished: equally loaded again
    other.free += 1
    first.served = other.served = 1
    turn2 = dispatch(router, workers, f"{SYSTEM}question 0 and the reply, then more")
    assert turn2 is first


def test_without_a_prefix_cache_it_is_least_loaded_then_least_served():
    router = Router(prefer_prefix=False)
    workers = [FakeWorker(0, 7, served=1), FakeWorker(1, 7, served=0), FakeWorker(2, 6)]
    assert dispatch(router, workers, SYSTEM).worker_id == 1


def test_common_length():
    assert common_length("abcdef", "abcxyz") == 3
    assert common_length("", "abc") == 0
    assert common_length("same", "same") == 4
