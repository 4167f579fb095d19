"""The gateway's link to llmsup without libzmq: ZMTP 3.1 (rfc.zeromq.org/spec/23), NULL
mechanism, spoken as a DEALER by an asyncio protocol on the gateway's own event loop.

Why not a libzmq socket: libzmq moves every message through its I/O thread, so each token
woke two gateway threads (the I/O thread, then the event loop through the socket's fd),
and each wake-up takes a core from llama.cpp's threads on a machine whose cores they fill.
Here the event loop reads the Unix or TCP socket itself: one wake-up per token. The bytes
on the wire are ZeroMQ's; the supervisor's ROUTER cannot tell the difference.

Only what a DEALER client of llmsup needs: the NULL mechanism (ipc://, and tcp:// without
CURVE; a CURVE endpoint keeps libzmq, upstream.LibzmqLink), READY metadata, PING answered
with PONG, and what libzmq's options gave the old socket: IMMEDIATE (a send before the
handshake is refused), a bound on unsent bytes (SNDHWM), reconnecting every RECONNECT_S.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable

from llmsup.protocol import constants as C

log = logging.getLogger("llmsup.gateway")

# --- ZMTP 3.1 vocabulary ---------------------------------------------------------------------

# signature (0xFF, 8 bytes of padding, 0x7F), version 3.1, mechanism NULL, as-server 0, filler
GREETING = b"\xff" + bytes(7) + b"\x01\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
GREETING_BYTES = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04  # frame flags


def command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes([len(name)]) + name + data
    return _frame_header(COMMAND, len(body)) + body


def _frame_header(flags: int, size: int) -> bytes:
    if size > 255:
        return struct.pack(">BQ", flags | LONG, size)
    return bytes((flags, size))


def metadata(**props: bytes) -> bytes:
    out = b""
    for name, value in props.items():
        key = name.replace("_", "-").encode()
        out += bytes([len(key)]) + key + struct.pack(">I", len(value)) + value
    return out


def parse_metadata(data: bytes) -> dict[bytes, bytes]:
    props, at = {}, 0
    while at < len(data):
        n = data[at]
        key = data[at + 1 : at + 1 + n]
        (size,) = struct.unpack_from(">I", data, at + 1 + n)
        start = at + 5 + n
        props[key.lower()] = data[start : start + size]
        at = start + size
    return props


READY = command(b"READY", metadata(Socket_Type=b"DEALER", Identity=b""))
RECONNECT_S = 0.1  # libzmq's default reconnect interval, which the gateway had before
HANDSHAKE_TIMEOUT_S = 30.0  # libzmq's default handshake interval
MAX_UNSENT_BYTES = 4 * C.MAX_FRAME_BYTES  # sends are refused past this (SNDHWM's job)


class ProtocolError(Exception):
    pass


def parse_endpoint(endpoint: str) -> tuple:
    """("unix", path) for ipc:// (an abstract name for ipc://@name), ("tcp", host, port)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        return ("unix", "\0" + path[1:] if path.startswith("@") else path)
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        return ("tcp", host.strip("[]"), int(port))
    raise ValueError(f"not an ipc:// or tcp:// endpoint: {endpoint}")


