"""The client endpoint `--bind` names: which are allowed, and taking an ipc path safely.

- `ipc://@NAME` is an abstract unix socket: it has no file, so no permissions; any local
  user can connect. It needs --allow-remote, like a non-loopback tcp address.
- `ipc://PATH` must not exist, or be a stale socket: one that nobody answers on (a
  connect() is refused: ECONNREFUSED), left by a supervisor that was killed; that one is
  removed. A regular file, a link, a directory or a live socket (another instance's) is
  refused: binding would replace it (ZeroMQ unlinks the path first), silently moving
  another instance's clients over.
- `tcp://HOST:PORT` on a loopback host; elsewhere with --allow-remote.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from llmsup.supervisor.host.netaddr import is_loopback


class EndpointError(Exception):
    pass


def check(endpoint: str, allow_remote: bool) -> str:
    """The endpoint if it may be bound (EndpointError says why not). Does not touch PATH."""
    if endpoint.startswith("ipc://"):
        path = endpoint[6:]
        if not path:
            raise EndpointError("ipc:// needs a path, e.g. ipc:///run/user/1000/llmsup.sock")
        if path.startswith("@") and not allow_remote:
            raise EndpointError(
                f"{endpoint} is an abstract unix socket: it has no file permissions, so every "
                "local user could connect; use an ipc://PATH in a private directory, or pass "
                "--allow-remote to accept that"
            )
        return endpoint
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise EndpointError("must be ipc://PATH or tcp://HOST:PORT, e.g. tcp://127.0.0.1:7411")
    host = endpoint[6:].rsplit(":", 1)[0].strip("[]")
    if not is_loopback(host) and not allow_remote:
        raise EndpointError(
            f"{host} is not a loopback address; binding to other hosts needs --allow-remote "
            "(tcp peers authenticate with CURVE unless --tcp-auth none)"
        )
    return endpoint


def ipc_path(endpoint: str) -> str | None:
    """The file an ipc endpoint binds, None for tcp or an abstract socket."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[6:]
    return None


def probe(path: str) -> str | None:
    """What is at `path`: None (nothing), "stale" (a socket nobody answers on), or a
    sentence saying why it must not be replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        kind = (
            "a symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "not a socket"
        )
        return (
            f"{path} exists and is {kind}; llmsup will not replace it: remove it or bind elsewhere"
        )
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return "stale"
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # a live listener whose backlog is full
            return f"{path} is a live socket (its backlog is full): another process serves it"
        return (
            f"{path} is a socket llmsup cannot probe ({exc.strerror}); remove it or bind elsewhere"
        )
    finally:
        s.close()
    return (
        f"{path} is a live socket: another process (another llmsup?) answers on it; "
        "stop that one or bind elsewhere"
    )


def claim(endpoint: str) -> None:
    """Before binding an ipc path: remove a stale socket there, refuse anything else."""
    path = ipc_path(endpoint)
    if path is None:
        return
    found = probe(path)
    if found is None:
        return
    if found != "stale":
        raise EndpointError(found)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise EndpointError(
            f"{path} is a stale socket that cannot be removed ({exc.strerror}); remove it or "
            "bind elsewhere"
        ) from None
