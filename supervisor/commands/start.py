"""`llmsup start`: check everything, then run the supervisor, detached by default."""

from __future__ import annotations

import ctypes
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import click
import orjson

from llmsup.protocol.arena_layout import MIN_MB, ArenaError, default_cache_mb
from llmsup.protocol.statedir import StateDirError, UnsafeStateDir
from llmsup.supervisor.commands.common import fail, state_of, state_option
from llmsup.supervisor.commands.exits import (
    EXIT_DISK,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_START_FAILED,
    EXIT_UNSAFE,
)
from llmsup.supervisor.core.config import Config
from llmsup.supervisor.core.server import Phase, Supervisor
from llmsup.supervisor.core.watchdog import Limits
from llmsup.supervisor.host import endpoints, logs
from llmsup.supervisor.host.netaddr import is_loopback, node_name_problem, split_host_port
from llmsup.supervisor.host.statedir import StateDir
from llmsup.worker import faults

M_MMAP_THRESHOLD = -3  # mallopt(3)


def check_bind(endpoint: str, allow_remote: bool, own: str | None = None) -> str:
    """--bind's endpoint, or click.BadParameter saying why not (endpoints.py). An ipc
    path other than the state dir's own (`own`, which the pidfile lock guards) must be
    free or a stale socket."""
    try:
        endpoints.check(endpoint, allow_remote)
        path = endpoints.ipc_path(endpoint)
        if path is not None and endpoint != own:
            found = endpoints.probe(path)
            if found not in (None, "stale"):
                raise endpoints.EndpointError(found)
    except endpoints.EndpointError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    return endpoint


def check_http(listen: str, allow_remote: bool, has_key: bool) -> str:
    """HOST:PORT for the HTTP gateway: loopback, or elsewhere with --allow-remote and a key."""
    address = split_host_port(listen)
    if address is None or address[1] == 0:
        raise click.BadParameter("must be HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--http")
    host = address[0]
    if not is_loopback(host) and not (allow_remote and has_key):
        raise click.BadParameter(
            f"{host} is not a loopback address: serving HTTP to other hosts needs "
            "--allow-remote and an API key (--api-key or --api-key-file)",
            param_hint="--http",
        )
    return listen


def write_api_key(state: StateDir, key: str) -> Path:
    """The key in a 0600 file of the state dir, so it is on no command line (`ps`)."""
    path = state.path / "api-key"
    state.write_file(path, key.encode())
    return path


