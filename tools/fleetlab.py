"""A fleet on one machine, for tests/test_fleet.py and perf/fleet.py: llmsup nodes in network
namespaces of their own (each a "machine" reached over a veth pair, on a core of its own)
and HAProxy in front of them, configured by `llmsup fleet haproxy-config`.

Needs root, iproute2 and haproxy (tools/setup-fleet.sh installs it); `unavailable()` says
why not where they are missing. Everything made is removed by `Lab.close()`: namespaces (and
with them the veth pairs), HAProxy, and the nodes' processes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from testkit import free_port, leave_nothing, stop_process  # beside this file: tools/

HTTP_PORT = 8000  # each node's gateway, on its namespace's address


def unavailable() -> str | None:
    """Why a lab cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "haproxy", "taskset"):
        if not shutil.which(tool):
            hint = " (bash tools/setup-fleet.sh installs it)" if tool == "haproxy" else ""
            return f"no {tool} on PATH{hint}"
    probe = f"llprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def free_subnet(count: int) -> ipaddress.IPv4Network:
    """A /24 of 10.231-10.239.x.0 that no route of this machine touches: one /30 per host."""
    used = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    nets = [
        ipaddress.ip_network(w, strict=False)
        for w in used.split()
        if "/" in w[:19] and w[0].isdigit()
    ]
    start = os.getpid() % 2000
    for i in range(2000):
        n = (start + i) % 2000
        net = ipaddress.ip_network(f"10.{231 + n // 250}.{n % 250}.0/24")
        if not any(net.overlaps(other) for other in nets):
            return net
    raise RuntimeError("no free 10.231-239 /24 for the lab")


