"""A model worker: one process pinned to one core group, serving jobs from the supervisor.

Started by the supervisor as a fresh interpreter:
    python -m llmsup.worker --worker-id 0 --cores 0 --identity w0.1 ...
so `ps`, `top` and `py-spy` can tell workers apart by their command line.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

import zmq

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.protocol import scoreboard as sb
from llmsup.protocol.arena import Arena
from llmsup.protocol.scoreboard import Scoreboard
from llmsup.worker.engine import DEFAULT_PREFILL_CHUNK
from llmsup.worker.loop import WorkerLoop

PR_SET_PDEATHSIG = 1


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
    parser.add_argument("--identity", required=True)
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
    args = parser.parse_args(argv)

    die_with_parent(args.supervisor_pid)
    # Ctrl-C in a terminal reaches the whole process group; the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.sched_setaffinity(0, args.cores)
    board = None
    if args.scoreboard:
        board = Scoreboard.attach(args.scoreboard)
        board.write_worker(args.worker_id, pid=os.getpid(), state=sb.STARTING, served=0,
                           request_id=b"", tokens=0)  # fmt: skip

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.identity.encode())
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(args.endpoint)
    try:
        from llmsup.worker.engine import Engine

        arena = Arena.attach(args.cache) if args.cache else None
        engine = Engine(args.model, threads=len(args.cores), n_ctx=args.ctx_size,
                        slots=args.slots, prefill_chunk=args.prefill_chunk,
                        arena=arena, row=args.worker_id)  # fmt: skip
    except Exception as exc:  # any load failure is reported, not raised into the void
        sock.send_multipart([C.W_FAILED, codec.dumps({"reason": f"{type(exc).__name__}: {exc}"})])
        sock.close()
        ctx.term()
        return 3
    ready = {
        "pid": os.getpid(),
        "slots": args.slots,
        "n_ctx": engine.n_ctx,  # per slot
        "threads": len(args.cores),
        # ms per decode of 1..slots tokens, measured at load: why a step is split as it is
        "step_ms": [round(ms, 1) for ms in engine.step_ms[1:]],
        "cores": args.cores,
    }
    sock.send_multipart([C.W_READY, codec.dumps(ready)])
    WorkerLoop(sock, engine, slots=args.slots, board=board, row=args.worker_id).run()
    sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
