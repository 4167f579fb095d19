"""llmsup on a shared machine (issue 17, items 2-4): unguessable shared-memory names that
only their owner sweeps, every command checking the state dir, `stop` signalling only a
proven supervisor, and no symbolic link followed in the state dir.

Where it matters the other side is a real second user, made here (root only: skipped with
the reason otherwise) and removed afterwards; files are planted as that user from a
forked child that setuid()s to it, and commands run as that user the same way (the
test's modules are already loaded: the venv's python may not be readable by that user).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pytest
import zmq
from click.testing import CliRunner

from llmsup.protocol.statedir import UnsafeStateDir
from llmsup.supervisor.cli import main as cli
from llmsup.supervisor.commands.exits import EXIT_UNSAFE
from llmsup.supervisor.commands.start import write_api_key
from llmsup.supervisor.host.identity import process_identity
from llmsup.supervisor.host.segments import SEGMENT_NAME
from llmsup.supervisor.host.statedir import StateDir

ONE_WORKER = ("--workers", "1", "--cores-per-worker", "1")


# --- helpers ---------------------------------------------------------------------------------


def as_user(user, fn, *args):
    """fn(*args) in a forked child running as `user`; its return value (or exception)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                result = ("ok", fn(*args))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                result = ("error", repr(exc))
            os.write(write_fd, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    assert kind == "ok", f"as {user.pw_name}: {value}"
    return value


def run_cli(*args: str) -> tuple[int, str, str]:
    """An llmsup command in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def plant(path: str, data: bytes = b"x", mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.close(fd)
    return path


def mkdir(path: str, mode: int = 0o700) -> str:
    os.mkdir(path)
    os.chmod(path, mode)
    return path


def their_dir(tmp: Path, other) -> str:
    """A 0700 state dir of the other user's, for them to plant files in."""
    path = mkdir(str(tmp / "theirs"))
    os.chown(path, other.pw_uid, other.pw_gid)
    return path


@pytest.fixture
def tmp():
    """A scratch dir readable by the other user (they need to reach what lies in it)."""
    path = tempfile.mkdtemp(prefix="llmsup-sec", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def old_name(state_dir: str, suffix: str = "") -> str:
    """The predictable segment name llmsup used before (uid and a hash of the state dir)."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:12]
    return f"llmsup-{os.getuid()}-{digest}{suffix}"


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def commands_with_state_dir() -> list[list[str]]:
    """Every command that takes --state-dir, with a dummy value for each argument."""
    found = []
    for name, command in sorted(cli.commands.items()):
        params = command.params
        if not any(p.name == "state_dir" for p in params):
            continue
        args = ["1" for p in params if p.param_type_name == "argument"]
        found.append([name, *args])
    return found


# --- item 3: every command checks the state directory ------------------------------------


def unsafe_dirs(tmp: Path, other) -> dict[str, tuple[Path, str]]:
    """State dirs no command may trust, with the word the refusal must contain."""
    theirs = their_dir(tmp, other)
    link = tmp / "link"
    link.symlink_to(theirs)
    return {
        "another user's": (Path(theirs), "belongs to"),
        "a symlink to it": (link, "symbolic link"),
        "0777": (Path(mkdir(str(tmp / "open"), 0o777)), "writable by other users"),
        "0770": (Path(mkdir(str(tmp / "group"), 0o770)), "writable by other users"),
    }


def test_every_command_refuses_an_unsafe_state_dir(tmp, other):
    commands = commands_with_state_dir()
    names = {c[0] for c in commands}
    assert {"start", "stop", "status", "generate", "chat", "tokenize", "top", "profile"} <= names
    for case, (path, why) in unsafe_dirs(tmp, other).items():
        mode = os.lstat(path).st_mode
        for command in commands:
            code, out, err = run_cli(*command, "--state-dir", str(path))
            assert code == EXIT_UNSAFE, (case, command, code, out, err)
            line = one_line(err)
            assert why in line and str(path) in line, (case, command, line)
            assert "--state-dir" in line or "chmod 700" in line  # what to do
        assert os.lstat(path).st_mode == mode, f"{case}: changed by a command"
    # The symlink's target (another user's 0700 dir) was neither chmodded nor written.
    assert stat.S_IMODE(os.stat(tmp / "theirs").st_mode) == 0o700
    assert os.listdir(tmp / "theirs") == []


def test_start_wants_a_private_dir_and_makes_a_missing_one_0700(tmp):
    readable = mkdir(str(tmp / "readable"), 0o755)
    code, _, err = run_cli("start", "--state-dir", readable)
    assert code == EXIT_UNSAFE and "open to other users" in one_line(err)
    assert stat.S_IMODE(os.stat(readable).st_mode) == 0o755  # refused, not chmodded
    # Readable but not writable by others can be trusted by the other commands.
    code, _, err = run_cli("status", "--state-dir", readable)
    assert code == 1 and "not running" in err
    fresh = StateDir(tmp / "new" / "state")
    old = os.umask(0)
    try:
        fresh.ensure()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(fresh.path).st_mode) == 0o700


def test_a_client_never_talks_to_another_users_fake_server(tmp, other):
    """Issue 17 #3: `generate` with another user's state dir used to send the prompt to
    their fake server and print its forged reply."""
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    try:
        theirs = their_dir(tmp, other)

        def forge():
            state = StateDir(Path(theirs))
            state.write_json(state.info_file, {"pid": 1, "endpoint": f"tcp://127.0.0.1:{port}"})
            plant(str(state.pidfile), b"1\n")

        as_user(other, forge)
        holder = os.open(Path(theirs, "supervisor.pid"), os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_SH)  # "running"
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "llmsup.supervisor",
                    "generate",
                    "secret prompt",
                    "--state-dir",
                    theirs,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            os.close(holder)
        assert result.returncode == EXIT_UNSAFE, result.stderr
        assert "belongs to" in one_line(result.stderr) and result.stdout == ""
        assert fake.poll(500) == 0, "the prompt reached the other user's server"
        # The Python client refuses too (it reads supervisor.json through StateDir).
        with pytest.raises(UnsafeStateDir):
            StateDir(Path(theirs)).read_info()
    finally:
        fake.close(0)


# --- item 3: stop signals only a proven supervisor ---------------------------------------


def fake_supervisor(state_dir: str, user=None, argv: list[str] | None = None):
    """A process whose command line looks like the supervisor's (sh waits on stdin)."""
    argv = argv or ["-m", "llmsup.supervisor", "start", "--foreground", "--state-dir", state_dir]
    kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    # Popen returns once the exec is done: the command line is already sh's.
    return subprocess.Popen(["/bin/sh", "-c", "read x", *argv], stdin=subprocess.PIPE, **kwargs)


def hold_pidfile(state: StateDir, pid: int) -> int:
    """Make `pid` the one in a locked pidfile, as a running supervisor does."""
    fd = os.open(state.pidfile, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, f"{pid}\n".encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def record(state: StateDir, pid: int, **changes) -> None:
    state.write_json(state.process_file, {"pid": pid, **process_identity(pid), **changes})


def test_stop_signals_only_a_proven_supervisor(tmp, other):
    state = StateDir(Path(mkdir(str(tmp / "mine"))))
    elsewhere = mkdir(str(tmp / "elsewhere"))
    victims = []

    def refused(proc, why: str) -> None:
        lock = hold_pidfile(state, proc.pid)
        try:
            code, out, err = run_cli("stop", "--state-dir", str(state.path))
        finally:
            os.close(lock)
        line = one_line(err)
        assert code == EXIT_UNSAFE and f"pid {proc.pid}" in line and why in line, (code, err)
        time.sleep(0.1)
        assert proc.poll() is None, f"{proc.args} was signalled: {line}"

    try:
        # An unrelated process of the caller, no record: the pidfile alone proves nothing.
        sleeper = subprocess.Popen(["sleep", "60"])
        victims.append(sleeper)
        state.process_file.unlink(missing_ok=True)
        refused(sleeper, "does not record it as the supervisor")
        # The record is there but the process started at another time: a reused pid.
        record(state, sleeper.pid, start_time=process_identity(sleeper.pid)["start_time"] - 1)
        refused(sleeper, "pid was reused")
        # Its own start time, but not `llmsup start --foreground`.
        record(state, sleeper.pid)
        refused(sleeper, "not `llmsup start --foreground`")
        # `llmsup start --foreground` of another state dir.
        stranger = fake_supervisor(elsewhere)
        victims.append(stranger)
        record(state, stranger.pid)
        refused(stranger, f"its state dir is not {state.path}")
        # Another user's process with a command line naming this dir.
        theirs = fake_supervisor(str(state.path), user=other)
        victims.append(theirs)
        record(state, theirs.pid)
        refused(theirs, f"runs as uid {other.pw_uid}")
        # The real thing (same command line, start time, user): SIGTERM through its pidfd.
        ours = fake_supervisor(str(state.path))
        victims.append(ours)
        record(state, ours.pid)
        lock = hold_pidfile(state, ours.pid)
        try:
            code, _, err = run_cli("stop", "--timeout", "5", "--state-dir", str(state.path))
        finally:
            os.close(lock)
        assert ours.wait(5) == -signal.SIGTERM, err
        assert code != EXIT_UNSAFE, err
    finally:
        for proc in victims:
            proc.kill()
            proc.wait()


def test_stop_with_another_users_pidfile_signals_nothing(tmp, other):
    """Issue 17 #3: `stop` read a pid from another user's pidfile and SIGTERMed it."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        theirs = their_dir(tmp, other)

        def forge(pid):
            state = StateDir(Path(theirs))
            plant(str(state.pidfile), f"{pid}\n".encode())
            state.write_json(state.process_file, {"pid": pid, **process_identity(pid)})

        as_user(other, forge, sleeper.pid)
        holder = os.open(Path(theirs, "supervisor.pid"), os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_SH)
        try:
            code, _, err = run_cli("stop", "--state-dir", theirs)
        finally:
            os.close(holder)
        assert code == EXIT_UNSAFE and "belongs to" in one_line(err)
        time.sleep(0.1)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


# --- item 2: the sweep touches only recorded segments the caller owns --------------------


def test_sweep_unlinks_only_recorded_segments_of_the_caller(tmp, other):
    state = StateDir(Path(mkdir(str(tmp / "mine"))))
    uid = os.getuid()
    mine = f"llmsup-{uid}-{secrets.token_hex(16)}"
    theirs = f"llmsup-{uid}-{secrets.token_hex(16)}-cache"  # our name form, their file
    unrecorded = f"llmsup-{uid}-{secrets.token_hex(16)}"
    foreign_uid = f"llmsup-{other.pw_uid}-{secrets.token_hex(16)}"
    victim = plant(str(tmp / "victim"))
    linked = f"llmsup-{uid}-{secrets.token_hex(16)}"
    try:
        plant(f"/dev/shm/{mine}")
        plant(f"/dev/shm/{unrecorded}")
        os.symlink(victim, f"/dev/shm/{linked}")
        as_user(other, plant, f"/dev/shm/{theirs}")
        as_user(other, plant, f"/dev/shm/{foreign_uid}")
        state.write_json(
            state.segments_file,
            {
                mine: "scoreboard",
                theirs: "cache",
                foreign_uid: "scoreboard",
                linked: "cache",
                "../../tmp/x": "cache",
                f"llmsup-{uid}-../../etc/passwd": "cache",
            },
        )
        code, _, err = run_cli("stop", "--state-dir", str(state.path))
        assert code == 1 and "removed" in err, err
        assert not os.path.exists(f"/dev/shm/{mine}")
        for name in (theirs, foreign_uid, unrecorded, linked):
            assert os.path.lexists(f"/dev/shm/{name}"), f"{name} was swept"
        assert os.path.exists(victim) and not state.segments_file.exists()
    finally:
        for name in (mine, theirs, unrecorded, foreign_uid, linked):
            Path(f"/dev/shm/{name}").unlink(missing_ok=True)


def test_squatted_names_do_not_block_start_and_nobody_else_stops_it(instance_factory, other):
    """Issue 17 #2: another user created the scoreboard's predictable name first, and start
    failed. Names are random now; a stale record is swept at start only where it is ours;
    the other user can neither stop this instance nor read its state dir."""
    inst = instance_factory(*ONE_WORKER, "--cache-mb", "16")
    state = StateDir(Path(inst.state_dir))
    uid = os.getuid()
    squatted = [old_name(inst.state_dir), old_name(inst.state_dir, "-cache")]
    stale_mine = f"llmsup-{uid}-{secrets.token_hex(16)}"
    stale_theirs = f"llmsup-{uid}-{secrets.token_hex(16)}-cache"
    planted = [*squatted, stale_theirs]
    try:
        for name in planted:
            as_user(other, plant, f"/dev/shm/{name}", b"squatter", 0o644)
        plant(f"/dev/shm/{stale_mine}")
        state.write_json(state.segments_file, {stale_mine: "scoreboard", stale_theirs: "cache"})
        started = inst.start()
        assert started.returncode == 0, started.stderr
        segments = inst.segments()
        assert set(segments) == {"scoreboard", "cache"}
        info = orjson.loads(Path(inst.state_dir, "supervisor.json").read_bytes())
        assert (info["scoreboard"], info["cache"]) == (segments["scoreboard"], segments["cache"])
        for name in segments.values():
            assert SEGMENT_NAME.fullmatch(name) and name not in squatted
            st = os.lstat(f"/dev/shm/{name}")
            assert st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600
        st = os.lstat(state.segments_file)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert not os.path.exists(f"/dev/shm/{stale_mine}")  # ours: swept at start
        assert all(os.path.exists(f"/dev/shm/{n}") for n in planted)  # theirs: untouched
        assert inst.top()["workers"][0]["pid"] > 0  # top finds the recorded scoreboard

        # The other user: refused by every command, and cannot even list the state dir.
        for command in (["stop"], ["status"], ["top", "--once"]):
            code, err = as_user(
                other, lambda c: run_cli(*c, "--state-dir", inst.state_dir)[::2], command
            )
            assert code == EXIT_UNSAFE and "belongs to" in err, (command, err)
        assert as_user(other, os.access, inst.state_dir, os.R_OK | os.X_OK) is False
        with inst.client() as client:
            assert client.ping()["pong"] is True

        stopped = inst.stop()
        assert stopped.returncode == 0, stopped.stderr
        assert not [n for n in segments.values() if os.path.exists(f"/dev/shm/{n}")]
        assert all(os.path.exists(f"/dev/shm/{n}") for n in planted)
        left = set(os.listdir(inst.state_dir))
        assert not left & {"segments.json", "supervisor-process.json", "supervisor.pid"}, left
    finally:
        for name in [*planted, stale_mine]:
            Path(f"/dev/shm/{name}").unlink(missing_ok=True)


# --- item 4: no symbolic link is followed ------------------------------------------------


def test_files_are_replaced_never_written_through_a_link(tmp):
    state = StateDir(Path(mkdir(str(tmp / "mine"))))
    victim = plant(str(tmp / "victim"), b"precious", 0o644)
    for path in (
        state.info_file,
        state.stop_file,
        state.segments_file,
        state.process_file,
        state.path / "api-key",
    ):
        path.symlink_to(victim)
        # The old fixed temp names, planted as links too: no longer used.
        path.with_name(path.name + ".tmp").symlink_to(victim)
        if path.name == "api-key":
            write_api_key(state, "k")
        else:
            state.write_json(path, {"written": True})
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, path
    assert Path(victim).read_bytes() == b"precious"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    assert not [n for n in os.listdir(state.path) if n.startswith(".")]  # no temp left


def test_links_for_pidfile_and_log_are_refused(tmp):
    victim = plant(str(tmp / "victim"), b"precious", 0o644)
    for name in ("supervisor.pid", "supervisor.log"):
        state = StateDir(Path(mkdir(str(tmp / name.replace(".", "-")))))
        (state.path / name).symlink_to(victim)
        code, _, err = run_cli("start", *ONE_WORKER, "--state-dir", str(state.path))
        assert code == EXIT_UNSAFE, err
        assert "symbolic link" in one_line(err) and name in err
        assert not (state.path / "client.sock").exists()
    with pytest.raises(UnsafeStateDir):
        StateDir(tmp / "supervisor-pid").lock()
    with pytest.raises(UnsafeStateDir):
        StateDir(tmp / "supervisor-log").open_log()
    assert Path(victim).read_bytes() == b"precious"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644


def test_log_is_0600_and_appended(tmp):
    state = StateDir(Path(mkdir(str(tmp / "mine"))))
    plant(str(state.log_file), b"old\n", 0o644)  # from a version that wrote it 0644
    fd = state.open_log()
    os.write(fd, b"new\n")
    os.close(fd)
    assert state.log_file.read_bytes() == b"old\nnew\n"
    assert stat.S_IMODE(os.stat(state.log_file).st_mode) == 0o600
