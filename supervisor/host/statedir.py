"""The per-user state directory of one llmsup instance: sockets, pidfile, log, records.

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

import errno
import fcntl
import os
import pwd
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson

# Unix socket paths are limited to 107 bytes on Linux.
MAX_IPC_PATH = 107
SHM_DIR = "/dev/shm"
# llmsup-UID-<128 random bits>[-cache]: nothing else is ever swept.
SEGMENT_NAME = re.compile(r"llmsup-(\d+)-[0-9a-f]{32}(-cache)?")


class StateDirError(Exception):
    pass


class UnsafeStateDir(StateDirError):
    """The directory or a file in it is not safe to trust: refused, nothing changed."""


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

    def write_file(self, path: Path, data: bytes) -> None:
        """Replace `path` with a 0600 file holding `data`: written to a temp file with a
        random name, created exclusively, then renamed over `path` (a link there is
        replaced, never followed)."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)  # fmt: skip
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

    def read_json(self, path: Path) -> dict | None:
        data = self.read_file(path)
        try:
            value = orjson.loads(data) if data is not None else None
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

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

    def running_pid(self) -> int | None:
        """The pid of the supervisor holding the lock, or None if none is running."""
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

    # --- what clients read --------------------------------------------------------------------

    def read_info(self) -> dict | None:
        """supervisor.json, once the directory is checked (StateDirError if unsafe)."""
        if not self.check():
            return None
        return self.read_json(self.info_file)

    # --- shared-memory segments ---------------------------------------------------------------

    def record_segment(self, kind: str, suffix: str = "") -> str:
        """A new segment name: random, not in use, and recorded here before the segment is
        created (exclusively, by the supervisor) so that a sweep finds it if the supervisor
        is killed. Only the supervisor, holding the pidfile lock, calls this."""
        for _ in range(100):
            name = f"llmsup-{os.getuid()}-{secrets.token_hex(16)}{suffix}"
            if not os.path.lexists(f"{SHM_DIR}/{name}"):
                break
        else:
            raise StateDirError(f"no free shared-memory name in {SHM_DIR} after 100 tries")
        segments = self.read_segments()
        segments[name] = kind
        self.write_json(self.segments_file, segments)
        return name

    def read_segments(self) -> dict[str, str]:
        """Recorded segment names (name -> kind), only names of the caller's llmsup form."""
        data = self.read_json(self.segments_file) or {}
        return {
            name: kind
            for name, kind in data.items()
            if isinstance(kind, str) and is_own_segment_name(name)
        }

    def segment(self, kind: str) -> str | None:
        """The newest recorded segment of this kind ("scoreboard", "cache")."""
        names = [name for name, k in self.read_segments().items() if k == kind]
        return names[-1] if names else None

    def sweep_segments(self) -> bool:
        """Unlink the segments recorded here that are still the caller's (left by a killed
        supervisor; call only when none runs) and forget them; True if one was unlinked."""
        swept = [name for name in self.read_segments() if unlink_segment(name)]
        self.segments_file.unlink(missing_ok=True)
        return bool(swept)

    def remove_runtime_files(self, keep_pidfile: bool = False) -> None:
        names = ["client.sock", "workers.sock", "supervisor.json", "segments.json"]
        if not keep_pidfile:  # only while we still hold its lock
            names += ["supervisor.pid", "supervisor-process.json"]
        for name in names:
            try:
                (self.path / name).unlink()  # unlink removes a link, never its target
            except FileNotFoundError:
                pass


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def is_own_segment_name(name: str) -> bool:
    match = SEGMENT_NAME.fullmatch(name) if isinstance(name, str) else None
    return match is not None and int(match.group(1)) == os.getuid()


def segment_is_ours(name: str) -> bool:
    """A segment of the caller's llmsup form that is a regular file the caller owns (lstat:
    /dev/shm is sticky, so nobody else can replace a file of ours there)."""
    if not is_own_segment_name(name):
        return False
    try:
        st = os.lstat(f"{SHM_DIR}/{name}")
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def unlink_segment(name: str) -> bool:
    """Unlink a segment only if it is provably the caller's; True if it was unlinked."""
    if not segment_is_ours(name):
        return False
    try:
        os.unlink(f"{SHM_DIR}/{name}")
        return True
    except FileNotFoundError:
        return False


def process_identity(pid: int) -> dict:
    """What tells a process apart from a later one with the same pid: its start time in
    clock ticks since boot (/proc/PID/stat field 22) and the boot's id."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
        fields = f.read().rsplit(b")", 1)[1].split()
    return {"start_time": int(fields[22 - 3]), "boot_id": boot_id()}


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
