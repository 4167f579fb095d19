"""What one connected peer can make the supervisor hold in memory (SPEC.md "Security").

    .venv/bin/python perf/peer_memory.py

Starts llmsup (1 worker), then, each on a fresh connection, measures the supervisor's
RSS growth while and after:
  multipart   one message of 103 frames of 2 MiB (each frame under MAX_FRAME_BYTES):
              answered bad_request; libzmq holds the whole message before we see it
  unfinished  100 frames of 2 MiB with MORE set and no last frame: held by libzmq
              until the peer disconnects (nothing in the application sees them)
  flood       2,000 well-formed 2 MiB requests sent as fast as possible (refused: the
              prompt is over the limit): what queues in libzmq while the loop reads
The figures are the peak and the remainder after the peer is gone, in MiB.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import orjson
import psutil
import zmq

from llmsup.protocol import constants as C

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)
from testkit import PeakRss  # noqa: E402

FRAME = b"x" * (2 * 1024 * 1024)


def llmsup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmsup.supervisor", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def measure(proc: psutil.Process, endpoint: str, name: str, attack) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    time.sleep(0.2)
    base = proc.memory_info().rss
    peak = PeakRss(proc)
    peak.start()
    if attack is unfinished:
        raw = attack(endpoint)
        held = "no reply expected"
    else:
        held = attack(sock)
    connected = proc.memory_info().rss
    if attack is unfinished:
        raw.close()
    sock.close(0)
    ctx.term()
    time.sleep(1.0)
    top = peak.stop()
    after = proc.memory_info().rss
    mib = 1 << 20
    print(
        f"{name:<11} peak +{(top - base) / mib:7.1f} MiB   while connected "
        f"+{(connected - base) / mib:7.1f} MiB   after it left +{(after - base) / mib:6.1f} MiB"
        f"   ({held})"
    )


def multipart(sock) -> str:
    sock.send_multipart([C.VERSION, C.PING, b"m", *([FRAME] * 99)])
    ok = sock.poll(60_000, zmq.POLLIN)
    reply = orjson.loads(sock.recv_multipart()[3]) if ok else {}
    return f"reply: {reply.get('code')}"


def zmtp_dealer(endpoint: str) -> socket.socket:
    """A raw ZMTP 3.0 peer (NULL mechanism) on an ipc endpoint: libzmq's own sockets only
    put a message on the wire once its last frame is sent, a raw peer need not."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(endpoint.removeprefix("ipc://"))
    raw.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    raw.recv(64)
    prop = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    ready = b"\x05READY" + prop
    raw.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return raw


def unfinished(endpoint: str) -> str:
    raw = zmtp_dealer(endpoint)
    for _ in range(100):  # MORE | LONG, an 8-byte size, the frame; never a last frame
        raw.sendall(b"\x03" + struct.pack(">Q", len(FRAME)) + FRAME)
    time.sleep(3.0)
    return raw


def flood(sock) -> str:
    body = orjson.dumps({"prompt": "y" * (2 * 1024 * 1024)})
    for i in range(2000):
        sock.send_multipart([C.VERSION, C.COMPLETE, b"f%d" % i, body])
    replies = 0
    while sock.poll(5_000, zmq.POLLIN):
        sock.recv_multipart()
        replies += 1
        if replies == 2000:
            break
    return f"{replies} replies"


def main() -> None:
    state = tempfile.mkdtemp(prefix="llmsup-pm", dir="/tmp")
    try:
        started = llmsup("start", "--state-dir", state, "--workers", "1", "--cache-mb", "0")
        if started.returncode != 0:
            sys.exit(started.stderr)
        info = orjson.loads(open(f"{state}/supervisor.json", "rb").read())
        proc = psutil.Process(info["pid"])
        print(
            f"supervisor RSS at start: {proc.memory_info().rss / (1 << 20):.1f} MiB; "
            f"MAX_FRAME_BYTES {C.MAX_FRAME_BYTES:,}"
        )
        for name, attack in (
            ("multipart", multipart),
            ("unfinished", unfinished),
            ("flood", flood),
        ):
            measure(proc, info["endpoint"], name, attack)
    finally:
        llmsup("stop", "--state-dir", state)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
