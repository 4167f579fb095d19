"""The config file and the LLMSUP_* variables: each setting's effective value and where it
came from, from the one settings declaration (settings.py).

Precedence, most important first: a flag given on the command line, then the setting's
LLMSUP_* variable (LLMSUP_QUEUE_SIZE), then the config file, then the default. The file is
TOML (Python's tomllib), flat, its keys the settings' names as the flags spell them
(`queue-size = 64`; `queue_size` is read the same). Found at --config FILE, else
$XDG_CONFIG_HOME/llmsup/llmsup.toml (~/.config when unset), else /etc/llmsup/llmsup.toml.

Every error names where the value came from (the file and line, or the variable), the key
and the limit, and an unknown key gets the nearest valid one. `start` reads this once and
the supervisor again on reload (core/reload.py), with the same flags and environment.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmsup.supervisor.settings import SETTINGS, Process, Setting

SYSTEM_FILE = Path("/etc/llmsup/llmsup.toml")
MAX_FILE_BYTES = 1024 * 1024  # a config file is a few hundred bytes; refuse a runaway one
SECRET_KEYS = ("api-key",)  # a file holding one must not be readable by others

# The keys of the file (and the LLMSUP_* variables): start's settings a user may set.
FILE_SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in SETTINGS
    if s.in_file and not s.hidden and s.processes & {Process.START, Process.EVERY}
}
BY_DEST = {s.dest: s for s in FILE_SETTINGS.values()}
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """str(): one line per problem, each naming its file and line (or variable) and key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Sourced:
    value: Any
    source: str  # "flag", "env LLMSUP_X", "file PATH:LINE" or "default"


@dataclass(frozen=True)
class Origin:
    """What `start` was given, kept so a reload reads the settings the same way: the
    --config option, the flags typed (by dest) and the environment at start."""

    config: Path | None
    flags: Mapping[str, Any]
    env: Mapping[str, str]

    def read(self) -> tuple[Path | None, dict[str, Sourced]]:
        path = config_path(self.config, self.env)
        return path, resolve(self.flags, set(self.flags), path, self.env)


def default_path(env: Mapping[str, str] = os.environ) -> Path | None:
    """The first config file that exists where llmsup looks when --config is not given."""
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for path in (Path(xdg) / "llmsup" / "llmsup.toml", SYSTEM_FILE):
        if path.is_file():
            return path
    return None


