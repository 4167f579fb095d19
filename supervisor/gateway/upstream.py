"""The gateway's connections to llmsup. Over one connection (Upstream) many HTTP requests'
llmsup requests go as a DEALER, told apart by request id, and each reply frame is routed
to the queue of the request it belongs to. Lanes spreads HTTP clients over a few such
connections, so that llmsup's per-client bounds and turns apply.

One connection per lane rather than one per HTTP request: a connection per request would
cost a ZeroMQ handshake (and a supervisor-side routing id) per request, and SPEC.md 1 lets
one connection carry any number of concurrent requests. A request sent while llmsup is not
connected fails at once instead of waiting for a supervisor that may never come back; when
the connection drops, the requests that were in flight on it fail (their replies can no
longer arrive).

The connection itself is a link: zmtp.ZmtpLink, ZeroMQ's wire protocol read on the event
loop (one wake-up per token instead of two), or LibzmqLink for a CURVE endpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import zlib
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from llmsup.protocol import codec
from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.zmtp import ZmtpLink

log = logging.getLogger("llmsup.gateway")

# Gateway-side error codes, in the same shape as llmsup's error bodies (SPEC.md 5).
E_UNREACHABLE = "upstream_unavailable"  # llmsup is not connected: nothing was sent
E_LOST = "upstream_lost"  # the connection dropped while the request was in flight
# After a disconnect, replies already received by ZeroMQ are still read for this long
# before the requests still open are failed: a DONE that raced the disconnect is kept.
LOST_GRACE_S = 0.2
# Messages one wake-up of the reader takes before it lets the loop serve the HTTP side.
READ_BATCH = 256
LINK_ENV = "LLMSUP_GATEWAY_LINK"  # "libzmq": LibzmqLink for every endpoint (benchmarks)


class UpstreamError(Exception):
    """An llmsup `error` reply (or a gateway-side one of the same shape)."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(f"{body.get('code')}: {body.get('message')}")
        self.body = body
        self.code: str = body.get("code", C.E_INTERNAL)


class Call:
    """One llmsup request in flight: its reply frames arrive on `queue`, in order, as
    (kind, parsed body). `close()` when done with it, whether it ended or not."""

    __slots__ = ("upstream", "request_id", "verb", "queue", "ended", "generation")

    def __init__(self, upstream: Upstream, request_id: bytes, verb: bytes, generation: int):
        self.upstream = upstream
        self.request_id = request_id
        self.verb = verb
        self.queue: asyncio.Queue[tuple[bytes, dict[str, Any]]] = asyncio.Queue()
        self.ended = False  # its terminal frame was taken from the queue
        self.generation = generation  # the connection it was sent on

    async def next(self) -> tuple[bytes, dict[str, Any]]:
        kind, body = await self.queue.get()
        self.ended = kind in C.TERMINAL_KINDS
        return kind, body

    def next_nowait(self) -> tuple[bytes, dict[str, Any]] | None:
        """The next frame if one is already here: a step's frames are written together."""
        if self.ended or self.queue.empty():
            return None
        kind, body = self.queue.get_nowait()
        self.ended = kind in C.TERMINAL_KINDS
        return kind, body

    def close(self) -> None:
        """Forget the request; if it has not ended (the HTTP client went away, or the
        gateway stops), tell llmsup to stop it: `cancel` stops it within one token."""
        self.upstream.forget(self, cancel=not self.ended)