class ZmtpLink(asyncio.Protocol):
    """One DEALER connection to a ROUTER at `endpoint`, kept up until close(). Messages
    (lists of frames) go to `on_message`; `on_state(True/False)` says when it is usable."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.address = parse_endpoint(endpoint)
        self.connected = False  # the handshake is done: sends go out
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[list[bytes]], None] = lambda frames: None
        self._on_state: Callable[[bool], None] = lambda up: None
        self._buf = bytearray()
        self._greeted = False
        self._frames: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._warned: str | None = None  # the last failure logged: each is logged once

    def start(self, on_message, on_state) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_state = on_message, on_state
        self._loop.create_task(self._connect())

    async def close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def send(self, frames: list[bytes]) -> bool:
        """Write one message now; False (nothing written) when not connected, or when the
        peer has not read what was written before (MAX_UNSENT_BYTES)."""
        t = self.transport
        if not self.connected or t is None or t.get_write_buffer_size() > MAX_UNSENT_BYTES:
            return False
        out = []
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            out.append(_frame_header(MORE if i < last else 0, len(frame)))
            out.append(frame)
        t.write(b"".join(out))
        return True

    # --- connection ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._closing:
            return
        try:
            if self.address[0] == "unix":
                await self._loop.create_unix_connection(lambda: self, self.address[1])
            else:
                await self._loop.create_connection(lambda: self, *self.address[1:])
        except OSError:
            self._retry()

    def _retry(self) -> None:
        if not self._closing:
            self._cancel_timer()
            self._timer = self._loop.call_later(
                RECONNECT_S, lambda: self._loop.create_task(self._connect())
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._buf.clear()
        self._frames.clear()
        self._greeted = False
        transport.write(GREETING + READY)  # the peer reads its greeting, then our READY
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        log.warning("no ZMTP handshake from %s in %g s", self.endpoint, HANDSHAKE_TIMEOUT_S)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.transport = None
        self._cancel_timer()
        if self.connected:
            self.connected = False
            self._on_state(False)
        self._retry()

    # --- reading ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            at = self._greet(buf) if not self._greeted else 0
            at = self._read_frames(buf, at)
        except ProtocolError as exc:
            if str(exc) != self._warned:  # not again on every retry
                log.warning("closing the connection to %s: %s", self.endpoint, exc)
                self._warned = str(exc)
            self.transport.abort()
            return
        del buf[:at]

    def _greet(self, buf: bytearray) -> int:
        if len(buf) < GREETING_BYTES:
            return 0
        if buf[0] != 0xFF or not buf[9] & 1 or buf[10] < 3:
            raise ProtocolError("not a ZMTP 3 peer")
        mechanism = bytes(buf[12:32]).rstrip(b"\0")
        if mechanism != b"NULL":
            raise ProtocolError(f"peer wants mechanism {mechanism!r}")
        self._greeted = True
        return GREETING_BYTES

    def _read_frames(self, buf: bytearray, at: int) -> int:
        """Every whole frame from `at` on; where the first incomplete one begins."""
        end = len(buf)
        while self._greeted and end - at >= 2:
            flags = buf[at]
            if flags & LONG:
                if end - at < 9:
                    break
                (size,) = struct.unpack_from(">Q", buf, at + 1)
                start = at + 9
            else:
                size, start = buf[at + 1], at + 2
            if size > C.MAX_FRAME_BYTES:
                raise ProtocolError(f"a frame of {size} bytes")
            if end - start < size:
                break
            body = bytes(buf[start : start + size])
            at = start + size
            if flags & COMMAND:
                self._command(body)
            elif not self.connected:
                raise ProtocolError("a message before READY")
            else:
                self._frames.append(body)
                if not flags & MORE:
                    frames, self._frames = self._frames, []
                    self._on_message(frames)
                    if self.transport is None or self.transport.is_closing():
                        break
        return at

    def _command(self, body: bytes) -> None:
        name = body[1 : 1 + body[0]] if body else b""
        data = body[1 + len(name) :]
        if name == b"READY":
            socket_type = parse_metadata(data).get(b"socket-type")
            if socket_type != b"ROUTER":
                raise ProtocolError(f"peer is a {socket_type!r} socket, not a ROUTER")
            self._cancel_timer()
            self.connected, self._warned = True, None
            self._on_state(True)
        elif name == b"ERROR":
            raise ProtocolError(f"peer refused: {data[1 : 1 + data[0]]!r}" if data else "ERROR")
        elif name == b"PING" and len(data) >= 2:
            self.transport.write(command(b"PONG", data[2:18]))
        # Other commands (PONG, SUBSCRIBE...) mean nothing to a DEALER: ignored.
