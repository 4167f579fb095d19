"""Detaching: run `llmsup start --foreground` in a new session with its output in the state
dir's log, and wait for the one report it writes to a pipe once every worker is ready (or
start-up failed)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import orjson

from llmsup.supervisor.host.statedir import StateDir

# Beyond --startup-timeout: the daemon's own start (imports, binding) before its workers.
REPORT_MARGIN_S = 15


class DaemonFailed(Exception):
    """No report came (`reported` False), or the daemon reported a failure; `disk`: a
    state-dir file could not be written (the message is then one line: path and errno)."""

    def __init__(self, message: str, reported: bool = True, disk: bool = False):
        super().__init__(message)
        self.reported = reported
        self.disk = disk


def daemonize(state: StateDir, args: list[str], startup_timeout: float) -> dict:
    """Run `start --foreground ARGS` detached; what it reports once ready (pid, endpoint,
    workers), or DaemonFailed."""
    log = state.open_log()
    read_fd, write_fd = os.pipe()
    try:
        command = [sys.executable, "-m", "llmsup.supervisor", "start", "--foreground"]
        proc = subprocess.Popen(
            [*command, "--ready-fd", str(write_fd), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(log)
    os.close(write_fd)
    data = read_report(read_fd, time.monotonic() + startup_timeout + REPORT_MARGIN_S)
    if not data:
        if proc.poll() is None:
            proc.kill()
        raise DaemonFailed(
            f"the supervisor did not report ready; see {state.log_file}:\n{log_tail(state)}",
            reported=False,
        )
    report = orjson.loads(data)
    if not report["ok"] and report.get("disk"):
        raise DaemonFailed(report["error"], disk=True)
    if not report["ok"]:
        raise DaemonFailed(f"start failed: {report['error']}\n(log: {state.log_file})")
    return report["info"]


def read_report(fd: int, deadline: float) -> bytes:
    """All the daemon writes to the pipe until it closes it, or what came by `deadline`."""
    data = b""
    with os.fdopen(fd, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    return data


def log_tail(state: StateDir, lines: int = 15) -> str:
    try:
        fd = state.open_file(state.log_file, os.O_RDONLY)
    except FileNotFoundError:
        return ""
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, os.fstat(fd).st_size - 65536))
        data = f.read()
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
