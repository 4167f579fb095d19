"""`llmsup stop`: drain, then fail what is left, then kill; the exit status says which."""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path

import click
import orjson

from llmsup.protocol import arena, scoreboard
from llmsup.supervisor.cliutil import (
    EXIT_FORCED,
    EXIT_KILLED,
    EXIT_NOT_RUNNING,
    fail,
    state_of,
    state_option,
)


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return bool(ready)
    finally:
        os.close(fd)


@click.command()
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for requests in flight before failing them.",
)
@state_option
def stop(timeout, state_dir):
    """Drain and stop llmsup.

    Exit status: 0 drained cleanly; 3 requests still in flight at the timeout were failed;
    4 the supervisor had to be SIGKILLed; 1 llmsup was not running.
    """
    state = state_of(state_dir)
    pid = state.running_pid()
    if pid is None:
        stale = state.info_file.exists() or Path(state.path, "client.sock").exists()
        swept = sweep_segments(state)
        if stale or swept:
            state.remove_runtime_files()
            fail(f"llmsup is not running (state dir {state.path}); removed the sockets, pidfile "
                 "and shared memory left by a supervisor that died", EXIT_NOT_RUNNING)  # fmt: skip
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    state.stop_file.unlink(missing_ok=True)
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout + 2):
        # SIGQUIT: fail what is still in flight now, kill the workers, exit.
        os.kill(pid, signal.SIGQUIT)
        if not wait_exit(pid, 10):
            os.kill(pid, signal.SIGKILL)  # workers follow through PR_SET_PDEATHSIG
            wait_exit(pid, 5)
            state.remove_runtime_files()
            sweep_segments(state)
            click.echo(f"llmsup killed (pid {pid}): it did not stop in time", err=True)
            sys.exit(EXIT_KILLED)
    try:
        result = orjson.loads(state.stop_file.read_bytes())
        state.stop_file.unlink()
    except FileNotFoundError:
        result = {"drained": False, "failed_requests": None}
    if result["drained"]:
        click.echo(f"llmsup stopped (pid {pid}): all requests drained")
        return
    click.echo(
        f"llmsup stopped (pid {pid}): {result['failed_requests']} request(s) in flight "
        "were failed with shutting_down",
        err=True,
    )
    sys.exit(EXIT_FORCED)


def sweep_segments(state) -> bool:
    """Unlink the scoreboard and prefix cache a dead supervisor left; True if there were."""
    board = scoreboard.sweep(scoreboard.segment_name(str(state.path)))
    cache = scoreboard.sweep(arena.segment_name(str(state.path)))
    return board or cache
