"""Endpoints and fd pressure (issue 17, items 1 and 5; docs/security.md).

- `--bind ipc://@name` (abstract: no file permissions) needs --allow-remote; an ipc path
  that exists is refused unless it is a stale socket, which is removed;
- tcp peers authenticate with CURVE by default: the Python client and the HTTP gateway
  use the state dir's keys; a plain peer, or one with a key not listed, gets no frame
  through, and what it sends costs the supervisor no memory; `--tcp-auth none` says so;
- a peer that exhausts the supervisor's fds does not kill it: it keeps serving once the
  connections close, and `status` says connections were refused.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import click
import orjson
import psutil
import pytest
import zmq
from testkit import PeakRss, free_port

from llmsup.protocol import constants as C
from llmsup.protocol.client import Client
from llmsup.supervisor.commands.start import check_bind
from llmsup.supervisor.host import curve, endpoints

from .conftest import llmsup, wait_until
from .test_security import as_user

ONE_WORKER = ("--workers", "1", "--cores-per-worker", "1")
FRAME = b"x" * (2 * 1024 * 1024)


def plain_dealer_gets(endpoint: str, frames: list[bytes], wait_ms: int = 2000) -> list | None:
    """Send with a DEALER that has no CURVE keys; the reply, or None if none came."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        return sock.recv_multipart() if sock.poll(wait_ms, zmq.POLLIN) else None
    finally:
        sock.close(0)
        ctx.term()


PING = [C.VERSION, C.PING, b"p1", b"{}"]


# --- endpoints that may not be bound ---------------------------------------------------------


def test_abstract_ipc_needs_allow_remote():
    with pytest.raises(click.BadParameter, match="abstract unix socket"):
        check_bind("ipc://@llmsup-test", allow_remote=False)
    assert check_bind("ipc://@llmsup-test", allow_remote=True) == "ipc://@llmsup-test"
    with pytest.raises(click.BadParameter, match="not a loopback"):
        check_bind("tcp://10.1.2.3:7411", allow_remote=False)


def test_abstract_ipc_refused_by_start(tmp_path):
    result = llmsup("start", "--state-dir", str(tmp_path / "s"), "--bind", "ipc://@llmsup-t")
    assert result.returncode != 0
    assert "abstract unix socket" in result.stderr and "--allow-remote" in result.stderr


def test_existing_ipc_paths(tmp_path):
    """A regular file, a link or a live socket is refused; a stale socket is removed."""
    regular = tmp_path / "file.sock"
    regular.write_bytes(b"precious")
    link = tmp_path / "link.sock"
    link.symlink_to(regular)
    for path, why in ((regular, "not a socket"), (link, "symbolic link")):
        with pytest.raises(endpoints.EndpointError, match=why):
            endpoints.claim(f"ipc://{path}")
        with pytest.raises(click.BadParameter, match=why):
            check_bind(f"ipc://{path}", allow_remote=False)
    assert regular.read_bytes() == b"precious" and link.is_symlink()

    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen(1)
    try:
        with pytest.raises(endpoints.EndpointError, match="live socket"):
            endpoints.claim(f"ipc://{live}")
    finally:
        listener.close()  # closed without unlinking: now it is stale
    assert endpoints.probe(str(live)) == "stale"
    endpoints.claim(f"ipc://{live}")
    assert not live.exists()
    endpoints.claim(f"ipc://{tmp_path / 'missing.sock'}")  # nothing there: fine


