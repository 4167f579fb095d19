#!/usr/bin/env python3
"""A real systemd for tests: booted as PID 1 of its own pid, mount, cgroup, uts and ipc
namespaces, seeing only the unit files a test gives it (tests/test_systemd.py).

    with SystemdLab() as lab:
        lab.install_unit("llmsup.service", text, dropins={"test.conf": "[Service]\\n..."})
        lab.systemctl("start", "llmsup", timeout=200)
        lab.show("llmsup")["ActiveState"]          # also MainPID, NRestarts, StatusText...

    python tools/systemdlab.py          # boot one, run a Type=notify unit, tear it down

Needs root (unshare, mount, cgroups), /lib/systemd/systemd, unshare and nsenter;
`SystemdLab.why_not()` says which is missing, `SystemdLab.boot()` raises LabError with
what systemd or the mounts said if it does not come up.

What the lab shares with the machine and what it does not, and why. The root file system
is the machine's (systemd and llmsup run from it), so everything systemd would write to it
is covered, in the lab's mount namespace only: a first attempt with /lib's unit files
visible ran systemd-tmpfiles-setup (sysinit.target.wants), which emptied the machine's
/tmp. So:

- systemd reads units only from /etc/systemd/system (a tmpfs: the test's units) and the
  lab's stub targets (sysinit, basic, shutdown...) in /run/lab/units, through
  SYSTEMD_UNIT_PATH; generators are off (SYSTEMD_GENERATOR_PATH is an empty dir). Nothing
  of /lib/systemd/system starts, so no tmpfiles, sysctl, sysusers, modprobe or udev.
- tmpfs on /run, /tmp, /var/tmp, /dev/shm, /var/lib, /var/cache, /var/log: PrivateTmp= and
  StateDirectory= directories, llmsup's shared memory, the journal (volatile) all stay in
  the lab and go with it.
- /proc/sys and /sys are read-only (PID 1 writes kernel.core_pattern and fs.nr_open, which
  are not namespaced); the uts namespace keeps the host name, the cgroup namespace roots
  systemd at a cgroup of its own (NAME below the caller's, in name=systemd and cgroup2).
- `share`, a directory of the machine (/run/llmsup-lab-XXXX), is bind-mounted at the same
  path inside: state dirs and config files there are seen alike by the test (a Client on
  the socket) and by the service.
- systemctl runs through `nsenter` into the mount and pid namespaces (PID 1 drops a bus
  peer whose pid it cannot see: "Transport endpoint is not connected").

Teardown: the units installed are stopped (their own clean exit), PID 1 is SIGKILLed (the
kernel kills its whole pid namespace; the mounts go with the namespace), the cgroups are
removed and the share deleted. A killed test session leaves the same to tools/reaper.py
(`cgroup` and `dir` entries). Several labs can run at once; none touches another's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testkit  # noqa: E402
from reaper import remove_cgroup  # noqa: E402

SYSTEMD_CANDIDATES = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
STUB_TARGETS = (
    "sysinit basic sockets timers paths slices local-fs local-fs-pre remote-fs "
    "remote-fs-pre network network-pre network-online nss-lookup swap shutdown umount "
    "final multi-user"
).split()
# The lab's unit search path: the test's units, then the stubs.
UNIT_PATH = "/etc/systemd/system:/run/lab/units"
# systemctl show's integer properties, returned as int by show().
INT_PROPS = {"MainPID", "NRestarts", "ExecMainPID", "ExecMainStatus", "ControlPID"}
DEFAULT_PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result")

# Run as PID 1's parent-to-be inside the new namespaces, then exec'd into systemd.
# $LAB_SHARE: the shared dir, with the lab's units in lab/ (lab_files()); $LAB_CGROUPS:
# "v1", "v1+v2" or "v2only".
INNER = r"""
exec 3<"$LAB_SHARE"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -o remount,bind,ro /sys
case "$LAB_CGROUPS" in
  v2only) mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup ;;
  *) mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
     mkdir /sys/fs/cgroup/systemd
     mount -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup /sys/fs/cgroup/systemd
     case "$LAB_CGROUPS" in *v2*)
       mkdir /sys/fs/cgroup/unified
       mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified ;;
     esac ;;
esac
for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $d; done
for d in /etc/systemd/system /var/lib /var/cache /var/log; do
  if [ -d $d ]; then mount -t tmpfs -o mode=755 tmpfs $d; fi
