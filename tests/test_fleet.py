"""A fleet behind a real balancer (issue 18, items 3 and 5): two llmsup nodes, each in a
network namespace of its own on a core of its own, behind HAProxy configured by `llmsup fleet
haproxy-config` (tools/fleetlab.py). Conversations stay on their node and hit its prefix
cache; bursts get 200 or a quick 503 with Retry-After from both nodes; a node that dies, loses
its link or is stopped loses nothing that a client could not retry."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fleetlab  # tools/, on sys.path from conftest
import httpx
import orjson
import pytest

from llmsup.supervisor.host.statedir import StateDir
from tests.conftest import SEGMENTS, STATE_DIRS

pytestmark = pytest.mark.timeout(180)
KEY = "fleet-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "gemma3-270m"
# A node, as docs/fleet.md runs one: 8 slots and no queue, so a ninth request
# at once gets llmsup's 503, which HAProxy tries on the other node.
NODE_ARGS = (
    "--model",
    MODEL,
    "--cache-mb",
    "64",
    "--slots-per-worker",
    "8",
    "--queue-size",
    "0",
    "--drain-timeout",
    "20",
)
BALANCER_ARGS = ()  # `llmsup fleet haproxy-config`'s defaults
SYSTEM = (
    "You are a careful assistant for a small museum of river boats. Answer visitors' "
    "questions about the boats, their engines, the people who built them and the rivers they "
    "worked on. Keep answers short, friendly and exact; say so when you do not know. "
) * 3


def haproxy_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmsup.supervisor", "fleet", "haproxy-config", *args],
        capture_output=True,
        text=True,
    )


# --- the command ------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("haproxy"), reason="no haproxy (tools/setup-fleet.sh)")
def test_the_written_configuration_is_valid_haproxy(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    made = haproxy_config(
        "a=10.0.0.5:8000",
        "10.0.0.6:8000",
        "[fd00::7]:8000",
        "--bind",
        "0.0.0.0:8080",
        "-o",
        str(cfg),
    )
    assert made.returncode == 0, made.stderr
    checked = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = cfg.read_text()
    expected = [
        "server a 10.0.0.5:8000",
        "server node2 10.0.0.6:8000",
        "server node3 [fd00::7]:8000",
        "hash-type consistent",
        "hash-balance-factor 175",
        "option httpchk GET /health",
        "retry-on conn-failure empty-response 503",
    ]
    assert [line for line in expected if line not in text] == []


@pytest.mark.parametrize(
    "args, named",
    [
        ((), "give at least one node"),
        (("10.0.0.5",), "[NAME=]HOST:PORT"),
        (("a=10.0.0.5:8000", "a=10.0.0.6:8000"), "node names must differ"),
        (("bad name=10.0.0.5:8000",), "a node's name"),
        (("10.0.0.5:8000", "--maxconn", "0"), "--maxconn"),
        (("10.0.0.5:8000", "--bind", "8080"), "--bind"),
        (("10.0.0.5:8000", "--balance-factor", "100"), "--balance-factor"),
    ],
)
def test_bad_input_is_refused_naming_it(args, named):
    made = haproxy_config(*args)
    assert made.returncode == 2 and made.stdout == ""
    assert named in made.stderr


# --- the fleet ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    why = fleetlab.unavailable()
    if why:
        pytest.skip(f"no fleet lab here: {why}")
    made = fleetlab.Lab(2, KEY, NODE_ARGS, BALANCER_ARGS)
    STATE_DIRS.extend(node.state_dir for node in made.nodes)
    try:
        made.open()
        for node in made.nodes:
            SEGMENTS.update(StateDir(Path(node.state_dir)).read_segments())
        yield made
    finally:
        made.close()


@pytest.fixture
def fleet(lab):
    """The lab with both nodes serving and seen up by HAProxy (a test may have broken one)."""
    for host, node in zip(lab.hosts, lab.nodes, strict=True):
        host.link(True)
        if not node.processes():
            node.start()
            SEGMENTS.update(StateDir(Path(node.state_dir)).read_segments())
    lab.balancer.wait_up([h.name for h in lab.hosts])
    return lab


class Reply:
    def __init__(self, started: float, response: httpx.Response | None, error: str = ""):
        self.started = started
        self.ended = time.monotonic()
        self.status = response.status_code if response is not None else None
        self.headers = response.headers if response is not None else {}
        self.body = response.json() if response is not None and self.status == 200 else {}
        self.error = error

    @property
    def node(self) -> str | None:
        return self.headers.get("x-llmsup-node")


def ask(url: str, body: dict, timeout: float = 60, http: httpx.Client | None = None) -> Reply:
    """One non-streamed chat completion; never raises (a failure is the Reply's error)."""
    own = http is None
    http = http or httpx.Client(timeout=timeout)
    started = time.monotonic()
    try:
        response = http.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, **body},
            headers=AUTH,
            timeout=timeout,
        )
        return Reply(started, response)
    except httpx.HTTPError as exc:
        return Reply(started, None, f"{type(exc).__name__}: {exc}")
    finally:
        if own:
            http.close()