@click.command()
@click.option(
    "--model",
    "model",
    multiple=True,
    metavar="MODEL",
    help="A model to serve: a catalog name (`llmsup models`), NAME=PATH or a GGUF path; "
    "repeat for several (the first is the default) [default: the catalog's default].",
)
@click.option(
    "--keep-alive",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds a model other than the default stays loaded unused; then its cores go "
    "back to the default model.",
)
@click.option(
    "--max-loaded",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Models loaded at once at most (each takes whole core groups).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Number of workers [default: physical cores / --cores-per-worker].",
)
@click.option(
    "--cores-per-worker",
    type=int,
    default=None,
    help="Physical cores per worker, = llama.cpp threads [default: 2].",
)
@click.option(
    "--ctx-size",
    type=click.IntRange(128, 131072),
    default=2048,
    show_default=True,
    help="Context of each slot (sequence), in tokens.",
)
@click.option(
    "--bind",
    "endpoint",
    default=None,
    help="Client endpoint [default: ipc://STATE_DIR/client.sock].",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow --bind to a non-loopback address or an abstract ipc://@NAME socket.",
)
@click.option(
    "--tcp-auth",
    type=click.Choice(["curve", "none"]),
    default="curve",
    show_default=True,
    help="How tcp peers authenticate: CURVE with the state dir's keys, or not at all.",
)
@click.option(
    "--http",
    default=None,
    metavar="HOST:PORT",
    help="Also serve the OpenAI HTTP API there, from a gateway process llmsup keeps alive.",
)
@click.option(
    "--api-key",
    default=None,
    help="Require `Authorization: Bearer KEY` on the HTTP API (kept in the state dir, 0600).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Like --api-key, the key read from this file.",
)
@click.option(
    "--node-name",
    default=None,
    help="This node's name in the X-Llmsup-Node header of every HTTP response "
    "[default: the host name].",
)
@click.option(
    "--drain-health-s",
    type=click.FloatRange(0, 600),
    default=2.0,
    show_default=True,
    help="On stop, seconds the HTTP gateway answers /health 503 while still serving, once a "
    "balancer has asked /health (two of its check intervals).",
)
@click.option(
    "--public-metrics",
    is_flag=True,
    help="Serve /metrics without the API key (for Prometheus or Kubernetes' endpoint picker).",
)
@click.option(
    "--queue-size",
    type=click.IntRange(0, 100000),
    default=32,
    show_default=True,
    help="Requests that may wait for a free worker slot; beyond it: overloaded.",
)
@click.option(
    "--queue-tokens",
    type=click.IntRange(1),
    default=65536,
    show_default=True,
    help="Estimated prompt tokens that may wait in the queue.",
)
@click.option(
    "--client-queue",
    type=click.IntRange(1),
    default=None,
    help="Waiting requests one client may hold [default: queue size / 2].",
)
@click.option(
    "--startup-timeout",
    type=click.FloatRange(1),
    default=120.0,
    show_default=True,
    help="Seconds every worker has to load the model and report ready.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds a stop waits for requests in flight before failing them.",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(1, 4096),
    default=256,
    show_default=True,
    help="Prompt tokens a worker reads per step while its other sequences wait.",
)
@click.option(
    "--cache-mb",
    type=click.IntRange(0),
    default=None,
    help="Shared-memory prompt-prefix cache, in MB; 0 turns it off "
    "[default: a sixteenth of RAM, at most 1024].",
)
@click.option(
    "--slots-per-worker",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="Sequences each worker decodes at once (README: Step plan, Layout).",
)
@click.option(
    "--mem-soft-mb",
    type=click.IntRange(1),
    default=Limits.mem_soft_mb,
    show_default=True,
    help="Anonymous memory of a worker that makes it recycle.",
)
@click.option(
    "--mem-hard-mb",
    type=click.IntRange(1),
    default=Limits.mem_hard_mb,
    show_default=True,
    help="Anonymous memory of a worker that gets it killed at once.",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(1),
    default=Limits.stall_timeout_s,
    show_default=True,
    help="Seconds of no token progress before a worker is hung.",
)
@click.option(
    "--spin-cpu",
    type=click.FloatRange(1),
    default=Limits.spin_cpu_percent,
    show_default=True,
    help="CPU%% of an idle worker that counts as spinning.",
)
@click.option(
    "--spin-seconds",
    type=click.FloatRange(1),
    default=Limits.spin_seconds,
    show_default=True,
    help="Seconds of idle spinning before a recycle.",
)
@click.option(
    "--max-requests",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Recycle a worker after this many requests, +0-10%% jitter (0: never).",
)
@click.option(
    "--crash-loop",
    type=(int, float),
    default=(Limits.crash_loop_failures, Limits.crash_loop_window_s),
    show_default=True,
    metavar="N SECONDS",
    help="N crashes within SECONDS mark a worker FATAL.",
)
@click.option("--foreground", is_flag=True, help="Stay in the foreground (systemd, containers).")
@click.option("--ready-fd", type=int, default=None, hidden=True)
@state_option
@click.pass_context
def start(ctx, **options):
    """Start llmsup; return when every worker is ready and print the endpoint."""
    from llmsup.supervisor.host import layout
    from llmsup.supervisor.models.errors import ModelError
    from llmsup.supervisor.models.spec import resolve_models

    o = options
    state = state_of(o["state_dir"])
    try:
        groups = layout.core_groups(o["workers"], o["cores_per_worker"])
        state.ensure()
        own = state.client_endpoint
        endpoint = check_bind(o["endpoint"] or own, o["allow_remote"], own)
    except (layout.LayoutError, StateDirError) as exc:
        fail(str(exc), EXIT_UNSAFE if isinstance(exc, UnsafeStateDir) else 1)
    except click.BadParameter as exc:
        fail(exc.format_message())
    if endpoint.startswith("tcp://") and o["tcp_auth"] == "none":
        click.echo(f"llmsup: warning: --tcp-auth none: tcp peers on {endpoint} are not "
                   "authenticated; any local user can use this server", err=True)  # fmt: skip
    has_key = bool(o["api_key"] or o["api_key_file"])
    try:
        http = check_http(o["http"], o["allow_remote"], has_key) if o["http"] else None
    except click.BadParameter as exc:
        fail(exc.format_message())
    if o["node_name"] is not None and (problem := node_name_problem(o["node_name"])):
        fail(f"--node-name {problem}")
    if has_key and not http:
        fail("--api-key and --api-key-file protect the HTTP API: give --http HOST:PORT too")
    if o["cache_mb"] is not None and 0 < o["cache_mb"] < MIN_MB:
        fail(f"--cache-mb {o['cache_mb']} is below the minimum of {MIN_MB} MB (0 turns it off)")
    pid = state.running_pid()
    if pid is not None:
        fail(
            f"llmsup is already running (pid {pid}, state dir {state.path}); "
            "stop it with `llmsup stop` or use another --state-dir"
        )
    try:
        served = {spec.name: str(spec.path) for spec in resolve_models(list(o["model"]))}
    except ModelError as exc:
        fail(str(exc))

    key_file = write_api_key(state, o["api_key"]) if o["api_key"] else o["api_key_file"]
    if not o["foreground"]:
        args = forward_options(ctx, endpoint=endpoint, state_dir=state.path,
                               api_key=None, api_key_file=key_file)  # fmt: skip
        info = daemonize(state, args, o["startup_timeout"])
        click.echo(f"llmsup started: pid {info['pid']}, endpoint {info['endpoint']}")
        if info.get("http"):
            click.echo(f"  OpenAI API: {info['http']}/v1")
        for w in info["workers"]:
            click.echo(f"  worker {w['id']}: pid {w['pid']}, cores {w['cores']}")
        return
    limits = Limits(
        mem_soft_mb=o["mem_soft_mb"],
        mem_hard_mb=o["mem_hard_mb"],
        stall_timeout_s=o["stall_timeout"],
        spin_cpu_percent=o["spin_cpu"],
        spin_seconds=o["spin_seconds"],
        max_requests=o["max_requests"],
        crash_loop_failures=o["crash_loop"][0],
        crash_loop_window_s=o["crash_loop"][1],
    )
    gateway = gateway_args(endpoint, http, key_file, o, state)
    config = Config(
        models=served,
        keep_alive_s=o["keep_alive"],
        max_loaded=o["max_loaded"],
        groups=groups,
        ctx_size=o["ctx_size"],
        endpoint=endpoint,
        tcp_auth=o["tcp_auth"],
        queue_size=o["queue_size"],
        queue_tokens=o["queue_tokens"],
        client_queue=o["client_queue"],
        startup_timeout=o["startup_timeout"],
        drain_timeout=o["drain_timeout"],
        slots_per_worker=o["slots_per_worker"],
        prefill_chunk=o["prefill_chunk"],
        limits=limits,
        cache_mb=default_cache_mb() if o["cache_mb"] is None else o["cache_mb"],
        gateway_args=gateway,
    )
    sys.exit(run_supervisor(state, o["ready_fd"], config))