done
mkdir -p "$LAB_SHARE"
mount --no-canonicalize --bind /proc/self/fd/3 "$LAB_SHARE"
exec 3<&-
touch "$LAB_SHARE/console"
mount --bind "$LAB_SHARE/console" /dev/console
mkdir -p /run/lab/empty /run/systemd/journald.conf.d
cp -R "$LAB_SHARE/lab/units" /run/lab/units
cp "$LAB_SHARE/lab/journald.conf" /run/systemd/journald.conf.d/zz-lab.conf
rm -rf "$LAB_SHARE/lab"
export container=llmsup-lab SYSTEMD_UNIT_PATH="$LAB_UNIT_PATH" \
  SYSTEMD_GENERATOR_PATH=/run/lab/empty SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/lab/empty
unset LAB_SHARE LAB_CGROUPS LAB_UNIT_PATH
exec "$LAB_SYSTEMD" --unit=lab.target --show-status=no --log-target=journal --log-level=info
"""


# journald keeps the journal in the lab's /run, reads no kernel log, forwards nothing.
JOURNALD_CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
Audit=no
"""
JOURNALD_SOCKET = """[Unit]
DefaultDependencies=no
[Socket]
ListenDatagram=/run/systemd/journal/socket
ListenStream=/run/systemd/journal/stdout
PassCredentials=yes
PassSecurity=yes
SocketMode=0666
Service=systemd-journald.service
"""
JOURNALD_SERVICE = """[Unit]
DefaultDependencies=no
Requires=systemd-journald.socket
After=systemd-journald.socket
[Service]
Type=notify
ExecStart={systemd}-journald
Sockets=systemd-journald.socket
StandardOutput=null
RuntimeDirectory=systemd/journal
RuntimeDirectoryPreserve=yes
"""


def lab_files(systemd: str, journal: bool) -> dict[str, str]:
    """The lab's own unit files (units/...) and journald.conf: lab.target, the target PID 1
    starts, the stubs every unit's default dependencies name, and journald if `journal`."""
    files = {
        f"units/{t}.target": f"[Unit]\nDescription={t} (lab stub)\nDefaultDependencies=no\n"
        for t in STUB_TARGETS
    }
    wants = "Wants=systemd-journald.socket systemd-journald.service\n" if journal else ""
    files["units/lab.target"] = f"[Unit]\nDescription=llmsup lab\n{wants}"
    if journal:
        files["units/systemd-journald.socket"] = JOURNALD_SOCKET
        files["units/systemd-journald.service"] = JOURNALD_SERVICE.format(systemd=systemd)
    files["journald.conf"] = JOURNALD_CONF
    return files


class LabError(RuntimeError):
    """systemd could not be booted here (the message says what failed)."""


def systemd_binary() -> str | None:
    return next((p for p in SYSTEMD_CANDIDATES if os.access(p, os.X_OK)), None)


def mounts() -> dict[str, tuple[str, str]]:
    """Mount point -> (file system type, super options) of this mount namespace."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            found[fields[4]] = (fields[sep + 1], fields[sep + 3])
    return found


def cgroup_layout() -> tuple[str, dict[str, str]] | str:
    """("v1+v2" | "v1" | "v2only", {kind: host hierarchy mount}) or why systemd cannot get
    a cgroup tree of its own here."""
    m = mounts()
    if m.get("/sys/fs/cgroup", ("",))[0] == "cgroup2":
        return "v2only", {"v2": "/sys/fs/cgroup"}
    v1 = m.get("/sys/fs/cgroup/systemd")
    if not v1 or v1[0] != "cgroup" or "name=systemd" not in v1[1]:
        return (
            "neither a cgroup2 file system at /sys/fs/cgroup nor a name=systemd cgroup v1 "
            "hierarchy at /sys/fs/cgroup/systemd is mounted: systemd needs one to track units"
        )
    found = {"v1": "/sys/fs/cgroup/systemd"}
    if m.get("/sys/fs/cgroup/unified", ("",))[0] == "cgroup2":
        found["v2"] = "/sys/fs/cgroup/unified"
    return ("v1+v2" if "v2" in found else "v1"), found


def own_cgroup(kind: str) -> str:
    """This process's cgroup path in the name=systemd (v1) or the unified (v2) hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (kind == "v2" and controllers == "") or (
            kind == "v1" and "name=systemd" in controllers.split(",")
        ):
            return path
    return "/"


