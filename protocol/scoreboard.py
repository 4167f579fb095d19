"""The scoreboard: per-worker status in one shared-memory segment per supervisor instance.

Fixed-size records with no pointers (Apache httpd's scoreboard is the model). The
supervisor creates and unlinks the segment; workers and `llmsup top` only attach.

Layout (little-endian, numpy structured dtypes below are the source of truth):

| part   | field           | type     | written by | meaning                                   |
|--------|-----------------|----------|------------|-------------------------------------------|
| header | magic           | 8 bytes  | supervisor | b"LLMSUPSB"                               |
| header | version         | u32      | supervisor | layout version (1)                        |
| header | n_rows          | u32      | supervisor | one row per worker slot                   |
| header | supervisor_pid  | u32      | supervisor |                                           |
| header | updated         | f64      | supervisor | time.time() of the last header write      |
| header | queue_depth     | u32      | supervisor | requests waiting for a worker             |
| header | queue_limit     | u32      | supervisor | --queue-size                              |
| header | accepted_rate   | f32      | supervisor | accepted requests/s over the last second  |
| header | rejected_rate   | f32      | supervisor | rejected requests/s over the last second  |
| header | latency_p50_ms  | f32      | supervisor | end-to-end latency of recent requests     |
| header | latency_p99_ms  | f32      | supervisor |                                           |
| header | gateway_pid     | i32      | supervisor | the HTTP gateway's pid (0: none running)  |
| header | gateway_state   | u8       | supervisor | GATEWAY_STATES index (0: no gateway)      |
| header | gateway_restarts| u32      | supervisor |                                           |
| row    | w_seq           | u32      | worker     | seqlock: odd while the worker writes      |
| row    | pid             | i32      | worker     |                                           |
| row    | state           | u8       | worker     | STATES index; supervisor writes dead/fatal|
| row    | request_id      | 64 bytes | worker     | current request id (NUL padded)           |
| row    | request_started | f64      | worker     | time.monotonic() when it started          |
| row    | tokens          | u32      | worker     | tokens generated for the current request  |
| row    | progress        | u64      | worker     | bumped on every decode step               |
| row    | progress_at     | f64      | worker     | time.monotonic() of the last bump         |
| row    | served          | u64      | worker     | requests finished by this process         |
| row    | s_seq           | u32      | supervisor | seqlock of the supervisor's fields        |
| row    | cores           | 32 bytes | supervisor | e.g. b"0,1"                               |
| row    | anon_bytes      | u64      | supervisor | anonymous RSS (weights are file-backed)   |
| row    | cpu_percent     | f32      | supervisor | over the last watchdog interval           |
| row    | restarts        | u32      | supervisor |                                           |
| row    | last_exit       | 96 bytes | supervisor | why the previous process in this row ended|
| row    | model           | 64 bytes | supervisor | the name of the model its worker serves   |

time.monotonic() is CLOCK_MONOTONIC, the same clock in every process on the machine.
A writer bumps its seq to odd, writes, bumps it to even; a reader copies the row and
retries if a seq was odd or changed (a torn read otherwise looks like real data).
"""

from __future__ import annotations

import os
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

MAGIC = b"LLMSUPSB"
LAYOUT_VERSION = 3

STATES = ("starting", "idle", "prefill", "decode", "draining", "dead", "fatal")
STARTING, IDLE, PREFILL, DECODE, DRAINING, DEAD, FATAL = range(len(STATES))
GATEWAY_STATES = ("none", "starting", "serving", "dead", "fatal", "stopped")

HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("n_rows", "<u4"),
        ("supervisor_pid", "<u4"),
        ("updated", "<f8"),
        ("queue_depth", "<u4"),
        ("queue_limit", "<u4"),
        ("accepted_rate", "<f4"),
        ("rejected_rate", "<f4"),
        ("latency_p50_ms", "<f4"),
        ("latency_p99_ms", "<f4"),
        ("gateway_pid", "<i4"),
        ("gateway_state", "u1"),
        ("gateway_restarts", "<u4"),
    ],
    align=True,
)
ROW = np.dtype(
    [
        ("w_seq", "<u4"),
        ("pid", "<i4"),
        ("state", "u1"),
        ("request_id", "S64"),
        ("request_started", "<f8"),
        ("tokens", "<u4"),
        ("progress", "<u8"),
        ("progress_at", "<f8"),
        ("served", "<u8"),
        ("s_seq", "<u4"),
        ("cores", "S32"),
        ("anon_bytes", "<u8"),
        ("cpu_percent", "<f4"),
        ("restarts", "<u4"),
        ("last_exit", "S96"),
        ("model", "S64"),
    ],
    align=True,
)
HEADER_BYTES = 128
assert HEADER.itemsize <= HEADER_BYTES


