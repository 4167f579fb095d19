"""The gateway's own ZMTP link (supervisor/gateway/zmtp.py) against libzmq itself: a real
ROUTER socket on ipc and tcp, and raw sockets that speak something else."""

from __future__ import annotations

import asyncio
import socket

import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway import zmtp

pytestmark = pytest.mark.timeout(60)


class Seen:
    """What the link reported: messages, and each change of its connection."""

    def __init__(self):
        self.messages: list[list[bytes]] = []
        self.states: list[bool] = []

    def start(self, link: zmtp.ZmtpLink) -> None:
        link.start(self.messages.append, self.states.append)


async def until(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def receive(sock: zmq.Socket, timeout: float = 10.0) -> list[bytes]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            assert asyncio.get_running_loop().time() < deadline, "nothing received"
            await asyncio.sleep(0.01)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request, tmp_path):
    if request.param == "ipc":
        return f"ipc://{tmp_path}/router.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_messages_cross_a_libzmq_router_both_ways_short_and_long_frames(ctx, endpoint):
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)

    async def run():
        link, seen = zmtp.ZmtpLink(endpoint), Seen()
        seen.start(link)
        await until(lambda: seen.states == [True])
        sent = [C.VERSION, b"x" * 300, b""]  # a short, a long (8-byte size) and an empty frame
        assert link.send(sent)
        identity, *got = await receive(router)
        assert got == sent
        reply = [b"r1", b"y" * 70_000]
        router.send_multipart([identity, *reply])
        router.send_multipart([identity, b"r2"])
        await until(lambda: len(seen.messages) == 2)
        assert seen.messages == [reply, [b"r2"]]
        await link.close()

    asyncio.run(run())


def test_a_send_is_refused_until_connected_and_the_link_reconnects(ctx, endpoint):
    async def run():
        link, seen = zmtp.ZmtpLink(endpoint), Seen()
        seen.start(link)
        await asyncio.sleep(0.3)  # nothing listens: it keeps retrying
        assert not link.send([b"early"]) and seen.states == []
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)
        await until(lambda: seen.states == [True])
        assert link.send([b"one"])
        assert (await receive(router))[1:] == [b"one"]
        router.close(0)  # the supervisor goes away...
        await until(lambda: seen.states == [True, False])
        assert not link.send([b"lost"])
        router = ctx.socket(zmq.ROUTER)  # ...and comes back
        router.bind(endpoint)
        await until(lambda: seen.states == [True, False, True])
        assert link.send([b"two"])
        assert (await receive(router))[1:] == [b"two"]
        await link.close()
        router.close(0)

    asyncio.run(run())


def test_a_peer_that_is_not_a_router_is_never_connected(ctx, endpoint):
    dealer = ctx.socket(zmq.DEALER)  # libzmq would pair DEALER with DEALER; llmsup's is a ROUTER
    dealer.bind(endpoint)

    async def run():
        link, seen = zmtp.ZmtpLink(endpoint), Seen()
        seen.start(link)
        await asyncio.sleep(0.5)
        assert seen.states == [] and not link.send([b"x"])
        await link.close()

    asyncio.run(run())


def raw_server(tmp_path, replies: list[bytes]):
    """A Unix socket server that answers each connection with `replies`, then stays."""
    path = str(tmp_path / "raw.sock")
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader, writer):
        accepted.append(writer)
        for chunk in replies:
            writer.write(chunk)
        await writer.drain()

    return path, serve, accepted


@pytest.mark.parametrize(
    "what,replies",
    [
        ("not ZMTP", [b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64)]),
        ("CURVE", [zmtp.GREETING.replace(b"NULL", b"CURVE")]),
        (
            "a frame over the limit",
            [
                zmtp.GREETING,
                zmtp.command(b"READY", zmtp.metadata(Socket_Type=b"ROUTER")),
                bytes([zmtp.LONG]) + (C.MAX_FRAME_BYTES + 1).to_bytes(8, "big"),
            ],
        ),
        ("an ERROR command", [zmtp.GREETING, zmtp.command(b"ERROR", b"\x06denied")]),
    ],
)
def test_a_peer_speaking_otherwise_is_dropped_and_retried(tmp_path, what, replies):
    async def run():
        path, serve, accepted = raw_server(tmp_path, replies)
        server = await asyncio.start_unix_server(serve, path)
        link, seen = zmtp.ZmtpLink(f"ipc://{path}"), Seen()
        seen.start(link)
        await until(lambda: len(accepted) >= 2)  # dropped, then tried again
        assert seen.messages == [] and not link.send([b"x"])
        # Connected only where READY came before the fault, and dropped each time.
        assert seen.states == [True, False] * (len(seen.states) // 2)
        await link.close()
        server.close()
        for w in accepted:
            w.close()

    asyncio.run(run())


def test_a_ping_is_answered_with_its_context(tmp_path):
    async def run():
        got = asyncio.Queue()

        async def serve(reader, writer):
            ready = zmtp.command(b"READY", zmtp.metadata(Socket_Type=b"ROUTER"))
            writer.write(zmtp.GREETING + ready + zmtp.command(b"PING", b"\x00\x0actx"))
            data = b""
            while pong not in data and (chunk := await reader.read(4096)):
                data += chunk
            await got.put(data)
            writer.close()

        pong = zmtp.command(b"PONG", b"ctx")
        path = str(tmp_path / "ping.sock")
        server = await asyncio.start_unix_server(serve, path)
        link, seen = zmtp.ZmtpLink(f"ipc://{path}"), Seen()
        seen.start(link)
        data = await asyncio.wait_for(got.get(), 10)
        assert data.startswith(zmtp.GREETING[:10]) and pong in data
        await link.close()
        server.close()

    asyncio.run(run())


def test_endpoints_parse():
    assert zmtp.parse_endpoint("ipc:///run/x.sock") == ("unix", "/run/x.sock")
    assert zmtp.parse_endpoint("ipc://@llmsup") == ("unix", "\0llmsup")
    assert zmtp.parse_endpoint("tcp://127.0.0.1:5555") == ("tcp", "127.0.0.1", 5555)
    assert zmtp.parse_endpoint("tcp://[::1]:5555") == ("tcp", "::1", 5555)
    with pytest.raises(ValueError):
        zmtp.parse_endpoint("inproc://x")