def chat(key: str, text: str, max_tokens: int = 8) -> dict:
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "prompt_cache_key": key,
    }


def at_once(url: str, bodies: list[dict], timeout: float = 60) -> list[Reply]:
    """All at once, each on a connection opened beforehand, from one asyncio loop: a thread
    per request would time the GIL too (40 threads building requests behind each other took
    as long as a 503 takes to arrive), so each request is timed from its own write."""
    host, port = url.removeprefix("http://").rsplit(":", 1)

    def request(body: dict) -> bytes:
        data = orjson.dumps({"model": MODEL, **body})
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + data

    async def one(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes) -> Reply:
        reader, writer = conn
        started = time.monotonic()
        writer.write(raw)
        answer = await reader.read()  # to the end: the connection closes after the reply
        ended = time.monotonic()
        writer.close()
        head, _, content = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
        status = int(lines[0].split(" ")[1])
        reply = Reply(started, httpx.Response(status, headers=headers, content=content))
        reply.ended = ended
        return reply

    async def burst() -> list[Reply]:
        conns = [await asyncio.open_connection(host, int(port)) for _ in bodies]
        raws = [request(body) for body in bodies]
        return await asyncio.wait_for(
            asyncio.gather(*(one(c, r) for c, r in zip(conns, raws, strict=True))), timeout
        )

    return asyncio.run(burst())


def key_on(lab, node: str) -> str:
    """A routing key that HAProxy sends to `node` (while both are up)."""
    for i in range(64):
        key = f"probe-{i}"
        if ask(lab.balancer.url, chat(key, "Hi", 1)).node == node:
            return key
    raise AssertionError(f"no key of 64 went to node {node}")


def test_conversations_stay_on_their_node_and_reuse_its_cache(fleet):
    conversations = 6

    def converse(c: int) -> list[Reply]:
        messages = [{"role": "system", "content": f"Visitor {c}. {SYSTEM}"}]
        replies = []
        for turn in range(4):
            messages.append({"role": "user", "content": f"Question {turn}: who built boat {c}?"})
            body = {
                "messages": messages,
                "max_tokens": 8,
                "temperature": 0,
                "prompt_cache_key": f"conv-{c}",
            }
            reply = ask(fleet.balancer.url, body)
            replies.append(reply)
            if reply.status != 200:
                break
            messages.append(reply.body["choices"][0]["message"])
        return replies

    with ThreadPoolExecutor(conversations) as pool:
        talks = list(pool.map(converse, range(conversations)))
    assert all(r.status == 200 for talk in talks for r in talk), [
        (r.status, r.error) for talk in talks for r in talk
    ]
    later = [(talk[0].node, r) for talk in talks for r in talk[1:]]
    assert len(later) == 18
    assert sum(node == r.node for node, r in later) >= 17
    assert {talk[0].node for talk in talks} == {"a", "b"}  # the keys spread over both nodes
    prompt = sum(r.body["usage"]["prompt_tokens"] for _, r in later)
    cached = sum(r.body["usage"]["prompt_tokens_details"]["cached_tokens"] for _, r in later)
    assert cached >= 0.8 * prompt, (cached, prompt)


def test_a_burst_gets_200s_from_both_nodes_or_quick_503s(fleet):
    replies = at_once(
        fleet.balancer.url, [chat(f"burst-{i}", "Tell me a story.", 16) for i in range(40)]
    )
    assert all(r.status in (200, 503) for r in replies), [(r.status, r.error) for r in replies]
    refused = [r for r in replies if r.status == 503]
    assert all("retry-after" in r.headers for r in refused)
    assert all(r.ended - r.started < 0.1 for r in refused), sorted(
        round(r.ended - r.started, 3) for r in refused
    )
    served = [r.node for r in replies if r.status == 200]
    assert len(served) >= 16  # 2 nodes x 8 slots at once (nodes queue nothing)
    assert min(served.count("a"), served.count("b")) >= 0.4 * len(served), served


