"""`llmsup config show` and `llmsup config check`: the effective settings and where each
came from, and a config file checked without starting anything (supervisor/configfile.py)."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from llmsup.supervisor.commands.options import effective, settings_options
from llmsup.supervisor.configfile import BY_DEST, SECRET_KEYS, ConfigError, as_toml, read_file
from llmsup.supervisor.settings import Process


@click.group("config")
def config_command():
    """Show the effective settings, or check a config file."""


@config_command.command("show")
@settings_options(Process.START)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: value and source.")
def show(as_json: bool, **options):
    """Every setting `llmsup start` would run with (given these options), where each came
    from (flag, LLMSUP_* variable, file:line or default), written as a config file."""
    path, values = effective(options)
    if as_json:
        out = {BY_DEST[d].name: {"value": v.value, "source": v.source} for d, v in values.items()}
        data = {"config": str(path) if path else None, "settings": out}
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str))
        return
    click.echo(f"# config file: {path if path else 'none (defaults)'}")
    for dest, sourced in values.items():
        setting = BY_DEST[dest]
        if sourced.value is None or sourced.value == ():
            click.echo(f"# {setting.name}: unset  # {sourced.source}: {unset_note(setting)}")
            continue
        value = "(hidden)" if setting.name in SECRET_KEYS else sourced.value
        click.echo(f"{setting.name} = {as_toml(setting, value)}  # {sourced.source}")


@config_command.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path):
    """Check FILE as llmsup would read it (keys, types, limits); start nothing."""
    try:
        values = read_file(file.absolute())
    except ConfigError as exc:
        click.echo("\n".join(exc.problems), err=True)
        raise SystemExit(2) from None
    click.echo(f"{file}: ok ({len(values)} setting{'s' if len(values) != 1 else ''})")


def unset_note(setting) -> str:
    """What an unset setting means, from its help's "[default: ...]"."""
    if "[default: " in setting.help:
        return setting.help.split("[default: ", 1)[1].rsplit("]", 1)[0]
    return "not used"
