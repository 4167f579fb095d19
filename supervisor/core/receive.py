"""Reading one ZeroMQ message with a bound on what is kept of it."""

from __future__ import annotations

import zmq

# Frames up to this size are copied into bytes (cheap); larger ones stay zero-copy buffers.
COPY_BELOW = 65536


def receive(sock: zmq.Socket, max_frames: int) -> list | None:
    """One message, or None when there is none. Frames past `max_frames` are read and
    dropped as they come (libzmq holds a whole message before we see any of it, so
    reading cannot be refused, only kept from being copied); such a message comes back
    with max_frames + 1 frames after the peer's identity. Large frames stay zero-copy."""
    try:
        first = sock.recv(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [first.bytes]
    while sock.getsockopt(zmq.RCVMORE):
        frame = sock.recv(copy=False)
        if len(frames) <= max_frames + 1:
            frames.append(frame.buffer if len(frame) > COPY_BELOW else frame.bytes)
    return frames
