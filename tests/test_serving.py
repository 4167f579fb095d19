"""Requests through a real supervisor with 2 real llama.cpp workers on the default model."""

from __future__ import annotations

import os
import signal
import threading
import time

import orjson
import psutil
import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from tests.conftest import wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}


def test_streamed_completion(served):
    with served.client() as client:
        stream = client.complete("The capital of France is", max_tokens=12, **GREEDY)
        pieces = list(stream)
    done = stream.done
    assert len(pieces) >= 2, "tokens must stream one frame at a time"
    assert "".join(pieces).strip()
    assert done["finish_reason"] in (C.FINISH_STOP, C.FINISH_LENGTH)
    assert 1 <= done["usage"]["completion_tokens"] <= 12
    assert done["usage"]["prompt_tokens"] >= 5
    assert done["timings"]["prompt_ms"] > 0
    if done["finish_reason"] == C.FINISH_LENGTH:
        assert done["usage"]["completion_tokens"] == 12


def test_greedy_is_deterministic_and_max_tokens_counts(served):
    with served.client() as client:
        first = client.complete("List three colors:", max_tokens=10, **GREEDY)
        a = first.text()
        b = client.complete("List three colors:", max_tokens=10, **GREEDY).text()
    assert a == b
    assert first.done["usage"]["completion_tokens"] <= 10


def test_stop_string_ends_generation(served):
    with served.client() as client:
        free = client.complete("Count: 1, 2, 3,", max_tokens=16, **GREEDY).text()
        assert "," in free  # the model continues the list
        cut = free[: free.index(",")]
        stream = client.complete("Count: 1, 2, 3,", max_tokens=16, stop=[","], **GREEDY)
        text = stream.text()
    assert text == cut
    assert stream.done["finish_reason"] == C.FINISH_STOP


def test_chat_uses_template(served):
    with served.client() as client:
        stream = client.chat(
            [{"role": "user", "content": "Say hello in one word."}], max_tokens=16, **GREEDY
        )
        text = stream.text()
    assert text.strip()
    assert "<start_of_turn>" not in text and "<end_of_turn>" not in text
    assert stream.done["usage"]["prompt_tokens"] > 8  # the template added its turn markers


def test_tokenize(served):
    with served.client() as client:
        tokens = client.tokenize("Hello world")
        again = client.call(C.TOKENIZE, {"text": "Hello world"})
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert again == {"tokens": tokens, "count": len(tokens)}


def test_several_clients_at_once_all_finish(served):
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with served.client() as client:
                for _attempt in range(20):
                    try:
                        stream = client.complete(f"Story {i}:", max_tokens=6, **GREEDY)
                        stream.text()
                        results[i] = stream.done
                        return
                    except LlmsupError as exc:  # queue of 1: retry as the server says
                        assert exc.code == C.E_OVERLOADED
                        time.sleep(exc.retry_after_ms / 1000)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == list(range(5))
    served_by = [w["served"] for w in served.status()["workers"]]
    assert all(n > 0 for n in served_by), f"both workers must take work: {served_by}"


def raw_socket(served) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.status()["endpoint"])
    return sock


