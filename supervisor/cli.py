"""The `llmsup` command line. Each command lives in a module of its own (cmd_*.py)."""

from __future__ import annotations

import click

from llmsup.supervisor.commands.client import (
    chat,
    detokenize,
    embed,
    generate,
    status,
    tokenize,
)
from llmsup.supervisor.commands.config import config_command
from llmsup.supervisor.commands.fleet import fleet
from llmsup.supervisor.commands.inspect import check, profile, top
from llmsup.supervisor.commands.models import models_command
from llmsup.supervisor.commands.service import reload_command, restart_workers, service_unit
from llmsup.supervisor.commands.start import start
from llmsup.supervisor.commands.stop import stop
from llmsup.supervisor.commands.version import print_version, version


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=print_version,
    help="Print the versions of llmsup, its protocol and llama.cpp, and exit.",
)
def main():
    """Serve a local LLM from a supervised pool of llama.cpp worker processes."""


for command in (
    start,
    stop,
    reload_command,
    restart_workers,
    status,
    models_command,
    generate,
    chat,
    tokenize,
    detokenize,
    embed,
    top,
    profile,
    check,
    config_command,
    fleet,
    service_unit,
    version,
):
    main.add_command(command)
