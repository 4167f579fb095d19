"""The daemon's main: `llmsup start --foreground` runs the supervisor's event loop here,
after the checks of commands/start.py, and exits with its status (commands/exits.py)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import click
import orjson

from llmsup.protocol.arena_layout import ArenaError
from llmsup.protocol.statedir import StateDirError, UnsafeStateDir
from llmsup.supervisor.commands.common import fail
from llmsup.supervisor.commands.exits import (
    EXIT_DISK,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_START_FAILED,
    EXIT_UNSAFE,
)
from llmsup.supervisor.core.config import Config
from llmsup.supervisor.core.lifecycle import Phase
from llmsup.supervisor.core.server import Supervisor
from llmsup.supervisor.host import logs
from llmsup.supervisor.host.statedir import StateDir
from llmsup.worker import faults

M_MMAP_THRESHOLD = -3  # mallopt(3)
# The daemon's exit status by the phase its loop ended in (drained otherwise).
EXIT_OF_PHASE = {Phase.START_FAILED: EXIT_START_FAILED, Phase.FORCED: EXIT_FORCED}


def serve(state: StateDir, ready_fd: int | None, config: Config) -> None:
    sys.exit(run_supervisor(state, ready_fd, config))


def run_supervisor(state: StateDir, ready_fd: int | None, config: Config) -> int:
    # fd 2 is supervisor.log when detached (daemonize), else whatever stderr was given.
    path = state.log_file if ready_fd is not None else None
    sink = logs.setup(path, config.log_format, config.log_level)

    def on_ready(ok: bool, detail) -> None:
        disk = isinstance(detail, logs.DiskError)
        if ready_fd is None:
            click.echo(
                f"llmsup ready: endpoint {detail['endpoint']}"
                if ok
                else f"llmsup: {'' if disk else 'start failed: '}{detail}",
                err=not ok,
            )
            return
        report = {"ok": ok, "info": detail} if ok else {"ok": False, "error": str(detail)}
        if disk:
            report["disk"] = True
        os.write(ready_fd, orjson.dumps(report))
        os.close(ready_fd)

    try:
        lock_fd = state.lock()
    except StateDirError as exc:
        fail(str(exc), EXIT_UNSAFE if isinstance(exc, UnsafeStateDir) else 1)
    except OSError as exc:  # a full or read-only disk: say which file and why, in one line
        on_ready(False, logs.DiskError(logs.describe_os_error(exc)))
        return EXIT_DISK
    try:
        # Left by a supervisor that was killed: its recorded segments (if still ours), sockets.
        state.sweep_segments()
        state.remove_runtime_files(keep_pidfile=True)
        logs.reserve_stop_record(state)
    except OSError as exc:
        on_ready(False, logs.DiskError(logs.describe_os_error(exc)))
        logs.remove_runtime_files(state)
        os.close(lock_fd)
        return EXIT_DISK

    if faults.enabled():
        logging.warning("fault injection is ON (%s): for tests only", faults.ENV)
    return_large_blocks_at_once()
    try:
        supervisor = Supervisor(config, state, on_ready=on_ready, log_sink=sink)
    except (ArenaError, OSError) as exc:
        disk = isinstance(exc, OSError) and not isinstance(exc, ArenaError)
        on_ready(False, logs.DiskError(logs.describe_os_error(exc)) if disk else str(exc))
        logs.remove_runtime_files(state)
        os.close(lock_fd)
        return EXIT_DISK if disk else EXIT_START_FAILED
    code = EXIT_OF_PHASE.get(supervisor.run(), EXIT_OK)
    record = {
        "exit_status": code,
        "drained": code == 0,
        "failed_requests": supervisor.failed_on_stop,
    }
    sink.flush_held(everything=True)  # warnings the rate limit still holds
    logs.write_stop_record(state, record)  # into the space reserved at start
    logs.remove_runtime_files(state)
    stop_resource_tracker()
    os.close(lock_fd)
    return code


def stop_resource_tracker() -> None:
    """Wait for multiprocessing's resource tracker (SharedMemory starts it) to exit now.

    It exits when it reads EOF from us, some 50 ms after we do; under systemd
    (KillMode=mixed) the service then still has a process once its main one exited, which
    systemd SIGKILLs and logs. Every segment it tracks was unlinked already (one owner
    creates and unlinks), so closing its pipe first changes nothing but the order.
    """
    from multiprocessing import resource_tracker

    try:
        resource_tracker._resource_tracker._stop()  # Python 3.8-3.13: close, then waitpid
    except (AttributeError, OSError, ChildProcessError):
        pass  # another Python's tracker, or none was started


def return_large_blocks_at_once() -> None:
    """Have glibc give a prompt's memory back to the system when its request ends.

    Above its mmap threshold (128 KiB) glibc serves a block with its own mapping, unmapped
    on free; but each such free raises the threshold (up to 32 MiB), so after the first
    large prompts they come from the heap, whose holes stay resident: the supervisor's
    RSS then wanders 15-20 MB with the mix of prompts in flight (perf/soak.py). A fixed
    threshold keeps every large prompt in a mapping of its own.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own rules
