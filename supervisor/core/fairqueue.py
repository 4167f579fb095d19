"""The admission queue: bounded, and served round-robin across clients.

Each client identity has its own FIFO; dispatch takes one job from each client in turn,
so a client that floods the queue waits behind itself, not in front of everyone else.
A client may hold at most `per_client` waiting jobs, leaving room for the others.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmsup.supervisor.core.ledger import Job


class FairQueue:
    def __init__(self, limit: int, per_client: int, token_limit: int):
        self.limit = limit
        self.per_client = per_client
        self.token_limit = token_limit
        self.by_client: dict[bytes, collections.deque[Job]] = {}
        self.turns: collections.deque[bytes] = collections.deque()  # clients with jobs
        self.count = 0
        self.tokens = 0

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self) -> Iterator[Job]:
        for jobs in self.by_client.values():
            yield from jobs

    def refusal(self, client: bytes, tokens: int) -> str | None:
        """Why a new job from this client cannot be queued now, or None."""
        if self.count >= self.limit:
            return f"the queue is full ({self.limit} requests waiting)"
        mine = len(self.by_client.get(client, ()))
        if mine >= self.per_client:
            return f"this client already has {mine} requests waiting (limit {self.per_client})"
        if self.tokens + tokens > self.token_limit and self.count:
            return (
                f"the queue holds about {self.tokens} prompt tokens; this request's "
                f"{tokens} would pass the limit of {self.token_limit}"
            )
        return None

    def push(self, job: Job, front: bool = False) -> None:
        jobs = self.by_client.get(job.client)
        if jobs is None:
            jobs = self.by_client[job.client] = collections.deque()
            self.turns.append(job.client)
        if front:
            # A job that has waited already (retried after its worker died) goes first:
            # first among its client's jobs, and its client takes the next turn.
            jobs.appendleft(job)
            self.turns.remove(job.client)
            self.turns.appendleft(job.client)
        else:
            jobs.append(job)
        self.count += 1
        self.tokens += job.prompt_tokens

    def pop(self) -> Job:
        """The next job in round-robin order across clients."""
        job = self.pop_first(lambda job: True)
        assert job is not None, "pop from an empty queue"
        return job

    def pop_first(self, can_run: Callable[[Job], bool]) -> Job | None:
        """The next job in round-robin order that `can_run` (its model has a free slot),
        looking only at each client's oldest, so a client's jobs start in order."""
        for i, client in enumerate(self.turns):
            jobs = self.by_client[client]
            if can_run(jobs[0]):
                del self.turns[i]  # the clients it passed keep their turns
                job = jobs.popleft()
                if jobs:
                    self.turns.append(client)
                else:
                    del self.by_client[client]
                self.count -= 1
                self.tokens -= job.prompt_tokens
                return job
        return None

    def remove(self, job: Job) -> bool:
        jobs = self.by_client.get(job.client)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self.by_client[job.client]
            self.turns.remove(job.client)
        self.count -= 1
        self.tokens -= job.prompt_tokens
        return True

    def of_client(self, client: bytes) -> list[Job]:
        return list(self.by_client.get(client, ()))
