"""CURVE authentication of tcp peers (ZeroMQ's CurveZMQ, checked by a ZAP handler thread).

Keys live in the state directory, which only its user can read (0700, files 0600, written
with StateDir.write_file: exclusively created, never through a link). `start` generates
them the first time (zmq.curve_keypair(), Z85 text):

  curve-server.key / curve-server.pub   the supervisor's keypair
  curve-client.key / curve-client.pub   a keypair for the local user's clients
  curve-clients                         the client public keys allowed, one per line
                                        (first: curve-client.pub; add lines for others)

A tcp frontend is a CURVE server; pyzmq's ThreadAuthenticator answers the ZAP requests
on its own thread and lets a client in only if its public key is listed in
curve-clients (re-read at every handshake: a line added is taken at once, no restart).
A peer that is refused, or speaks no CURVE at all, never gets a frame to the supervisor:
libzmq drops its connection during the handshake, before any message is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from llmsup.protocol.statedir import (
    ALLOWED,
    CLIENT_PUBLIC,
    CLIENT_SECRET,
    SERVER_PUBLIC,
    SERVER_SECRET,
    CurveError,
    StateDirError,
)
from llmsup.supervisor.host.statedir import StateDir

log = logging.getLogger("llmsup.supervisor")

DOMAIN = "llmsup"


def ensure_keys(state: StateDir) -> None:
    """Generate the server and local client keypairs once; keep existing ones."""
    if state.read_curve_key(SERVER_SECRET) is None or state.read_curve_key(SERVER_PUBLIC) is None:
        public, secret = zmq.curve_keypair()
        state.write_file(state.path / SERVER_SECRET, secret + b"\n")
        state.write_file(state.path / SERVER_PUBLIC, public + b"\n")
        log.info("generated the CURVE server keypair in %s", state.path)
    if state.read_curve_key(CLIENT_SECRET) is None or state.read_curve_key(CLIENT_PUBLIC) is None:
        public, secret = zmq.curve_keypair()
        state.write_file(state.path / CLIENT_SECRET, secret + b"\n")
        state.write_file(state.path / CLIENT_PUBLIC, public + b"\n")
        allowed = state.read_file(state.path / ALLOWED) or b""
        state.write_file(state.path / ALLOWED, allowed + public + b"\n")
        log.info("generated a CURVE client keypair in %s", state.path)
    elif state.read_file(state.path / ALLOWED) is None:
        state.write_file(state.path / ALLOWED, state.read_curve_key(CLIENT_PUBLIC) + b"\n")


def client_keys(state_dir: str | Path) -> dict[str, bytes] | None:
    """{server_key, public_key, secret_key} for a client of this state dir, or None when
    it holds no keys (protocol/statedir.py: what every client reads)."""
    return StateDir(Path(state_dir)).client_curve_keys()


def apply_client(sock: zmq.Socket, keys: dict[str, bytes]) -> None:
    """Make `sock` a CURVE client with these keys (before it connects)."""
    sock.curve_serverkey = keys["server_key"]
    sock.curve_publickey = keys["public_key"]
    sock.curve_secretkey = keys["secret_key"]


class AllowedKeys:
    """pyzmq's credentials provider: is this Z85 public key listed in curve-clients?"""

    def __init__(self, state: StateDir):
        self.state = state
        self.keys = self.load() or set()
        self.refused = 0

    def load(self) -> set[bytes] | None:
        try:
            data = self.state.read_file(self.state.path / ALLOWED) or b""
        except Exception:  # unreadable just now (EMFILE, a bad file): keep the last list
            return None
        return {line.strip() for line in data.splitlines() if len(line.strip()) == 40}

    def callback(self, domain: str, key: bytes) -> bool:
        keys = self.load()
        if keys is not None:
            self.keys = keys
        allowed = key in self.keys
        if not allowed:
            self.refused += 1
        return allowed


class CurveServer:
    """The ZAP handler of one supervisor's context; `stop()` before the context ends."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, state: StateDir):
        try:
            ensure_keys(state)
            server_secret = state.read_curve_key(SERVER_SECRET)
            server_public = state.read_curve_key(SERVER_PUBLIC)
        except (StateDirError, OSError) as exc:  # a planted link, a full disk: say which
            raise CurveError(f"the CURVE keys in {state.path}: {exc}") from None
        self.allowed = AllowedKeys(state)
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("llmsup.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(DOMAIN, credentials_provider=self.allowed)
        sock.zap_domain = DOMAIN.encode()
        sock.curve_server = True
        sock.curve_secretkey = server_secret
        sock.curve_publickey = server_public

    @property
    def refused(self) -> int:
        return self.allowed.refused

    def stop(self) -> None:
        self.auth.stop()


def serve(ctx: zmq.Context, sock: zmq.Socket, state: StateDir, endpoint: str, mode: str):
    """Set up `sock` (not yet bound) for `endpoint`: a CurveServer for tcp unless `mode` is
    "none" (said in the log); None for ipc, which file permissions protect."""
    if not endpoint.startswith("tcp://"):
        return None
    if mode == "none":
        log.warning(
            "tcp peers are NOT authenticated (--tcp-auth none): every local user, and "
            "any host that reaches %s, can use this server",
            endpoint,
        )
        return None
    return CurveServer(ctx, sock, state)