def test_a_second_instance_cannot_take_over_an_ipc_endpoint(instance_factory, tmp_path):
    path = f"/tmp/llmsup-t-ep-{os.getpid()}.sock"
    first = instance_factory(*ONE_WORKER, "--bind", f"ipc://{path}")
    try:
        started = first.start()
        assert started.returncode == 0, started.stderr
        second = instance_factory(*ONE_WORKER, "--bind", f"ipc://{path}")
        refused = second.start()
        assert refused.returncode != 0
        assert "live socket" in refused.stderr, refused.stderr
        with first.client(timeout=10) as c:  # the first one still has its endpoint
            assert c.ping()["pong"]
        regular = tmp_path / "regular"
        regular.write_bytes(b"keep")
        third = instance_factory(*ONE_WORKER, "--bind", f"ipc://{regular}")
        assert third.start().returncode != 0
        assert regular.read_bytes() == b"keep"
    finally:
        first.stop()
        Path(path).unlink(missing_ok=True)


# --- CURVE on tcp ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curved():
    """One supervisor on loopback tcp with the default --tcp-auth curve, and an HTTP gateway."""
    from .conftest import Instance

    port, http = free_port(), free_port()
    inst = Instance(*ONE_WORKER, "--bind", f"tcp://127.0.0.1:{port}", "--http", f"127.0.0.1:{http}")
    result = inst.start()
    assert result.returncode == 0, result.stderr
    inst.endpoint = f"tcp://127.0.0.1:{port}"
    inst.http = f"http://127.0.0.1:{http}"
    yield inst
    inst.cleanup()


def test_curve_keys_are_generated_private(curved):
    names = [
        curve.SERVER_SECRET,
        curve.SERVER_PUBLIC,
        curve.CLIENT_SECRET,
        curve.CLIENT_PUBLIC,
        curve.ALLOWED,
    ]
    for name in names:
        st = os.lstat(Path(curved.state_dir, name))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
    allowed = Path(curved.state_dir, curve.ALLOWED).read_bytes().split()
    assert Path(curved.state_dir, curve.CLIENT_PUBLIC).read_bytes().strip() in allowed
    info = orjson.loads(Path(curved.state_dir, "supervisor.json").read_bytes())
    assert info["tcp_auth"] == "curve"


