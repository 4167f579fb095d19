"""Running llmsup as a service: `llmsup reload` (re-read the settings: SIGHUP),
`llmsup restart-workers` (replace every worker, one core group at a time: SIGUSR2) and
`llmsup service-unit` (a systemd unit for `start --foreground`). docs/service.md."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import click

from llmsup.supervisor.commands.common import connect, fail, state_of, state_option
from llmsup.supervisor.commands.exits import EXIT_NOT_RUNNING, EXIT_UNSAFE
from llmsup.supervisor.commands.stop import NotTheSupervisor, open_supervisor, send
from llmsup.supervisor.configfile import SYSTEM_FILE
from llmsup.supervisor.settings import default

RUNTIME_DIR = "llmsup"  # RuntimeDirectory=: /run/llmsup, the service's state dir
# Beyond the start-up and drain times: the process's own start and exit.
MARGIN_S = 60


def signal_supervisor(state_dir: Path | None, sig: signal.Signals) -> None:
    """Send `sig` to this state dir's supervisor, proven to be it as `stop` proves it."""
    state = state_of(state_dir)
    pid = state.running_pid()
    if pid is None:
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    try:
        pidfd = open_supervisor(state, pid)
    except NotTheSupervisor as exc:
        fail(f"not signalling pid {pid}: {exc}", EXIT_UNSAFE)
    if pidfd is None:
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    try:
        send(pidfd, sig)
    finally:
        os.close(pidfd)


@click.command("reload")
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the supervisor to say what the reload did.",
)
@state_option
def reload_command(timeout, state_dir):
    """Re-read the config file and LLMSUP_* variables (SIGHUP): what can change while
    serving changes at once, failing no request; the rest is named as needing a restart.

    Exit status: 0 reloaded; 1 the file did not parse (nothing changed) or no answer in
    time; 5 the state dir or its pid is not safe to trust."""
    with connect(state_dir, None, timeout=timeout) as client:
        before = (client.status().get("reload") or {}).get("count", 0)
        signal_supervisor(state_dir, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = client.status().get("reload")
            if record and record["count"] > before:
                break
            time.sleep(0.1)
        else:
            fail(f"the supervisor did not report the reload within {timeout:g} s")
    if not record["ok"]:
        fail(f"reload failed, nothing changed: {record['error']}")
    changed = ", ".join(record["changed"]) or "nothing"
    click.echo(f"reloaded: changed {changed}")
    if record["restart_needed"]:
        names = ", ".join(record["restart_needed"])
        click.echo(f"  needs a restart to change: {names}")


@click.command("restart-workers")
@state_option
def restart_workers(state_dir):
    """Replace every worker, one core group at a time, failing no request (SIGUSR2): how a
    model file replaced on disk is picked up. `llmsup status` shows the progress."""
    signal_supervisor(state_dir, signal.SIGUSR2)
    click.echo("replacing the workers one core group at a time (llmsup status shows it)")


@click.command("service-unit")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=SYSTEM_FILE,
    show_default=True,
    help="The config file the service reads.",
)
@click.option(
    "--state-dir",
    "unit_state_dir",  # written into the unit, not a state dir this command opens
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/run") / RUNTIME_DIR,
    show_default=True,
    help="The service's state dir (a RuntimeDirectory= under /run by default).",
)
@click.option("--user", default=None, help="Run as this user [default: you].")
@click.option(
    "--watchdog-sec",
    type=click.IntRange(0, 3600),
    default=30,
    show_default=True,
    help="Restart llmsup if its event loop stops pinging for this long (0: off).",
)
@click.option(
    "--exec",
    "executable",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The llmsup executable [default: this one].",
)
def service_unit(config, unit_state_dir, user, watchdog_sec, executable):
    """Print a systemd unit for llmsup (Type=notify, watchdog, reload, hardening):
    llmsup service-unit > /etc/systemd/system/llmsup.service."""
    click.echo(
        unit_text(
            config,
            unit_state_dir,
            user or getpass.getuser(),
            watchdog_sec,
            executable or this_executable(),
        ),
        nl=False,
    )


def this_executable() -> Path:
    found = shutil.which("llmsup")
    if found:
        return Path(found).absolute()
    return Path(sys.argv[0]).absolute()


def cache_dir(user: str) -> Path:
    """Where that user's llmsup keeps its models (models/fetch.py: ~/.cache/llmsup)."""
    home = Path(os.path.expanduser(f"~{user}"))
    xdg = os.environ.get("XDG_CACHE_HOME") if user == getpass.getuser() else None
    return (Path(xdg) if xdg else home / ".cache") / "llmsup"


def unit_text(config: Path, state_dir: Path, user: str, watchdog_sec: int, exe: Path) -> str:
    state = str(state_dir)
    runtime = state.startswith("/run/") and state.count("/") == 2
    start_s = default("startup-timeout") + MARGIN_S
    stop_s = default("drain-timeout") + MARGIN_S
    lines = [
        "# Written by `llmsup service-unit`; docs/service.md says what each line is for.",
        "[Unit]",
        "Description=llmsup: local LLM inference from a supervised pool of llama.cpp workers",
        "After=network.target",
        "",
        "[Service]",
        # READY=1 once every worker serves; only the main process may notify.
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exe} start --foreground --config {config} --state-dir {state}",
        f"ExecReload={exe} reload --state-dir {state}",
        # SIGTERM to the supervisor alone: it drains, then stops its workers itself.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStartSec={start_s:g}",
        f"TimeoutStopSec={stop_s:g}",
        *([f"WatchdogSec={watchdog_sec}"] if watchdog_sec else []),
        "Restart=on-failure",
        "RestartSec=2",
        f"User={user}",
        *([f"RuntimeDirectory={RUNTIME_DIR}", "RuntimeDirectoryMode=0700"] if runtime else []),
        "Environment=PYTHONUNBUFFERED=1",
        # Hardening llmsup works under: the file system read-only but for the state dir and
        # the model cache; no privileges to gain; a private /tmp. /dev/shm (the shared
        # prefix cache and scoreboard) stays the host's.
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        f"ReadWritePaths=-{cache_dir(user)}",
        *([] if runtime else [f"ReadWritePaths={state}"]),
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