def forward_options(ctx: click.Context, **overrides) -> list[str]:
    """This command's options as argv for the detached `start --foreground`."""
    args = []
    for param in ctx.command.params:
        if param.name in ("foreground", "ready_fd"):
            continue
        value = overrides.get(param.name, ctx.params[param.name])
        flag = max(param.opts, key=len)
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def daemonize(state: StateDir, args: list[str], startup_timeout: float) -> dict:
    """Run `start --foreground` detached, and wait for it to report ready or failed."""
    log = state.open_log()
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmsup.supervisor",
                "start",
                "--foreground",
                "--ready-fd",
                str(write_fd),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(log)
    os.close(write_fd)
    data = b""
    deadline = time.monotonic() + startup_timeout + 15
    with os.fdopen(read_fd, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    if not data:
        if proc.poll() is None:
            proc.kill()
        fail(f"the supervisor did not report ready; see {state.log_file}:\n{log_tail(state)}")
    report = orjson.loads(data)
    if not report["ok"] and report.get("disk"):
        fail(report["error"], EXIT_DISK)  # one line: the path and the errno
    if not report["ok"]:
        fail(f"start failed: {report['error']}\n(log: {state.log_file})", 2)
    return report["info"]


def log_tail(state: StateDir, lines: int = 15) -> str:
    try:
        fd = state.open_file(state.log_file, os.O_RDONLY)
    except FileNotFoundError:
        return ""
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, os.fstat(fd).st_size - 65536))
        data = f.read()
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def run_supervisor(state: StateDir, ready_fd: int | None, config: Config) -> int:
    # fd 2 is supervisor.log when detached (daemonize), else whatever stderr was given.
    sink = logs.setup(state.log_file if ready_fd is not None else None)

    def on_ready(ok: bool, detail) -> None:
        disk = isinstance(detail, logs.DiskError)
        if ready_fd is None:
            click.echo(
                f"llmsup ready: endpoint {detail['endpoint']}"
                if ok
                else f"llmsup: {'' if disk else 'start failed: '}{detail}",
                err=not ok,
            )
            return
        report = {"ok": ok, "info": detail} if ok else {"ok": False, "error": str(detail)}
        if disk:
            report["disk"] = True
        os.write(ready_fd, orjson.dumps(report))
        os.close(ready_fd)

    try:
        lock_fd = state.lock()
    except StateDirError as exc:
        fail(str(exc), EXIT_UNSAFE if isinstance(exc, UnsafeStateDir) else 1)
    except OSError as exc:  # a full or read-only disk: say which file and why, in one line
        on_ready(False, logs.DiskError(logs.describe_os_error(exc)))
        return EXIT_DISK
    try:
        # Left by a supervisor that was killed: its recorded segments (if still ours), sockets.
        state.sweep_segments()
        state.remove_runtime_files(keep_pidfile=True)
        logs.reserve_stop_record(state)
    except OSError as exc:
        on_ready(False, logs.DiskError(logs.describe_os_error(exc)))
        logs.remove_runtime_files(state)
        os.close(lock_fd)
        return EXIT_DISK

    if faults.enabled():
        logging.warning("fault injection is ON (%s): for tests only", faults.ENV)
    return_large_blocks_at_once()
    try:
        supervisor = Supervisor(config, state, on_ready=on_ready, log_sink=sink)
    except (ArenaError, OSError) as exc:
        disk = isinstance(exc, OSError) and not isinstance(exc, ArenaError)
        on_ready(False, logs.DiskError(logs.describe_os_error(exc)) if disk else str(exc))
        logs.remove_runtime_files(state)
        os.close(lock_fd)
        return EXIT_DISK if disk else EXIT_START_FAILED
    ended = supervisor.run()
    code = {Phase.START_FAILED: EXIT_START_FAILED, Phase.FORCED: EXIT_FORCED}.get(ended, EXIT_OK)
    record = {"exit_status": code, "drained": code == 0,
              "failed_requests": supervisor.failed_on_stop}  # fmt: skip
    logs.write_stop_record(state, record)  # into the space reserved at start
    logs.remove_runtime_files(state)
    os.close(lock_fd)
    return code