def test_python_client_uses_the_state_dir_keys(curved):
    with Client(state_dir=curved.state_dir, timeout=30) as c:  # endpoint and keys from there
        assert c.ping()["pong"]
        assert c.complete("Hello", max_tokens=2, temperature=0).text() is not None
    with Client(curved.endpoint, state_dir=curved.state_dir, timeout=10) as c:
        assert c.ping()["pong"]
    keys = curve.client_keys(curved.state_dir)
    with Client(curved.endpoint, curve_keys=keys, timeout=10) as c:  # explicit keys
        assert c.ping()["pong"]
    result = curved.cli("generate", "Hi", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr


def test_the_http_gateway_connects_with_curve(curved):
    body = orjson.dumps({"prompt": "Once", "max_tokens": 2, "temperature": 0})
    request = urllib.request.Request(
        f"{curved.http}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = orjson.loads(response.read())
    assert reply["choices"][0]["text"] is not None
    assert curved.status()["gateway"]["state"] == "serving"


def test_unauthenticated_peers_get_nothing_through(curved):
    before = curved.status()
    assert plain_dealer_gets(curved.endpoint, PING) is None  # no CURVE at all
    stranger = zmq.curve_keypair()  # CURVE with a key that is not listed
    keys = {
        **curve.client_keys(curved.state_dir),
        "public_key": stranger[0],
        "secret_key": stranger[1],
    }
    with Client(curved.endpoint, curve_keys=keys, timeout=2) as c:
        with pytest.raises(TimeoutError):
            c.ping()
    after = curved.status()
    assert after["requests"]["accepted"] == before["requests"]["accepted"]
    assert after["requests"]["rejected"] == before["requests"]["rejected"]
    assert after["connections"]["handshake_refused"] > before["connections"]["handshake_refused"]
    # Listing the key lets it in at once (curve-clients is read at every handshake).
    allowed = Path(curved.state_dir, curve.ALLOWED)
    allowed.write_bytes(allowed.read_bytes() + stranger[0] + b"\n")
    with Client(curved.endpoint, curve_keys=keys, timeout=10) as c:
        assert c.ping()["pong"]


def test_large_messages_from_unauthenticated_peers_cost_no_memory(curved):
    """A plain DEALER's multipart messages, and a raw ZMTP peer's 100 unfinished 2 MiB
    frames, never reach the supervisor: its RSS does not grow (figures: SPEC.md 10)."""
    pid = curved.pid
    base = psutil.Process(pid).memory_info().rss
    peak = PeakRss(psutil.Process(pid))
    peak.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(curved.endpoint)
    for i in range(20):  # no handshake ever completes: libzmq has no pipe to queue them on
        try:
            sock.send_multipart([C.VERSION, C.PING, b"m%d" % i, *([FRAME] * 5)], zmq.NOBLOCK)
        except zmq.Again:
            pass
    assert not sock.poll(2000, zmq.POLLIN)
    sock.close(0)
    ctx.term()
    raw = socket.create_connection(("127.0.0.1", int(curved.endpoint.rsplit(":", 1)[1])))
    sent = 0
    try:  # ZMTP 3.0 greeting (NULL), READY, then frames with MORE set and no last frame
        raw.sendall(
            b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
        )
        ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        raw.sendall(b"\x04" + bytes([len(ready)]) + ready)
        raw.settimeout(10)
        for _ in range(100):
            raw.sendall(b"\x03" + struct.pack(">Q", len(FRAME)) + FRAME)
            sent += 1
    except OSError:
        pass  # the supervisor dropped the connection: the point
    finally:
        raw.close()
    time.sleep(0.5)
    grew = (peak.stop() - base) / (1 << 20)
    assert grew < 16, f"the supervisor's RSS grew {grew:.1f} MiB ({sent} raw frames sent)"
    assert curved.status()["requests"]["rejected"] == 0  # nothing was even read


def test_tcp_auth_none_keeps_the_old_behaviour_and_says_so(instance_factory):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    inst = instance_factory(*ONE_WORKER, "--bind", endpoint, "--tcp-auth", "none")
    result = inst.start()
    assert result.returncode == 0, result.stderr
    assert "--tcp-auth none" in result.stderr and "not authenticated" in result.stderr
    assert "NOT authenticated (--tcp-auth none)" in inst.log()
    reply = plain_dealer_gets(endpoint, PING, wait_ms=10000)
    assert reply is not None and reply[1] == C.DONE
    with inst.client(timeout=10) as c:  # the state dir's client knows: no CURVE
        assert c.ping()["pong"]
    assert not Path(inst.state_dir, curve.SERVER_SECRET).exists()


# --- fd pressure -----------------------------------------------------------------------------


def test_fd_exhaustion_is_survived_and_reported(instance_factory):
    """A peer opens connections until the supervisor has no fd left (its limit lowered to
    128 for the test): the watchdog samples meanwhile fail with EMFILE and are skipped; the
    supervisor lives, serves again once the connections close, and status says so."""
    if os.geteuid() != 0:
        pytest.skip("lowering a running process's limit with prlimit needs root here")
    port = free_port()
    inst = instance_factory(*ONE_WORKER, "--bind", f"tcp://127.0.0.1:{port}")
    result = inst.start()
    assert result.returncode == 0, result.stderr
    pid = inst.pid
    assert (
        psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        == psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[1]
    ), "the soft limit was not raised to the hard one"
    early = inst.client(timeout=10)  # connected before: it can still ask
    assert early.ping()["pong"]
    subprocess.run(["prlimit", "--pid", str(pid), "--nofile=128:128"], check=True)
    conns = []
    try:
        for _ in range(300):  # past the limit they wait in the listen backlog, until it is full
            try:
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except TimeoutError:
                break
        time.sleep(3.5)  # three watchdog rounds, each failing to read /proc with EMFILE
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        during = early.status()["connections"]
        assert during["refusing"] and during["fd_limit"] == 128, during
    finally:
        for s in conns:
            s.close()
        early.close()

    def serving():
        try:
            with inst.client(timeout=3) as c:
                return c.status()
        except TimeoutError:
            return None

    status = wait_until(serving, timeout=60, interval=0.5)
    assert status is not None, "the supervisor did not answer once the connections closed"
    conn = status["connections"]
    assert conn["fd_exhausted_checks"] >= 2 and conn["fd_limit"] == 128, conn
    with inst.client(timeout=60) as c:
        assert c.complete("Hi", max_tokens=2, temperature=0).text() is not None
    assert "out of file descriptors (limit 128)" in inst.log()
    assert wait_until(lambda: not inst.status()["connections"]["refusing"], timeout=5)
    assert psutil.Process(pid).is_running()


@pytest.mark.parametrize("language", ["c", "node"])
def test_c_and_node_clients_use_curve_keys(curved, language):
    """The state dir's keys by default for a tcp endpoint; explicit keys as options; a
    client without keys gets nothing (its receive timeout)."""
    from .test_clients import c_client, node_client

    cli = c_client() if language == "c" else node_client()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cli, "-e", curved.endpoint, "-n", "2", "-t", "0", *args, "Hi"],
            capture_output=True,
            timeout=60,
        )

    by_state_dir = run("-s", curved.state_dir)
    assert by_state_dir.returncode == 0, by_state_dir.stderr
    keys = curve.client_keys(curved.state_dir)
    # OPTION=VALUE: a Z85 key may begin with '-', which a separate argument would make
    # look like an option (Node's parseArgs refuses it as ambiguous).
    explicit = run(
        "-s",
        "/nonexistent",
        f"--server-key={keys['server_key'].decode()}",
        f"--public-key={keys['public_key'].decode()}",
        f"--secret-key={keys['secret_key'].decode()}",
    )
    assert explicit.returncode == 0, explicit.stderr
    try:  # no keys: no frame comes (the node client may linger after saying so)
        none = subprocess.run(
            [*cli, "-e", curved.endpoint, "-s", "/nonexistent", "-T", "1500", "-a", "1", "Hi"],
            capture_output=True,
            timeout=15,
        )
        assert none.returncode != 0
        stderr = none.stderr
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr or b""
    assert b"no frame for request" in stderr, stderr


