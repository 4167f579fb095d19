"""`llmsup fleet haproxy-config NODE...`: an HAProxy configuration for llmsup nodes.

A template the user runs with their own HAProxy, not a router of ours. What it makes HAProxy
do, and why (each measured against llmsup nodes in network namespaces: tests/test_fleet.py):
- Keep a conversation on one node, where its prompt prefix is cached: a consistent hash of the
  request's key (OpenAI's `prompt_cache_key`, else `user`, else the body's first bytes), with
  bounded load (`hash-balance-factor`) so one hot key cannot pile onto one node.
- Spill what a node refuses: llmsup answers busy and stopping with 503 + Retry-After, and
  HAProxy retries those (and connection failures) on another node. A worker failure is 502,
  which it does not retry: the request may have run. So nodes of a fleet get a small
  `--queue-size` (0: busy as soon as every slot is), and HAProxy's own per-node limit only
  bounds what a node is sent: a queue at a node, or in HAProxy, would hold a request there
  while another node has free slots (2 nodes against one, `perf/fleet.py --node-queue N`:
  1.56-1.72x tokens/s with llmsup's default queue of 32, 1.86x with 2, 1.97-2.04x with 0).
- Notice a dead node fast: /health every second, down after two failures, and the sessions
  of a node marked down are cut instead of waiting for the server timeout.
"""

from __future__ import annotations

import re

import click

from llmsup.supervisor.host.netaddr import split_host_port

CHECK_INTERVAL_MS = 1000  # two of these are what a node's /health stays 503 before it stops
KEY_BYTES = 256  # the body's first bytes, the key of a request with no other
# The routing key is read from the buffered body; a larger body is routed by its first bytes
# (its JSON cannot be parsed whole), and is not retried on another node (not buffered).
BUFFER_BYTES = 65536
# Bounded load: a node may hold fewer than (all requests in flight + 1) x factor / nodes. With
# few in flight, one node's idle moment (its clients between turns) halves that average: at
# 150 a node of two spilled once it held 3 alone, and 3 of 18 later turns of 6 conversations
# moved to the other node and read their prompt again (tests/test_fleet.py). At 175 a node of
# two holds up to 7 alone (a node's 8 slots, less one) before a hot key spills; at 200 it
# never would.
BALANCE_FACTOR = 175
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

TEMPLATE = """\
# HAProxy in front of {count} llmsup node(s). Written by `llmsup fleet haproxy-config`;
# a template: edit it freely. Check it with `haproxy -c -f FILE`, run it with `haproxy -f FILE`.
global
    maxconn {global_maxconn}
    # The routing key is read from the request body, which has to fit in one buffer.
    tune.bufsize {buffer_bytes}

defaults
    mode http
    timeout connect 1s
    timeout client 10m
    timeout server 10m
    timeout http-request 30s
    # A request waiting for a node's connection slot longer than this gets 503.
    timeout queue 3s
    timeout check 1s
    # Whole request bodies: the key is in them, and a buffered request can be retried.
    option http-buffer-request
    # Busy (503) and unreachable nodes are tried again elsewhere; worker failures (502) not.
    # Each retry goes to another node (redispatch): more retries than other nodes would only
    # ask a node that just said busy again, and delay the client's own 503.
    retries {retries}
    option redispatch 1
    retry-on conn-failure empty-response 503

frontend llmsup
    bind {bind}
    http-request set-var(txn.llmsup_key) req.body,json_query('$.prompt_cache_key')
    http-request set-var(txn.llmsup_key) req.body,json_query('$.user') \
unless {{ var(txn.llmsup_key) -m found }}
    http-request set-var(txn.llmsup_key) req.body,bytes(0,{key_bytes}) \
unless {{ var(txn.llmsup_key) -m found }}
    # HAProxy's own 503 (queue full or timed out, no node up) says when to retry, as llmsup's do.
    http-after-response set-header Retry-After 1 \
if {{ status 503 }} !{{ res.hdr(Retry-After) -m found }}
    default_backend llmsup

backend llmsup
    balance hash var(txn.llmsup_key)
    hash-type consistent
    # No node above {balance_factor}% of the average load: a hot key spills to the others.
    hash-balance-factor {balance_factor}
    option httpchk GET /health
    http-check expect status 200
    # Equal weights, but large ones: a weight is 16 points on the hash ring, so at weight 1
    # each node owns a few wide arcs and their shares of the keys can be far apart (64 keys
    # came out 25 and 39). At 100 the arcs are fine; a given set of keys still splits by
    # chance (36/28 and 32/32 in two runs of perf/fleet.py).
    default-server check inter {inter_ms}ms fall 2 rise 2 maxconn {maxconn} \
maxqueue {maxqueue} weight 100 on-marked-down shutdown-sessions
{servers}
"""


