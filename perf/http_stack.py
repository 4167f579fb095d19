#!/usr/bin/env python3
"""Which HTTP stack the OpenAI gateway (supervisor/gateway/) runs on: the server CPU each
stack spends per streamed server-sent event and per small request, measured the same way.

    .venv/bin/python perf/http_stack.py                   # every stack installed here
    .venv/bin/python perf/http_stack.py --stacks aiohttp-uvloop --streams 4 --events 2000

Each stack serves two routes in a process of its own: GET /small (a short JSON body) and
POST /stream, which sends `events` SSE events built as the gateway builds them (a prebuilt
byte template around orjson-encoded text), yielding to the event loop between events as a
token arrival does. A client in this process (threads, http.client, keep-alive) runs
`--streams` concurrent streams, then `--requests` small requests on 4 connections; the
figures are the server process's CPU seconds (psutil: user + system) over the work done, so
the client's own cost does not count. A stack whose packages are missing is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import subprocess
import sys
import threading
import time

import orjson
import psutil

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)
from testkit import free_port  # noqa: E402

STACKS = ("aiohttp", "aiohttp-uvloop", "starlette-uvicorn")
PIECE = "lorem"
PREFIX = b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":'  # noqa: E501
SUFFIX = b',"finish_reason":null,"logprobs":null}]}\n\n'
SMALL = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})


def event() -> bytes:
    return PREFIX + orjson.dumps(PIECE) + SUFFIX


# --- servers ------------------------------------------------------------------------------------


def serve_aiohttp(port: int, use_uvloop: bool, pace: float) -> None:
    from aiohttp import web

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=SMALL, content_type="application/json")

    async def stream(request: web.Request) -> web.StreamResponse:
        n = orjson.loads(await request.read())["n"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n):
            await resp.write(event())
            await asyncio.sleep(pace)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_post("/stream", stream)
    if use_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_starlette(port: int, pace: float) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def small(request: Request) -> Response:
        return Response(SMALL, media_type="application/json")

    async def stream(request: Request) -> StreamingResponse:
        n = orjson.loads(await request.body())["n"]

        async def events():
            for _ in range(n):
                yield event()
                await asyncio.sleep(pace)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/small", small), Route("/stream", stream, methods=["POST"])])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def importable(stack: str) -> bool:
    modules = {
        "aiohttp": ["aiohttp"],
        "aiohttp-uvloop": ["aiohttp", "uvloop"],
        "starlette-uvicorn": ["starlette", "uvicorn", "uvloop", "httptools"],
    }[stack]
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        return False
    return True


# --- client -------------------------------------------------------------------------------------


def wait_up(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/small")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def in_threads(count: int, work) -> float:
    """Run work(i) in `count` threads; the wall time. A failure in a thread is re-raised."""
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return time.monotonic() - started


def measure(
    stack: str, streams: int, events: int, requests: int, pace_ms: float
) -> dict[str, float]:
    port = free_port()
    cmd = [__file__, "--serve", stack, "--port", str(port), "--pace-ms", str(pace_ms)]
    proc = subprocess.Popen([sys.executable, *cmd])
    try:
        wait_up(port)
        server = psutil.Process(proc.pid)
        expected = events * len(event()) + len(b"data: [DONE]\n\n")

        def stream(_: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/stream", orjson.dumps({"n": events}))
            resp = conn.getresponse()
            got = 0
            while chunk := resp.read(65536):
                got += len(chunk)
            conn.close()
            assert got == expected, (got, expected)

        def small(_: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(requests // 4):
                conn.request("GET", "/small")
                assert conn.getresponse().read() == SMALL
            conn.close()

        before = sum(server.cpu_times()[:2])
        wall = in_threads(streams, stream)
        mid = sum(server.cpu_times()[:2])
        small_wall = in_threads(4, small)
        after = sum(server.cpu_times()[:2])
        return {
            "us_cpu_per_event": (mid - before) / (streams * events) * 1e6,
            "events_per_s": streams * events / wall,
            "us_cpu_per_request": (after - mid) / (requests // 4 * 4) * 1e6,
            "requests_per_s": requests // 4 * 4 / small_wall,
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stacks", default=",".join(STACKS))
    p.add_argument("--streams", type=int, default=4, help="concurrent SSE streams")
    p.add_argument("--events", type=int, default=5000, help="events per stream")
    p.add_argument("--requests", type=int, default=2000, help="small GETs, on 4 connections")
    p.add_argument("--repeat", type=int, default=2, help="keep each stack's best run")
    p.add_argument(
        "--pace-ms",
        type=float,
        default=0.0,
        help="sleep between a stream's events (0: just yield; 10: token pace)",
    )
    p.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve == "starlette-uvicorn":
        serve_starlette(args.port, args.pace_ms / 1000)
        return 0
    if args.serve:
        serve_aiohttp(args.port, args.serve == "aiohttp-uvloop", args.pace_ms / 1000)
        return 0
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.streams} streams "
        f"x {args.events} events {args.pace_ms:g} ms apart, {args.requests} small requests; "
        f"best of {args.repeat}\n"
    )
    print(
        "| stack | server CPU per SSE event | events/s | server CPU per small request "
        "| requests/s |\n|---|---|---|---|---|"
    )
    for stack in args.stacks.split(","):
        if not importable(stack):
            print(f"| {stack} | not installed | | | |")
            continue
        runs = [
            measure(stack, args.streams, args.events, args.requests, args.pace_ms)
            for _ in range(args.repeat)
        ]
        best = min(runs, key=lambda r: r["us_cpu_per_event"] + r["us_cpu_per_request"] / 10)
        print(
            f"| {stack} | {best['us_cpu_per_event']:.1f} µs | {best['events_per_s']:.0f} | "
            f"{best['us_cpu_per_request']:.0f} µs | {best['requests_per_s']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