def test_a_hot_key_spills_onto_the_other_node(fleet):
    replies = at_once(
        fleet.balancer.url, [chat("one-hot-key", f"Story {i}.", 16) for i in range(20)]
    )
    assert all(r.status in (200, 503) for r in replies), [(r.status, r.error) for r in replies]
    served = [r.node for r in replies if r.status == 200]
    assert set(served) == {"a", "b"}


def fail_a_node_under_load(lab, fail) -> tuple[list[Reply], list[Reply], float]:
    """16 requests in flight, then `fail` node a; requests from 3 s after go on for 3 s.
    Returns (in flight, later, when it failed)."""
    bodies = [chat(f"load-{i}", "Tell me about river boats.", 24) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        flying = [pool.submit(ask, lab.balancer.url, body, 30) for body in bodies]
        time.sleep(0.5)  # all sent and buffered by HAProxy: in flight on both nodes
        failed_at = time.monotonic()
        fail(lab)
        in_flight = [f.result() for f in flying]
    later = []
    time.sleep(max(0.0, failed_at + 3 - time.monotonic()))
    while time.monotonic() < failed_at + 6:
        later.append(ask(lab.balancer.url, chat(f"after-{len(later)}", "Hi", 2), 10))
    return in_flight, later, failed_at


def test_a_node_killed_with_16_in_flight_loses_nothing_after_3_s(fleet):
    in_flight, later, killed_at = fail_a_node_under_load(fleet, lambda lab: lab.nodes[0].kill())
    assert all(r.ended - killed_at < 5 for r in in_flight), sorted(
        round(r.ended - killed_at, 2) for r in in_flight
    )
    assert later and all(r.status == 200 and r.node == "b" for r in later), [
        (r.status, r.error) for r in later
    ]


def test_a_node_whose_link_is_cut_loses_nothing_after_3_s(fleet):
    in_flight, later, cut_at = fail_a_node_under_load(fleet, lambda lab: lab.hosts[0].link(False))
    fleet.hosts[0].link(True)
    assert all(r.ended - cut_at < 5 for r in in_flight), sorted(
        (round(r.ended - cut_at, 2), r.status, r.node, r.error[:40]) for r in in_flight
    )
    assert later and all(r.status == 200 and r.node == "b" for r in later), [
        (r.status, r.error) for r in later
    ]


def test_a_planned_stop_under_load_loses_nothing(fleet):
    replies: list[Reply] = []
    stop_at = time.monotonic() + 1.0
    done = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not done.is_set():
            replies.append(ask(fleet.balancer.url, chat(f"stop-{worker}-{i}", "Hello there", 8)))
            i += 1

    with ThreadPoolExecutor(6) as pool:
        for w in range(6):
            pool.submit(load, w)
        time.sleep(max(0.0, stop_at - time.monotonic()))
        stopped = fleet.nodes[0].stop()
        time.sleep(2)
        done.set()
    assert stopped.returncode == 0, stopped.stderr
    assert len(replies) >= 12
    assert all(r.status == 200 for r in replies), [
        (r.status, r.error) for r in replies if r.status != 200
    ]
    assert {r.node for r in replies} == {"a", "b"}  # a served until it stopped


def test_a_stream_cut_by_its_nodes_death_ends_in_an_error(fleet):
    key = key_on(fleet, "a")
    body = {**chat(key, "Count to 500.", 400), "model": MODEL, "stream": True}
    lines: list[str] = []
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", f"{fleet.balancer.url}/v1/chat/completions", json=body, headers=AUTH
        ) as stream:
            assert stream.headers["x-llmsup-node"] == "a"
            events = stream.iter_lines()
            while len(lines) < 3:
                lines.append(next(events))
            killed_at = time.monotonic()
            fleet.nodes[0].kill()
            with pytest.raises(httpx.HTTPError):  # the chunked body never ends cleanly
                for line in events:
                    lines.append(line)
            ended = time.monotonic() - killed_at
    assert ended < 5
    assert "data: [DONE]" not in lines
