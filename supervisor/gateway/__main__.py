"""`python -m llmsup.supervisor.gateway`: the command line (see the package docstring),
the checks that refuse an unsafe configuration before anything listens, start-up and a
clean exit on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import stat
import sys

import orjson
import uvloop
from aiohttp import web

from llmsup.supervisor.gateway.app import Gateway, make_app
from llmsup.supervisor.gateway.upstream import Lanes
from llmsup.supervisor.host import logs
from llmsup.supervisor.host.netaddr import (
    cors_origin_problem,
    is_loopback,
    node_name_problem,
    split_host_port,
)
from llmsup.supervisor.settings import Process, Setting, for_process

log = logging.getLogger("llmsup.gateway")

SHUTDOWN_GRACE_S = 2.0  # for handlers to answer after their cancel; then connections close
MAX_KEY_BYTES = 4096
LOG_LEVELS = {s.name: s for s in for_process(Process.GATEWAY)}["log-level"].choices


class Refused(Exception):
    """A configuration the gateway will not run with: exit 2 with this message."""


def parse_listen(listen: str) -> tuple[str, int]:
    address = split_host_port(listen)
    if address is None:
        raise Refused(f"--listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:8080")
    return address


def read_api_key(path: str) -> bytes:
    """The key from a file only this user can read. O_NOFOLLOW: a symlink swapped in for
    the file (by whoever can write its directory) is refused, not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(f"--api-key-file {path} is a symlink; give the file itself") from None
        raise Refused(f"--api-key-file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"--api-key-file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise Refused(f"--api-key-file {path} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & 0o077:
            raise Refused(
                f"--api-key-file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"other users must not read it (chmod 600 {path})"
            )
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    key = data.strip()
    if not key or len(data) > MAX_KEY_BYTES or any(c <= 32 or c > 126 for c in key):
        raise Refused(
            f"--api-key-file {path} must hold one key: 1 to {MAX_KEY_BYTES} "
            "printable ASCII characters without spaces"
        )
    return key


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The gateway's arguments: its settings in the declaration (supervisor/settings.py)."""
    p = argparse.ArgumentParser(
        prog="python -m llmsup.supervisor.gateway",
        description="OpenAI-compatible HTTP gateway to llmsup.",
    )
    for s in for_process(Process.GATEWAY):
        add_argument(p, s)
    args = p.parse_args(argv)
    for s in for_process(Process.GATEWAY):
        if s.multiple:  # a tuple, as start holds a repeated setting
            setattr(args, s.dest, tuple(getattr(args, s.dest)))
    return args


def add_argument(parser: argparse.ArgumentParser, s: Setting) -> None:
    """One setting as an argparse argument, its limits checked as it is parsed."""
    help_text = argparse.SUPPRESS if s.hidden else s.help.replace("%", "%%")
    if s.is_flag:
        parser.add_argument(s.flag, dest=s.dest, action="store_true", help=help_text)
        return
    if s.multiple:
        parser.add_argument(
            s.flag, dest=s.dest, action="append", default=[], metavar=s.metavar, help=help_text
        )
        return
    if s.default is not None and s.show_default and not s.hidden:
        help_text += " (default: %(default)s)"

    def parse(text: str):
        try:
            value = s.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {s.kind.__name__}") from None
        if (s.min is not None and value < s.min) or (s.max is not None and value > s.max):
            raise argparse.ArgumentTypeError(f"{text} is not {s.range_text()}")
        return value

    parser.add_argument(
        s.flag,
        dest=s.dest,
        type=parse,
        choices=s.choices or None,
        default=s.default,
        required=s.required,
        metavar=s.metavar,
        help=help_text,
    )


def check(args: argparse.Namespace) -> tuple[str, int, bytes | None]:
    """(host, port, key), or Refused: nothing listens before the configuration is safe."""
    host, port = parse_listen(args.listen)
    if args.node_name is not None and (problem := node_name_problem(args.node_name)):
        raise Refused(f"--node-name {problem}")
    for origin in args.cors_origin:
        if (problem := cors_origin_problem(origin)) is not None:
            raise Refused(f"--cors-origin {origin!r}: {problem}")
    if not is_loopback(host):
        if not args.allow_remote:
            raise Refused(
                f"--listen {args.listen}: {host} is not a loopback address; serving "
                "other hosts needs --allow-remote (and --api-key-file)"
            )
        if not args.api_key_file:
            raise Refused(
                "--allow-remote needs --api-key-file: the gateway will not serve "
                "other hosts without an API key"
            )
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    return host, port, key


def read_live(path: str) -> dict | None:
    """The supervisor's --live-file (a JSON object it wrote in its state dir), or None
    with the reason logged. O_NOFOLLOW: a symlink put in its place is not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("reload: cannot read %s: %s", path, exc.strerror)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(65536)
    try:
        live = orjson.loads(data)
    except orjson.JSONDecodeError:
        live = None
    if not isinstance(live, dict):
        log.error("reload: %s is not a JSON object: nothing changed", path)
        return None
    return live


def apply_live(gw: Gateway, path: str, remote: bool) -> None:
    """SIGHUP (sent by the supervisor's reload): take the key and the log level it wrote.
    A key that cannot be read, or none on a listener beyond loopback, keeps the old one."""
    live = read_live(path)
    if live is None:
        return
    level = live.get("log_level")
    if level in LOG_LEVELS:
        logging.getLogger().setLevel(level.upper())
    key_file = live.get("api_key_file")
    try:
        if key_file is None and remote:
            raise Refused("no API key on a listener beyond loopback: the key is kept")
        gw.api_key = read_api_key(key_file) if key_file else None
    except Refused as exc:
        log.error("reload: %s", exc)
        return
    log.info("reloaded: API key %s, log level %s", "required" if gw.api_key else "off", level)


async def serve(args: argparse.Namespace, host: str, port: int, key: bytes | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # handled in the loop, not in the handler
    keys = None
    if args.curve_keys:
        from llmsup.supervisor.host import curve

        keys = curve.client_keys(args.curve_keys)
    upstream = Lanes(args.endpoint, args.lanes, keys)
    upstream.start()
    gw = Gateway(upstream, key, args.max_body_bytes, args.node_name, args.public_metrics)
    gw.cors_origins = frozenset(args.cors_origin)
    if args.live_file:
        remote = not is_loopback(host)
        apply_live(gw, args.live_file, remote)  # a restarted gateway takes the last reload's
        loop.add_signal_handler(signal.SIGHUP, apply_live, gw, args.live_file, remote)
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # not a way to kill it
    # handler_cancellation: a client that goes away cancels its handler at once, also
    # while it waits for its first token, so its llmsup request is cancelled at once.
    runner = web.AppRunner(
        make_app(gw), handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc.strerror)
        await runner.cleanup()
        await upstream.close()
        return 1
    bound = runner.addresses[0]
    url = f"http://[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"http://{bound[0]}:{bound[1]}"
    log.info(
        "listening on %s (llmsup at %s; API key %s)",
        url,
        args.endpoint,
        "required" if key else "off",
    )
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    await stop.wait()
    gw.draining = True  # /health: 503 from now on; requests are still taken
    drain = await gw.drain_wait(args.drain_health_s)
    if drain > 0:
        log.info("stopping: /health answers 503 for %.1f s before requests are refused", drain)
        stop.clear()
        try:  # a second SIGTERM or SIGINT cuts it short
            await asyncio.wait_for(stop.wait(), drain)
        except TimeoutError:
            pass
    gw.stopping = True
    cancelled = upstream.cancel_all()
    log.info("stopping: cancelled %d request(s) in flight", cancelled)
    await runner.cleanup()  # stop listening, let handlers answer, close connections
    await upstream.close()
    log.info("stopped")
    return 0


LOOP_ENV = "LLMSUP_GATEWAY_LOOP"  # "asyncio": the standard loop, for comparing the two


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # fd 2 is the supervisor's log (or the stderr a test gave): the supervisor's format and
    # one write a line, so its lines and the gateway's never mix. No rate limit, as before.
    logs.setup(
        None,
        args.log_format,
        args.log_level,
        tag="llmsup-gateway",
        defaults={"pid": os.getpid()},
        rate_limit=False,
    )
    try:
        host, port, key = check(args)
    except Refused as exc:
        log.error("refused: %s", exc)
        return 2
    # uvloop: each token wakes this process once, and its loop does that for less CPU than
    # asyncio's own (perf/gateway.py runs both, the second with LLMSUP_GATEWAY_LOOP=asyncio).
    factory = (
        asyncio.new_event_loop if os.environ.get(LOOP_ENV) == "asyncio" else uvloop.new_event_loop
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(args, host, port, key))


if __name__ == "__main__":
    sys.exit(main())
