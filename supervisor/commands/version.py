"""`llmsup version` and `llmsup --version`: what is installed, for a bug report or a check
that two nodes run the same build."""

from __future__ import annotations

from importlib import metadata

import click
import orjson

from llmsup.protocol import constants as C


def versions() -> dict:
    from llmsup.worker.build import build_info  # loads llama.cpp: only when asked

    try:
        llmsup = metadata.version("llmsup")
    except metadata.PackageNotFoundError:  # run from a tree that was never installed
        llmsup = "unknown"
    return {"llmsup": llmsup, "protocol": C.VERSION.decode(), **build_info()}


def one_line(v: dict) -> str:
    ggml = " ".join(filter(None, (v.get("ggml_version"), v.get("ggml_commit"))))
    return (
        f"llmsup {v['llmsup']} (protocol {v['protocol']}, llama-cpp-python "
        f"{v['llama_cpp_python']}, ggml {ggml or 'unknown'}; CPU: "
        f"{' '.join(v['cpu_features'])})"
    )


def print_version(ctx: click.Context, param, value: bool) -> None:
    """The --version flag of the `llmsup` group."""
    if value and not ctx.resilient_parsing:
        click.echo(one_line(versions()))
        ctx.exit()


@click.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
def version(as_json: bool) -> None:
    """Print llmsup's version, the protocol's and the llama.cpp build's (CPU features)."""
    v = versions()
    click.echo(orjson.dumps(v, option=orjson.OPT_INDENT_2).decode() if as_json else one_line(v))
