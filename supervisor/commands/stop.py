"""`llmsup stop`: drain, then fail what is left, then kill; the exit status says which.

A pid is signalled only once it is proven to be the supervisor of this state directory:
a pidfd is opened on it (the signals go through it, so they reach that process or none),
then its start time and boot must be what the supervisor recorded about itself when it
took the pidfile lock, it must run as the caller, and its command line must be `llmsup
start --foreground` for this state directory; the pidfd still naming a live process after
those reads proves they were about it. Anything else is refused with the pid and why.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import sys
from pathlib import Path

import click

from llmsup.supervisor.commands.common import fail, state_of, state_option
from llmsup.supervisor.commands.exits import (
    EXIT_DISK,
    EXIT_FORCED,
    EXIT_KILLED,
    EXIT_NOT_RUNNING,
    EXIT_UNSAFE,
)
from llmsup.supervisor.host.identity import process_identity
from llmsup.supervisor.host.statedir import StateDir


class NotTheSupervisor(Exception):
    """The pid in the pidfile cannot be proven to be this state dir's supervisor."""


def wait_exit(pidfd: int, timeout: float) -> bool:
    """Wait for the process of a pidfd to exit; True if it did."""
    ready, _, _ = select.select([pidfd], [], [], max(0.0, timeout))
    return bool(ready)


