"""`llmsup start`: check everything, then run the supervisor (commands/serve.py), detached by
default (host/daemon.py). Its options are the settings declaration's (supervisor/settings.py)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from llmsup.protocol.arena_layout import MIN_MB, default_cache_mb
from llmsup.protocol.statedir import StateDirError, UnsafeStateDir
from llmsup.supervisor.commands.common import fail, state_of, state_option
from llmsup.supervisor.commands.exits import EXIT_DISK, EXIT_START_FAILED, EXIT_UNSAFE
from llmsup.supervisor.commands.options import effective, given_on_command_line, settings_options
from llmsup.supervisor.configfile import Origin
from llmsup.supervisor.core.config import Config
from llmsup.supervisor.core.reload import GATEWAY_LIVE_FILE
from llmsup.supervisor.core.watchdog import Limits
from llmsup.supervisor.host import endpoints, logs
from llmsup.supervisor.host.daemon import DaemonFailed, daemonize
from llmsup.supervisor.host.netaddr import (
    cors_origin_problem,
    is_loopback,
    node_name_problem,
    split_host_port,
)
from llmsup.supervisor.host.statedir import StateDir
from llmsup.supervisor.settings import Process, to_argv


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
@settings_options(Process.START)
@state_option
def start(**options):
    """Start llmsup; return when every worker is ready and print the endpoint."""
    from llmsup.supervisor.host import layout
    from llmsup.supervisor.models.errors import ModelError
    from llmsup.supervisor.models.spec import resolve_models

    path, values = effective(options)
    typed = {dest: options[dest] for dest in given_on_command_line()}
    o = {**options, **{dest: v.value for dest, v in values.items()}}
    if o["foreground"]:
        # The daemon: what its own checks below say goes to its log (fd 2, supervisor.log
        # when detached) in --log-format already; serve.py sets the log up again with its path.
        logs.setup(None, o["log_format"], o["log_level"])
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
        click.echo(
            f"llmsup: warning: --tcp-auth none: tcp peers on {endpoint} are not "
            "authenticated; any local user can use this server",
            err=True,
        )
    has_key = bool(o["api_key"] or o["api_key_file"])
    try:
        http = check_http(o["http"], o["allow_remote"], has_key) if o["http"] else None
    except click.BadParameter as exc:
        fail(exc.format_message())
    if o["node_name"] is not None and (problem := node_name_problem(o["node_name"])):
        fail(f"--node-name {problem}")
    for origin in o["cors_origin"]:
        if (problem := cors_origin_problem(origin)) is not None:
            fail(f"--cors-origin {origin!r}: {problem}")
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
        # The daemon gets the flags typed here, not the values found: it reads the same
        # file and variables itself, and a reload re-reads them under the same flags.
        flags = {d: v for d, v in typed.items() if d not in ("state_dir", "foreground")}
        if "api_key" in flags:  # kept off the daemon's command line (`ps`)
            flags.update(api_key=None, api_key_file=key_file)
        detach(state, {**flags, "config": path}, o["startup_timeout"])
        return
    from llmsup.supervisor.commands.serve import serve  # the event loop: the daemon only

    config = supervisor_config(o, served, groups, endpoint, http, key_file, state)
    config.origin = Origin(o["config"], typed, dict(os.environ))
    config.settings = {dest: v.value for dest, v in values.items()}
    serve(state, o["ready_fd"], config)


def detach(state: StateDir, flags: dict, startup_timeout: float) -> None:
    """Start the daemon (`start --foreground` with these flags) and say what it serves."""
    args = [*to_argv(Process.START, {**flags, "foreground": False, "ready_fd": None})]
    args += ["--state-dir", str(state.path)]
    try:
        info = daemonize(state, args, startup_timeout)
    except DaemonFailed as exc:
        code = EXIT_DISK if exc.disk else EXIT_START_FAILED if exc.reported else 1
        fail(str(exc), code)
    click.echo(f"llmsup started: pid {info['pid']}, endpoint {info['endpoint']}")
    if info.get("http"):
        click.echo(f"  OpenAI API: {info['http']}/v1")
    for w in info["workers"]:
        click.echo(f"  worker {w['id']}: pid {w['pid']}, cores {w['cores']}")


def supervisor_config(
    o: dict,
    served: dict[str, str],
    groups: list[list[int]],
    endpoint: str,
    http: str | None,
    key_file: Path | None,
    state: StateDir,
) -> Config:
    """What the supervisor runs with, from start's checked options."""
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
    return Config(
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
        gateway_args=gateway_args(endpoint, http, key_file, o, state),
        log_format=o["log_format"],
        log_level=o["log_level"],
    )


def gateway_args(
    endpoint: str, http: str | None, key_file: Path | None, o: dict, state: StateDir
) -> list[str]:
    """The HTTP gateway's command line (see llmsup.supervisor.gateway), from start's options:
    the settings it shares with start as given, and where to connect and listen."""
    if not http:
        return []
    curve = endpoint.startswith("tcp://") and o["tcp_auth"] == "curve"
    return to_argv(
        Process.GATEWAY,
        {
            **o,
            "endpoint": endpoint,
            "listen": http,
            "api_key_file": key_file,
            "curve_keys": str(state.path) if curve else None,  # it reads the client keys there
            "live_file": str(state.path / GATEWAY_LIVE_FILE),  # the reload's key, log level
            "ready_fd": None,  # the supervisor adds its own pipe
        },
    )
