"""Commands that look at workers without asking the supervisor: top, profile, check."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import orjson

from llmsup.protocol import scoreboard
from llmsup.protocol.arena import Arena
from llmsup.protocol.arena_layout import ArenaError
from llmsup.supervisor.commands.common import fail, state_of, state_option
from llmsup.supervisor.commands.exits import EXIT_NOT_RUNNING
from llmsup.supervisor.core.watchdog import py_spy
from llmsup.supervisor.host.segments import segment_is_ours
from llmsup.supervisor.host.statedir import StateDir


@click.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None)
def check(model):
    """Prove the install: load the model and decode a few tokens in a child process."""
    from llmsup.supervisor.models.errors import ModelError
    from llmsup.supervisor.models.spec import resolve

    try:
        path = resolve(str(model) if model else None)
    except ModelError as exc:
        fail(str(exc))
    proc = subprocess.run(
        [sys.executable, "-m", "llmsup.worker.selfcheck", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        how = (
            f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        fail(
            f"llama.cpp decode failed ({how}); a build with the wrong CPU flags (e.g. AMX) "
            f"crashes here: rerun tools/setup.sh.\n{proc.stderr[-2000:]}"
        )
    click.echo(proc.stdout.strip())


def our_segment(state: StateDir, kind: str) -> str | None:
    """The name the supervisor recorded for its `kind` segment, if that segment exists and
    is the caller's (a name recorded in a checked state dir, a file the caller owns)."""
    name = state.segment(kind)
    return name if name is not None and segment_is_ours(name) else None


def attach_scoreboard(state_dir: Path | None) -> scoreboard.Scoreboard:
    state = state_of(state_dir)
    if state.running_pid() is None:
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    name = our_segment(state, "scoreboard")
    if name is None:
        fail(f"no scoreboard of yours is recorded in {state.segments_file}", EXIT_NOT_RUNNING)
    try:
        return scoreboard.Scoreboard.attach(name)
    except (FileNotFoundError, ValueError) as exc:
        fail(f"cannot read the scoreboard of {state.path}: {exc}", EXIT_NOT_RUNNING)


@click.command()
@click.option("--once", is_flag=True, help="Print one screen and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON snapshot and exit.")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True)
@state_option
def top(once, as_json, interval, state_dir):
    """Live view of the workers, read from shared memory."""
    from llmsup.supervisor.commands.topview import render, snapshot

    state = state_of(state_dir)
    board = attach_scoreboard(state_dir)
    cache_name = our_segment(state, "cache")
    try:
        cache = Arena.attach(cache_name) if cache_name else None  # None: --cache-mb 0
    except (FileNotFoundError, ArenaError):
        cache = None
    try:
        if as_json:
            data = snapshot(board, cache)
            click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
            return
        if once:
            click.echo(render(snapshot(board, cache)))
            return
        while state.running_pid() is not None:
            click.echo("\x1b[H\x1b[2J" + render(snapshot(board, cache)), nl=True)
            time.sleep(interval)
        click.echo("llmsup stopped")
    except KeyboardInterrupt:
        pass
    finally:
        board.close()
        if cache is not None:
            cache.close()


@click.command()
@click.argument("worker", type=int)
@click.option(
    "--record",
    "seconds",
    type=click.FloatRange(0.5),
    default=None,
    help="Sample for SECONDS and write a flame graph SVG instead of one dump.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SVG path for --record [default: llmsup-worker-N-PID.svg].",
)
@state_option
def profile(worker, seconds, output, state_dir):
    """py-spy dump (or --record a flame graph) of worker WORKER."""
    board = attach_scoreboard(state_dir)
    try:
        if not 0 <= worker < len(board.rows):
            fail(f"worker {worker} does not exist; workers are 0 to {len(board.rows) - 1}")
        row = board.read_row(worker)
    finally:
        board.close()
    pid = row["pid"]
    if pid <= 0 or row["activity"] in ("dead", "fatal"):
        fail(f"worker {worker} has no live process ({row['activity']})")
    if seconds is None:
        cmd = [py_spy(), "dump", "--pid", str(pid)]
    else:
        output = output or Path(f"llmsup-worker-{worker}-{pid}.svg")
        duration = str(max(1, round(seconds)))
        cmd = [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            duration,
            "--idle",
            "--output",
            str(output),
            "--format",
            "flamegraph",
            "--nonblocking",
        ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=(seconds or 0) + 60)
    except FileNotFoundError:
        fail("py-spy is not installed in this environment (pip install py-spy)")
    except subprocess.TimeoutExpired:
        fail(f"py-spy did not finish in time on worker {worker} (pid {pid})")
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if "ermission" in text or "ptrace" in text.lower():
            fail(
                f"py-spy may not trace pid {pid}: it needs ptrace permission. Run as root, or "
                "as the same user with kernel.yama.ptrace_scope=0, or with CAP_SYS_PTRACE.\n"
                f"{text.strip()}"
            )
        fail(f"py-spy failed on worker {worker} (pid {pid}):\n{text.strip()}")
    if seconds is None:
        click.echo(proc.stdout.rstrip())
    else:
        click.echo(f"flame graph of worker {worker} (pid {pid}) written to {output}")