def return_large_blocks_at_once() -> None:
    """Have glibc give a prompt's memory back to the system when its request ends.

    Above its mmap threshold (128 KiB) glibc serves a block with its own mapping, unmapped
    on free; but each such free raises the threshold (up to 32 MiB), so after the first
    large prompts they come from the heap, whose holes stay resident: the supervisor's
    RSS then wanders 15-20 MB with the mix of prompts in flight (perf/soak.py). A fixed
    threshold keeps every large prompt in a mapping of its own.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own rules


def gateway_args(endpoint: str, http: str | None, key_file: Path | None, o: dict,
                 state: StateDir) -> list[str]:  # fmt: skip
    """The HTTP gateway's command line (see llmsup.supervisor.gateway), from start's options."""
    if not http:
        return []
    args = ["--endpoint", endpoint, "--listen", http, "--drain-health-s", str(o["drain_health_s"])]
    if endpoint.startswith("tcp://") and o["tcp_auth"] == "curve":
        args += ["--curve-keys", str(state.path)]  # it reads the client keys there
    if key_file is not None:
        args += ["--api-key-file", str(key_file)]
    if o["allow_remote"]:
        args.append("--allow-remote")
    if o["node_name"]:
        args += ["--node-name", o["node_name"]]
    if o["public_metrics"]:
        args.append("--public-metrics")
    return args