class LibzmqLink:
    """The link to a CURVE endpoint: a libzmq DEALER socket (ZmtpLink speaks NULL only).
    IMMEDIATE, so a send while llmsup is not connected is refused instead of waiting in a
    pipe for a supervisor that may never come back; a socket monitor follows the
    connection. Replies are read by a callback on the socket's fd that takes every message
    already there, not by zmq.asyncio's recv, which made a future and asked the socket for
    its events on every token."""

    def __init__(self, endpoint: str, curve_keys: dict[str, bytes] | None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_keys:
            self.sock.curve_serverkey = curve_keys["server_key"]
            self.sock.curve_publickey = curve_keys["public_key"]
            self.sock.curve_secretkey = curve_keys["secret_key"]
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self.sock.connect(endpoint)
        self.connected = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, on_message, on_state) -> None:
        self._on_message, self._on_state = on_message, on_state
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.FD, self._read)
        self._loop.add_reader(self.monitor.FD, self._watch)
        self._loop.call_soon(self._read)  # what arrived before the readers were added
        self._loop.call_soon(self._watch)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.FD)
            self._loop.remove_reader(self.monitor.FD)
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()

    def send(self, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(frames, flags=zmq.DONTWAIT)
        except zmq.Again:
            return False
        # A send may take the fd's readable edge for replies that are already queued: read
        # them soon, or they would wait for the next edge, which might never come.
        if self._loop is not None and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._read)
        return True

    def _read(self) -> None:
        """Every message already received. ZeroMQ's fd only says that something may have
        changed, so the socket is read until it has nothing (or READ_BATCH, then again soon)."""
        for _ in range(READ_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames)
        self._loop.call_soon(self._read)

    def _watch(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self._on_state(True)
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self._on_state(False)


class Upstream:
    def __init__(self, endpoint: str, curve_keys: dict[str, bytes] | None = None):
        self.endpoint = endpoint
        # CURVE needs libzmq; everything else is read on the event loop itself (zmtp.py).
        # LINK_ENV=libzmq keeps libzmq for all, for perf/gateway.py to compare the two.
        libzmq = curve_keys or os.environ.get(LINK_ENV) == "libzmq"
        self.link = LibzmqLink(endpoint, curve_keys) if libzmq else ZmtpLink(endpoint)
        self.calls: dict[bytes, Call] = {}
        self.generation = 0  # bumped on every disconnect
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.link.start(self._route, self._connection)

    async def close(self) -> None:
        await self.link.close()

    # --- requests ----------------------------------------------------------------------------

    def open(self, verb: bytes, body: dict[str, Any]) -> Call:
        """Send a request; its replies go to the returned Call. Raises UpstreamError at once
        when llmsup is not connected (or its connection holds 1000 unsent messages)."""
        request_id = b"g%x" % next(self._ids)
        call = Call(self, request_id, verb, self.generation)
        self._send([C.VERSION, verb, request_id, codec.dumps(body)])
        self.calls[request_id] = call
        return call

    def _send(self, frames: list[bytes]) -> None:
        if not self.link.send(frames):  # sent now, or refused now
            raise UpstreamError(
                {
                    "code": E_UNREACHABLE,
                    "message": f"llmsup at {self.endpoint} is not connected",
                }
            )

    async def request(self, verb: bytes, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A request answered by its terminal frame alone (`status`, `ping`): its DONE body."""
        call = self.open(verb, body)
        try:
            async with asyncio.timeout(timeout):
                while not call.ended:
                    kind, reply = await call.next()
        except TimeoutError:
            raise UpstreamError(
                {
                    "code": E_UNREACHABLE,
                    "message": f"llmsup at {self.endpoint} did not answer {verb.decode()} "
                    f"in {timeout:g} s",
                }
            ) from None
        finally:
            call.close()
        if kind != C.DONE:
            raise UpstreamError(reply)
        return reply

    def forget(self, call: Call, cancel: bool) -> None:
        if self.calls.pop(call.request_id, None) is None or not cancel:
            return
        if call.verb not in (C.COMPLETE, C.CHAT) or call.generation != self.generation:
            return  # nothing to stop, or it died with its connection
        # The cancel's own reply and the target's terminal frame arrive for ids nobody
        # waits for any more; the reader drops them.
        body = {"target": call.request_id.decode()}
        try:
            self._send([C.VERSION, C.CANCEL, call.request_id + b".cancel", codec.dumps(body)])
        except UpstreamError:
            pass  # not connected: the supervisor cancels a vanished client's requests itself

    def cancel_all(self) -> int:
        """Cancel every generation request in flight (the gateway stops): each then gets
        its terminal frame (`cancelled`) from llmsup, and its HTTP handler answers."""
        sent = 0
        for call in list(self.calls.values()):
            if call.verb in (C.COMPLETE, C.CHAT):
                target = {"target": call.request_id.decode()}
                try:
                    self._send(
                        [C.VERSION, C.CANCEL, call.request_id + b".cancel", codec.dumps(target)]
                    )
                    sent += 1
                except UpstreamError:
                    self._fail(call, E_LOST, "the gateway is stopping")
        return sent

    # --- replies -----------------------------------------------------------------------------

    def _route(self, frames: list[bytes]) -> None:
        if len(frames) != 4 or frames[0] != C.VERSION:
            log.warning("dropped a malformed reply from llmsup: %r", frames[:2])
            return
        _, kind, request_id, raw = frames
        call = self.calls.get(request_id)
        if call is None:
            return  # a cancel's reply, or a request whose HTTP client went away
        try:
            body = codec.loads(raw)
        except ValueError:
            log.warning("dropped a reply with a body that is not JSON: %r", raw[:80])
            return
        if kind in C.TERMINAL_KINDS:
            del self.calls[request_id]
        call.queue.put_nowait((kind, body))

    def _fail(self, call: Call, code: str, message: str) -> None:
        self.calls.pop(call.request_id, None)
        call.queue.put_nowait((C.ERROR, {"code": code, "message": message}))

    def _connection(self, up: bool) -> None:
        """Follow the connection (each link reports changes only): log it, and fail the
        requests a dropped one carried."""
        if up:
            log.info("connected to llmsup at %s", self.endpoint)
            return
        lost = self.generation
        self.generation += 1
        log.warning("lost the connection to llmsup at %s", self.endpoint)
        self._loop.call_later(LOST_GRACE_S, self._fail_lost, lost)

    def _fail_lost(self, generation: int) -> None:
        for call in list(self.calls.values()):
            if call.generation == generation:
                self._fail(call, E_LOST, f"lost the connection to llmsup at {self.endpoint}")


class Lanes:
    """Several connections to llmsup, each request on one of them by a stable hash of its
    routing key (app.client_of: `prompt_cache_key`, else `user`, else the prompt's first
    bytes). llmsup bounds the requests each of its clients may queue (--client-queue) and
    serves its clients round-robin, so on one connection the gateway's users would share one
    bound and one turn; over lanes they get them much as ZeroMQ clients do (keys on the same
    lane still share)."""

    def __init__(self, endpoint: str, lanes: int, curve_keys: dict[str, bytes] | None = None):
        self.lanes = [Upstream(endpoint, curve_keys) for _ in range(max(1, lanes))]

    def start(self) -> None:
        for lane in self.lanes:
            lane.start()

    async def close(self) -> None:
        await asyncio.gather(*(lane.close() for lane in self.lanes))

    def open(self, verb: bytes, body: dict[str, Any], client: bytes = b"") -> Call:
        lane = self.lanes[zlib.crc32(client) % len(self.lanes)]
        return lane.open(verb, body)

    async def request(self, verb: bytes, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await self.lanes[0].request(verb, body, timeout)

    def cancel_all(self) -> int:
        return sum(lane.cancel_all() for lane in self.lanes)

    async def answer(self, verb: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """A worker verb whose only reply that counts is its terminal one (`tokenize`,
        `detokenize`, `embed`): its DONE body, or UpstreamError with llmsup's error body.
        No timeout of its own: llmsup's heartbeats keep it alive while it runs, and a lost
        connection fails it."""
        call = self.open(verb, body)
        try:
            while True:
                kind, reply = await call.next()
                if kind == C.DONE:
                    return reply
                if kind == C.ERROR:
                    raise UpstreamError(reply)
        finally:
            call.close()
