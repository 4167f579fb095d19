"""A model worker: one process pinned to one core group, serving jobs from the supervisor.

Started by the supervisor as a fresh interpreter:
    python -m llmsup.worker --worker-id 0 --cores 0 ...
so `ps`, `top` and `py-spy` can tell workers apart by their command line. What must stay
secret is not on it (every user can read a command line): the supervisor writes one line
of JSON to the worker's stdin and closes it,
    {"identity": "<the worker's ZeroMQ identity>", "secret": "<64 hex digits>"}
and the worker proves who it is with that secret in READY or FAILED (workerwire.py).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys

import orjson
import zmq

from llmsup.protocol import scoreboard as sb
from llmsup.protocol import workerwire as wire
from llmsup.protocol.arena import Arena
from llmsup.protocol.scoreboard import Scoreboard
from llmsup.worker import logformat
from llmsup.worker.engine import DEFAULT_PREFILL_CHUNK
from llmsup.worker.loop import WorkerLoop

PR_SET_PDEATHSIG = 1
# The spawn line on stdin is about 120 bytes; anything much longer is not one.
MAX_SPAWN_LINE = 4096
MAX_IDENTITY_BYTES = 255  # ZeroMQ's limit on a routing id

log = logging.getLogger("llmsup.worker")


class SpawnLineError(Exception):
    """stdin did not hold the identity and secret line the supervisor writes."""


def read_spawn_line(stream) -> tuple[bytes, bytes]:
    """The (identity, secret) the supervisor wrote on our stdin, as one JSON line."""
    if stream.isatty():
        raise SpawnLineError("stdin is a terminal")
    line = stream.readline(MAX_SPAWN_LINE + 1)
    if not line:
        raise SpawnLineError("stdin is empty")
    if len(line) > MAX_SPAWN_LINE:
        raise SpawnLineError(f"the line on stdin is longer than {MAX_SPAWN_LINE} bytes")
    try:
        spawn = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise SpawnLineError(f"the line on stdin is not JSON: {exc}") from None
    if not isinstance(spawn, dict):
        raise SpawnLineError("the line on stdin is not a JSON object")
    identity, secret = spawn.get("identity"), spawn.get("secret")
    if not isinstance(identity, str) or not 0 < len(identity.encode()) <= MAX_IDENTITY_BYTES:
        raise SpawnLineError(f"identity must be a string of 1-{MAX_IDENTITY_BYTES} bytes")
    if identity.startswith("\x00"):
        raise SpawnLineError("identity must not start with a zero byte (ZeroMQ reserves it)")
    try:
        secret_bytes = bytes.fromhex(secret) if isinstance(secret, str) else b""
    except ValueError:
        secret_bytes = b""
    if len(secret_bytes) != wire.SECRET_BYTES:
        raise SpawnLineError(f"secret must be {2 * wire.SECRET_BYTES} hex digits")
    return identity.encode(), secret_bytes


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL us when the supervisor dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The supervisor may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(1)


def parse_cores(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmsup.worker")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--cores", type=parse_cores, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ctx-size", type=int, required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--slots", type=int, default=1, help="sequences decoded at once")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        help="prompt tokens read per step while other sequences generate",
    )
    parser.add_argument("--scoreboard", default=None, help="shared memory segment to report in")
    parser.add_argument("--cache", default=None, help="shared memory segment of the prefix cache")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=tuple(logformat.LEVELS), default="info")
    args = parser.parse_args(argv)
    # fd 2 is the supervisor's log: lines in its format, each with this worker's id and pid.
    logformat.setup_fd(
        args.log_format,
        args.log_level,
        tag=f"llmsup-worker-{args.worker_id}",
        defaults={"worker": args.worker_id, "pid": os.getpid()},
    )
    try:
        identity, secret = read_spawn_line(sys.stdin.buffer)
    except SpawnLineError as exc:
        log.error(
            "%s; the supervisor starts workers with their identity and secret on stdin",
            exc,
        )
        return 2

    die_with_parent(args.supervisor_pid)
    # Ctrl-C in a terminal reaches the whole process group; the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.sched_setaffinity(0, args.cores)
    board = None
    if args.scoreboard:
        board = Scoreboard.attach(args.scoreboard)
        board.write_worker(
            args.worker_id, pid=os.getpid(), state=sb.STARTING, served=0, request_id=b"", tokens=0
        )

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(args.endpoint)
    try:
        from llmsup.worker.engine import Engine

        arena = Arena.attach(args.cache) if args.cache else None
        engine = Engine(
            args.model,
            threads=len(args.cores),
            n_ctx=args.ctx_size,
            slots=args.slots,
            prefill_chunk=args.prefill_chunk,
            arena=arena,
            row=args.worker_id,
        )
    except Exception as exc:  # any load failure is reported, not raised into the void
        sock.send_multipart(wire.failed_report(secret, f"{type(exc).__name__}: {exc}"))
        sock.close()
        ctx.term()
        return 3
    # step_ms: ms per decode of 1..slots tokens, measured at load: why a step is split as
    # it is (the supervisor knows the cores and threads: it chose them).
    ready = wire.ready_report(
        secret, pid=os.getpid(), slots=args.slots, n_ctx=engine.n_ctx, step_ms=engine.step_ms[1:]
    )
    sock.send_multipart(ready)
    WorkerLoop(sock, engine, slots=args.slots, board=board, row=args.worker_id).run()
    sock.close()
    ctx.term()  # after LINGER: the last answers are out
    # Straight out, from here: the scoreboard and prefix-cache segments are only attached
    # (the supervisor owns them), and freeing this frame's objects would close them while
    # numpy views of them still live, printing a BufferError for every worker that exits.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
