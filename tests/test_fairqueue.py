"""The admission queue (supervisor/core/fairqueue.py) on its own: no model, no processes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)  # compared by identity: two jobs with equal fields stay two jobs
class Item:
    """All FairQueue reads of a job: its client and its estimated prompt tokens."""

    name: str
    client: bytes
    prompt_tokens: int = 0


A, B, C = b"client-a", b"client-b", b"client-c"


def fairqueue():
    """The module, imported per test: an import error fails the queue's tests, not the file's."""
    from llmsup.supervisor.core import fairqueue

    return fairqueue


def queue(limit: int = 100, per_client: int = 100, token_limit: int = 10_000):
    return fairqueue().FairQueue(limit=limit, per_client=per_client, token_limit=token_limit)


def names(items) -> list[str]:
    return [item.name for item in items]


def drain(q) -> list[str]:
    popped = []
    while q:
        popped.append(q.pop().name)
    return popped


def test_fairqueue_serves_clients_round_robin():
    q = queue()
    for item in [
        Item("a1", A),
        Item("a2", A),
        Item("a3", A),
        Item("b1", B),
        Item("c1", C),
        Item("c2", C),
    ]:
        q.push(item)
    # A flooded first, yet waits behind itself: one job of each client in turn.
    assert drain(q) == ["a1", "b1", "c1", "a2", "c2", "a3"]


def test_fairqueue_client_that_comes_back_takes_the_last_turn():
    q = queue()
    q.push(Item("a1", A))
    q.push(Item("b1", B))
    assert q.pop().name == "a1"  # A has nothing left: it leaves the turns
    q.push(Item("a2", A))  # and comes back behind B
    q.push(Item("c1", C))
    assert drain(q) == ["b1", "a2", "c1"]


def test_fairqueue_len_bool_iter_and_of_client():
    q = queue()
    assert len(q) == 0 and not q and list(q) == [] and q.of_client(A) == []
    for item in [Item("a1", A, 5), Item("b1", B, 7), Item("a2", A, 11)]:
        q.push(item)
    assert len(q) == 3 and q
    assert sorted(names(q)) == ["a1", "a2", "b1"]  # every waiting job, once
    assert names(q.of_client(A)) == ["a1", "a2"]  # in its client's order
    assert names(q.of_client(B)) == ["b1"] and q.of_client(C) == []
    copy = q.of_client(A)
    copy.clear()
    assert len(q.of_client(A)) == 2, "of_client returns a copy"
    assert q.count == 3 and q.tokens == 23


def test_fairqueue_refuses_when_full():
    q = queue(limit=3)
    for item in [Item("a1", A), Item("b1", B)]:
        q.push(item)
    assert q.refusal(C, 1) is None
    q.push(Item("c1", C))
    assert q.refusal(C, 1) == "the queue is full (3 requests waiting)"
    assert q.refusal(b"new", 0) is not None, "a full queue refuses a new client too"
    q.pop()
    assert q.refusal(b"new", 0) is None


def test_fairqueue_refuses_a_client_over_its_own_limit():
    q = queue(limit=10, per_client=2)
    q.push(Item("a1", A))
    assert q.refusal(A, 1) is None
    q.push(Item("a2", A))
    assert q.refusal(A, 1) == "this client already has 2 requests waiting (limit 2)"
    assert q.refusal(B, 1) is None, "other clients still have room"
    q.pop()
    assert q.refusal(A, 1) is None


def test_fairqueue_total_limit_is_checked_before_the_client_limit():
    q = queue(limit=2, per_client=2, token_limit=10)
    q.push(Item("a1", A, 5))
    q.push(Item("a2", A, 5))
    assert q.refusal(A, 50).startswith("the queue is full")


def test_fairqueue_token_limit():
    q = queue(token_limit=100)
    q.push(Item("a1", A, 60))
    assert q.refusal(B, 40) is None, "exactly at the limit fits"
    assert q.refusal(B, 41) == (
        "the queue holds about 60 prompt tokens; this request's 41 would pass the limit of 100"
    )
    q.push(Item("b1", B, 40))
    assert q.tokens == 100
    assert q.refusal(C, 1) is not None
    assert q.refusal(C, 0) is None


def test_fairqueue_token_limit_never_refuses_into_an_empty_queue():
    q = queue(token_limit=100)
    assert q.refusal(A, 10**9) is None, "a prompt larger than the bound still gets in alone"
    q.push(Item("a1", A, 10**9))
    assert q.tokens == 10**9
    assert q.refusal(B, 1) is not None, "and then nothing more until it leaves"
    q.pop()
    assert q.tokens == 0 and q.refusal(B, 10**9) is None
    # Only the token bound gives way: a queue (or client) limit of 0 refuses even when empty.
    assert queue(limit=0).refusal(A, 1).startswith("the queue is full")
    assert queue(per_client=0).refusal(A, 1).startswith("this client already has 0")
    assert queue(token_limit=0).refusal(A, 1) is None


def test_fairqueue_push_front_goes_first_within_its_client():
    q = queue()
    for item in [Item("a1", A), Item("b1", B), Item("a2", A)]:
        q.push(item)
    q.push(Item("a0", A), front=True)  # a retried job of a client that has jobs waiting
    assert names(q.of_client(A)) == ["a0", "a1", "a2"]
    # The client keeps its place in the turns: A was first already.
    assert drain(q) == ["a0", "b1", "a1", "a2"]


def test_fairqueue_push_front_of_a_new_client_takes_the_first_turn():
    q = queue()
    for item in [Item("a1", A), Item("b1", B)]:
        q.push(item)
    q.push(Item("c0", C), front=True)
    assert drain(q) == ["c0", "a1", "b1"]


def test_fairqueue_push_front_moves_a_waiting_clients_turn_first():
    # A retried job has waited already: its client takes the next turn.
    q = queue()
    for item in [Item("a1", A), Item("b1", B)]:
        q.push(item)
    q.push(Item("b0", B), front=True)
    assert drain(q) == ["b0", "a1", "b1"]


def test_fairqueue_remove_from_the_middle():
    q = queue()
    a1, a2, a3 = Item("a1", A, 1), Item("a2", A, 2), Item("a3", A, 4)
    b1 = Item("b1", B, 8)
    for item in (a1, a2, b1, a3):
        q.push(item)
    assert q.remove(a2) is True
    assert names(q.of_client(A)) == ["a1", "a3"]
    assert len(q) == 3 and q.tokens == 13
    assert q.remove(a2) is False, "a second remove finds nothing"
    assert len(q) == 3 and q.tokens == 13
    assert drain(q) == ["a1", "b1", "a3"]


def test_fairqueue_remove_the_last_job_of_a_client():
    q = queue()
    a1, b1, c1, a2 = Item("a1", A, 1), Item("b1", B, 2), Item("c1", C, 4), Item("a2", A, 8)
    for item in (a1, b1, c1, a2):
        q.push(item)
    assert q.remove(b1) is True
    assert q.of_client(B) == [] and B not in q.by_client and B not in q.turns
    assert drain(q) == ["a1", "c1", "a2"], "round-robin goes on without B"
    assert q.remove(b1) is False


def test_fairqueue_remove_of_a_job_never_queued():
    q = queue()
    q.push(Item("a1", A, 3))
    twin = Item("a1", A, 3)  # equal fields, another job
    assert q.remove(twin) is False and q.remove(Item("z", b"nobody")) is False
    assert len(q) == 1 and q.tokens == 3


def test_fairqueue_counts_and_tokens_return_to_zero():
    q = queue(limit=50, per_client=50, token_limit=10_000)
    items = [Item(f"{c.decode()}{i}", c, 10 * i + 1) for i in range(5) for c in (A, B, C)]
    for item in items:
        q.push(item)
    assert len(q) == 15 and q.tokens == sum(item.prompt_tokens for item in items)
    for item in items[::3]:  # a third removed, from every client
        assert q.remove(item)
    q.push(items[0], front=True)  # and one back in
    popped = drain(q)
    assert len(popped) == 11
    assert len(q) == 0 and q.count == 0 and q.tokens == 0 and not q
    assert q.by_client == {} and not q.turns
    assert q.refusal(A, 10_000) is None
