"""The OpenAI gateway as a member of a fleet behind a balancer (issue 18, items 1 and 2):
/health turns 503 before the gateway refuses anything, 503 + Retry-After only for busy and
stopping (a worker failure is 502), vLLM's gauge names on /metrics, X-Llmsup-Node on every
response, and the lane a request takes by its routing key (`prompt_cache_key`, else `user`,
else its prompt's first bytes). Against a real llmsup and gateway, as tests/test_gateway.py."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import zlib

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import from_llmsup
from llmsup.supervisor.gateway.generate import client_of
from tests import test_gateway as tg
from tests.conftest import wait_until
from tests.test_gateway import LONG, MODEL, PROMPT, events, free_port, in_flight

# test_gateway's fixtures (this module gets its own supervisor from `inst`).
inst, gateways, gw = tg.inst, tg.gateways, tg.gw

pytestmark = pytest.mark.timeout(120)
NODE = "X-Llmsup-Node"


def lane(key: bytes) -> int:
    return zlib.crc32(key) % 8  # upstream.Lanes over the default 8 lanes


# --- X-Llmsup-Node ------------------------------------------------------------------------------


def test_every_response_names_its_node(inst, gateways):
    named = gateways(inst.status()["endpoint"], "--node-name", "node-a")
    with httpx.Client(base_url=named.url, timeout=60) as http:
        responses = [
            http.get("/health"),
            http.get("/metrics"),
            http.get("/v1/models"),
            http.get("/nowhere"),  # 404 from the router
            http.post("/v1/completions", json={"prompt": PROMPT, "n": 0}),  # 400
            http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}),
        ]
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "stream": True,
            },
        ) as streamed:
            assert [line for line in streamed.iter_lines() if line][-1] == "data: [DONE]"
            responses.append(streamed)
    assert [r.status_code for r in responses] == [200, 200, 200, 404, 400, 200, 200]
    assert all(r.headers[NODE] == "node-a" for r in responses)
    default = gateways(inst.status()["endpoint"])
    assert httpx.get(f"{default.url}/v1/models").headers[NODE] == socket.gethostname()
    bad = gateways("ipc:///nonexistent", "--node-name", "two words", wait=False)
    assert bad.proc.wait(10) == 2 and "--node-name" in bad.output()


# --- /metrics -----------------------------------------------------------------------------------


def test_metrics_carry_vllm_gauges_beside_llmsup_names(inst, gw):
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()  # kept: dropping it closes the response
        next(lines)
        scraped: list[str] = []

        def running() -> bool:  # the worker's status shows it running a moment later
            scraped.append(httpx.get(f"{gw.url}/metrics").text)
            return "\nllmsup_num_requests_running 1.0" in scraped[-1]

        assert wait_until(running, timeout=10), scraped[-1]
    text = scraped[-1]
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        assert f"# TYPE vllm:{name} gauge" in text
        assert samples[f"vllm:{name}"] == samples[f"llmsup_{name}"], name
    assert samples["vllm:num_requests_running"] == 1
    assert samples["vllm:kv_cache_usage_perc"] == 0.5  # 1 of the worker's 2 slots
    assert samples["vllm:num_requests_waiting"] == 0
    assert wait_until(lambda: in_flight(inst) == 0, timeout=2)


# --- status codes -------------------------------------------------------------------------------


def test_only_busy_and_stopping_are_503_with_retry_after():
    """from_llmsup, the translation every llmsup error reply goes through."""
    busy = from_llmsup({"code": C.E_OVERLOADED, "message": "", "retry_after_ms": 1500}, None)
    assert busy.status == 503 and busy.headers["Retry-After"] == "2"
    stopping = from_llmsup({"code": C.E_SHUTTING_DOWN, "message": ""}, None)
    assert stopping.status == 503 and stopping.headers["Retry-After"] == "1"
    ours = from_llmsup({"code": C.E_CANCELLED, "message": ""}, None, stopping=True)
    assert ours.status == 503 and ours.headers["Retry-After"] == "1"
    for code in (C.E_WORKER_FAILED, C.E_WORKER_LOST):
        failed = from_llmsup({"code": code, "message": "it crashed"}, None)
        assert failed.status == 502 and "Retry-After" not in failed.headers, code
    assert from_llmsup({"code": C.E_WORKER_FAILED}, None).headers["x-should-retry"] == "false"
    assert from_llmsup({"code": C.E_DEADLINE}, None).status == 504


def test_a_worker_failure_is_502_without_retry_after(inst, gw):
    """Its worker is SIGKILLed under a request that is not streamed."""
    got: list = []

    def ask() -> None:
        got.append(
            httpx.post(
                f"{gw.url}/v1/completions", timeout=60, json={"prompt": "Once upon a time", **LONG}
            )
        )

    thread = threading.Thread(target=ask)
    thread.start()
    assert wait_until(lambda: inst.status()["workers"][0]["running"], timeout=20)
    time.sleep(0.3)  # generating
    os.kill(inst.status()["workers"][0]["pid"], signal.SIGKILL)
    thread.join(30)
    resp = got[0]
    assert resp.status_code == 502, resp.text
    assert resp.json()["error"]["code"] == "worker_lost"
    assert "retry-after" not in resp.headers and resp.headers[NODE]
    assert wait_until(lambda: inst.status()["workers"][0]["state"] == "ready", timeout=60)


# --- routable address -----------------------------------------------------------------------------


def test_a_routable_address_only_with_allow_remote_and_an_api_key(inst, gateways, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("fleet-key\n")
    key_file.chmod(0o600)
    port = free_port()
    keyed_only = gateways(
        "ipc:///nonexistent", "--api-key-file", str(key_file), listen=f"0.0.0.0:{port}", wait=False
    )
    assert keyed_only.proc.wait(10) == 2 and "--allow-remote" in keyed_only.output()
    remote = gateways(
        inst.status()["endpoint"],
        "--allow-remote",
        "--api-key-file",
        str(key_file),
        listen=f"0.0.0.0:{port}",
    )
    remote.url = f"http://127.0.0.1:{port}"  # reached over loopback here
    assert httpx.get(f"{remote.url}/health").status_code == 200
    assert httpx.get(f"{remote.url}/v1/models").status_code == 401
    keyed = httpx.get(f"{remote.url}/v1/models", headers={"Authorization": "Bearer fleet-key"})
    assert keyed.status_code == 200


# --- a planned stop -------------------------------------------------------------------------------


def test_sigterm_turns_health_503_first_then_refuses(inst, gateways):
    """Once a balancer has checked /health: SIGTERM makes it 503 at once while requests are
    still served for --drain-health-s; then what is in flight is cancelled as before (a
    whole request's 503 carries Retry-After) and the gateway exits 0."""
    gw = gateways(inst.status()["endpoint"], "--drain-health-s", "2")
    assert httpx.get(f"{gw.url}/health").status_code == 200
    got: list = []

    def ask() -> None:
        got.append(
            httpx.post(
                f"{gw.url}/v1/completions", timeout=60, json={"prompt": "Once upon a time", **LONG}
            )
        )

    thread = threading.Thread(target=ask)
    thread.start()
    assert wait_until(lambda: in_flight(inst) == 1, timeout=20)
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.get(f"{gw.url}/health").status_code == 503, timeout=1)
    health = httpx.get(f"{gw.url}/health")
    assert health.json()["reason"] == "the gateway is stopping" and health.headers[NODE]
    # Still taking requests: the balancer has not marked this node down yet.
    late = httpx.post(f"{gw.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert late.status_code == 200 and time.monotonic() - sent < 1.5
    assert httpx.get(f"{gw.url}/health").status_code == 503
    thread.join(10)
    ended = time.monotonic() - sent
    assert 1.8 <= ended < 4, ended
    resp = got[0]
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down"
    assert resp.headers["Retry-After"] == "1"
    assert gw.proc.wait(5) == 0, gw.output()
    assert "/health answers 503" in gw.output()
    assert wait_until(lambda: in_flight(inst) == 0, timeout=2)


# --- the routing key ------------------------------------------------------------------------------


def test_client_of_prefers_prompt_cache_key_then_user_then_the_prompt():
    assert client_of({"prompt_cache_key": "conv-42", "user": "u", "prompt": "x"}) == b"conv-42"
    assert client_of({"user": "u", "prompt": "x"}) == b"u"
    assert client_of({"prompt_cache_key": "", "user": 7, "prompt": "x"}) == b'"x"'
    long = {"messages": [{"role": "user", "content": "a" * 1000}]}
    assert client_of(long) == orjson.dumps(long["messages"])[:256]
    # Two conversations that begin alike (past 256 bytes) take the same lane.
    other = {"messages": [{"role": "user", "content": "a" * 900 + "b"}]}
    assert client_of(other) == client_of(long)


def test_requests_take_the_lane_of_their_routing_key(instance_factory, gateways):
    """One slot, and each llmsup client (lane) may queue one request: with a lane's slot
    taken and its one request queued, a third request on that lane is refused (503), one
    on another lane is queued (200 and `: queued`). Which lane: prompt_cache_key, else
    user, else the prompt's first bytes; not the peer address (every request here comes
    from the same one)."""
    inst = instance_factory(
        "--workers",
        "1",
        "--cores-per-worker",
        "1",
        "--slots-per-worker",
        "1",
        "--queue-size",
        "8",
        "--client-queue",
        "1",
    )
    assert inst.start().returncode == 0
    gw = gateways(inst.status()["endpoint"])
    key = "conv-a"
    home = lane(key.encode())
    # Keys, users and prompts on lanes of their own: each lane may queue one request.
    keys = [f"k{i}" for i in range(200)]
    same = next(k for k in keys if lane(k.encode()) == home)
    other_key = next(k for k in keys if lane(k.encode()) not in {home})
    other_user = next(k for k in keys if lane(k.encode()) not in {home, lane(other_key.encode())})
    taken = {home, lane(other_key.encode()), lane(other_user.encode())}
    prompts = [f"Story {i}:" for i in range(200)]
    same_prompt = next(p for p in prompts if lane(client_of({"prompt": p})) == home)
    other_prompt = next(p for p in prompts if lane(client_of({"prompt": p})) not in taken)
    held = []

    def hold(body: dict, queued: bool) -> None:
        cm = httpx.stream(
            "POST", f"{gw.url}/v1/completions", timeout=60, json={"stream": True, **LONG, **body}
        )
        resp = cm.__enter__()
        held.append(cm)
        lines = resp.iter_lines()
        first = next(lines)
        assert resp.status_code == 200, body
        assert (first == ": queued") == queued, (body, first)
        held.append(lines)  # kept: dropping it closes the response

    def refused(body: dict) -> bool:
        resp = httpx.post(f"{gw.url}/v1/completions", timeout=60, json={"max_tokens": 2, **body})
        if resp.status_code == 503:
            assert resp.json()["error"]["code"] == "overloaded" and resp.headers["Retry-After"]
            return True
        assert resp.status_code == 200, resp.text
        return False

    try:
        hold({"prompt": "Once upon a time", "prompt_cache_key": key}, queued=False)
        hold({"prompt": "Once upon a time", "prompt_cache_key": key}, queued=True)
        assert inst.status()["queue"]["depth"] == 1
        # The key's lane is full: refused by key, by a user on that lane (no key), and by a
        # prompt whose first bytes hash there; the key wins over a user on another lane.
        assert refused({"prompt": PROMPT, "prompt_cache_key": key, "user": other_user})
        assert refused({"prompt": PROMPT, "user": same})
        assert refused({"prompt": same_prompt})
        # Another lane: queued, by key (over a user on the full lane), by user, by prompt.
        hold({"prompt": PROMPT, "prompt_cache_key": other_key, "user": key}, queued=True)
        hold({"prompt": PROMPT, "user": other_user}, queued=True)
        hold({"prompt": other_prompt}, queued=True)
        assert inst.status()["queue"]["depth"] == 4
    finally:
        for item in held:
            if not hasattr(item, "__next__"):
                item.__exit__(None, None, None)
    assert wait_until(lambda: inst.status()["requests"]["in_flight"] == 0, timeout=10)


def test_prompt_cache_key_is_accepted_by_the_sdk(inst, gw):
    client = gw.client()
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        prompt_cache_key="conv-42",
        user="someone",
    )
    assert chat.usage.completion_tokens >= 1
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"prompt_cache_key": "conv-42"}
    )
    assert completion.usage.completion_tokens >= 1
    # A misspelt field is ignored, as llama-server and vLLM ignore it, but named.
    typo = client.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"prompt_cache_kee": "x"}
    )
    assert typo.headers["X-Llmsup-Ignored-Params"] == "prompt_cache_kee"


# --- llmsup stops ---------------------------------------------------------------------------------


def test_while_llmsup_stops_health_is_503_and_requests_get_503_with_retry_after(inst, gw):
    """Last in the module: it stops the module's supervisor, with a stream in flight."""
    body = {"prompt": "Once upon a time", "stream": True, **LONG}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        stopped: list = []
        stopper = threading.Thread(target=lambda: stopped.append(inst.stop("--timeout", "3")))
        stopper.start()
        assert wait_until(lambda: httpx.get(f"{gw.url}/health").status_code == 503, 5)
        refused = httpx.post(f"{gw.url}/v1/completions", json={"prompt": PROMPT})
        rest = [line for line in lines if line]
    stopper.join(30)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["Retry-After"] == "1"
    assert events(rest)[-1]["error"]["code"] == "shutting_down"
    # llmsup is gone: /health was asked, but a SIGTERM now has nothing to drain for.
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(5) == 0 and time.monotonic() - sent < 1.5, gw.output()
    assert "/health answers 503" not in gw.output()
