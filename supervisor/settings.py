"""Every setting of llmsup, declared once: its name, type, default, limits, help and which
process takes it. `llmsup start`'s options (commands/options.py), the HTTP gateway's
arguments (gateway/__main__.py) and the argv that start hands to the daemon and to the
gateway are all built from SETTINGS, so a new setting is one entry here and its help
cannot drift between them.

A setting's `name` is its flag without the dashes; `dest` the Python name its value has.
The declaration imports no CLI library: the config file of a later change reads it too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsup.protocol import constants as C


class Process(enum.Enum):
    """Which command line a setting is part of (EVERY: each `llmsup` command's)."""

    EVERY = "every"  # every `llmsup` command (commands/common.py: state_option)
    START = "start"  # `llmsup start` (the supervisor)
    GATEWAY = "gateway"  # `python -m llmsup.supervisor.gateway`, spawned by the supervisor


EVERY = frozenset({Process.EVERY})
START = frozenset({Process.START})
GATEWAY = frozenset({Process.GATEWAY})
BOTH = START | GATEWAY  # given to start, which passes it on to its gateway


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type | tuple[type, ...]  # int, float, str, bool (a flag), Path, or a tuple of them
    help: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    multiple: bool = False  # repeatable; the value is a tuple
    required: bool = False
    hidden: bool = False  # internal: how processes talk to each other, not for users
    directory: bool = False  # a Path that names a directory (checked by its user, not here)
    show_default: bool = True  # False where the help says what an unset value means
    processes: frozenset[Process] = START
    # Changes on reload (SIGHUP, `llmsup reload`) without a restart (supervisor/reload.py).
    live: bool = False
    in_file: bool = True  # a key of the config file (and an LLMSUP_* variable)
    dest_name: str | None = field(default=None, repr=False)

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.dest_name or self.name.replace("-", "_")

    @property
    def env(self) -> str:
        """The environment variable that sets it, e.g. LLMSUP_QUEUE_SIZE."""
        return "LLMSUP_" + self.name.upper().replace("-", "_")

    @property
    def is_flag(self) -> bool:
        return self.kind is bool

    def range_text(self) -> str:
        """The limits as the errors and help say them, e.g. "between 0 and 600"."""
        if self.min is not None and self.max is not None:
            return f"between {self.min:g} and {self.max:g}"
        if self.min is not None:
            return f"at least {self.min:g}"
        return f"at most {self.max:g}"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "state-dir",
        Path,
        "Where the instance keeps its sockets, pidfile and log "
        "[default: $LLMSUP_STATE_DIR, $XDG_RUNTIME_DIR/llmsup or /tmp/llmsup-UID].",
        directory=True,
        show_default=False,
        processes=EVERY,
    ),
    # --- models and layout ---
    Setting(
        "model",
        str,
        "A model to serve: a catalog name (`llmsup models`), NAME=PATH or a "
        "GGUF path; repeat for several (the first is the default) [default: the catalog's "
        "default].",
        default=(),
        metavar="MODEL",
        multiple=True,
        show_default=False,
    ),
    Setting(
        "keep-alive",
        float,
        "Seconds a model other than the default stays loaded unused; "
        "then its cores go back to the default model.",
        default=300.0,
        min=0,
        live=True,
    ),
    Setting(
        "max-loaded",
        int,
        "Models loaded at once at most (each takes whole core groups).",
        default=2,
        min=1,
    ),
    Setting(
        "workers",
        int,
        "Number of workers [default: physical cores / --cores-per-worker].",
        show_default=False,
    ),
    Setting(
        "cores-per-worker",
        int,
        "Physical cores per worker, = llama.cpp threads [default: 2].",
        show_default=False,
    ),
    Setting(
        "ctx-size",
        int,
        "Context of each slot (sequence), in tokens.",
        default=2048,
        min=128,
        max=131072,
    ),
    Setting(
        "slots-per-worker",
        int,
        "Sequences each worker decodes at once (docs/architecture.md: Step plan, Layout).",
        default=8,
        min=1,
        max=64,
    ),
    Setting(
        "prefill-chunk",
        int,
        "Prompt tokens a worker reads per step while its other sequences wait.",
        default=256,
        min=1,
        max=4096,
    ),
    Setting(
        "cache-mb",
        int,
        "Shared-memory prompt-prefix cache, in MB; 0 turns it off "
        "[default: a sixteenth of RAM, at most 1024].",
        min=0,
        show_default=False,
    ),
    # --- where clients connect ---
    Setting(
        "bind",
        str,
        "Client endpoint [default: ipc://STATE_DIR/client.sock].",
        show_default=False,
        dest_name="endpoint",
    ),
    Setting(
        "allow-remote",
        bool,
        "Allow --bind to a non-loopback address or an abstract "
        "ipc://@NAME socket; for the gateway, a non-loopback --listen (needs an API key).",
        default=False,
        processes=BOTH,
    ),
    Setting(
        "tcp-auth",
        str,
        "How tcp peers authenticate: CURVE with the state dir's keys, or not at all.",
        default="curve",
        choices=("curve", "none"),
    ),
    # --- the HTTP gateway ---
    Setting(
        "http",
        str,
        "Also serve the OpenAI HTTP API there, from a gateway process llmsup keeps alive.",
        metavar="HOST:PORT",
        show_default=False,
    ),
    Setting(
        "api-key",
        str,
        "Require `Authorization: Bearer KEY` on the HTTP API (kept in the state dir, 0600).",
        show_default=False,
        live=True,
    ),
    Setting(
        "api-key-file",
        Path,
        "Like --api-key, the key read from this file (a regular "
        "file of this user, 0600, not a symlink).",
        show_default=False,
        processes=BOTH,
        metavar="PATH",
        live=True,
    ),
    Setting(
        "node-name",
        str,
        "This node's name in the X-Llmsup-Node header of every HTTP "
        "response [default: the host name].",
        show_default=False,
        processes=BOTH,
    ),
    Setting(
        "drain-health-s",
        float,
        "On stop, seconds the HTTP gateway answers /health 503 "
        "while still serving, once a balancer has asked /health (two of its check "
        "intervals).",
        default=2.0,
        min=0,
        max=600,
        processes=BOTH,
    ),
    Setting(
        "public-metrics",
        bool,
        "Serve /metrics without the API key (for Prometheus or Kubernetes' endpoint picker).",
        default=False,
        processes=BOTH,
    ),
    Setting(
        "cors-origin",
        str,
        "A browser origin (scheme://host[:port]) allowed to call the HTTP API across "
        "origins, or * for any; repeat for several. None: no CORS headers at all.",
        default=(),
        metavar="ORIGIN",
        multiple=True,
        show_default=False,
        processes=BOTH,
    ),
    Setting(
        "endpoint",
        str,
        "llmsup's ZeroMQ client endpoint, e.g. ipc:///tmp/llmsup-1000/client.sock.",
        required=True,
        processes=GATEWAY,
    ),
    Setting(
        "listen",
        str,
        "HOST:PORT to serve HTTP on ([::1]:PORT for IPv6; port 0: any free port); a host "
        "that is not loopback needs --allow-remote.",
        required=True,
        metavar="HOST:PORT",
        processes=GATEWAY,
    ),
    Setting(
        "curve-keys",
        str,
        "Connect with CURVE, using the client keys in this state dir.",
        metavar="STATE_DIR",
        processes=GATEWAY,
        show_default=False,
    ),
    Setting(
        "live-file",
        str,
        "A JSON file of the state dir to re-read the API key file and the log level from, "
        "at start and on SIGHUP (the supervisor's reload writes it).",
        hidden=True,
        processes=GATEWAY,
        show_default=False,
        in_file=False,
    ),
    Setting(
        "max-body-bytes",
        int,
        "Larger request bodies get 413 (the protocol's frame limit).",
        default=C.MAX_FRAME_BYTES,
        min=1,
        processes=GATEWAY,
    ),
    Setting(
        "lanes",
        int,
        "Connections to llmsup that HTTP clients are spread over (by "
        "prompt_cache_key, user or the prompt's start).",
        default=8,
        min=1,
        max=256,
        processes=GATEWAY,
    ),
    # --- admission ---
    Setting(
        "queue-size",
        int,
        "Requests that may wait for a free worker slot; beyond it: overloaded.",
        default=32,
        min=0,
        max=100000,
        live=True,
    ),
    Setting(
        "queue-tokens",
        int,
        "Estimated prompt tokens that may wait in the queue.",
        default=65536,
        min=1,
        live=True,
    ),
    Setting(
        "client-queue",
        int,
        "Waiting requests one client may hold [default: queue size / 2].",
        min=1,
        show_default=False,
        live=True,
    ),
    Setting(
        "startup-timeout",
        float,
        "Seconds every worker has to load the model and report ready.",
        default=120.0,
        min=1,
    ),
    Setting(
        "drain-timeout",
        float,
        "Seconds a stop waits for requests in flight before failing them.",
        default=30.0,
        min=0,
        live=True,
    ),
    # --- watchdogs ---
    Setting(
        "mem-soft-mb",
        int,
        "Anonymous memory of a worker that makes it recycle.",
        default=2048,
        min=1,
        live=True,
    ),
    Setting(
        "mem-hard-mb",
        int,
        "Anonymous memory of a worker that gets it killed at once.",
        default=4096,
        min=1,
        live=True,
    ),
    Setting(
        "stall-timeout",
        float,
        "Seconds of no token progress before a worker is hung.",
        default=30.0,
        min=1,
        live=True,
    ),
    Setting(
        "spin-cpu",
        float,
        "CPU% of an idle worker that counts as spinning.",
        default=50.0,
        min=1,
        live=True,
    ),
    Setting(
        "spin-seconds",
        float,
        "Seconds of idle spinning before a recycle.",
        default=10.0,
        min=1,
        live=True,
    ),
    Setting(
        "max-requests",
        int,
        "Recycle a worker after this many requests, +0-10% jitter (0: never).",
        default=0,
        min=0,
        live=True,
    ),
    Setting(
        "crash-loop",
        (int, float),
        "N crashes within SECONDS mark a worker FATAL.",
        default=(5, 60.0),
        metavar="N SECONDS",
        live=True,
    ),
    # --- how the processes start each other ---
    # --- logs ---
    Setting(
        "log-level",
        str,
        "Least severe log records written.",
        default="info",
        choices=("debug", "info", "warning", "error"),
        processes=BOTH,
        live=True,
    ),
    Setting(
        "log-format",
        str,
        "text: one line a record; json: one object a line (time, level, logger, message, "
        "and request, worker or model where there is one). Under systemd's journal text "
        "lines carry no timestamp of their own.",
        default="text",
        choices=("text", "json"),
        processes=BOTH,
    ),
    # --- how the processes start each other ---
    Setting(
        "config",
        Path,
        "Config file (TOML) [default: $XDG_CONFIG_HOME/llmsup/llmsup.toml, else "
        "/etc/llmsup/llmsup.toml, where one exists]. Flags win over LLMSUP_* variables, "
        "which win over the file (`llmsup config show`).",
        show_default=False,
        in_file=False,
        metavar="FILE",
    ),
    Setting(
        "foreground",
        bool,
        "Stay in the foreground (systemd, containers).",
        default=False,
        in_file=False,
    ),
    Setting(
        "ready-fd",
        int,
        "A pipe to write to once ready (how a parent process learns it is up).",
        hidden=True,
        processes=BOTH,
        show_default=False,
        in_file=False,
    ),
)

BY_NAME = {s.name: s for s in SETTINGS}


def for_process(process: Process) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if process in s.processes)


def default(name: str) -> Any:
    return BY_NAME[name].default


def to_argv(process: Process, values: dict[str, Any]) -> list[str]:
    """`values` (by dest) as the command line of `process`: flags set, values given,
    repeated settings repeated; unset (None, False, ()) ones left out."""
    argv: list[str] = []
    for s in for_process(process):
        value = values.get(s.dest)
        if value is None or value is False or value == ():
            continue
        if s.is_flag:
            argv.append(s.flag)
        elif s.multiple:
            for item in value:
                argv += [s.flag, str(item)]
        elif isinstance(value, tuple):
            argv += [s.flag, *map(str, value)]
        else:
            argv += [s.flag, str(value)]
    return argv
