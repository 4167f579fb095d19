"""The supervisor's side of its state directory (protocol/statedir.py has what clients read):
creating it, the pidfile lock, writing files and the log.

Only its user may write in it, so what it holds can be trusted: every command checks
that first (owned by the caller, not group/other-writable, not a symbolic link, seen with
lstat) and refuses with one line saying why and what to do; `start` also wants it closed
to other users (0700), and creates a missing one so. Nothing in it is followed through a
symbolic link: files are opened with O_NOFOLLOW and must be regular files of the caller,
and new ones are written to an exclusively created temp file with a random name, then
renamed over the old.

The pidfile is held under an exclusive flock for the supervisor's whole life: a second
start fails to take the lock, and a pidfile left by a dead supervisor is simply re-locked.
Next to it the supervisor records its pid and start time (supervisor-process.json), so
that `stop` can prove a pid is still that process before it signals it, and the names of
its shared-memory segments (segments.json), which are random: nobody can create one
first, and a sweep touches only the recorded segments that belong to the caller.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from pathlib import Path

import orjson

from llmsup.protocol import statedir
from llmsup.protocol.statedir import StateDirError
from llmsup.supervisor.host.identity import process_identity
from llmsup.supervisor.host.segments import SegmentRegistry


class StateDir(statedir.StateDir, SegmentRegistry):
    """A state directory as the supervisor and the CLI use it: what clients read, and what
    only the directory's user does there."""

    # --- the directory ------------------------------------------------------------------------

    def ensure(self) -> None:
        """For start: create a missing directory 0700, else check it is private."""
        try:
            os.lstat(self.path)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass  # made meanwhile by someone else: checked below like any other
        self.check(private=True)

    # --- files in it --------------------------------------------------------------------------

    def write_file(self, path: Path, data: bytes) -> None:
        """Replace `path` with a 0600 file holding `data`: written to a temp file with a
        random name, created exclusively, then renamed over `path` (a link there is
        replaced, never followed)."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            exc.filename = str(path)  # a disk error names the file meant, not the temp one
            raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                exc.filename = str(path)
            raise

    def write_json(self, path: Path, data: dict) -> None:
        self.write_file(path, orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def open_log(self) -> int:
        """supervisor.log for appending (0600, created if missing, never through a link)."""
        fd = self.open_file(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # ours (checked), from a version that wrote it 0644
        return fd

    # --- the pidfile --------------------------------------------------------------------------

    def lock(self) -> int:
        """Take the pidfile lock, write our pid and record our start time; returns the fd to
        keep open. The pidfile is written in place under the lock (a renamed-over pidfile
        would let a second supervisor lock another inode); it is created exclusively, and an
        existing one is opened only if it is a regular file of ours."""
        while True:
            try:
                fd = self.open_file(self.pidfile, os.O_RDWR)
                break
            except FileNotFoundError:
                pass
            try:
                fd = self.open_file(self.pidfile, os.O_RDWR | os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                continue  # made meanwhile: open that one
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirError(
                f"llmsup is already running (pid {self.running_pid()}, state dir {self.path}); "
                "stop it with `llmsup stop` or use another --state-dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            exc.filename = str(self.pidfile)  # a disk error names the file
            raise
        self.write_json(self.process_file, {"pid": os.getpid(), **process_identity(os.getpid())})
        return fd

    def lock_if_stale(self) -> int | None:
        """The pidfile's lock when no supervisor holds it (to clean up after a dead one
        without a new one starting meanwhile), or None if one does or there is no pidfile."""
        try:
            fd = self.open_file(self.pidfile, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def read_process(self) -> dict | None:
        """What the supervisor recorded about itself: pid, start_time, boot_id."""
        return self.read_json(self.process_file)

    def remove_runtime_files(self, keep_pidfile: bool = False) -> None:
        names = ["client.sock", "workers.sock", "supervisor.json", "segments.json"]
        names.append("gateway-live.json")  # written anew at each start (core/reload.py)
        if not keep_pidfile:  # only while we still hold its lock
            names += ["supervisor.pid", "supervisor-process.json"]
        for name in names:
            try:
                (self.path / name).unlink()  # unlink removes a link, never its target
            except FileNotFoundError:
                pass
