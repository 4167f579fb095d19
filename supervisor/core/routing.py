"""Which free worker a request goes to: one of those with the most free slots (load first:
a prefix another worker holds costs a restore of a few ms from the shared cache, an idle
worker left idle costs its cores), and among those the one that last served the longest
start of the request, else the one that has served least.

A worker's finished sequences keep their KV cells until a new prompt needs the room, so a
chat's next turn sent to the worker that served the previous one continues in place, with
nothing to restore from the shared prefix cache (which any other worker would do instead,
in a few ms). The supervisor does not tokenize: it compares request texts (a prompt, or a
chat's messages in order), which start the same way exactly when their prompts do.
"""

from __future__ import annotations

import collections

from llmsup.protocol import messages as M

KEEP_CHARS = 1 << 16  # of each remembered text: past this a longer match changes nothing
MIN_CHARS = 256  # shorter common starts are not worth steering a request for


def common_length(a: str, b: str) -> int:
    """Length of the common start of two strings (binary search on C-speed comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Router:
    def __init__(self, prefer_prefix: bool):
        self.prefer_prefix = prefer_prefix  # off without a prefix cache: nothing is kept
        self.recent: dict[int, collections.deque[str]] = {}

    def pick(self, free: dict, work: M.Work):
        """The worker to run `work`, of `free`: {worker: its free slots (at least one)}."""
        most = max(free.values())
        least_loaded = [w for w, n in free.items() if n == most]
        if not self.prefer_prefix or isinstance(work, (M.Tokenize, M.Detokenize, M.Embed)):
            return min(least_loaded, key=lambda w: w.served)
        text = work.as_text()[:KEEP_CHARS]
        preferred = self.best([w.worker_id for w in least_loaded], text)
        worker = next((w for w in least_loaded if w.worker_id == preferred), None)
        if worker is None:
            worker = min(least_loaded, key=lambda w: w.served)
        self.remember(worker.worker_id, worker.slots, text)
        return worker

    def remember(self, worker_id: int, slots: int, text: str) -> None:
        texts = self.recent.get(worker_id)
        if texts is None or texts.maxlen != slots:
            texts = self.recent[worker_id] = collections.deque(texts or (), maxlen=max(1, slots))
        texts.append(text)

    def forget(self, worker_id: int) -> None:
        """A worker process ended: its sequences are gone with it."""
        self.recent.pop(worker_id, None)

    def best(self, worker_ids: list[int], text: str) -> int | None:
        """The worker among `worker_ids` whose recent requests share the longest start with
        this request's text (at least MIN_CHARS), or None."""
        best, best_n = None, MIN_CHARS - 1
        for worker_id in worker_ids:
            for seen in self.recent.get(worker_id, ()):
                n = common_length(seen, text)
                if n > best_n:
                    best, best_n = worker_id, n
        return best
