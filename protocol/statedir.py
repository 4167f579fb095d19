"""What a client reads from a state directory (protocol/SPEC.md section 1): where it is,
the endpoint in supervisor.json, whether a supervisor holds the pidfile, and the CURVE key
files for a tcp endpoint. The supervisor's own side (creating the directory, locking,
writing files, the segment registry) builds on this in supervisor/host/statedir.py.

Only its user may write in the directory, so what it holds can be trusted once checked:
owned by the caller, not group/other-writable, not a symbolic link (seen with lstat).
Nothing in it is followed through a link: files are opened with O_NOFOLLOW and must be
regular files of the caller.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson

# Unix socket paths are limited to 107 bytes on Linux.
MAX_IPC_PATH = 107

# The CURVE key files (Z85 text, 40 characters): SPEC section 1, docs/security.md.
SERVER_SECRET = "curve-server.key"
SERVER_PUBLIC = "curve-server.pub"
CLIENT_SECRET = "curve-client.key"
CLIENT_PUBLIC = "curve-client.pub"
ALLOWED = "curve-clients"
Z85_KEY_CHARS = 40


class StateDirError(Exception):
    pass


class UnsafeStateDir(StateDirError):
    """The directory or a file in it is not safe to trust: refused, nothing changed."""


class CurveError(Exception):
    """A CURVE key file that does not hold a key."""


def default_state_dir() -> Path:
    env = os.environ.get("LLMSUP_STATE_DIR")
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "llmsup"
    return Path(f"/tmp/llmsup-{os.getuid()}")


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class StateDir:
    path: Path

    @property
    def pidfile(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def process_file(self) -> Path:
        """The supervisor's pid and start time, written by itself: what `stop` checks."""
        return self.path / "supervisor-process.json"

    @property
    def segments_file(self) -> Path:
        """The names of the supervisor's shared-memory segments (name -> kind)."""
        return self.path / "segments.json"

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

    # --- the directory ------------------------------------------------------------------------

    def check(self, private: bool = False) -> bool:
        """Raise StateDirError unless the directory is safe to trust; False if it is missing.

        Safe: a real directory (lstat: a symbolic link is refused, never followed), owned by
        the caller, writable by nobody else. `private` (start) also wants no access at all
        for group and others: its sockets and files are the instance's."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        p = self.path
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeStateDir(
                f"state directory {p} is a symbolic link (to {os.readlink(p)}); llmsup follows "
                "no links there: give the real directory as --state-dir, or remove the link"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeStateDir(
                f"state directory {p} is not a directory; remove it or use another --state-dir"
            )
        if st.st_uid != os.getuid():
            raise UnsafeStateDir(
                f"state directory {p} belongs to {user_name(st.st_uid)}, not to you "
                f"({user_name(os.getuid())}): it is not safe to trust; use a directory of your "
                "own (--state-dir or LLMSUP_STATE_DIR)"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise UnsafeStateDir(
                f"state directory {p} is writable by other users (mode {mode:04o}): they could "
                f"plant files in it; run `chmod 700 {p}` or use another --state-dir"
            )
        if private and mode & 0o077:
            raise UnsafeStateDir(
                f"state directory {p} is open to other users (mode {mode:04o}): they could reach "
                f"its sockets and files; run `chmod 700 {p}` (systemd: RuntimeDirectoryMode=0700) "
                "or use another --state-dir"
            )
        return True

    # --- files in it --------------------------------------------------------------------------

    def open_file(self, path: Path, flags: int, mode: int = 0o600) -> int:
        """os.open without following a symbolic link; the file must be a regular one of ours."""
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeStateDir(
                    f"{path} is a symbolic link; llmsup follows no links in its state dir: "
                    "remove it"
                ) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else "not yours"
            raise UnsafeStateDir(f"{path} is {what}; llmsup will not use it: remove it")
        return fd

    def read_file(self, path: Path, limit: int = 1 << 20) -> bytes | None:
        """The file's first `limit` bytes, None if it does not exist."""
        try:
            fd = self.open_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(limit)

    def read_json(self, path: Path) -> dict | None:
        data = self.read_file(path)
        try:
            value = orjson.loads(data) if data is not None else None
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    # --- what clients read --------------------------------------------------------------------

    def running_pid(self) -> int | None:
        """The pid of the supervisor holding the pidfile lock, or None if none is running."""
        try:
            fd = self.open_file(self.pidfile, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it: a stale pidfile
        finally:
            os.close(fd)

    def read_info(self) -> dict | None:
        """supervisor.json, once the directory is checked (StateDirError if unsafe)."""
        if not self.check():
            return None
        return self.read_json(self.info_file)

    def read_curve_key(self, name: str) -> bytes | None:
        """A Z85 key from one of the CURVE key files, None if the file does not exist."""
        data = self.read_file(self.path / name, limit=256)
        if data is None:
            return None
        key = data.strip()
        if len(key) != Z85_KEY_CHARS:
            raise CurveError(
                f"{self.path / name} does not hold a Z85 CURVE key ({Z85_KEY_CHARS} characters)"
            )
        return key

    def client_curve_keys(self) -> dict[str, bytes] | None:
        """{server_key, public_key, secret_key} for a client of this state dir, or None when
        it holds no keys (a server started with --tcp-auth none, or never on tcp)."""
        server = self.read_curve_key(SERVER_PUBLIC)
        public = self.read_curve_key(CLIENT_PUBLIC)
        secret = self.read_curve_key(CLIENT_SECRET)
        if server is None or public is None or secret is None:
            return None
        return {"server_key": server, "public_key": public, "secret_key": secret}
