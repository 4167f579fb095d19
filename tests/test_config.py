"""The config file and LLMSUP_* variables (supervisor/configfile.py, issue 27 item 2): where
it is found, precedence (flag > variable > file > default), `llmsup config show` and
`config check`, and errors that name the file, line, key and limit. No model needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from llmsup.supervisor import configfile
from llmsup.supervisor.configfile import FILE_SETTINGS, ConfigError, read_file, resolve
from llmsup.supervisor.settings import SETTINGS

pytestmark = pytest.mark.timeout(60)


def llmsup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmsup.supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else os.environ.copy(),
    )


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def defaults() -> dict:
    return {s.dest: s.default for s in FILE_SETTINGS.values()}


def test_every_start_setting_a_user_sets_is_a_file_key_and_internal_ones_are_not():
    keys = set(FILE_SETTINGS)
    assert {"queue-size", "model", "crash-loop", "api-key", "log-level", "state-dir"} <= keys
    assert not keys & {"ready-fd", "foreground", "config", "endpoint", "listen", "live-file"}
    for s in SETTINGS:
        if s.name in keys:
            assert s.env == "LLMSUP_" + s.name.upper().replace("-", "_")


def test_precedence_flag_then_variable_then_file_then_default(tmp_path):
    path = write(tmp_path / "llmsup.toml", "queue-size = 64\nqueue-tokens = 999\nkeep-alive = 5\n")
    env = {"LLMSUP_QUEUE_SIZE": "80", "LLMSUP_DRAIN_TIMEOUT": "7"}
    flags = {**defaults(), "queue_size": 90, "spin_cpu": 70.0}
    got = resolve(flags, {"queue_size", "spin_cpu"}, path, env)
    assert got["queue_size"] == configfile.Sourced(90, "flag")
    assert got["spin_cpu"].value == 70.0 and got["spin_cpu"].source == "flag"
    assert got["drain_timeout"] == configfile.Sourced(7.0, "env LLMSUP_DRAIN_TIMEOUT")
    assert got["queue_tokens"] == configfile.Sourced(999, f"file {path}:2")
    assert got["keep_alive"] == configfile.Sourced(5.0, f"file {path}:3")
    assert got["ctx_size"] == configfile.Sourced(2048, "default")
    # Without the flag the variable wins over the file.
    assert resolve(defaults(), set(), path, env)["queue_size"].value == 80


def test_where_the_file_is_found(tmp_path):
    xdg = tmp_path / "xdg"
    (xdg / "llmsup").mkdir(parents=True)
    mine = write(xdg / "llmsup" / "llmsup.toml", "")
    given = write(tmp_path / "given.toml", "")
    env = {"XDG_CONFIG_HOME": str(xdg)}
    assert configfile.config_path(given, env) == given
    assert configfile.config_path(None, {**env, "LLMSUP_CONFIG": str(given)}) == given
    assert configfile.config_path(None, env) == mine
    mine.unlink()
    expected = configfile.SYSTEM_FILE if configfile.SYSTEM_FILE.is_file() else None
    assert configfile.config_path(None, env) == expected


def test_types_lists_and_pairs_are_read_as_the_flags_read_them(tmp_path):
    path = write(
        tmp_path / "a.toml",
        'model = ["smollm2-135m-instruct", "gemma3-270m"]\ncrash-loop = [3, 30]\n'
        'allow-remote = true\nstate_dir = "~/llmsup-state"\nlog-format = "json"\n',
    )
    got = read_file(path)
    assert got["model"].value == ("smollm2-135m-instruct", "gemma3-270m")
    assert got["crash_loop"].value == (3, 30.0)
    assert got["allow_remote"].value is True
    assert got["state_dir"].value == Path("~/llmsup-state").expanduser()
    assert got["log_format"].value == "json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "queue_sise = 3\n",
            ":1: 'queue_sise' is not a key llmsup knows; did you mean 'queue-size'?",
        ),
        ('\n\nkeep-alive = "x"\n', ":3: 'keep-alive' must be a number, not 'x'"),
        ("ctx-size = 99\n", ":1: 'ctx-size' is 99; it must be between 128 and 131072"),
        ("queue-size = 1.5\n", ":1: 'queue-size' must be an integer, not 1.5"),
        ("allow-remote = 1\n", ":1: 'allow-remote' must be true or false, not 1"),
        ('tcp-auth = "plain"\n', ":1: 'tcp-auth' is 'plain'; it must be one of curve, none"),
        ("crash-loop = [3]\n", ":1: 'crash-loop' must be [integer, number] (N SECONDS)"),
        ("[gateway]\nx = 1\n", ":1: 'gateway' is not a table llmsup knows"),
        ("queue-size = \n", ": not valid TOML: Invalid value (at line 1, column 14)"),
    ],
)
def test_each_error_names_file_line_key_and_limit(tmp_path, text, expected):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        read_file(path)
    assert str(caught.value).startswith(str(path)), caught.value
    assert expected in str(caught.value), caught.value


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    path = write(tmp_path / "bad.toml", "queue-size = -1\nworkerz = 2\nspin-cpu = 0\n")
    with pytest.raises(ConfigError) as caught:
        read_file(path)
    assert len(caught.value.problems) == 3, caught.value.problems
    assert "did you mean 'workers'" in caught.value.problems[1]


def test_a_key_in_a_file_others_can_read_is_refused(tmp_path):
    path = write(tmp_path / "a.toml", 'api-key = "sekret"\n', mode=0o644)
    with pytest.raises(ConfigError, match="'api-key' is a secret, but others may read"):
        read_file(path)
    path.chmod(0o600)
    assert read_file(path)["api_key"].value == "sekret"


def test_variables_are_checked_like_the_file():
    with pytest.raises(ConfigError) as caught:
        resolve(defaults(), set(), None, {"LLMSUP_QUEUE_SIZE": "abc", "LLMSUP_SPIN_CPU": "0"})
    problems = caught.value.problems
    assert "LLMSUP_QUEUE_SIZE='abc': 'queue-size' must be an integer, not 'abc'" in problems
    assert "LLMSUP_SPIN_CPU='0': 'spin-cpu' is 0; it must be at least 1" in problems
    got = resolve(defaults(), set(), None, {"LLMSUP_CRASH_LOOP": "4 20", "LLMSUP_MODEL": "a,b"})
    assert got["crash_loop"].value == (4, 20.0) and got["model"].value == ("a", "b")


def test_config_show_prints_each_value_and_its_source(tmp_path):
    path = write(tmp_path / "llmsup.toml", 'queue-size = 64\nlog-format = "json"\n')
    env = {**os.environ, "LLMSUP_QUEUE_TOKENS": "1000"}
    shown = llmsup("config", "show", "--config", str(path), "--drain-timeout", "5", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert f"# config file: {path}" in lines
    assert f"queue-size = 64  # file {path}:1" in lines
    assert "queue-tokens = 1000  # env LLMSUP_QUEUE_TOKENS" in lines
    assert "drain-timeout = 5.0  # flag" in lines
    assert "ctx-size = 2048  # default" in lines
    # The output, without the comments, is a config file that reads back the same values.
    again = write(tmp_path / "again.toml", shown.stdout)
    assert read_file(again)["queue_size"].value == 64
    secret = llmsup("config", "show", "--api-key", "sekret", env=env)
    assert 'api-key = "(hidden)"  # flag' in secret.stdout and "sekret" not in secret.stdout
    as_json = llmsup("config", "show", "--config", str(path), "--json", env=env)
    data = orjson.loads(as_json.stdout)
    assert data["settings"]["queue-size"] == {"value": 64, "source": f"file {path}:1"}


def test_config_check_and_start_refuse_a_bad_file_before_anything_runs(tmp_path):
    good = write(tmp_path / "good.toml", "queue-size = 64\n")
    checked = llmsup("config", "check", str(good))
    assert checked.returncode == 0 and "ok (1 setting)" in checked.stdout
    bad = write(tmp_path / "bad.toml", "queue-size = 64\nqueue-sizes = 3\n")
    checked = llmsup("config", "check", str(bad))
    assert checked.returncode == 2
    assert f"{bad}:2: 'queue-sizes' is not a key llmsup knows" in checked.stderr
    state = tmp_path / "state"
    started = llmsup("start", "--config", str(bad), "--state-dir", str(state))
    assert started.returncode == 2 and "bad configuration" in started.stderr
    assert "did you mean 'queue-size'" in started.stderr
    assert not (state / "supervisor.pid").exists()


def test_commands_find_the_state_dir_a_config_file_names(tmp_path):
    xdg = tmp_path / "xdg"
    (xdg / "llmsup").mkdir(parents=True)
    state = tmp_path / "from-file"
    write(xdg / "llmsup" / "llmsup.toml", f'state-dir = "{state}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("LLMSUP_CONFIG", "LLMSUP_STATE_DIR")}
    env["XDG_CONFIG_HOME"] = str(xdg)
    result = llmsup("status", env=env)
    assert result.returncode == 1 and str(state) in result.stderr, result.stderr
