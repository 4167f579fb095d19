"""The settings declaration (supervisor/settings.py) is the one source of start's options,
the gateway's arguments and the argv passed between them: checked here without a model."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from llmsup.supervisor.commands.start import start
from llmsup.supervisor.gateway.__main__ import parse_args
from llmsup.supervisor.settings import SETTINGS, Process, for_process, to_argv

START_PARAMS = {p.name: p for p in start.params}

# A value of each setting's type inside its limits, for the round trips below.
SAMPLE = {int: 7, float: 2.5, str: "x", Path: Path("/tmp/llmsup-key"), bool: True}


def sample(setting) -> object:
    if setting.choices:
        return setting.choices[-1]
    if isinstance(setting.kind, tuple):
        return (3, 40.0)
    value = SAMPLE[setting.kind]
    if setting.kind in (int, float) and setting.min is not None:
        value = max(value, setting.min)
    if setting.kind in (int, float) and setting.max is not None:
        value = min(value, setting.max)
    return (value,) if setting.multiple else value


def test_every_start_setting_is_an_option_with_its_default_and_help():
    for s in for_process(Process.START):
        param = START_PARAMS[s.dest]
        assert param.opts[0] == s.flag, s.name
        assert param.default == s.default, s.name
        assert param.help == s.help, s.name  # as written: click prints it so
        assert param.hidden == s.hidden, s.name
    assert set(START_PARAMS) == {s.dest for s in for_process(Process.START)} | {"state_dir"}


def test_start_parses_back_what_to_argv_writes():
    values = {s.dest: sample(s) for s in for_process(Process.START)}
    values.update(foreground=False, ready_fd=None, api_key=None)  # not forwarded as given
    argv = to_argv(Process.START, values)
    parsed = start.make_context("start", argv).params
    for s in for_process(Process.START):
        want = values[s.dest]
        if want is None or want is False:
            continue
        assert parsed[s.dest] == want, (s.name, argv)


def test_the_gateway_parses_back_what_to_argv_writes():
    values = {s.dest: sample(s) for s in for_process(Process.GATEWAY)}
    values["ready_fd"] = 9
    args = parse_args(to_argv(Process.GATEWAY, values))
    for s in for_process(Process.GATEWAY):
        assert getattr(args, s.dest) == values[s.dest], s.name


def test_the_gateway_takes_the_declared_defaults():
    args = parse_args(["--endpoint", "ipc:///x", "--listen", "127.0.0.1:0"])
    for s in for_process(Process.GATEWAY):
        if not s.required:
            assert getattr(args, s.dest) == s.default, s.name


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.max is not None], ids=lambda s: s.name)
def test_a_value_over_the_limit_is_refused_naming_the_flag_and_limit(s, capsys):
    over = str(s.max + 1)
    if Process.START in s.processes:
        with pytest.raises(click.BadParameter) as exc:
            start.make_context("start", [s.flag, over])
        assert s.flag in exc.value.format_message() or s.flag == exc.value.param_hint
        assert f"{s.max:g}" in exc.value.format_message()
    if Process.GATEWAY in s.processes:
        with pytest.raises(SystemExit):
            parse_args(["--endpoint", "e", "--listen", "l", s.flag, over])
        err = capsys.readouterr().err
        assert s.flag in err and s.range_text() in err, err


def test_to_argv_leaves_out_what_is_unset():
    assert to_argv(Process.START, {"http": None, "allow_remote": False, "model": ()}) == []
    assert to_argv(Process.START, {"model": ("a", "b"), "crash_loop": (3, 40.0)}) == [
        "--model",
        "a",
        "--model",
        "b",
        "--crash-loop",
        "3",
        "40.0",
    ]