def parse_node(text: str, index: int) -> tuple[str, str, int]:
    """[NAME=]HOST:PORT as (name, host, port); a click error naming the argument if not."""
    name, sep, address = text.rpartition("=")
    if not sep:
        name = f"node{index + 1}"
    elif not NAME.fullmatch(name):
        raise click.BadParameter(
            f"{text!r}: a node's name is 1 to 63 letters, digits, '.', '_' or '-'",
            param_hint="NODE",
        )
    host_port = split_host_port(address)
    if host_port is None or host_port[1] == 0:
        raise click.BadParameter(
            f"{text!r} must be [NAME=]HOST:PORT, e.g. node1=10.0.0.5:8000", param_hint="NODE"
        )
    return name, *host_port


def render(
    nodes: list[str], bind: str, maxconn: int, maxqueue: int, balance_factor: int, inter_ms: int
) -> str:
    """The configuration's text; click.BadParameter names what is wrong."""
    if not nodes:
        raise click.BadParameter("give at least one node", param_hint="NODE")
    parsed = [parse_node(text, i) for i, text in enumerate(nodes)]
    names = [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"node names must differ: {names}", param_hint="NODE")
    if split_host_port(bind) is None:
        raise click.BadParameter("must be HOST:PORT, e.g. 0.0.0.0:8080", param_hint="--bind")
    servers = "\n".join(
        f"    server {name} {f'[{host}]' if ':' in host else host}:{port}"
        for name, host, port in parsed
    )
    return TEMPLATE.format(
        count=len(parsed),
        retries=max(1, min(2, len(parsed) - 1)),
        global_maxconn=max(4096, 2 * maxconn * len(parsed)),
        buffer_bytes=BUFFER_BYTES,
        bind=bind,
        key_bytes=KEY_BYTES,
        balance_factor=balance_factor,
        inter_ms=inter_ms,
        maxconn=maxconn,
        maxqueue=maxqueue,
        servers=servers,
    )


@click.command("haproxy-config")
@click.argument("nodes", nargs=-1, metavar="NODE...")
@click.option(
    "--bind", default="127.0.0.1:8080", show_default=True, help="Where HAProxy listens (HOST:PORT)."
)
@click.option(
    "--maxconn",
    type=click.IntRange(1, 100000),
    default=40,
    show_default=True,
    help="Requests HAProxy sends one node at once at most: more than the node's slots plus "
    "its --queue-size, so that the node answers busy itself and HAProxy tries another.",
)
@click.option(
    "--maxqueue",
    type=click.IntRange(1, 100000),
    default=8,
    show_default=True,
    help="Requests that wait in HAProxy for a full node (up to 3 s); beyond: 503.",
)
@click.option(
    "--balance-factor",
    type=click.IntRange(101, 1000),
    default=BALANCE_FACTOR,
    show_default=True,
    help="No node above this percentage of the average load (HAProxy's hash-balance-factor).",
)
@click.option(
    "--check-interval-ms",
    "inter_ms",
    type=click.IntRange(100, 60000),
    default=CHECK_INTERVAL_MS,
    show_default=True,
    help="How often HAProxy asks each node's /health; two failures mark it down. Keep "
    "each node's --drain-health-s at two of these.",
)
@click.option(
    "-o",
    "--output",
    type=click.File("w"),
    default="-",
    help="Write the configuration here [default: standard output].",
)
def haproxy_config(nodes, bind, maxconn, maxqueue, balance_factor, inter_ms, output):
    """An HAProxy configuration for llmsup nodes, each NODE an HTTP gateway as
    [NAME=]HOST:PORT (`llmsup start --http HOST:PORT --allow-remote --api-key ...`)."""
    output.write(render(list(nodes), bind, maxconn, maxqueue, balance_factor, inter_ms))
