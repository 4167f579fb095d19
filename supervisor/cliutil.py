"""What every `llmsup` command shares: the state-dir option, exit codes, errors, connecting."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llmsup.protocol.client import Client, NotRunning
from llmsup.supervisor import server
from llmsup.supervisor.statedir import StateDir, default_state_dir

EXIT_NOT_RUNNING = 1
EXIT_FORCED = server.EXIT_FORCED  # requests in flight at the drain timeout were failed
EXIT_KILLED = 4


def state_option(f):
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the instance keeps its sockets, pidfile and log "
        "[default: $LLMSUP_STATE_DIR, $XDG_RUNTIME_DIR/llmsup or /tmp/llmsup-UID].",
    )(f)


def state_of(state_dir: Path | None) -> StateDir:
    return StateDir((state_dir or default_state_dir()).absolute())


def fail(message: str, code: int = 1):
    click.echo(f"llmsup: {message}", err=True)
    sys.exit(code)


def connect(state_dir: Path | None, endpoint: str | None, timeout: float = 120.0) -> Client:
    try:
        return Client(endpoint, state_dir=state_of(state_dir).path, timeout=timeout)
    except NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)


endpoint_option = click.option(
    "--endpoint", default=None, help="Connect here instead of the state dir's supervisor."
)