class SystemdLab:
    """One systemd in namespaces of its own; a context manager (boot on enter, tear down on
    exit). `share` is a directory seen at the same path by the test and the lab."""

    def __init__(self, journal: bool = True, boot_timeout: float = 30):
        self.with_journal = journal
        self.boot_timeout = boot_timeout
        self.name = f"llmsup-lab-{os.getpid()}-{secrets.token_hex(3)}"
        self.share: Path | None = None
        self.cgroups: list[str] = []
        self.proc: subprocess.Popen | None = None  # unshare, parent of PID 1
        self.pid1: int | None = None  # systemd's pid as this process sees it
        self.units: list[str] = []  # installed by install_unit, stopped at teardown

    # -- can it run at all ----------------------------------------------------------------

    @staticmethod
    def why_not() -> str | None:
        """Why systemd cannot be booted here, or None if it can be tried."""
        if sys.platform != "linux":
            return f"systemd runs on Linux only, not {sys.platform}"
        if os.geteuid() != 0:
            return (
                "booting systemd in namespaces of its own needs root (unshare, mount and "
                f"cgroups need CAP_SYS_ADMIN); running as uid {os.geteuid()}"
            )
        if systemd_binary() is None:
            return f"no systemd here: none of {', '.join(SYSTEMD_CANDIDATES)} (package systemd)"
        for tool in ("unshare", "nsenter", "systemctl"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        layout = cgroup_layout()
        if isinstance(layout, str):
            return layout
        for hierarchy in layout[1].values():
            if not os.access(hierarchy, os.W_OK):
                return f"the cgroup hierarchy {hierarchy} is not writable: no cgroup for systemd"
        return None

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> SystemdLab:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        problems = self.close()
        if problems and exc[0] is None:
            raise LabError("teardown: " + "; ".join(problems))

    def boot(self) -> None:
        reason = self.why_not()
        if reason:
            raise LabError(reason)
        layout, hierarchies = cgroup_layout()  # type: ignore[misc]
        systemd = systemd_binary()
        run_dir = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
        self.share = Path(tempfile.mkdtemp(prefix="llmsup-lab-", dir=run_dir))
        testkit.leave_nothing("dir", self.share)  # the reaper undoes the latest first
        for kind, mount in hierarchies.items():
            path = os.path.normpath(f"{mount}/{own_cgroup(kind)}/{self.name}")
            os.mkdir(path)
            self.cgroups.append(path)
            testkit.leave_nothing("cgroup", path)
        for name, text in lab_files(systemd, self.with_journal).items():
            (self.share / "lab" / name).parent.mkdir(parents=True, exist_ok=True)
            (self.share / "lab" / name).write_text(text)
        join = "".join(f'echo $$ > "{p}/cgroup.procs"; ' for p in self.cgroups)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LAB_SHARE": str(self.share),
            "LAB_CGROUPS": layout,
            "LAB_UNIT_PATH": UNIT_PATH,
            "LAB_SYSTEMD": systemd,
        }
        unshare = (
            "unshare --pid --mount --cgroup --uts --ipc --fork --propagation private "
            '--mount-proc sh -ec "$0"'
        )
        with open(self.share / "boot.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-ec", f"{join}exec {unshare}", INNER],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.boot_timeout
        while self.pid1 is None:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                found = children.read_text().split()
            except OSError:
                found = []
            if found:
                self.pid1 = int(found[0])
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"unshare did not start systemd: {self.boot_log()}")
            else:
                time.sleep(0.02)
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                os.stat(f"/proc/{self.pid1}/root/run/systemd/private")
            except OSError:
                time.sleep(0.05)
                continue
            result = self.systemctl("is-system-running", timeout=10)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise LabError(
            f"systemd did not come up within {self.boot_timeout:g} s (state {state!r}, "
            f"exit {self.proc.poll()}): {self.boot_log()}"
        )

    def boot_log(self) -> str:
        """What the namespace set-up and PID 1 wrote before the journal ran."""
        text = ""
        for name in ("boot.log", "console"):
            try:
                text += (self.share / name).read_text(errors="replace")  # type: ignore[operator]
            except (OSError, TypeError):
                pass
        return text.strip()[-2000:] or "(nothing written)"

    def close(self) -> list[str]:
        """Stop the installed units, kill PID 1 and so its namespaces, remove the cgroups
        and the share; what could not be undone (empty if everything went)."""
        problems = []
        if self.pid1 is not None and self.alive():
            if self.units:
                try:
                    self.systemctl("stop", *self.units, timeout=60)
                except subprocess.TimeoutExpired:
                    problems.append(f"systemctl stop {' '.join(self.units)} hung")
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for path in reversed(self.cgroups):
            if not remove_cgroup(path):
                problems.append(f"cgroup {path} could not be removed")
        self.cgroups = []
        if self.share is not None:
            shutil.rmtree(self.share, ignore_errors=True)
            if self.share.exists():
                problems.append(f"{self.share} could not be removed")
        self.pid1 = None
        return problems

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- inside the lab -------------------------------------------------------------------

    def run(
        self, *cmd: str, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run cmd in the lab's namespaces (`timeout` kills it there); rc, stdout, stderr."""
        if self.pid1 is None:
            raise LabError("the lab is not running")
        argv = [
            "nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-i", "-C", "--",
            "timeout", "-k", "5", f"{timeout:g}", *cmd,
        ]  # fmt: skip
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "SYSTEMD_UNIT_PATH": UNIT_PATH,
            "SYSTEMD_PAGER": "cat",
            "SYSTEMD_COLORS": "0",
        }
        return subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout + 15, env=env
        )

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str | int]:
        """`systemctl show -p ...` as a dict (MainPID, NRestarts... as int)."""
        names = props or DEFAULT_PROPS
        result = self.systemctl("show", unit, "-p", ",".join(names), timeout=20)
        if result.returncode != 0:
            raise LabError(f"systemctl show {unit}: {result.stderr.strip()}")
        found: dict[str, str | int] = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition("=")
            found[key] = int(value) if key in INT_PROPS and value.isdigit() else value
        return found

    def journal(self, unit: str | None = None) -> str:
        """The lab's journal (of one unit), if journald runs in it."""
        args = ["-u", unit] if unit else []
        return self.run("journalctl", "--no-pager", "-o", "short-monotonic", *args).stdout

    def path(self, inside: str) -> Path:
        """A path of the lab's mount namespace, reached from outside through PID 1's root."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def install_unit(self, name: str, text: str, dropins: dict[str, str] | None = None) -> None:
        """Write /etc/systemd/system/NAME (and NAME.d/ drop-ins) in the lab; daemon-reload."""
        if "." not in name:
            name += ".service"
        units = self.path("/etc/systemd/system")
        (units / name).write_text(text)
        if dropins:
            (units / f"{name}.d").mkdir(exist_ok=True)
            for file, body in dropins.items():
                (units / f"{name}.d" / file).write_text(body)
        reloaded = self.systemctl("daemon-reload")
        if reloaded.returncode != 0:
            raise LabError(f"daemon-reload: {reloaded.stderr.strip()}")
        if name not in self.units:
            self.units.append(name)

    def host_pid(self, lab_pid: int) -> int | None:
        """The pid, as this process sees it, of the lab's process `lab_pid`."""
        for pid in self.processes():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == lab_pid:
                    return pid
        return None

    def processes(self) -> list[int]:
        """Every process in the lab's cgroups (pids as this process sees them)."""
        pids: set[int] = set()
        for cgroup in self.cgroups:
            for dirpath, _, _ in os.walk(cgroup):
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids.update(int(p) for p in f.read().split())
                except OSError:
                    pass
        return sorted(pids)


