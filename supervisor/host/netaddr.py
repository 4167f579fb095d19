"""Listening addresses: the one test of "loopback" that `--bind`, `--http` and the HTTP
gateway's own `--listen` all apply, so they cannot disagree about what is local; and the
node name a fleet member puts in its responses' headers."""

from __future__ import annotations

import ipaddress
import re


def split_host_port(text: str) -> tuple[str, int] | None:
    """HOST:PORT ([::1]:PORT for IPv6) as (host, port); None if it is not one."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it could resolve anywhere


NODE_NAME_MAX = 253  # a DNS name's length: host and pod names fit


def node_name_problem(name: str) -> str | None:
    """Why `name` cannot be a node's name in an HTTP header, or None if it can."""
    if not name or len(name) > NODE_NAME_MAX or any(not 33 <= ord(c) <= 126 for c in name):
        return f"must be 1 to {NODE_NAME_MAX} printable ASCII characters without spaces"
    return None


CORS_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/,*]+", re.IGNORECASE)


def cors_origin_problem(origin: str) -> str | None:
    """Why `origin` cannot be a --cors-origin (the gateway's CORS), or None."""
    if origin == "*" or CORS_ORIGIN.fullmatch(origin):
        return None
    return "must be * or an origin SCHEME://HOST[:PORT] without a path, e.g. http://localhost:3000"