def test_another_user_can_neither_read_the_keys_nor_get_through(curved, other):
    """As a second user: the key files are out of reach, and a connection without them
    (plain, or with a CURVE key of their own) gets no reply."""
    key_file = str(Path(curved.state_dir, curve.CLIENT_SECRET))
    endpoint = curved.endpoint

    def attempt() -> dict:
        try:
            open(key_file, "rb").read()
            readable = True
        except PermissionError:
            readable = False
        plain = plain_dealer_gets(endpoint, PING, wait_ms=1500)
        public, secret = zmq.curve_keypair()
        server = b"0" * 40  # they cannot read curve-server.pub either
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (server, public, secret)
        sock.connect(endpoint)
        try:
            sock.send_multipart(PING, zmq.NOBLOCK)
        except zmq.Again:
            pass
        got = sock.poll(1500, zmq.POLLIN)
        sock.close(0)
        ctx.term()
        return {"readable": readable, "plain": plain is not None, "curve": bool(got)}

    assert as_user(other, attempt) == {"readable": False, "plain": False, "curve": False}


def test_a_link_planted_as_a_key_file_is_refused(instance_factory):
    inst = instance_factory(*ONE_WORKER, "--bind", f"tcp://127.0.0.1:{free_port()}")
    Path(inst.state_dir).chmod(0o700)
    target = Path(inst.state_dir, "elsewhere")
    target.write_bytes(b"x" * 40)
    Path(inst.state_dir, curve.SERVER_SECRET).symlink_to(target)
    result = inst.start()
    assert result.returncode != 0
    assert "is a symbolic link" in result.stderr, result.stderr
    assert target.read_bytes() == b"x" * 40