def self_check() -> int:
    """Boot a lab, run a Type=notify unit with a watchdog, stop it by the watchdog, tear
    down; print what happened."""
    reason = SystemdLab.why_not()
    if reason:
        print(f"systemd cannot run here: {reason}")
        return 1
    mounts_before = Path("/proc/self/mounts").read_text()
    notify = (
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "a = os.environ['NOTIFY_SOCKET']\n"
        "s.sendto(b'READY=1\\nSTATUS=up', a)\n"
        "while True:\n    s.sendto(b'WATCHDOG=1', a); time.sleep(0.5)\n"
    )
    with SystemdLab() as lab:
        print(f"booted: PID 1 is pid {lab.pid1} here; share {lab.share}")
        script = lab.share / "notify.py"
        script.write_text(notify)
        lab.install_unit(
            "probe",
            "[Service]\nType=notify\nNotifyAccess=main\nWatchdogSec=2\nRestart=on-failure\n"
            f"RestartSec=1\nExecStart={sys.executable} {script}\n",
        )
        started = lab.systemctl("start", "probe")
        print("start:", started.returncode, lab.show("probe"))
        lab.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", "probe")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and lab.show("probe")["NRestarts"] == 0:
            time.sleep(0.2)
        print("after SIGSTOP:", lab.show("probe"))
        print(lab.journal("probe").strip()[-600:])
    left = Path("/proc/self/mounts").read_text() != mounts_before
    print("torn down; mounts changed here:", left)
    return 0


if __name__ == "__main__":
    sys.exit(self_check())
