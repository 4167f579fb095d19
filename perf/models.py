"""Models on demand (issue 14): what switching costs, and what a second model weighs.

    .venv/bin/python perf/models.py [--rounds 3]

1. Switch: llmsup serves gemma3-270m on one core group; a request names
   smollm2-135m-instruct, so the group drains, a worker of the other model starts, and the
   request is read. Its time to first token is compared with the baseline measured in the
   same run: a fresh process that loads the same model with llmsup's own engine (same
   threads, slots and context) and reads the same prompt to its first token.
   Target: switch / baseline at most 1.3.
2. Memory: the proportional set size (PSS: shared weights counted once) of the supervisor
   and its workers with one model loaded on two groups, then with two models (one group
   each), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import orjson
import psutil

from llmsup.protocol.client import Client
from llmsup.supervisor.models.spec import resolve_models

PROMPT = "Write one sentence about the sea."
BASE, OTHER = "gemma3-270m", "smollm2-135m-instruct"
CTX = 2048

BASELINE = """
import sys, time
t0 = time.monotonic()
from llmsup.protocol.messages import Complete, Sampling
from llmsup.worker.engine import Engine
eng = Engine(sys.argv[1], threads=int(sys.argv[2]), n_ctx=int(sys.argv[3]), slots=1)
gen = eng.start(Complete(sys.argv[4], Sampling(max_tokens=1, temperature=0.0)))
while gen.first_token_at is None:
    eng.step()
print(time.monotonic() - t0)
"""


def llmsup(state: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmsup.supervisor", *args, "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=600,
    )


def baseline_s(model_path: str, threads: int) -> float:
    """A fresh process: load the model with llmsup's engine, read PROMPT to a first token."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            ",".join(map(str, range(threads))),
            sys.executable,
            "-c",
            BASELINE,
            model_path,
            str(threads),
            str(CTX),
            PROMPT,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1])


def first_token_s(client: Client, model: str) -> float:
    started = time.monotonic()
    stream = client.complete(PROMPT, model=model, max_tokens=1, temperature=0.0)
    for _ in stream:
        break
    elapsed = time.monotonic() - started
    stream.text()
    return elapsed


def pss_mb(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_full_info().pss for p in procs) / (1 << 20)


def wait_serving(client: Client, models: list[str]) -> None:
    while sorted(w["model"] for w in client.status()["workers"] if w["state"] == "ready") != sorted(
        models
    ):
        time.sleep(0.2)


def switch(rounds: int) -> None:
    other_path = str(resolve_models([OTHER])[0].path)
    state = tempfile.mkdtemp(prefix="llmsup-pm", dir="/tmp")
    args = [
        "--model",
        BASE,
        "--model",
        OTHER,
        "--workers",
        "1",
        "--cores-per-worker",
        "2",
        "--ctx-size",
        str(CTX),
        "--slots-per-worker",
        "1",
        "--keep-alive",
        "0",
    ]
    # The baselines first, on idle cores: llmsup's workers would compete with them.
    bases = [baseline_s(other_path, 2) for _ in range(rounds)]
    switches = []
    try:
        started = llmsup(state, "start", *args)
        if started.returncode:
            sys.exit(started.stderr)
        with Client(state_dir=state, timeout=300) as client:
            for _ in range(rounds):
                wait_serving(client, [BASE])  # keep-alive 0: back to the default after each
                switches.append(first_token_s(client, OTHER))
    finally:
        llmsup(state, "stop")
        shutil.rmtree(state, ignore_errors=True)
    s, b = statistics.median(switches), statistics.median(bases)
    print(
        f"switch {BASE} -> {OTHER}, first token: median {s:.2f} s of {rounds} "
        f"({', '.join(f'{x:.2f}' for x in switches)})"
    )
    print(
        f"baseline: fresh process loads {OTHER} and reads the prompt: median {b:.2f} s "
        f"({', '.join(f'{x:.2f}' for x in bases)})"
    )
    print(f"ratio switch / baseline: {s / b:.2f} (target at most 1.3)")


def memory() -> None:
    state = tempfile.mkdtemp(prefix="llmsup-pm", dir="/tmp")
    args = [
        "--model",
        BASE,
        "--model",
        OTHER,
        "--workers",
        "2",
        "--cores-per-worker",
        "1",
        "--ctx-size",
        str(CTX),
        "--keep-alive",
        "3600",
        "--cache-mb",
        "0",
    ]
    try:
        started = llmsup(state, "start", *args)
        if started.returncode:
            sys.exit(started.stderr)
        pid = orjson.loads(open(os.path.join(state, "supervisor.json"), "rb").read())["pid"]
        with Client(state_dir=state, timeout=300) as client:
            one = pss_mb(pid)
            first_token_s(client, OTHER)
            wait_serving(client, [BASE, OTHER])
            two = pss_mb(pid)
    finally:
        llmsup(state, "stop")
        shutil.rmtree(state, ignore_errors=True)
    print(
        f"memory (PSS of supervisor + workers): {BASE} on 2 groups {one:.0f} MB; "
        f"{BASE} + {OTHER}, one group each {two:.0f} MB; ratio {two / one:.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    switch(args.rounds)
    memory()


if __name__ == "__main__":
    main()
