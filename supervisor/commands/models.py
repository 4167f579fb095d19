"""`llmsup models`: the catalog's models and a running instance's, and where each is loaded."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from llmsup.supervisor.commands.common import fail, state_of, state_option
from llmsup.supervisor.models.catalog import DEFAULT_MODEL, catalog, catalog_path
from llmsup.supervisor.models.errors import ModelError
from llmsup.supervisor.models.fetch import is_fetched
from llmsup.supervisor.models.gguf import gguf_info
from llmsup.supervisor.models.spec import resolve_models

# A worker in one of these states holds no model.
GONE = ("dead", "failed", "fatal")


@click.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the models.")
@click.option(
    "--fetch",
    is_flag=True,
    help="First fetch every catalog model not yet in the cache (with progress on stderr).",
)
@state_option
def models_command(as_json, fetch, state_dir):
    """List the models: the catalog's and those a running llmsup serves.

    For each: name, file, size, architecture, context length (trained), whether the file
    has a chat template, whether it is fetched, and the workers it is loaded on.
    """
    if fetch:
        try:
            resolve_models(catalog())
        except ModelError as exc:
            fail(str(exc))
    state = state_of(state_dir)
    status, why = running_status(state)
    rows = model_rows(status)
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if status is None:
        click.echo(f"llmsup is not running in {state.path}: {why}")
    else:
        click.echo(f"llmsup pid {status.get('pid')} in {state.path}")
    click.echo(render(rows, running=status is not None))


def running_status(state) -> tuple[dict | None, str]:
    """The status of the supervisor running in `state`, or None and why there is none."""
    from llmsup.protocol.client import Client, LlmsupError, NotRunning

    if state.running_pid() is None:
        return None, "nothing is loaded"
    try:
        with Client(state_dir=state.path, timeout=5) as client:
            return client.status(), ""
    except (NotRunning, LlmsupError, TimeoutError, OSError) as exc:
        return None, f"its status cannot be read ({exc})"


def model_rows(status: dict | None) -> list[dict]:
    """One dict per model: the catalog's, then the other models `status` shows served."""
    served = served_models(status)
    rows = []
    for name in catalog():
        path = catalog_path(name)
        rows.append(row(name, path, fetched=is_fetched(name), catalog=True))
    for name, path in served.items():
        if name not in catalog():
            rows.append(row(name, path, fetched=None, catalog=False))
    default = status.get("model") if status else DEFAULT_MODEL
    workers = (status or {}).get("workers") or []
    for r in rows:
        r["default"] = r["name"] == default or (r["file"] is not None and r["file"] == default)
        r["served"] = r["name"] in served
        r["loaded"] = [
            {"worker": w.get("id"), "state": w.get("state")}
            for w in workers
            if w.get("state") not in GONE and worker_model(w, served) == r["name"]
        ]
    return rows


def served_models(status: dict | None) -> dict[str, Path | None]:
    """Name -> file (None if status does not say) of the models a running llmsup serves.

    Today's status has `models`, a list of {"name", ...} (a "path" is used if present), and
    `model`, the default's name; an older one only `model`, the path of its one model.
    """
    if not status:
        return {}
    served: dict[str, Path | None] = {}
    for entry in status.get("models") or []:
        if isinstance(entry, str):
            served[entry] = None
        elif isinstance(entry, dict) and entry.get("name"):
            path = entry.get("path") or entry.get("file")
            served[entry["name"]] = Path(path) if path else None
    model = status.get("model")
    if not served and isinstance(model, str):
        path = Path(model)
        served[catalog_name_of(path) or path.stem.lower()] = path
    for name, path in served.items():
        if path is None and name in catalog():
            served[name] = catalog_path(name)
    return served


def catalog_name_of(path: Path) -> str | None:
    for name in catalog():
        if catalog_path(name) == path:
            return name
    return None


def worker_model(worker: dict, served: dict[str, Path | None]) -> str | None:
    """The model a worker's status entry runs; without a `model` field, the only one."""
    if worker.get("model"):
        return worker["model"]
    return next(iter(served)) if len(served) == 1 else None


def row(name: str, path: Path | None, *, fetched: bool | None, catalog: bool) -> dict:
    info = error = None
    if path is not None and path.exists():
        try:
            info = gguf_info(path)
        except ModelError as exc:
            error = str(exc)
    return {
        "name": name,
        "file": str(path) if path is not None else None,
        "size_mb": round(info.size_bytes / 1e6, 1) if info else None,
        "architecture": info.architecture if info else None,
        "context_length": info.context_length if info else None,
        "chat_template": info.chat_template if info else None,
        "fetched": fetched,  # None: not a catalog model
        "catalog": catalog,
        "error": error,
    }


def render(rows: list[dict], running: bool) -> str:
    def yes(value) -> str:
        return "-" if value is None else ("yes" if value else "no")

    def loaded(r) -> str:
        if not r["loaded"]:
            return "-"
        return ",".join(
            f"{w['worker']}" if w["state"] == "ready" else f"{w['worker']}({w['state']})"
            for w in r["loaded"]
        )

    table = [("NAME", "SIZE MB", "ARCH", "CONTEXT", "CHAT", "FETCHED", "WORKERS", "FILE")]
    for r in rows:
        table.append(
            (
                r["name"] + (" *" if r["default"] else ""),
                f"{r['size_mb']:.0f}" if r["size_mb"] is not None else "-",
                r["architecture"] or "-",
                str(r["context_length"]) if r["context_length"] is not None else "-",
                yes(r["chat_template"]),
                yes(r["fetched"]) if r["catalog"] else "file",
                loaded(r) if running else "-",
                (r["file"] or "-") + (f"  ({r['error']})" if r["error"] else ""),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    right = {1, 3}  # numbers
    lines = []
    for line in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=False))
        ]
        lines.append("  ".join([*cells, line[-1]]))
    lines.append(
        "* the default model" + ("" if running else " (of `llmsup start` without --model)")
    )
    return "\n".join(lines)
