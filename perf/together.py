"""Run a benchmark's clients at once: one thread each, timed together.

A failure in a thread would pass unseen and leave a figure that counts fewer requests, so
the first one is raised here, after every thread has ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_together(clients: list[Callable[[], None]]) -> float:
    """Start every client, wait for all; the wall seconds from the first start to the last
    end. Re-raises the first exception a client raised."""
    errors: list[BaseException] = []

    def guarded(client: Callable[[], None]) -> None:
        try:
            client()
        except BaseException as exc:  # raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(client,)) for client in clients]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed
