"""The models to serve, from `--model` specs: a catalog name, `NAME=PATH`, or a GGUF path.

`resolve_models(specs)` turns the specs into `ModelSpec`s (name, path, GGUF metadata),
fetching catalog models if need be. Every file is checked before any worker is spawned, so a
missing, truncated or non-GGUF file is refused with a message naming the file and what is
wrong with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llmsup.supervisor.models.catalog import DEFAULT_MODELS, NAME_RE, catalog, catalog_path
from llmsup.supervisor.models.errors import ModelError
from llmsup.supervisor.models.fetch import Progress, fetch
from llmsup.supervisor.models.gguf import ModelInfo, gguf_info


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name (catalog name, NAME of NAME=PATH, or the file's stem,
    lowercase), its checked GGUF file (absolute) and that file's metadata."""

    name: str
    path: Path
    info: ModelInfo


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
