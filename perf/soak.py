#!/usr/bin/env python3
"""Soak: does the supervisor's memory stay flat for minutes of hostile clients?

    .venv/bin/python perf/soak.py                  # 10 minutes
    .venv/bin/python perf/soak.py --minutes 1      # smoke run (no verdict)

Starts its own `llmsup start --cache-mb 64` in a fresh /tmp/llmsup-soak-* state dir and drives
it with raw pyzmq DEALER sockets speaking the wire protocol (protocol/SPEC.md), one thread:

- hang-ups: ~50 clients a second send `ping` (or `complete`) and close with linger 0 unread;
- cancels: 256 KiB-1 MiB prompts, timeout_ms 24 h, queued, then cancelled or disconnected;
- long deadlines: timeout_ms 24 h requests with max_tokens 4 that complete normally;
- overload: bursts past the queue's size, answered `overloaded`;
- garbage: wrong frame counts, bad JSON, unknown verbs and fields, another version.

Every 10 s it prints the supervisor process's RSS (workers excluded) and the requests sent and
replies by kind/code. At the end: RSS at the start, after the first minute and at the end, and
PASS if it grew by under 5 MB after the first minute (the first minute is warm-up: allocator
pools, ZeroMQ buffers). Then it stops the instance and removes the state dir, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import zmq

from llmsup.protocol import constants as C

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from testkit import dealer  # noqa: E402

MB = 1024 * 1024
DAY_MS = C.MAX_TIMEOUT_MS  # 24 h: no request of the soak ever ends by its deadline
TARGET_MB = 5.0
REPORT_EVERY = 10.0
CYCLE_S = 8.0  # one round of every scenario; the model idles most of it (2 cores, be gentle)
WARM_UP_S = 60.0
# A prompt the model keeps continuing, so the slot holders never end early by themselves.
COUNTING = "Count from one to one thousand: 1, 2, 3, 4, 5, 6,"


def llmsup(state_dir: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", state_dir]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


class Soak:
    def __init__(self, endpoint: str, supervisor: psutil.Process, rate: float):
        self.endpoint, self.supervisor, self.rate = endpoint, supervisor, rate
        self.ctx = zmq.Context()
        self.driver = self.dealer()  # blockers, cancels, long deadlines, garbage, status
        self.driver.send_multipart([C.VERSION, C.STATUS, b"status", b"{}"])
        if not self.driver.poll(10_000):
            raise RuntimeError("no reply to status in 10 s")
        status = orjson.loads(self.driver.recv_multipart()[3])
        self.slots = sum(w["slots"] for w in status["workers"] if w["state"] == "ready")
        self.queue_size = status["queue"]["limit"]
        self.per_client = status["queue"]["per_client_limit"]
        self.ids = itertools.count()
        self.rng = random.Random(0)
        words = "the keeper climbed the lighthouse stairs while the grey sea rose".split()
        self.text = " ".join(self.rng.choice(words) for _ in range(250_000))  # > 1 MiB
        self.sent: collections.Counter[str] = collections.Counter()
        self.replies: collections.Counter[str] = collections.Counter()
        self.pending: dict[bytes, str] = {}  # request id -> scenario, until its terminal frame
        # Enough connections that a burst exceeds the whole queue, not one client's share.
        self.bursters = [self.dealer() for _ in range(self.queue_size // self.per_client + 1)]
        self.poller = zmq.Poller()
        for sock in (self.driver, *self.bursters):
            self.poller.register(sock, zmq.POLLIN)
        # Hang-up sockets connect ahead of use: one closed right after connect() drops its
        # request unsent, so the supervisor would never see it.
        self.hangups = collections.deque((time.monotonic(), self.dealer()) for _ in range(16))
        self.hung_up = 0
        self.hangup_verb = C.PING
        self.status_rid, self.queue_depth, self.next_status = b"", -1, 0.0
        self.t0 = self.next_report = time.monotonic()
        self.rss_start = self.rss_end = self.rss()
        self.rss_minute: int | None = None

    def dealer(self) -> zmq.Socket:
        sock = dealer(self.endpoint, self.ctx)
        sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a supervisor that stops reading fails the run
        return sock

    def rss(self) -> int:
        return self.supervisor.memory_info().rss

    def send(self, sock: zmq.Socket, scenario: str, verb: bytes, body: dict) -> bytes:
        rid = f"{scenario}-{next(self.ids)}".encode()
        sock.send_multipart([C.VERSION, verb, rid, orjson.dumps(body)])
        self.sent[scenario] += 1
        self.pending[rid] = scenario
        return rid

    def cancel(self, sock: zmq.Socket, rid: bytes) -> None:
        self.send(sock, "cancel-verb", C.CANCEL, {"target": rid.decode()})

    def small(self, max_tokens: int, prompt: str = "Tell me about the sea.") -> dict:
        return {
            "prompt": f"{next(self.ids)}: {prompt}",
            "max_tokens": max_tokens,
            "temperature": 0,
            "timeout_ms": DAY_MS,
        }

    def big(self) -> dict:
        size = self.rng.randint(256 * 1024, C.MAX_PROMPT_BYTES - 16)
        return {
            "prompt": f"{next(self.ids)}: {self.text[:size]}",
            "max_tokens": 4,
            "timeout_ms": DAY_MS,
        }

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Read replies and keep hang-ups and reports going for `seconds`, or until `until()`."""
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end and not (until and until()):
            self.hang_up(now)
            if now >= self.next_report:
                self.report(now)
            for sock, _ in self.poller.poll(10):
                while sock.poll(0, zmq.POLLIN):
                    self.on_reply(sock.recv_multipart())

    def on_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 4:
            self.replies["malformed"] += 1
            return
        _, kind, rid, body = frames
        key = f"error:{orjson.loads(body)['code']}" if kind == C.ERROR else kind.decode()
        self.replies[key] += 1
        if kind == C.DONE and rid == self.status_rid:
            self.queue_depth = orjson.loads(body)["queue"]["depth"]
        if kind in C.TERMINAL_KINDS:
            self.pending.pop(rid, None)

    def hang_up(self, now: float) -> None:
        """Send on a connected socket and close it at once, unread: the reply may find it gone."""
        while self.hung_up < (now - self.t0) * self.rate and now - self.hangups[0][0] > 0.02:
            _, sock = self.hangups.popleft()
            body = self.small(4) if self.hangup_verb == C.COMPLETE else {}
            rid = f"h-{next(self.ids)}".encode()
            sock.send_multipart([C.VERSION, self.hangup_verb, rid, orjson.dumps(body)])
            sock.close(linger=0)
            self.sent[f"hangup-{self.hangup_verb.decode()}"] += 1
            self.hangups.append((now, self.dealer()))
            self.hung_up += 1

    def report(self, now: float) -> None:
        self.next_report += REPORT_EVERY
        print(
            f"{now - self.t0:5.0f} s  supervisor RSS {self.rss() / MB:6.1f} MB  "
            f"in flight {len(self.pending)}",
            flush=True,
        )
        for name, counts in (("sent", self.sent), ("replies", self.replies)):
            print(f"{name:>12}: " + " ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    def queue_empty(self) -> bool:
        """Ask `status` for the queue depth (at most every 0.25 s); True once it is 0."""
        now = time.monotonic()
        asked = self.status_rid in self.pending
        if self.queue_depth != 0 and not asked and now >= self.next_status:
            self.status_rid = self.send(self.driver, "status", C.STATUS, {})
            self.next_status = now + 0.25
        return self.queue_depth == 0

    def cycle(self) -> None:
        started = time.monotonic()
        # Blockers take every slot, so what follows waits in the queue: a 1 MiB prompt that
        # reached the worker would cost it a second of tokenizing. Released further down.
        blockers = [
            self.send(self.driver, "blocker", C.COMPLETE, self.small(512, COUNTING))
            for _ in range(self.slots)
        ]
        # Same connection as the blockers, so the supervisor reads these after them.
        for _ in range(2):
            self.cancel(self.driver, self.send(self.driver, "cancel", C.COMPLETE, self.big()))
        # Their connection goes; the next QUEUED probe (<= ~1 s) finds it gone and cancels.
        vanishing = [self.dealer() for _ in range(2)]
        for sock in vanishing:
            self.pending.pop(self.send(sock, "disconnect", C.COMPLETE, self.big()))
        burst = [
            (s, self.send(s, "burst", C.COMPLETE, self.small(4)))
            for s in self.bursters
            for _ in range(self.per_client)
        ]
        self.hangup_verb = C.COMPLETE  # while the slots are held these wait, never run
        self.pump(0.3)
        self.hangup_verb = C.PING
        for sock in vanishing:
            sock.close(linger=2000)  # linger: let the rest of a 1 MiB request go out first
        for sock, rid in burst:
            if rid in self.pending:
                self.cancel(sock, rid)
        self.queue_depth, self.status_rid = -1, b""
        self.pump(5.0, until=self.queue_empty)
        for rid in blockers:
            if rid in self.pending:
                self.cancel(self.driver, rid)
        self.pump(5.0, until=lambda: not self.pending.keys() & set(blockers))
        longs = [self.send(self.driver, "long", C.COMPLETE, self.small(4)) for _ in range(4)]
        self.pump(10.0, until=lambda: not self.pending.keys() & set(longs))
        self.garbage()
        self.pump(max(0.0, started + CYCLE_S - time.monotonic()))

    def garbage(self) -> None:
        """Malformed messages: each still gets exactly one error reply, nothing is queued."""
        for frames in (
            [C.VERSION, C.PING, b"g3"],  # 3 frames
            [C.VERSION, C.PING, b"g5", b"{}", b"{}"],  # 5 frames
            [C.VERSION, C.COMPLETE, b"gjson", b'{"prompt": "x",'],  # bad JSON
            [C.VERSION, C.COMPLETE, b"gfield", b'{"prompt": "x", "colour": 1}'],
            [C.VERSION, b"dance", b"gverb", b"{}"],
            [b"LLMSUP9", C.PING, b"gversion", b"{}"],
            [C.VERSION, C.PING, b"", b"{}"],  # empty request id
            [C.VERSION, C.CANCEL, b"gcancel", b'{"target": "never-sent"}'],
        ):
            self.driver.send_multipart(frames)
            self.sent["garbage"] += 1

    def run(self, seconds: float) -> None:
        while time.monotonic() - self.t0 < seconds:
            self.cycle()
            # Compared at the same point of a cycle (queue empty, nothing running), so the
            # prompts that pass through in bursts do not count as growth.
            if self.rss_minute is None and time.monotonic() - self.t0 >= WARM_UP_S:
                self.rss_minute = self.rss()
        self.rss_end = self.rss()
        self.report(time.monotonic())

    def summary(self, minutes: float) -> int:
        elapsed = time.monotonic() - self.t0
        print(
            f"\nsoak: {elapsed / 60:.1f} min, {self.hung_up / elapsed * 60:.0f} hang-ups a "
            f"minute, {self.slots} slots, queue {self.queue_size}"
        )
        start, end = self.rss_start / MB, self.rss_end / MB
        minute = (self.rss_minute or self.rss_end) / MB
        print(
            f"supervisor RSS: start {start:.1f} MB, after the first minute {minute:.1f} MB, "
            f"end {end:.1f} MB"
        )
        if minutes * 60 <= WARM_UP_S or self.rss_minute is None:
            print("growth after the first minute: n/a (a verdict needs --minutes above 1)")
            return 0
        verdict = "PASS" if end - minute < TARGET_MB else "FAIL"
        print(
            f"growth after the first minute: {end - minute:+.1f} MB "
            f"(target: under {TARGET_MB:g} MB): {verdict}"
        )
        return 0 if verdict == "PASS" else 1


def cleanup(state_dir: str, procs: list[psutil.Process], segments: list[str]) -> None:
    """Stop the instance; kill whatever outlived that and sweep its shared memory."""
    stopped = llmsup(state_dir, "stop", "--timeout", "10")
    print(f"llmsup stop: {(stopped.stdout + stopped.stderr).strip()}", flush=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil checks the pid still names the same process
    psutil.wait_procs(procs, timeout=10)
    for name in segments:
        Path("/dev/shm", name).unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--hangups", type=float, default=50.0, help="hang-ups a second")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup below runs
    state_dir = tempfile.mkdtemp(prefix="llmsup-soak-", dir="/tmp")  # short: ipc path limit
    procs: list[psutil.Process] = []
    segments: list[str] = []
    soak: Soak | None = None
    try:
        # --queue-tokens: the default (65536) lets a 256 KiB prompt wait only in an empty
        # queue, so the large prompts and the bursts could never be queued together.
        start = llmsup(state_dir, "start", "--cache-mb", "64", "--queue-tokens", "100000000")
        if start.returncode != 0:
            raise RuntimeError(f"llmsup start failed: {start.stderr}")
        info = json.loads(Path(state_dir, "supervisor.json").read_text())
        supervisor = psutil.Process(info["pid"])
        procs = [supervisor, *supervisor.children(recursive=True)]
        segments = [name for name in (info.get("scoreboard"), info.get("cache")) if name]
        print(f"llmsup pid {info['pid']} in {state_dir}, {len(info['workers'])} worker(s)")
        soak = Soak(info["endpoint"], supervisor, args.hangups)
        soak.run(args.minutes * 60)
        return soak.summary(args.minutes)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if soak is not None:
            soak.ctx.destroy(linger=0)
        cleanup(state_dir, procs, segments)


if __name__ == "__main__":
    sys.exit(main())