class Scoreboard:
    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self.shm = shm
        self.owner = owner
        self.header = np.ndarray((), HEADER, buffer=shm.buf, offset=0)
        n = int(self.header["n_rows"])
        self.rows = np.ndarray((n,), ROW, buffer=shm.buf, offset=HEADER_BYTES)

    # --- life cycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, n_rows: int) -> Scoreboard:
        """Create the segment (the supervisor only), exclusively: an existing one of that
        name is an error (FileExistsError), never reused or removed."""
        size = HEADER_BYTES + ROW.itemsize * n_rows
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        shm.buf[:size] = bytes(size)
        header = np.ndarray((), HEADER, buffer=shm.buf, offset=0)
        header["magic"] = MAGIC
        header["version"] = LAYOUT_VERSION
        header["n_rows"] = n_rows
        header["supervisor_pid"] = os.getpid()
        del header
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Scoreboard:
        """Attach without ownership: Python 3.11 registers every attach with the resource
        tracker, which would unlink the segment when this process exits (cpython gh-82300)."""
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")
        board = cls(shm, owner=False)
        if bytes(board.header["magic"]) != MAGIC or int(board.header["version"]) != LAYOUT_VERSION:
            board.close()
            raise ValueError(
                f"shared memory segment {name} is not an llmsup scoreboard v{LAYOUT_VERSION}"
            )
        return board

    def close(self) -> None:
        del self.header, self.rows  # release the buffer exports before closing
        self.shm.close()
        if self.owner:
            self.shm.unlink()

    # --- writers ------------------------------------------------------------------------------

    def write_worker(self, row: int, **fields) -> None:
        """A worker updates its own row (worker-owned fields only)."""
        self._write(row, "w_seq", fields)

    def beat(self, row: int, **fields) -> None:
        """A worker made progress: bump the counter and its timestamp, with other fields."""
        self._write(row, "w_seq", fields, beat=True)

    def write_supervisor(self, row: int, **fields) -> None:
        self._write(row, "s_seq", fields)

    def _write(self, row: int, seq: str, fields: dict, beat: bool = False) -> None:
        r = self.rows[row]
        r[seq] += 1  # odd: readers retry
        for key, value in fields.items():
            r[key] = value
        if beat:
            r["progress"] += 1
            r["progress_at"] = time.monotonic()
        r[seq] += 1

    def write_header(self, **fields) -> None:
        for key, value in fields.items():
            self.header[key] = value
        self.header["updated"] = time.time()

    # --- readers ------------------------------------------------------------------------------

    def read_row(self, row: int) -> dict:
        for _ in range(100):
            copy = self.rows[row].copy()
            again = self.rows[row]
            seqs = (int(copy["w_seq"]), int(copy["s_seq"]))
            if (
                seqs[0] % 2 == 0
                and seqs[1] % 2 == 0
                and seqs == (int(again["w_seq"]), int(again["s_seq"]))
            ):
                return _row_dict(copy)
        return _row_dict(self.rows[row].copy())  # a writer died mid-write: best effort

    def read(self) -> dict:
        header = self.header.copy()
        return {
            "supervisor_pid": int(header["supervisor_pid"]),
            "updated": float(header["updated"]),
            "queue_depth": int(header["queue_depth"]),
            "queue_limit": int(header["queue_limit"]),
            "accepted_per_s": float(header["accepted_rate"]),
            "rejected_per_s": float(header["rejected_rate"]),
            "latency_p50_ms": float(header["latency_p50_ms"]),
            "latency_p99_ms": float(header["latency_p99_ms"]),
            "gateway": {
                "pid": int(header["gateway_pid"]) or None,
                "state": GATEWAY_STATES[min(int(header["gateway_state"]), len(GATEWAY_STATES) - 1)],
                "restarts": int(header["gateway_restarts"]),
            },
            "workers": [self.read_row(i) for i in range(len(self.rows))],
        }


def _row_dict(r) -> dict:
    return {
        "pid": int(r["pid"]),
        # What the worker does now; its life cycle ("state") is the supervisor's: status.
        "activity": STATES[int(r["state"])] if int(r["state"]) < len(STATES) else "unknown",
        "request_id": bytes(r["request_id"]).decode(errors="replace"),
        "request_started": float(r["request_started"]),
        "tokens": int(r["tokens"]),
        "progress": int(r["progress"]),
        "progress_at": float(r["progress_at"]),
        "served": int(r["served"]),
        "cores": bytes(r["cores"]).decode(),
        "anon_bytes": int(r["anon_bytes"]),
        "cpu_percent": float(r["cpu_percent"]),
        "restarts": int(r["restarts"]),
        "last_exit": bytes(r["last_exit"]).decode(errors="replace"),
        "model": bytes(r["model"]).decode(errors="replace"),
    }