def send(pidfd: int, sig: signal.Signals) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # it exited meanwhile: the wait sees it


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
    4 the supervisor had to be SIGKILLed; 1 llmsup was not running; 5 refused: the state
    dir or the pid in it is not safe to trust (the message says why); 6 a disk error (a
    file of the state dir could not be written: the message names it and the errno).
    """
    state = state_of(state_dir)
    pid = state.running_pid()
    pidfd = None
    if pid is not None:
        try:
            pidfd = open_supervisor(state, pid)
        except NotTheSupervisor as exc:
            fail(f"not signalling pid {pid}: {exc}", EXIT_UNSAFE)
    if pidfd is None:
        if clean_up_after_dead(state):
            fail(
                f"llmsup is not running (state dir {state.path}); removed the sockets, pidfile "
                "and shared memory left by a supervisor that died",
                EXIT_NOT_RUNNING,
            )
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    try:
        # last-stop.json is the supervisor's: reserved at start, overwritten when it exits.
        send(pidfd, signal.SIGTERM)
        if not wait_exit(pidfd, timeout + 2):
            # SIGQUIT: fail what is still in flight now, kill the workers, exit.
            send(pidfd, signal.SIGQUIT)
            if not wait_exit(pidfd, 10):
                send(pidfd, signal.SIGKILL)  # workers follow through PR_SET_PDEATHSIG
                wait_exit(pidfd, 5)
                clean_up_after_dead(state)
                click.echo(f"llmsup killed (pid {pid}): it did not stop in time", err=True)
                sys.exit(EXIT_KILLED)
    finally:
        os.close(pidfd)
    result = state.read_json(state.stop_file)
    try:
        state.stop_file.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only disk: the next start writes it anew
    if result is None or result.get("running"):
        fail(
            f"llmsup stopped (pid {pid}), but it could not record how the drain went in "
            f"{state.stop_file} (a disk error?); see {state.log_file}",
            EXIT_DISK,
        )
    if result.get("drained"):
        click.echo(f"llmsup stopped (pid {pid}): all requests drained")
        return
    click.echo(
        f"llmsup stopped (pid {pid}): {result.get('failed_requests')} request(s) in flight "
        "were failed with shutting_down",
        err=True,
    )
    sys.exit(EXIT_FORCED)


def clean_up_after_dead(state: StateDir) -> bool:
    """Remove what a dead supervisor left: its recorded segments that are still the
    caller's, sockets, info, pidfile. Done holding the pidfile lock, so that no supervisor
    starts meanwhile; nothing is done if one holds it. True if something was left."""
    lock = state.lock_if_stale()
    if lock is None and state.pidfile.exists():
        return False  # a supervisor holds the lock (again): not ours to clean
    try:
        stale = state.info_file.exists() or Path(state.path, "client.sock").exists()
        swept = state.sweep_segments()
        if stale or swept:
            state.remove_runtime_files()
        return stale or swept
    finally:
        if lock is not None:
            os.close(lock)


def open_supervisor(state: StateDir, pid: int) -> int | None:
    """A pidfd on `pid` once it is proven to be this state dir's supervisor; None if it
    has exited meanwhile. Raises NotTheSupervisor, saying why, for anything else."""
    record = state.read_process()
    if not record or record.get("pid") != pid:
        raise NotTheSupervisor(
            f"{state.process_file} does not record it as the supervisor (one started by an "
            f"older llmsup?); check it with `ps -o pid,lstart,args -p {pid}` and stop it "
            f"with `kill {pid}` if it is"
        )
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        try:
            identity = process_identity(pid)
            argv = read_proc(pid, "cmdline").split(b"\0")[:-1]
            uids = read_proc(pid, "status").split(b"\nUid:")[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError):
            os.close(pidfd)
            return None  # exited while we looked
        if identity != {key: record.get(key) for key in identity}:
            raise NotTheSupervisor(
                f"it started at tick {identity['start_time']}, but the supervisor recorded "
                f"tick {record.get('start_time')} in {state.process_file}: the supervisor is "
                "gone and its pid was reused"
            )
        if any(int(uid) != os.getuid() for uid in uids):
            raise NotTheSupervisor(f"it runs as uid {int(uids[0])}, not as you")
        try:
            environ = read_proc(pid, "environ")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (FileNotFoundError, ProcessLookupError):
            os.close(pidfd)
            return None
        args = [a.decode(errors="replace") for a in argv]
        why = not_the_supervisor_of(state, args, environ, cwd)
        if why:
            raise NotTheSupervisor(f"{why}: {shlex.join(args)[:300]}")
        signal.pidfd_send_signal(pidfd, 0)  # alive still, so all the above was about it
    except ProcessLookupError:
        os.close(pidfd)
        return None
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def read_proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def not_the_supervisor_of(state: StateDir, args: list[str], environ: bytes, cwd: str) -> str:
    """Why this command line is not `llmsup start --foreground` for this state dir ("" if
    it is). Without --state-dir on it, its default is worked out from its environment."""
    if "-m" in args and args.index("-m") + 1 < len(args):
        at = args.index("-m") + 1
        ok = args[at] == "llmsup.supervisor"
    else:  # the `llmsup` console script: python .../bin/llmsup start ...
        at = next((i for i, a in enumerate(args[:2]) if os.path.basename(a) == "llmsup"), -1)
        ok = at >= 0
    rest = args[at + 1 :]
    if not ok or not rest or rest[0] != "start" or "--foreground" not in rest:
        return "its command line is not `llmsup start --foreground`"
    given = None
    for i, arg in enumerate(rest):
        if arg == "--state-dir" and i + 1 < len(rest):
            given = rest[i + 1]
        elif arg.startswith("--state-dir="):
            given = arg.split("=", 1)[1]
    if given is not None:
        candidates = [os.path.join(cwd, given)]
    else:
        env = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        if env.get(b"LLMSUP_STATE_DIR"):
            candidates = [os.path.join(cwd, os.fsdecode(env[b"LLMSUP_STATE_DIR"]))]
        else:
            runtime = env.get(b"XDG_RUNTIME_DIR")
            candidates = [f"/tmp/llmsup-{os.getuid()}"]
            if runtime:
                candidates.append(os.path.join(os.fsdecode(runtime), "llmsup"))
    if not any(same_dir(c, state.path) for c in candidates):
        return f"its state dir is not {state.path}"
    return ""


def same_dir(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
