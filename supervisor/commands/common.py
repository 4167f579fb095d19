"""What every `llmsup` command shares: the state-dir option, errors, connecting."""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

import click

from llmsup.protocol.client import Client, NotRunning
from llmsup.protocol.statedir import UnsafeStateDir, default_state_dir
from llmsup.supervisor.commands.exits import EXIT_DISK, EXIT_NOT_RUNNING, EXIT_UNSAFE
from llmsup.supervisor.commands.options import click_option
from llmsup.supervisor.configfile import ConfigError, config_path, read_file
from llmsup.supervisor.host.logs import describe_os_error
from llmsup.supervisor.host.statedir import StateDir
from llmsup.supervisor.settings import BY_NAME

# What a disk or filesystem says when a state-dir file cannot be written.
DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EIO,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EMLINK,
    errno.ENAMETOOLONG,
}


STATE_DIR = click_option(BY_NAME["state-dir"])


def state_option(f):
    """--state-dir; a command that takes it refuses an unsafe state dir (UnsafeStateDir
    anywhere in it) with one line and EXIT_UNSAFE, and reports a disk error on a file
    (a full or read-only disk: path and errno) in one line with EXIT_DISK."""

    @functools.wraps(f)
    def checked(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except UnsafeStateDir as exc:
            fail(str(exc), EXIT_UNSAFE)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS or exc.filename is None:
                raise
            fail(describe_os_error(exc), EXIT_DISK)

    checked.__click_params__ = [*getattr(checked, "__click_params__", []), STATE_DIR]
    return checked


def state_of(state_dir: Path | None) -> StateDir:
    """The state dir, checked (owned by the caller, not writable by others, not a link);
    a missing one is fine here: nothing runs there."""
    state = StateDir((state_dir or configured_state_dir() or default_state_dir()).absolute())
    try:
        state.check()
    except UnsafeStateDir as exc:
        fail(str(exc), EXIT_UNSAFE)
    return state


def configured_state_dir() -> Path | None:
    """The config file's state-dir, for commands other than start (which reads the whole
    file): where `llmsup stop` and `status` find a server started with it. The variable
    LLMSUP_STATE_DIR still wins; a file that does not parse is skipped here (start says
    what is wrong with it)."""
    if os.environ.get("LLMSUP_STATE_DIR"):
        return None
    path = config_path(None)
    if path is None:
        return None
    try:
        found = read_file(path).get("state_dir")
    except ConfigError:
        return None
    return found.value if found else None


def fail(message: str, code: int = 1):
    click.echo(f"llmsup: {message}", err=True)
    sys.exit(code)


def connect(state_dir: Path | None, endpoint: str | None, timeout: float = 120.0) -> Client:
    try:
        return Client(endpoint, state_dir=state_of(state_dir).path, timeout=timeout)
    except NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)
    except UnsafeStateDir as exc:
        fail(str(exc), EXIT_UNSAFE)


endpoint_option = click.option(
    "--endpoint", default=None, help="Connect here instead of the state dir's supervisor."
)
