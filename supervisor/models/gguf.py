"""The GGUF header reader: what a model file says about its model, and whether it is whole.

`gguf_info(path)` reads the header (metadata and tensor table) by hand, without loading the
tensors, and refuses a file that is missing, not GGUF, or shorter than its tensors need, with
a message naming the file and what is wrong with it. Every model file is checked this way
before any worker is spawned.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from llmsup.supervisor.models.errors import ModelError


@dataclass(frozen=True)
class ModelInfo:
    """What a GGUF file's metadata says about its model."""

    architecture: str  # general.architecture: llama, gemma3, ...
    context_length: int  # <architecture>.context_length: the context it was trained for
    chat_template: bool  # tokenizer.chat_template is present
    size_bytes: int  # of the file
    name: str | None  # general.name, if the file has one
    parameters: int = 0  # the tensors' elements
    metadata: dict[str, object] = field(default_factory=dict)  # scalars and strings


def check_gguf(path: Path) -> None:
    """Refuse a file that is missing, not GGUF, or shorter than its tensors need."""
    gguf_info(path)


def gguf_info(path: Path) -> ModelInfo:
    """A GGUF file's model, from its header; raises ModelError for a file check_gguf refuses."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model file {path} is not a regular file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelError(f"model file {path} is not a GGUF file (it starts with {magic!r})")
        if size < 24:
            raise ModelError(f"model file {path} is truncated: it has {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                header = _gguf_header(buf)
            except (struct.error, IndexError, KeyError, ValueError) as exc:
                raise ModelError(
                    f"model file {path} is truncated or corrupt: its header cannot be read ({exc})"
                ) from None
    if header.n_tensors == 0:
        raise ModelError(f"model file {path} holds no tensors")
    if header.data_end > size:
        raise ModelError(
            f"model file {path} is truncated: it has {size} bytes, its tensors need "
            f"{header.data_end}"
        )
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"model file {path} has no general.architecture in its metadata")
    context = meta.get(f"{arch}.context_length")
    name = meta.get("general.name")
    return ModelInfo(
        architecture=arch,
        context_length=context if isinstance(context, int) else 0,
        chat_template=bool(meta.get("tokenizer.chat_template")),
        size_bytes=size,
        name=name if isinstance(name, str) else None,
        parameters=header.parameters,
        metadata=meta,
    )


# GGUF metadata value types -> struct format of fixed-size scalars (8 string, 9 array).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


@dataclass(frozen=True)
class _Header:
    data_end: int  # the byte offset where the last tensor ends
    n_tensors: int
    metadata: dict[str, object]  # the scalar and string values (arrays are skipped)
    parameters: int  # elements of all tensors


def _gguf_header(buf) -> _Header:
    """Parse a GGUF header (v2/v3) by hand: GGUFReader takes 17 s on these files."""
    from gguf.constants import GGML_QUANT_SIZES  # a table only

    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    pos = 24
    metadata: dict[str, object] = {}

    def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        return buf[pos + 8 : pos + 8 + n], pos + 8 + n

    for _ in range(n_kv):
        raw_key, pos = string(pos)
        key = raw_key.decode("utf-8", "replace")
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype == 8:
                for _ in range(count):
                    _, pos = string(pos)
            else:
                pos += count * struct.calcsize("<" + _SCALARS[etype])
        elif vtype == 8:
            value, pos = string(pos)
            metadata[key] = value.decode("utf-8", "replace")
        else:
            fmt = "<" + _SCALARS[vtype]
            (metadata[key],) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"general.alignment is {alignment!r}")
    end = parameters = 0
    for _ in range(n_tensors):
        _, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, type_size = GGML_QUANT_SIZES[gguf_type(ttype)]
        end = max(end, offset + math.prod(dims) // block * type_size)
        parameters += math.prod(dims)
    data_start = (pos + alignment - 1) // alignment * alignment
    return _Header(data_start + end, n_tensors, metadata, parameters)


def gguf_type(value: int):
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(value)
