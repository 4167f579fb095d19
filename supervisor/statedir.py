"""The per-user state directory of one llmsup instance: sockets, pidfile, log.

The directory is mode 0700 so that only its user can reach the ipc sockets in it. The
pidfile is held under an exclusive flock for the supervisor's whole life: a second start
fails to take the lock, and a pidfile left by a dead supervisor is simply re-locked.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson

# Unix socket paths are limited to 107 bytes on Linux.
MAX_IPC_PATH = 107


class StateDirError(Exception):
    pass


def default_state_dir() -> Path:
    env = os.environ.get("LLMSUP_STATE_DIR")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "llmsup"
    return Path(f"/tmp/llmsup-{os.getuid()}")


@dataclass(frozen=True)
class StateDir:
    path: Path

    @property
    def pidfile(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def info_file(self) -> Path:
        """Endpoint and layout of the running supervisor, for clients and the CLI."""
        return self.path / "supervisor.json"

    @property
    def stop_file(self) -> Path:
        """How the last supervisor ended: written on exit, read by `llmsup stop`."""
        return self.path / "last-stop.json"

    @property
    def log_file(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def client_endpoint(self) -> str:
        return self._ipc("client.sock")

    @property
    def worker_endpoint(self) -> str:
        return self._ipc("workers.sock")

    def _ipc(self, name: str) -> str:
        path = self.path / name
        if len(str(path)) > MAX_IPC_PATH:
            raise StateDirError(
                f"state directory {self.path} is too long for an ipc socket path "
                f"({len(str(path))} bytes; the limit is {MAX_IPC_PATH}); use a shorter --state-dir"
            )
        return f"ipc://{path}"

    def ensure(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.path.stat()
        if st.st_uid != os.getuid():
            raise StateDirError(f"state directory {self.path} belongs to another user")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(self.path, 0o700)

    def lock(self) -> int:
        """Take the pidfile lock and write our pid; returns the fd to keep open."""
        fd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirError(
                f"llmsup is already running (pid {self.running_pid()}, state dir {self.path}); "
                "stop it with `llmsup stop` or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def running_pid(self) -> int | None:
        """The pid of the supervisor holding the lock, or None if none is running."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode().strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it: a stale pidfile
        finally:
            os.close(fd)

    def read_info(self) -> dict | None:
        try:
            return orjson.loads(self.info_file.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None

    def write_json(self, path: Path, data: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)

    def remove_runtime_files(self, keep_pidfile: bool = False) -> None:
        names = ["client.sock", "workers.sock", "supervisor.json"]
        if not keep_pidfile:
            names.append("supervisor.pid")  # only while we still hold its lock
        for name in names:
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
