"""Baselines that perf/run.py measures llmsup against, in the same run.

- in-process llama-cpp-python: the same model, threads, cores, prompt and greedy sampling,
  in a fresh process pinned like an llmsup worker;
- a bare pyzmq load-balancing broker (ROUTER/ROUTER, zguide's lbbroker shape) in its own
  process, with an echo worker in another: the least any broker in Python can cost.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time

import zmq

VERSION = b"LLMSUP1"  # the same four-frame messages as llmsup, so sizes match


def _in_process(prompt: str, max_tokens: int, cores: list[int], out) -> None:
    import llama_cpp

    from llmsup.supervisor.models.fetch import default_model

    os.sched_setaffinity(0, cores)
    llm = llama_cpp.Llama(
        str(default_model()),
        n_threads=len(cores),
        n_threads_batch=len(cores),
        n_ctx=2048,
        verbose=False,
    )
    llm.create_completion("warm up", max_tokens=4, temperature=0)
    started = time.monotonic()
    tokens = 0
    for _ in llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0, top_k=1, stream=True
    ):
        tokens += 1
    out.put(tokens / (time.monotonic() - started))


def in_process_tokens_per_s(prompt: str, max_tokens: int, cores: list[int]) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_in_process, args=(prompt, max_tokens, cores, out))
    proc.start()
    value = out.get(timeout=300)
    proc.join()
    return value


def _broker(front: str, back: str) -> None:
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    frontend.bind(front)
    backend.bind(back)
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    workers: list[bytes] = []
    waiting: list[list[bytes]] = []
    while True:
        events = dict(poller.poll())
        if backend in events:
            frames = backend.recv_multipart()
            workers.append(frames[0])
            if frames[1] != b"READY":
                frontend.send_multipart(frames[1:])
        if frontend in events:
            client, version, verb, rid, body = frontend.recv_multipart()
            if verb == b"stop":
                return
            if verb == b"ping":
                frontend.send_multipart([client, version, b"done", rid, b'{"pong":true}'])
            else:
                waiting.append([client, version, verb, rid, body])
        while waiting and workers:
            backend.send_multipart([workers.pop(0), *waiting.pop(0)])


def _echo_worker(back: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(back)
    sock.send_multipart([b"READY"])
    while True:
        client, version, verb, rid, body = sock.recv_multipart()
        sock.send_multipart([client, version, b"done", rid, body])


def bare_broker_round_trips(n: int) -> dict:
    """Round trips through a bare broker process (ping) and broker -> worker (echo)."""
    from statistics import median

    tmp = tempfile.mkdtemp(prefix="llmsup-perf-bare")
    front, back = f"ipc://{tmp}/front", f"ipc://{tmp}/back"
    ctx = multiprocessing.get_context("spawn")
    broker = ctx.Process(target=_broker, args=(front, back), daemon=True)
    worker = ctx.Process(target=_echo_worker, args=(back,), daemon=True)
    broker.start()
    worker.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(front)

    def trips(verb: bytes, count: int) -> list[float]:
        times = []
        for i in range(count):
            rid = str(i).encode()
            started = time.perf_counter()
            sock.send_multipart([VERSION, verb, rid, b"{}"])
            sock.recv_multipart()
            times.append((time.perf_counter() - started) * 1e6)
        return times

    trips(b"echo", 50)  # warm up, and wait for the worker's READY
    ping, echo = trips(b"ping", n), trips(b"echo", n // 2)
    started = time.perf_counter()
    sent = done = 0
    while done < n * 4:
        while sent < n * 4 and sent - done < 64:
            sock.send_multipart([VERSION, b"ping", str(sent).encode(), b"{}"])
            sent += 1
        sock.recv_multipart()
        done += 1
    rate = n * 4 / (time.perf_counter() - started)
    sock.send_multipart([VERSION, b"stop", b"0", b"{}"])
    broker.join(5)
    worker.kill()
    worker.join()
    sock.close()
    for name in ("front", "back"):
        try:
            os.unlink(f"{tmp}/{name}")
        except FileNotFoundError:
            pass
    os.rmdir(tmp)
    ordered = sorted(ping)
    return {
        "ping_p50_us": median(ping),
        "ping_p99_us": ordered[int(len(ordered) * 0.99)],
        "echo_p50_us": median(echo),
        "pipelined_per_s": rate,
    }


if __name__ == "__main__":
    print(bare_broker_round_trips(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
