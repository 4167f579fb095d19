#!/usr/bin/env python3
"""Tear down what a test session made when the session dies without its own teardown.

    python tools/reaper.py PID REGISTRY

llmsup daemonizes into a session of its own, so a test run that is killed (SIGKILL, a CI
time limit, a stopped terminal) never reaches its fixtures' teardown and leaves supervisors,
workers, shared memory and network namespaces behind. tests/conftest.py starts this
process, in a session of its own too, for every test session: it waits on the session's
pidfd and, once that process is gone, undoes every line of REGISTRY that is still there
(testkit.leave_nothing writes them): `state-dir PATH` (`llmsup stop`, which also sweeps the
segments of a dead supervisor, then the directory), `pid PID START_TIME` (a helper process
such as HAProxy), `netns NAME`, `user NAME` and `dir PATH`. After a clean session every
entry is gone already and it only removes REGISTRY.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil


def stop_state_dir(path: str) -> None:
    if not os.path.isdir(path):
        return
    llmsup = [sys.executable, "-m", "llmsup.supervisor"]
    subprocess.run([*llmsup, "stop", "--state-dir", path, "--timeout", "5"], capture_output=True)
    for proc in psutil.process_iter(["cmdline"]):  # whatever a failed stop left
        if path in " ".join(proc.info["cmdline"] or []):
            proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def kill_pid(pid: str, start_time: str) -> None:
    try:
        proc = psutil.Process(int(pid))
        if f"{proc.create_time():.3f}" == start_time:  # not a later process with its pid
            proc.kill()
    except psutil.Error:
        pass


def delete_netns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


UNDO = {
    "state-dir": stop_state_dir,
    "user": lambda name: subprocess.run(["userdel", name], capture_output=True),
    "pid": kill_pid,
    "netns": delete_netns,
    "dir": lambda path: shutil.rmtree(path, ignore_errors=True),
}


def main(pid: int, registry: Path) -> None:
    try:
        fd = os.pidfd_open(pid)
        select.select([fd], [], [])
    except ProcessLookupError:
        pass  # gone already
    lines = registry.read_text().splitlines() if registry.exists() else []
    for line in reversed(lines):  # the latest first: nodes before the namespaces they run in
        kind, *args = line.split(" ")
        if kind in UNDO:
            UNDO[kind](*args)
    registry.unlink(missing_ok=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
