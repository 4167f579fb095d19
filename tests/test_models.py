"""Several models on one llmsup (issue 14): the instruction-tuned one answers a chat, a
request names its model, groups change model on demand under --max-loaded, go back to the
default after --keep-alive, and a model that cannot load is refused, not reloaded."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from llmsup.supervisor.models.spec import resolve_models
from tests.conftest import wait_until

GREEDY = {"temperature": 0.0, "top_k": 1}
INSTRUCT = "smollm2-135m-instruct"
DEFAULT = "gemma3-270m"


def broken_copy(tmp: Path) -> Path:
    """A GGUF file that passes llmsup's checks but not llama.cpp's: the instruct model with
    its architecture renamed."""
    src = resolve_models([INSTRUCT])[0].path
    dst = tmp / "broken.gguf"
    shutil.copyfile(src, dst)
    data = bytearray(dst.read_bytes()[: 1 << 20])
    key = b"general.architecture"
    at = data.index(key) + len(key)
    (vtype, n) = struct.unpack_from("<IQ", data, at)
    assert vtype == 8 and data[at + 12 : at + 12 + n] == b"llama"
    with dst.open("r+b") as f:
        f.seek(at + 12)
        f.write(b"xxxxx")
    return dst


def models_of(inst) -> list[str]:
    return [w["model"] for w in inst.status()["workers"]]


def serving(inst) -> list[str]:
    return [w["model"] for w in inst.status()["workers"] if w["state"] == "ready"]


def ask(inst, model: str | None, text: str = "The sky is", **params) -> dict:
    with inst.client(timeout=120) as client:
        stream = client.complete(text, max_tokens=4, model=model, **GREEDY, **params)
        stream.text()
        return stream.done


@pytest.mark.timeout(240)
def test_instruct_model_answers_a_chat(instance_factory):
    inst = instance_factory("--model", INSTRUCT, "--workers", "1")
    assert inst.start().returncode == 0
    with inst.client(timeout=120) as client:
        stream = client.chat(
            [{"role": "user", "content": "Name three large rivers."}], max_tokens=96, **GREEDY
        )
        text = stream.text()
        done = stream.done
        assert client.status()["models"][0]["name"] == INSTRUCT
    assert text.strip(), done
    assert done["finish_reason"] == C.FINISH_STOP, (text, done)  # the model's end of turn
    # The template wrapped the message: the prompt is longer than the message's own tokens.
    assert done["usage"]["prompt_tokens"] > 10


@pytest.mark.timeout(420)
def test_models_on_demand_under_a_bound(instance_factory, tmp_path):
    copy = tmp_path / "gemma-copy.gguf"
    copy.symlink_to(resolve_models([DEFAULT])[0].path)
    broken = broken_copy(tmp_path)
    inst = instance_factory(
        "--model",
        DEFAULT,
        "--model",
        INSTRUCT,
        "--model",
        f"copy={copy}",
        "--model",
        f"broken={broken}",
        "--workers",
        "2",
        "--cores-per-worker",
        "1",
        "--max-loaded",
        "2",
        "--keep-alive",
        "4",
    )
    assert inst.start().returncode == 0
    status = inst.status
    with inst.client() as client:
        assert models_of(inst) == [DEFAULT, DEFAULT]

        # Unknown model: refused, naming the field and what is served.
        with pytest.raises(LlmsupError) as info:
            client.complete("x", model="nope").text()
        assert info.value.code == C.E_BAD_REQUEST and info.value.body["field"] == "model"
        assert INSTRUCT in info.value.message and "copy" in info.value.message

    # A request for the instruct model takes one group; both models serve at once.
    assert ask(inst, INSTRUCT)["usage"]["completion_tokens"] >= 1
    assert sorted(models_of(inst)) == sorted([DEFAULT, INSTRUCT])
    assert ask(inst, None)["usage"]["completion_tokens"] >= 1  # the default, still loaded

    # A third model at the bound of two: the least recently used idle model goes (the
    # instruct one: the default was used after it), all its groups at once.
    assert ask(inst, "copy")["usage"]["completion_tokens"] >= 1
    assert INSTRUCT not in models_of(inst) and "copy" in models_of(inst)

    # Keep-alive: unused for 4 s, "copy" gives its group back to the default.
    back = wait_until(lambda: serving(inst) == [DEFAULT, DEFAULT], timeout=60, interval=0.5)
    assert back, status()

    # A model that cannot load: the waiting request gets llama.cpp's reason, and the next
    # one is refused at once instead of loading it again.
    with pytest.raises(LlmsupError) as info:
        ask(inst, "broken")
    assert info.value.code == C.E_WORKER_FAILED and "xxxxx" in info.value.message
    with pytest.raises(LlmsupError) as again:
        ask(inst, "broken")
    assert again.value.code == C.E_WORKER_FAILED
    entry = next(m for m in status()["models"] if m["name"] == "broken")
    assert entry["failed"] and not entry["groups"]
    assert wait_until(lambda: serving(inst) == [DEFAULT, DEFAULT], timeout=60), status()
    spawns = "\n".join(line for line in inst.log().splitlines() if "model broken" in line)
    assert spawns.count("spawned") == 1, spawns
