"""The supervisor <-> worker codec: every message on the worker socket is built and read here.

The exchange is internal (SPEC.md appendix A). Decoding never raises anything but
`WireError`, whatever the frames hold, so a malformed message from a buggy or forged peer
is dropped by the caller without changing any state.

Supervisor -> worker ("orders"):
    [S_JOB, job id, verb, body]      run this request (body: the client's, validated again
                                     here with codec.parse_body into its typed value)
    [S_ABORT, job id, {code, message}]  stop that job now and answer it with W_ERROR
    [S_DRAIN]                         finish current jobs, then exit
Worker -> supervisor ("reports"):
    [W_READY, secret, info]          loaded; `info` says how many slots it has
    [W_FAILED, secret, {reason}]     the model did not load
    [W_TOKEN | W_DONE | W_ERROR, job id, body] x n   a decoding step's events, in order
The secret is the one the worker read from its stdin at spawn: the supervisor accepts a
worker's messages only after it (see supervisor/core/pool.py, "identity").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import messages as M

SECRET_BYTES = 32
# A job id is an 8-byte sequence number followed by the client's request id.
JOB_ID_MIN = 9
JOB_ID_MAX = 8 + C.MAX_REQUEST_ID_BYTES


class WireError(Exception):
    """A message that does not follow this codec; the caller drops it and counts it."""


# --- orders: supervisor -> worker --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobOrder:
    job_id: bytes
    work: M.Work


@dataclass(frozen=True, slots=True)
class AbortOrder:
    job_id: bytes
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class DrainOrder:
    pass


Order = JobOrder | AbortOrder | DrainOrder


def job_order(job_id: bytes, work: M.Work) -> list[bytes]:
    return [C.S_JOB, job_id, work.verb, orjson.dumps(work.to_body())]


def abort_order(job_id: bytes, code: str, message: str) -> list[bytes]:
    return [C.S_ABORT, job_id, orjson.dumps({"code": code, "message": message})]


def drain_order() -> list[bytes]:
    return [C.S_DRAIN]


def decode_order(frames: list[bytes]) -> Order:
    try:
        kind = frames[0]
        if kind == C.S_DRAIN and len(frames) == 1:
            return DrainOrder()
        if kind == C.S_JOB and len(frames) == 4:
            _check_job_id(frames[1])
            if frames[2] not in C.WORKER_VERBS:
                raise WireError(f"job verb {frames[2][:16]!r} is not a worker verb")
            return JobOrder(frames[1], codec.parse_body(frames[2], orjson.loads(frames[3])))
        if kind == C.S_ABORT and len(frames) == 3:
            _check_job_id(frames[1])
            why = _object(frames[2])
            return AbortOrder(frames[1], str(why["code"]), str(why["message"]))
    except WireError:
        raise
    except (codec.ProtocolError, orjson.JSONDecodeError, LookupError, TypeError) as exc:
        raise WireError(f"malformed order: {exc}") from None
    raise WireError(f"unknown order {frames[0][:16]!r} with {len(frames)} frames")


# --- reports: worker -> supervisor -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    secret: bytes
    pid: int
    slots: int
    n_ctx: int  # per slot
    step_ms: tuple[float, ...]  # ms per decode of 1..slots tokens, measured at load


@dataclass(frozen=True, slots=True)
class Failed:
    secret: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class JobEvent:
    kind: bytes  # W_TOKEN, W_DONE or W_ERROR
    job_id: bytes
    body: bytes  # a JSON object, checked here, forwarded to the client as it is


Report = Ready | Failed | list[JobEvent]


def ready_report(secret: bytes, *, pid: int, slots: int, n_ctx: int, step_ms) -> list[bytes]:
    info = {"pid": pid, "slots": slots, "n_ctx": n_ctx, "step_ms": [round(ms, 1) for ms in step_ms]}
    return [C.W_READY, secret, orjson.dumps(info)]


def failed_report(secret: bytes, reason: str) -> list[bytes]:
    return [C.W_FAILED, secret, orjson.dumps({"reason": reason})]


def event_report(events: list[tuple[bytes, bytes, dict[str, Any]]]) -> list[bytes]:
    """A decoding step's (kind, job id, body) events in one message: one wake-up of each
    process on the way per step, not per sequence."""
    return [frame for kind, job_id, body in events for frame in (kind, job_id, orjson.dumps(body))]


def decode_report(frames: list[bytes]) -> Report:
    try:
        kind = frames[0]
        if kind == C.W_READY and len(frames) == 3:
            info = _object(frames[2])
            slots, n_ctx, pid = info["slots"], info["n_ctx"], info["pid"]
            if not all(type(v) is int and v > 0 for v in (slots, n_ctx, pid)):
                raise WireError("READY's slots, n_ctx and pid must be positive integers")
            step_ms = tuple(float(ms) for ms in info.get("step_ms", ()))
            return Ready(_secret(frames[1]), pid, slots, n_ctx, step_ms)
        if kind == C.W_FAILED and len(frames) == 3:
            return Failed(_secret(frames[1]), str(_object(frames[2])["reason"]))
        if kind in C.W_JOB_KINDS and len(frames) % 3 == 0:
            events = []
            for i in range(0, len(frames), 3):
                event_kind, job_id, body = frames[i : i + 3]
                if event_kind not in C.W_JOB_KINDS:
                    raise WireError(f"event kind {event_kind[:16]!r} is not a job event")
                _check_job_id(job_id)
                _object(body)
                events.append(JobEvent(event_kind, job_id, body))
            return events
    except WireError:
        raise
    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError) as exc:
        raise WireError(f"malformed report: {exc}") from None
    raise WireError(f"unknown report {frames[0][:16]!r} with {len(frames)} frames")


# --- pieces --------------------------------------------------------------------------------


def _check_job_id(job_id: bytes) -> None:
    if not JOB_ID_MIN <= len(job_id) <= JOB_ID_MAX:
        raise WireError(f"job id has {len(job_id)} bytes; it must have {JOB_ID_MIN}-{JOB_ID_MAX}")


def _secret(frame: bytes) -> bytes:
    if len(frame) != SECRET_BYTES:
        raise WireError(f"secret has {len(frame)} bytes; it must have {SECRET_BYTES}")
    return frame


def _object(frame: bytes) -> dict[str, Any]:
    value = orjson.loads(frame)
    if not isinstance(value, dict):
        raise WireError("body is not a JSON object")
    return value
