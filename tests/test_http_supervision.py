"""The HTTP gateway as a child of the supervisor: started with --http, restarted, stopped last."""

from __future__ import annotations

import http.client
import os
import signal
import threading

import orjson
import pytest
from testkit import free_port

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(180)


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def complete(port: int, prompt: str, max_tokens: int, key: str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    try:
        conn.request("POST", "/v1/completions", body=orjson.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def test_the_gateway_is_started_replaced_when_killed_and_stopped_last(instance_factory):
    port = free_port()
    inst = instance_factory(
        "--workers",
        "1",
        "--cores-per-worker",
        "1",
        "--slots-per-worker",
        "2",
        "--http",
        f"127.0.0.1:{port}",
    )
    started = inst.start()
    assert started.returncode == 0, started.stderr
    assert f"http://127.0.0.1:{port}/v1" in started.stdout
    gateway = inst.status()["gateway"]
    assert gateway["state"] == "serving" and gateway["restarts"] == 0
    assert get(port, "/health")[0] == 200
    status, body = complete(port, "The capital of France is", 8)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert inst.top()["gateway"]["state"] == "serving"

    # SIGKILLed under load: a request through ZeroMQ goes on, the gateway comes back.
    results: list = []
    errors: list[BaseException] = []

    def through_zmq() -> None:
        try:
            with inst.client(timeout=60) as client:
                results.append(client.complete("Once upon a time", max_tokens=48).text())
        except BaseException as exc:  # collected: an assert in a thread fails nothing
            errors.append(exc)

    worker = threading.Thread(target=through_zmq)
    worker.start()
    os.kill(gateway["pid"], signal.SIGKILL)
    worker.join()
    assert not errors and results and results[0]
    back = wait_until(lambda: inst.status()["gateway"]["state"] == "serving", timeout=30)
    assert back, inst.status()["gateway"]
    assert inst.status()["gateway"]["restarts"] == 1
    assert wait_until(lambda: get(port, "/health")[0] == 200, timeout=10)
    status, body = complete(port, "The capital of France is", 4)
    assert status == 200

    # Stop: the gateway goes too, last.
    pid = inst.status()["gateway"]["pid"]
    assert inst.stop().returncode == 0
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    assert "http gateway (pid" in inst.log()


def test_an_api_key_is_required_and_kept_off_command_lines(instance_factory):
    port = free_port()
    key = "s3cret-key-for-tests"
    inst = instance_factory(
        "--workers", "1", "--cores-per-worker", "1", "--http", f"127.0.0.1:{port}", "--api-key", key
    )
    assert inst.start().returncode == 0
    assert get(port, "/v1/models")[0] == 401
    assert get(port, "/v1/models", {"Authorization": f"Bearer {key}"})[0] == 200
    for pid in [inst.pid, inst.status()["gateway"]["pid"]]:
        assert key.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()
    key_file = os.path.join(inst.state_dir, "api-key")
    assert os.stat(key_file).st_mode & 0o777 == 0o600


def test_remote_http_needs_allow_remote_and_a_key(instance_factory):
    inst = instance_factory("--http", "0.0.0.0:8080")
    result = inst.start()
    assert result.returncode != 0
    assert "--allow-remote and an API key" in result.stderr
    inst = instance_factory("--http", "0.0.0.0:8080", "--allow-remote")
    assert "--allow-remote and an API key" in inst.start().stderr
    inst = instance_factory("--http", "127.0.0.1:notaport")
    assert "must be HOST:PORT" in inst.start().stderr


def test_http_clients_on_different_lanes_each_get_their_own_queue_bound(instance_factory):
    """One slot, and each llmsup client may queue one request: a user who already has one
    running and one waiting is refused, another user is still queued, not refused."""
    import zlib

    port = free_port()
    inst = instance_factory(
        "--workers",
        "1",
        "--cores-per-worker",
        "1",
        "--queue-size",
        "4",
        "--client-queue",
        "1",
        "--http",
        f"127.0.0.1:{port}",
    )
    assert inst.start().returncode == 0
    users = ["user-0"]
    users += [
        u
        for u in (f"user-{i}" for i in range(1, 50))
        if zlib.crc32(u.encode()) % 8 != zlib.crc32(b"user-0") % 8
    ][:1]
    results: dict[str, tuple[int, dict]] = {}
    errors: list[BaseException] = []

    def ask(name: str, user: str, max_tokens: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "user": user}
            conn.request(
                "POST",
                "/v1/completions",
                body=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            results[name] = (resp.status, orjson.loads(resp.read()))
        except BaseException as exc:  # collected: an assert in a thread fails nothing
            errors.append(exc)

    def start(name: str, user: str, max_tokens: int) -> threading.Thread:
        t = threading.Thread(target=ask, args=(name, user, max_tokens))
        t.start()
        return t

    threads = [start("running", users[0], 96)]
    wait_until(lambda: inst.status()["requests"]["in_flight"] == 1, timeout=20)
    threads.append(start("waiting", users[0], 4))
    wait_until(lambda: inst.status()["queue"]["depth"] == 1, timeout=20)
    threads.append(start("refused", users[0], 4))
    threads.append(start("other user", users[1], 4))
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results["refused"][0] == 503  # its user's lane already has one waiting
    assert results["running"][0] == results["waiting"][0] == 200
    assert results["other user"][0] == 200, results["other user"]
