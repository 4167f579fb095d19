"""click options built from the settings declaration (supervisor/settings.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from llmsup.supervisor.configfile import ConfigError, Sourced, config_path, resolve
from llmsup.supervisor.settings import Process, Setting, for_process


def click_type(s: Setting) -> click.ParamType | type | tuple:
    if s.choices:
        return click.Choice(list(s.choices))
    if isinstance(s.kind, tuple):
        return s.kind
    if s.kind is Path:  # a directory is checked by its user (StateDir.check), not by click
        return (
            click.Path(readable=False, path_type=Path)
            if s.directory
            else click.Path(dir_okay=False, path_type=Path)
        )
    if s.min is not None or s.max is not None:
        ranged = click.IntRange if s.kind is int else click.FloatRange
        return ranged(s.min, s.max)
    return s.kind


def click_option(s: Setting) -> click.Option:
    if s.is_flag:
        return click.Option(
            [s.flag, s.dest], is_flag=True, default=s.default, help=s.help, hidden=s.hidden
        )
    # click 8 prints help as written (no %-formatting, unlike argparse): "%" stays "%".
    return click.Option(
        [s.flag, s.dest],
        type=click_type(s),
        default=s.default,
        multiple=s.multiple,
        metavar=s.metavar,
        show_default=s.show_default and s.default is not None,
        help=s.help,
        hidden=s.hidden,
    )


def settings_options(process: Process) -> Callable:
    """A decorator adding every setting of `process` to a click command, in SETTINGS order."""

    def add(command: click.Command) -> click.Command:
        options = [click_option(s) for s in for_process(process)]
        if isinstance(command, click.Command):
            command.params[:0] = options
            return command
        command.__click_params__ = [*getattr(command, "__click_params__", []), *reversed(options)]
        return command

    return add


def given_on_command_line() -> set[str]:
    """The options of the running click command that were typed, not defaulted."""
    ctx = click.get_current_context()
    return {
        p.name
        for p in ctx.command.params
        if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE
    }


def effective(options: dict) -> tuple[Path | None, dict[str, Sourced]]:
    """(the config file read, every setting's Sourced value) for these start options; a
    problem of the file or the variables ends the command with every problem listed."""
    path = config_path(options.get("config"))
    try:
        return path, resolve(options, given_on_command_line(), path)
    except ConfigError as exc:
        click.echo("llmsup: bad configuration:\n  " + "\n  ".join(exc.problems), err=True)
        raise SystemExit(2) from None