def config_path(given: Path | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """--config, else LLMSUP_CONFIG, else the default places (None: no file, defaults)."""
    if given is not None:
        return given.absolute()
    if env.get("LLMSUP_CONFIG"):
        return Path(env["LLMSUP_CONFIG"]).absolute()
    return default_path(env)


def key_name(key: str) -> str:
    return key.replace("_", "-")


def nearest(key: str) -> str:
    close = difflib.get_close_matches(key_name(key), list(FILE_SETTINGS), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else " (`llmsup config show` lists them)"


def line_of(text: str, key: str) -> int | None:
    """The line that sets `key` (or opens it as a table); tomllib gives no positions."""
    pattern = re.compile(rf"""^\s*(\[\s*)?["']?{re.escape(key)}["']?\s*(=|\])""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def read_file(path: Path) -> dict[str, Sourced]:
    """The file's settings by dest, each checked; ConfigError listing every problem."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError([f"{where}: not a regular file"])
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read: {exc.strerror}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([f"{where}: larger than {MAX_FILE_BYTES} bytes"])
    try:
        text = data.decode()
        table = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{where}: not UTF-8 (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        raise ConfigError([f"{where}: not valid TOML: {exc}"]) from None
    values: dict[str, Sourced] = {}
    problems: list[str] = []
    for key, value in table.items():
        line = line_of(text, key)
        at = f"{where}:{line}" if line else where
        setting = FILE_SETTINGS.get(key_name(key))
        if setting is None:
            kind = "a table" if isinstance(value, dict) else "a key"
            problems.append(f"{at}: '{key}' is not {kind} llmsup knows{nearest(key)}")
            continue
        if setting.name in SECRET_KEYS and info.st_mode & 0o077:
            problems.append(
                f"{at}: '{key}' is a secret, but others may read this file "
                f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it, or use "
                "api-key-file"
            )
            continue
        try:
            values[setting.dest] = Sourced(check(setting, value), f"file {at}")
        except ValueError as exc:
            problems.append(f"{at}: '{key}' {exc}")
    if problems:
        raise ConfigError(problems)
    return values


def read_env(env: Mapping[str, str]) -> dict[str, Sourced]:
    """The LLMSUP_* variables of file settings, by dest (LLMSUP_STATE_DIR included)."""
    values: dict[str, Sourced] = {}
    problems: list[str] = []
    for setting in FILE_SETTINGS.values():
        text = env.get(setting.env)
        if text is None or (text == "" and setting.kind is not bool):
            continue
        try:
            value = check(setting, from_text(setting, text))
            values[setting.dest] = Sourced(value, f"env {setting.env}")
        except ValueError as exc:
            problems.append(f"{setting.env}={text!r}: '{setting.name}' {exc}")
    if problems:
        raise ConfigError(problems)
    return values


def from_text(setting: Setting, text: str) -> Any:
    """A variable's text as the value a TOML file would hold."""
    kind = setting.kind
    if setting.multiple:
        return [part for part in re.split(r"[\s,]+", text.strip()) if part]
    if isinstance(kind, tuple):
        parts = text.split()
        if len(parts) != len(kind):
            raise ValueError(f"must be {len(kind)} numbers ({setting.metavar}), e.g. '5 60'")
        return [parse_number(k, part, setting) for k, part in zip(kind, parts, strict=True)]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in TRUE | FALSE:
            return lowered in TRUE
        raise ValueError("must be true or false (1, 0, yes, no, on, off)")
    if kind in (int, float):
        return parse_number(kind, text, setting)
    return text


def parse_number(kind: type, text: str, setting: Setting) -> int | float:
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"must be {type_name(kind)}, not {text!r}") from None


def type_name(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if isinstance(kind, tuple):
        return "[" + ", ".join(names[k].split(" ", 1)[1] for k in kind) + "]"
    return names.get(kind, "a path")


def check(setting: Setting, value: Any) -> Any:
    """The value as start's option would hold it; ValueError naming the type or limit."""
    if setting.multiple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError("must be a string or a list of strings")
        return tuple(items)
    if isinstance(setting.kind, tuple):
        if not isinstance(value, list) or len(value) != len(setting.kind):
            raise ValueError(f"must be {type_name(setting.kind)} ({setting.metavar})")
        return tuple(scalar(k, v, setting) for k, v in zip(setting.kind, value, strict=True))
    return scalar(setting.kind, value, setting)


def scalar(kind: type, value: Any, setting: Setting) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if kind in (int, float):
        ok = isinstance(value, int) or (kind is float and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            raise ValueError(f"must be {type_name(kind)}, not {value!r}")
        value = kind(value)
        low, high = setting.min, setting.max
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"is {value:g}; it must be {setting.range_text()}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be {type_name(kind)}, not {value!r}")
    if setting.choices and value not in setting.choices:
        raise ValueError(f"is {value!r}; it must be one of {', '.join(setting.choices)}")
    return Path(value).expanduser() if kind is Path else value


def resolve(
    flags: Mapping[str, Any],
    given: set[str],
    path: Path | None,
    env: Mapping[str, str] = os.environ,
) -> dict[str, Sourced]:
    """Every file setting's effective value by dest: `flags` are start's parsed options
    (defaults included), `given` the dests set on the command line; ConfigError lists
    every problem of the file and the variables together."""
    problems: list[str] = []
    from_file: dict[str, Sourced] = {}
    from_env: dict[str, Sourced] = {}
    if path is not None:
        try:
            from_file = read_file(path)
        except ConfigError as exc:
            problems += exc.problems
    try:
        from_env = read_env(env)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    out = {}
    for dest, setting in BY_DEST.items():
        if dest in given:
            out[dest] = Sourced(flags[dest], "flag")
        else:
            fallback = Sourced(setting.default, "default")
            out[dest] = from_env.get(dest) or from_file.get(dest) or fallback
    return out


def as_toml(setting: Setting, value: Any) -> str:
    """A value as the file would write it (for `config show`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(as_toml(setting, v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
