"""What Ollama's model routes (/api/tags, /api/show, /api/ps) say of a served model, read
from its GGUF file's header: the file's size, `details` (family, parameter size,
quantization) and `model_info` (the header's metadata, as Ollama lists it). Tools read
them: Continue and Open WebUI take the context length from `model_info`, and lists show
the size and quantization.

The path comes from llmsup's status (`models[].path`); a header is read once per file
version (path, size, modification time). A file the gateway cannot read gives the empty
facts, never an error: the routes still answer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from llmsup.supervisor.models.errors import ModelError
from llmsup.supervisor.models.gguf import gguf_info

log = logging.getLogger("llmsup.gateway")

# Metadata Ollama's model_info leaves out: the template has a member of its own, and the
# tokenizer's arrays are not kept by our header reader.
NOT_INFO_PREFIXES = ("tokenizer.chat_template",)


@dataclass(frozen=True)
class ModelFacts:
    size: int = 0  # bytes of the file
    family: str = ""  # general.architecture
    parameter_size: str = ""  # as Ollama prints it: "134.52M", "8.0B"
    quantization_level: str = ""  # "Q4_K_M", "F16", ...
    info: dict[str, Any] = field(default_factory=dict)  # model_info
    embedding: bool = False  # it names a pooling type: an embedding model
    chat: bool = False  # it has a chat template (so it can take tools)

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family] if self.family else None,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def capabilities(self) -> list[str]:
        """Ollama's capabilities: an embedding model (one that names its pooling) embeds
        only; llmsup also embeds with a generation model (mean pooling), and tools go
        through a chat template."""
        if self.embedding:
            return ["embedding"]
        return ["completion", *(["tools"] if self.chat else []), "embedding"]


EMPTY = ModelFacts()


class FactsCache:
    def __init__(self) -> None:
        self._by_version: dict[tuple[str, int, int], ModelFacts] = {}

    def of(self, path: str | None) -> ModelFacts:
        if not isinstance(path, str) or not path:
            return EMPTY
        try:
            st = os.stat(path)
        except OSError:
            return EMPTY
        key = (path, st.st_size, st.st_mtime_ns)
        facts = self._by_version.get(key)
        if facts is None:
            facts = self._by_version[key] = read_facts(path)
        return facts


def read_facts(path: str) -> ModelFacts:
    try:
        info = gguf_info(path)
    except (ModelError, OSError) as exc:
        log.warning("cannot read the header of %s for /api/show: %s", path, exc)
        return EMPTY
    meta = info.metadata
    arch = info.architecture
    model_info = {k: v for k, v in meta.items() if not k.startswith(NOT_INFO_PREFIXES)}
    model_info["general.parameter_count"] = info.parameters
    return ModelFacts(
        size=info.size_bytes,
        family=arch,
        parameter_size=human_number(info.parameters),
        quantization_level=quantization(meta.get("general.file_type")),
        info=model_info,
        embedding=f"{arch}.pooling_type" in meta,
        chat=info.chat_template,
    )


def human_number(n: int) -> str:
    """A parameter count as Ollama prints it (its format.HumanNumber)."""
    for unit, scale, digits in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 0)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return str(n)


def quantization(file_type: object) -> str:
    """general.file_type as Ollama names it: MOSTLY_Q4_K_M -> Q4_K_M."""
    if not isinstance(file_type, int):
        return ""
    from gguf.constants import LlamaFileType  # a table only

    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return ""
    return {"ALL_F32": "F32"}.get(name, name.removeprefix("MOSTLY_"))
