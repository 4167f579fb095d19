"""What the supervisor measures of the requests it serves: how many were accepted and
rejected, how long a job takes in a worker (for `retry_after_ms`), and the rates and latency
percentiles the scoreboard header shows once a second."""

from __future__ import annotations

import collections
import time

LATENCY_WINDOW = 1000  # recent requests behind the p50/p99 in the scoreboard header
REPORT_INTERVAL_S = 1.0


class RequestStats:
    def __init__(self):
        self.accepted = 0
        self.rejected = 0
        self.service_ms = 1000.0  # moving average of a job's time in a worker
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.reported = (0, 0, time.monotonic())  # accepted, rejected, when: for rates

    def finished(self, service_ms: float, latency_ms: float) -> None:
        """A worker answered a job that spent `service_ms` on it, `latency_ms` since it was
        accepted. The service time is an exponential moving average weighting each new job
        0.2 (SPEC.md "overloaded"): it follows a change of load within about ten jobs."""
        self.service_ms += 0.2 * (service_ms - self.service_ms)
        self.latencies.append(latency_ms)

    def retry_after_ms(self, waiting: int, slots: int) -> int:
        """When a refused request should come back: the queue ahead of it, served by the
        slots at the recent pace; between 0.1 s and a minute."""
        estimate = self.service_ms * (waiting + 1) / max(1, slots)
        return int(min(60_000, max(100, estimate)))

    @property
    def next_report(self) -> float:
        return self.reported[2] + REPORT_INTERVAL_S

    def report(self, now: float) -> dict:
        """Rates since the last report and latency percentiles, as scoreboard header fields."""
        accepted, rejected, then = self.reported
        elapsed = now - then
        p50 = p99 = 0.0
        if self.latencies:
            ordered = sorted(self.latencies)
            p50 = ordered[len(ordered) // 2]
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        self.reported = (self.accepted, self.rejected, now)
        return {
            "accepted_rate": (self.accepted - accepted) / elapsed,
            "rejected_rate": (self.rejected - rejected) / elapsed,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
        }