def recv(sock: zmq.Socket, timeout_ms: int = 10000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no reply"
    return sock.recv_multipart()


@pytest.mark.parametrize(
    "frames, code, rid",
    [
        ([C.VERSION, C.PING], C.E_BAD_REQUEST, b""),
        ([b"LLMSUP0", C.PING, b"v", b"{}"], C.E_UNSUPPORTED_VERSION, b"v"),
        ([C.VERSION, b"fly", b"u", b"{}"], C.E_UNKNOWN_VERB, b"u"),
        ([C.VERSION, C.COMPLETE, b"j", b"{oops"], C.E_BAD_REQUEST, b"j"),
        (
            [C.VERSION, C.COMPLETE, b"t", b'{"prompt": "x", "temperature": 5}'],
            C.E_BAD_REQUEST,
            b"t",
        ),
        (
            [C.VERSION, C.CHAT, b"c", b'{"messages": [{"role": "x", "content": ""}]}'],
            C.E_BAD_REQUEST,
            b"c",
        ),
    ],
)
def test_malformed_requests_get_one_error_and_server_lives(served, frames, code, rid):
    sock = raw_socket(served)
    try:
        sock.send_multipart(frames)
        version, kind, got_rid, body = recv(sock)
        assert (version, kind, got_rid) == (C.VERSION, C.ERROR, rid)
        assert orjson.loads(body)["code"] == code
        assert not sock.poll(200), "exactly one terminal frame"
        sock.send_multipart([C.VERSION, C.PING, b"p", b""])
        assert recv(sock)[1:3] == [C.DONE, b"p"]
    finally:
        sock.close()


def test_bad_parameter_names_field(served):
    with served.client() as client:
        with pytest.raises(LlmsupError) as info:
            client.complete("x", temperature=5).text()
    assert info.value.code == C.E_BAD_REQUEST
    assert info.value.body["field"] == "temperature"
    assert "at most 2.0" in info.value.message


def test_duplicate_request_id_in_flight(served):
    sock = raw_socket(served)
    try:
        body = orjson.dumps({"prompt": "Once", "max_tokens": 8, **GREEDY})
        sock.send_multipart([C.VERSION, C.COMPLETE, b"same", body])
        sock.send_multipart([C.VERSION, C.COMPLETE, b"same", body])
        terminals = []
        while len(terminals) < 2:
            frames = recv(sock, 30000)
            if frames[1] in C.TERMINAL_KINDS:
                terminals.append((frames[1], orjson.loads(frames[3])))
        kinds = sorted(k for k, _ in terminals)
        assert kinds == [C.DONE, C.ERROR]
        assert [b["code"] for k, b in terminals if k == C.ERROR] == [C.E_DUPLICATE_ID]
    finally:
        sock.close()


def test_overload_gets_immediate_typed_reply(served):
    """2 workers busy, 1 queued (queue size 1): the 4th request is refused at once."""
    sock = raw_socket(served)
    try:
        body = orjson.dumps({"prompt": "Write a long story.", "max_tokens": 48, **GREEDY})
        for rid in (b"a", b"b", b"c"):
            sock.send_multipart([C.VERSION, C.COMPLETE, rid, body])
        queued = wait_until(lambda: served.status()["queue"]["depth"] == 1, timeout=10)
        assert queued, f"the third request never waited in the queue: {served.status()}"
        sent = time.monotonic()
        sock.send_multipart([C.VERSION, C.COMPLETE, b"d", body])
        terminal: dict[bytes, tuple[bytes, dict]] = {}
        while len(terminal) < 4:
            frames = recv(sock, 60000)
            if frames[1] in C.TERMINAL_KINDS:
                assert frames[2] not in terminal, "exactly one terminal frame per request"
                terminal[frames[2]] = (frames[1], orjson.loads(frames[3]))
                if frames[2] == b"d":
                    refused_after = time.monotonic() - sent
        kind, err = terminal[b"d"]
        assert kind == C.ERROR and err["code"] == C.E_OVERLOADED
        assert err["retry_after_ms"] >= 100
        assert refused_after < 1.0, "an overload reply must not wait for a worker"
        assert all(terminal[r][0] == C.DONE for r in (b"a", b"b", b"c"))
    finally:
        sock.close()


def test_worker_crash_fails_its_request_and_worker_comes_back(served):
    before = {w["id"]: w["pid"] for w in served.status()["workers"]}
    with served.client() as client:
        stream = client.complete("Tell me a long story about a dragon.", max_tokens=200, **GREEDY)
        it = iter(stream)
        next(it)  # generating now
        busy = [w for w in served.status()["workers"] if w["running"]]
        assert len(busy) == 1
        os.kill(busy[0]["pid"], signal.SIGKILL)
        with pytest.raises(LlmsupError) as info:
            for _ in it:
                pass
    assert info.value.code == C.E_WORKER_LOST
    assert info.value.body["tokens_sent"] >= 1

    def replaced():
        workers = served.status()["workers"]
        w = workers[busy[0]["id"]]
        return w["state"] == "ready" and w["pid"] != before[w["id"]] and w

    w = wait_until(replaced, timeout=30, interval=0.2)
    assert w, served.status()
    assert "SIGKILL" in w["last_exit"] and w["restarts"] >= 1
    with served.client() as client:
        stream = client.complete("Hi", max_tokens=2, **GREEDY)
        stream.text()
        assert stream.done["usage"]["completion_tokens"] >= 1


def test_idle_supervisor_sleeps(served):
    proc = psutil.Process(served.pid)
    before = proc.cpu_times()
    time.sleep(3)
    after = proc.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.03, f"idle supervisor used {used:.3f}s CPU in 3s"


@pytest.fixture(scope="module")
def reference_llama():
    """In-process llama-cpp-python on the same model: what llmsup's output must equal."""
    import llama_cpp

    from llmsup.supervisor.models.fetch import default_model

    return llama_cpp.Llama(
        str(default_model()),
        n_ctx=2048,
        n_threads=1,
        verbose=False,
        chat_format="gemma",
        flash_attn=True,  # as llmsup's workers (flash attention where the backend has it)
    )


def test_completion_equals_in_process_llama_cpp(served, reference_llama):
    prompt = "The three primary colors are"
    ref = reference_llama.create_completion(prompt, max_tokens=24, temperature=0, top_k=1)
    with served.client() as client:
        stream = client.complete(prompt, max_tokens=24, **GREEDY)
        text = stream.text()
    assert text == ref["choices"][0]["text"]
    assert stream.done["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert stream.done["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]


def test_chat_equals_in_process_llama_cpp(served, reference_llama):
    # User turns only: for a system turn llama-cpp-python's "gemma" format and llama.cpp's
    # built-in template (which follows Gemma's own) differ.
    messages = [
        {"role": "user", "content": "Name three large rivers."},
        {"role": "assistant", "content": "The Nile, the Amazon and the Yangtze."},
        {"role": "user", "content": "Which is longest?"},
    ]
    ref = reference_llama.create_chat_completion(messages, max_tokens=24, temperature=0, top_k=1)
    with served.client() as client:
        text = client.chat(messages, max_tokens=24, **GREEDY).text()
    assert text == ref["choices"][0]["message"]["content"]
