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
such as HAProxy), `netns NAME`, `user NAME`, `dir PATH` and `cgroup PATH` (every process
in that cgroup and below is killed, then the cgroups are removed: a systemd lab of
tools/systemdlab.py, whose namespaces go with its processes). After a clean session every
entry is gone already and it only removes REGISTRY.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
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


def remove_cgroup(path: str, timeout_s: float = 10) -> bool:
    """SIGKILL every process in cgroup PATH and its children, then rmdir them bottom-up;
    whether PATH is gone. Killing the init of a pid namespace kills the whole namespace,
    and a mount namespace goes with its last process."""
    if not os.path.isdir(path):
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        pids = []
        for dirpath, _, _ in os.walk(path):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids += [int(p) for p in f.read().split()]
            except (OSError, ValueError):
                pass
        if not pids or time.monotonic() > deadline:
            break
        kill = os.path.join(path, "cgroup.kill")  # cgroup v2 (Linux 5.14): all at once
        if os.path.exists(kill):
            try:
                with open(kill, "w") as f:
                    f.write("1")
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    for dirpath, _, _ in os.walk(path, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
    return not os.path.exists(path)


UNDO = {
    "state-dir": stop_state_dir,
    "user": lambda name: subprocess.run(["userdel", name], capture_output=True),
    "pid": kill_pid,
    "netns": delete_netns,
    "dir": lambda path: shutil.rmtree(path, ignore_errors=True),
    "cgroup": remove_cgroup,
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