class Host:
    """A network namespace joined to this one by a veth pair: a machine of the fleet."""

    def __init__(self, tag: str, index: int, subnet: ipaddress.IPv4Network, core: int):
        self.name = chr(ord("a") + index)
        self.ns = f"llmsup-{tag}-{self.name}"
        self.veth = f"ll{tag[-8:]}{self.name}"[:15]  # this side's end; Linux allows 15 bytes
        base = subnet.network_address + 4 * index
        self.outside, self.address = str(base + 1), str(base + 2)
        self.core = core

    def create(self) -> None:
        inside = self.veth[:-1] + self.name.upper()
        for cmd in (
            ["ip", "netns", "add", self.ns],
            ["ip", "-n", self.ns, "link", "set", "lo", "up"],
            ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", inside],
            ["ip", "link", "set", inside, "netns", self.ns],
            ["ip", "addr", "add", f"{self.outside}/30", "dev", self.veth],
            ["ip", "link", "set", self.veth, "up"],
            ["ip", "-n", self.ns, "addr", "add", f"{self.address}/30", "dev", inside],
            ["ip", "-n", self.ns, "link", "set", inside, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
            if cmd[:3] == ["ip", "netns", "add"]:
                leave_nothing("netns", self.ns)

    def link(self, up: bool) -> None:
        """Cut or mend the wire: packets vanish, nothing is refused (no RST)."""
        state = "up" if up else "down"
        subprocess.run(["ip", "link", "set", self.veth, state], check=True, capture_output=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.veth], capture_output=True)

    def prefix(self) -> list[str]:
        """Run a command on this machine: in its namespace, on its core."""
        return ["taskset", "-c", str(self.core), "ip", "netns", "exec", self.ns]

    @property
    def url(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}"


class Node:
    """One `llmsup start --http` on a Host, in a state dir of its own."""

    def __init__(self, host: Host, api_key: str, start_args: tuple[str, ...]):
        self.host = host
        self.api_key = api_key
        self.state_dir = tempfile.mkdtemp(prefix=f"llmsup-f{host.name}", dir="/tmp")
        leave_nothing("state-dir", self.state_dir)
        self.start_args = start_args

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", self.state_dir]

    def start(self) -> None:
        argv = self.command(
            "start",
            "--http",
            f"{self.host.address}:{HTTP_PORT}",
            "--allow-remote",
            "--api-key",
            self.api_key,
            "--node-name",
            self.host.name,
            "--workers",
            "1",
            "--cores-per-worker",
            "1",
            *self.start_args,
        )
        done = subprocess.run(
            self.host.prefix() + argv, capture_output=True, text=True, timeout=180
        )
        if done.returncode != 0:
            raise RuntimeError(f"node {self.host.name} did not start: {done.stderr.strip()}")

    def stop(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command("stop", *args), capture_output=True, text=True, timeout=120
        )

    def processes(self) -> list[psutil.Process]:
        try:
            pid = int(Path(self.state_dir, "supervisor.pid").read_text())
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except (OSError, ValueError, psutil.Error):
            return []

    def kill(self) -> int:
        """SIGKILL every process of the node at once, as a machine's power cut would."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def close(self) -> None:
        # stop also sweeps what a killed node left: its shared-memory segments, its sockets.
        self.stop("--timeout", "5")
        self.kill()
        shutil.rmtree(self.state_dir, ignore_errors=True)


class Balancer:
    """HAProxy in this namespace, its configuration written by `llmsup fleet haproxy-config`."""

    def __init__(self, nodes: list[Node], *config_args: str):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="llmsup-haproxy")
        leave_nothing("dir", self.dir)
        self.config = Path(self.dir, "haproxy.cfg")
        servers = [f"{n.host.name}={n.host.address}:{HTTP_PORT}" for n in nodes]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llmsup.supervisor",
                "fleet",
                "haproxy-config",
                *servers,
                "--bind",
                f"127.0.0.1:{self.port}",
                "-o",
                str(self.config),
                *config_args,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        # A stats socket, for the lab only: it tells when HAProxy sees a node up again.
        text = self.config.read_text().replace(
            "global\n", f"global\n    stats socket {self.dir}/stats.sock mode 600 level admin\n", 1
        )
        self.config.write_text(text)
        self.log = open(Path(self.dir, "haproxy.log"), "wb")  # noqa: SIM115  (kept open for HAProxy)
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        leave_nothing("pid", self.proc.pid, f"{psutil.Process(self.proc.pid).create_time():.3f}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def servers(self) -> dict[str, str]:
        """Node name -> HAProxy's view of it ("UP", "DOWN", ...)."""
        out = b""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(f"{self.dir}/stats.sock")
                s.sendall(b"show stat\n")
                while chunk := s.recv(65536):
                    out += chunk
        except OSError:
            return {}
        rows = [line.split(",") for line in out.decode().splitlines() if line.startswith("llmsup,")]
        return {r[1]: r[17].split(" ")[0] for r in rows if r[1] not in ("FRONTEND", "BACKEND")}

    def wait_up(self, names: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.servers()
            if all(states.get(name) == "UP" for name in names):
                return
            time.sleep(0.1)
        raise TimeoutError(f"HAProxy does not see {names} up: {self.servers()}")

    def close(self) -> None:
        stop_process(self.proc, grace_s=5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Lab:
    """`count` hosts, each with an llmsup node on a core of its own, behind HAProxy."""

    def __init__(
        self,
        count: int,
        api_key: str,
        start_args: tuple[str, ...] = (),
        balancer_args: tuple[str, ...] = (),
    ):
        self.tag = f"{os.getpid() % 100000}"
        cores = sorted(os.sched_getaffinity(0))
        subnet = free_subnet(count)
        self.hosts = [Host(self.tag, i, subnet, cores[i % len(cores)]) for i in range(count)]
        self.nodes = [Node(h, api_key, start_args) for h in self.hosts]
        self.balancer: Balancer | None = None
        self.balancer_args = balancer_args

    def open(self) -> Lab:
        try:
            for host in self.hosts:
                host.create()
            for node in self.nodes:
                node.start()
            self.balancer = Balancer(self.nodes, *self.balancer_args)
            self.balancer.wait_up([h.name for h in self.hosts])
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.balancer is not None:
            self.balancer.close()
        for node in self.nodes:
            node.close()
        for host in self.hosts:
            host.delete()
