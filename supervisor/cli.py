"""The `llmsup` command line: start, stop, status, generate, chat, tokenize, check."""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import orjson

from llmsup.protocol import scoreboard
from llmsup.protocol.client import Client, LlmsupError, NotRunning
from llmsup.supervisor.server import Config, Supervisor
from llmsup.supervisor.statedir import StateDir, StateDirError, default_state_dir
from llmsup.supervisor.watchdog import Limits, py_spy
from llmsup.worker import faults

EXIT_NOT_RUNNING = 1
EXIT_FORCED = 3
EXIT_KILLED = 4


def state_option(f):
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the instance keeps its sockets, pidfile and log "
        "[default: $LLMSUP_STATE_DIR, $XDG_RUNTIME_DIR/llmsup or /tmp/llmsup-UID].",
    )(f)


def state_of(state_dir: Path | None) -> StateDir:
    return StateDir((state_dir or default_state_dir()).absolute())


def fail(message: str, code: int = 1):
    click.echo(f"llmsup: {message}", err=True)
    sys.exit(code)


@click.group()
def main():
    """Serve a local LLM from a supervised pool of llama.cpp worker processes."""


# --- start ------------------------------------------------------------------------------------


def check_bind(endpoint: str, allow_remote: bool) -> str:
    if endpoint.startswith("ipc://"):
        return endpoint
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise click.BadParameter(
            "must be ipc://PATH or tcp://HOST:PORT, e.g. tcp://127.0.0.1:7411", param_hint="--bind"
        )
    host = endpoint[6:].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return endpoint
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise click.BadParameter(
            f"{host} is not a loopback address; llmsup has no authentication, so binding to "
            "other hosts needs --allow-remote",
            param_hint="--bind",
        )
    return endpoint


@main.command()
@click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="GGUF model file [default: the embedded Gemma 3 270M Q4_K_M].",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Number of workers [default: physical cores / --cores-per-worker].",
)
@click.option(
    "--cores-per-worker",
    type=int,
    default=None,
    help="Physical cores per worker, = llama.cpp threads [default: 1].",
)
@click.option(
    "--ctx-size",
    type=click.IntRange(128, 131072),
    default=2048,
    show_default=True,
    help="Context of each slot (sequence), in tokens.",
)
@click.option(
    "--bind",
    "endpoint",
    default=None,
    help="Client endpoint [default: ipc://STATE_DIR/client.sock].",
)
@click.option("--allow-remote", is_flag=True, help="Allow --bind to a non-loopback address.")
@click.option(
    "--queue-size",
    type=click.IntRange(0, 100000),
    default=32,
    show_default=True,
    help="Requests that may wait for a free worker slot; beyond it: overloaded.",
)
@click.option(
    "--queue-tokens",
    type=click.IntRange(1),
    default=65536,
    show_default=True,
    help="Estimated prompt tokens that may wait in the queue.",
)
@click.option(
    "--client-queue",
    type=click.IntRange(1),
    default=None,
    help="Waiting requests one client may hold [default: queue size / 2].",
)
@click.option(
    "--startup-timeout",
    type=click.FloatRange(1),
    default=120.0,
    show_default=True,
    help="Seconds every worker has to load the model and report ready.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds a stop waits for requests in flight before failing them.",
)
@click.option(
    "--slots-per-worker",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Sequences each worker decodes at once.",
)
@click.option(
    "--mem-soft-mb",
    type=click.IntRange(1),
    default=Limits.mem_soft_mb,
    show_default=True,
    help="Anonymous memory of a worker that makes it recycle.",
)
@click.option(
    "--mem-hard-mb",
    type=click.IntRange(1),
    default=Limits.mem_hard_mb,
    show_default=True,
    help="Anonymous memory of a worker that gets it killed at once.",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(1),
    default=Limits.stall_timeout_s,
    show_default=True,
    help="Seconds of no token progress before a worker is hung.",
)
@click.option(
    "--spin-cpu",
    type=click.FloatRange(1),
    default=Limits.spin_cpu_percent,
    show_default=True,
    help="CPU%% of an idle worker that counts as spinning.",
)
@click.option(
    "--spin-seconds",
    type=click.FloatRange(1),
    default=Limits.spin_seconds,
    show_default=True,
    help="Seconds of idle spinning before a recycle.",
)
@click.option(
    "--max-requests",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Recycle a worker after this many requests, +0-10%% jitter (0: never).",
)
@click.option(
    "--crash-loop",
    type=(int, float),
    default=(Limits.crash_loop_failures, Limits.crash_loop_window_s),
    show_default=True,
    metavar="N SECONDS",
    help="N crashes within SECONDS mark a worker FATAL.",
)
@click.option("--foreground", is_flag=True, help="Stay in the foreground (systemd, containers).")
@click.option("--ready-fd", type=int, default=None, hidden=True)
@state_option
@click.pass_context
def start(ctx, **options):
    """Start llmsup; return when every worker is ready and print the endpoint."""
    from llmsup.supervisor import layout
    from llmsup.supervisor import model as models

    o = options
    state = state_of(o["state_dir"])
    try:
        groups = layout.core_groups(o["workers"], o["cores_per_worker"])
        state.ensure()
        endpoint = check_bind(o["endpoint"] or state.client_endpoint, o["allow_remote"])
    except (layout.LayoutError, StateDirError) as exc:
        fail(str(exc))
    pid = state.running_pid()
    if pid is not None:
        fail(
            f"llmsup is already running (pid {pid}, state dir {state.path}); "
            "stop it with `llmsup stop` or use another --state-dir"
        )
    try:
        model_path = models.resolve(str(o["model"]) if o["model"] else None)
    except models.ModelError as exc:
        fail(str(exc))

    if not o["foreground"]:
        args = forward_options(ctx, model=model_path, endpoint=endpoint, state_dir=state.path)
        info = daemonize(state, args, o["startup_timeout"])
        click.echo(f"llmsup started: pid {info['pid']}, endpoint {info['endpoint']}")
        for w in info["workers"]:
            click.echo(f"  worker {w['id']}: pid {w['pid']}, cores {w['cores']}")
        return
    limits = Limits(
        mem_soft_mb=o["mem_soft_mb"],
        mem_hard_mb=o["mem_hard_mb"],
        stall_timeout_s=o["stall_timeout"],
        spin_cpu_percent=o["spin_cpu"],
        spin_seconds=o["spin_seconds"],
        max_requests=o["max_requests"],
        crash_loop_failures=o["crash_loop"][0],
        crash_loop_window_s=o["crash_loop"][1],
    )
    config = Config(
        model=str(model_path),
        groups=groups,
        ctx_size=o["ctx_size"],
        endpoint=endpoint,
        queue_size=o["queue_size"],
        queue_tokens=o["queue_tokens"],
        client_queue=o["client_queue"],
        startup_timeout=o["startup_timeout"],
        drain_timeout=o["drain_timeout"],
        slots_per_worker=o["slots_per_worker"],
        limits=limits,
    )
    sys.exit(run_supervisor(state, o["ready_fd"], config))


def forward_options(ctx: click.Context, **overrides) -> list[str]:
    """This command's options as argv for the detached `start --foreground`."""
    args = []
    for param in ctx.command.params:
        if param.name in ("foreground", "ready_fd"):
            continue
        value = overrides.get(param.name, ctx.params[param.name])
        flag = max(param.opts, key=len)
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def daemonize(state: StateDir, args: list[str], startup_timeout: float) -> dict:
    """Run `start --foreground` detached, and wait for it to report ready or failed."""
    read_fd, write_fd = os.pipe()
    with open(state.log_file, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmsup.supervisor",
                "start",
                "--foreground",
                "--ready-fd",
                str(write_fd),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    data = b""
    deadline = time.monotonic() + startup_timeout + 15
    with os.fdopen(read_fd, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    if not data:
        if proc.poll() is None:
            proc.kill()
        fail(f"the supervisor did not report ready; see {state.log_file}:\n{log_tail(state)}")
    report = orjson.loads(data)
    if not report["ok"]:
        fail(f"start failed: {report['error']}\n(log: {state.log_file})", 2)
    return report["info"]


def log_tail(state: StateDir, lines: int = 15) -> str:
    try:
        return "\n".join(state.log_file.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def run_supervisor(state: StateDir, ready_fd: int | None, config: Config) -> int:
    try:
        lock_fd = state.lock()
    except StateDirError as exc:
        fail(str(exc))
    state.remove_runtime_files(keep_pidfile=True)  # left by a supervisor that was killed
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s llmsup[{os.getpid()}] %(levelname)s %(message)s",
    )

    def on_ready(ok: bool, detail) -> None:
        if ready_fd is None:
            click.echo(
                f"llmsup ready: endpoint {detail['endpoint']}"
                if ok
                else f"llmsup: start failed: {detail}",
                err=not ok,
            )
            return
        report = {"ok": ok, "info": detail} if ok else {"ok": False, "error": detail}
        os.write(ready_fd, orjson.dumps(report))
        os.close(ready_fd)

    if faults.enabled():
        logging.warning("fault injection is ON (%s): for tests only", faults.ENV)
    supervisor = Supervisor(config, state, on_ready=on_ready)
    code = supervisor.run()
    state.write_json(
        state.stop_file,
        {
            "exit_status": code,
            "drained": code == 0,
            "failed_requests": supervisor.failed_on_stop,
        },
    )
    state.remove_runtime_files()
    os.close(lock_fd)
    return code


# --- stop -------------------------------------------------------------------------------------


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return bool(ready)
    finally:
        os.close(fd)


@main.command()
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for requests in flight before failing them.",
)
@state_option
def stop(timeout, state_dir):
    """Drain and stop llmsup.

    Exit status: 0 drained cleanly; 3 requests still in flight at the timeout were failed;
    4 the supervisor had to be SIGKILLed; 1 llmsup was not running.
    """
    state = state_of(state_dir)
    pid = state.running_pid()
    if pid is None:
        stale = state.info_file.exists() or Path(state.path, "client.sock").exists()
        swept = scoreboard.sweep(scoreboard.segment_name(str(state.path)))
        if stale or swept:
            state.remove_runtime_files()
            fail(f"llmsup is not running (state dir {state.path}); removed the sockets, pidfile "
                 "and shared memory left by a supervisor that died", EXIT_NOT_RUNNING)  # fmt: skip
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    state.stop_file.unlink(missing_ok=True)
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout + 2):
        # SIGQUIT: fail what is still in flight now, kill the workers, exit.
        os.kill(pid, signal.SIGQUIT)
        if not wait_exit(pid, 10):
            os.kill(pid, signal.SIGKILL)  # workers follow through PR_SET_PDEATHSIG
            wait_exit(pid, 5)
            state.remove_runtime_files()
            scoreboard.sweep(scoreboard.segment_name(str(state.path)))
            click.echo(f"llmsup killed (pid {pid}): it did not stop in time", err=True)
            sys.exit(EXIT_KILLED)
    try:
        result = orjson.loads(state.stop_file.read_bytes())
        state.stop_file.unlink()
    except FileNotFoundError:
        result = {"drained": False, "failed_requests": None}
    if result["drained"]:
        click.echo(f"llmsup stopped (pid {pid}): all requests drained")
        return
    click.echo(
        f"llmsup stopped (pid {pid}): {result['failed_requests']} request(s) in flight "
        "were failed with shutting_down",
        err=True,
    )
    sys.exit(EXIT_FORCED)


# --- status and requests ------------------------------------------------------------------------


def connect(state_dir: Path | None, endpoint: str | None, timeout: float = 120.0) -> Client:
    try:
        return Client(endpoint, state_dir=state_of(state_dir).path, timeout=timeout)
    except NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)


endpoint_option = click.option(
    "--endpoint", default=None, help="Connect here instead of the state dir's supervisor."
)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@endpoint_option
@state_option
def status(as_json, endpoint, state_dir):
    """Show the supervisor and its workers."""
    with connect(state_dir, endpoint, timeout=10) as client:
        st = client.status()
    if as_json:
        click.echo(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
        return
    req = st["requests"]
    click.echo(f"llmsup pid {st['pid']}  endpoint {st['endpoint']}")
    click.echo(f"model {st['model']}")
    click.echo(
        f"queue {st['queue']['depth']}/{st['queue']['limit']}  in flight {req['in_flight']}"
        f"  accepted {req['accepted']}  rejected {req['rejected']}"
    )
    click.echo(
        f"{'ID':>3} {'PID':>8} {'CORES':<8} {'STATE':<9} {'SLOTS':>5} {'SERVED':>7}  LAST EXIT"
    )
    for w in st["workers"]:
        click.echo(
            f"{w['id']:>3} {w['pid'] or '-':>8} {','.join(map(str, w['cores'])):<8} "
            f"{w['state']:<9} {w['slots'] - w['free_slots']}/{w['slots']:<3} "
            f"{w['served']:>7}  {w['last_exit'] or '-'}"
        )


def sampling_options(f):
    for option in reversed(
        [
            click.option(
                "--max-tokens", type=int, default=None, help="Tokens to generate at most."
            ),
            click.option("--temperature", type=float, default=None, help="0 is greedy."),
            click.option("--top-p", type=float, default=None),
            click.option("--top-k", type=int, default=None),
            click.option("--seed", type=int, default=None),
            click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        ]
    ):
        f = option(f)
    return f


def sampling_params(kwargs) -> dict:
    params = {k: v for k, v in kwargs.items() if v is not None and k != "stop"}
    if kwargs.get("stop"):
        params["stop"] = list(kwargs["stop"])
    return params


def print_stream(stream) -> None:
    try:
        for text in stream:
            click.echo(text, nl=False)
    except LlmsupError as exc:
        click.echo()
        hint = f" (retry after {exc.retry_after_ms} ms)" if exc.retry_after_ms else ""
        fail(f"{exc.code}: {exc.message}{hint}", 2)
    click.echo()
    done = stream.done
    t = done["timings"]
    click.echo(
        f"[{done['usage']['completion_tokens']} tokens, finish {done['finish_reason']}, "
        f"prompt {t['prompt_ms']:.0f} ms, {t['tokens_per_second'] or 0} tokens/s]",
        err=True,
    )


@main.command()
@click.argument("prompt")
@sampling_options
@endpoint_option
@state_option
def generate(prompt, endpoint, state_dir, **kwargs):
    """Stream a completion of PROMPT to stdout."""
    with connect(state_dir, endpoint) as client:
        print_stream(client.complete(prompt, **sampling_params(kwargs)))


@main.command()
@click.argument("message")
@click.option("--system", default=None, help="A system message before MESSAGE.")
@sampling_options
@endpoint_option
@state_option
def chat(message, system, endpoint, state_dir, **kwargs):
    """Send one chat MESSAGE through the model's chat template and stream the answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    with connect(state_dir, endpoint) as client:
        print_stream(client.chat(messages, **sampling_params(kwargs)))


@main.command()
@click.argument("text")
@endpoint_option
@state_option
def tokenize(text, endpoint, state_dir):
    """Print the model's token ids for TEXT."""
    with connect(state_dir, endpoint) as client:
        try:
            click.echo(" ".join(map(str, client.tokenize(text))))
        except LlmsupError as exc:
            fail(f"{exc.code}: {exc.message}", 2)


@main.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None)
def check(model):
    """Prove the install: load the model and decode a few tokens in a child process."""
    from llmsup.supervisor import model as models

    try:
        path = models.resolve(str(model) if model else None)
    except models.ModelError as exc:
        fail(str(exc))
    proc = subprocess.run(
        [sys.executable, "-m", "llmsup.worker.selfcheck", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        how = (
            f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        fail(
            f"llama.cpp decode failed ({how}); a build with the wrong CPU flags (e.g. AMX) "
            f"crashes here: rerun tools/setup.sh.\n{proc.stderr[-2000:]}"
        )
    click.echo(proc.stdout.strip())


# --- top and profile ----------------------------------------------------------------------------


def attach_scoreboard(state_dir: Path | None) -> scoreboard.Scoreboard:
    state = state_of(state_dir)
    if state.running_pid() is None:
        fail(f"llmsup is not running (state dir {state.path})", EXIT_NOT_RUNNING)
    try:
        return scoreboard.Scoreboard.attach(scoreboard.segment_name(str(state.path)))
    except (FileNotFoundError, ValueError) as exc:
        fail(f"cannot read the scoreboard of {state.path}: {exc}", EXIT_NOT_RUNNING)


@main.command()
@click.option("--once", is_flag=True, help="Print one screen and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON snapshot and exit.")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True)
@state_option
def top(once, as_json, interval, state_dir):
    """Live view of the workers, read from shared memory."""
    from llmsup.supervisor.top import render, snapshot

    state = state_of(state_dir)
    board = attach_scoreboard(state_dir)
    try:
        if as_json:
            click.echo(orjson.dumps(snapshot(board), option=orjson.OPT_INDENT_2).decode())
            return
        if once:
            click.echo(render(snapshot(board)))
            return
        while state.running_pid() is not None:
            click.echo("\x1b[H\x1b[2J" + render(snapshot(board)), nl=True)
            time.sleep(interval)
        click.echo("llmsup stopped")
    except KeyboardInterrupt:
        pass
    finally:
        board.close()


@main.command()
@click.argument("worker", type=int)
@click.option(
    "--record",
    "seconds",
    type=click.FloatRange(0.5),
    default=None,
    help="Sample for SECONDS and write a flame graph SVG instead of one dump.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SVG path for --record [default: llmsup-worker-N-PID.svg].",
)
@state_option
def profile(worker, seconds, output, state_dir):
    """py-spy dump (or --record a flame graph) of worker WORKER."""
    board = attach_scoreboard(state_dir)
    try:
        if not 0 <= worker < len(board.rows):
            fail(f"worker {worker} does not exist; workers are 0 to {len(board.rows) - 1}")
        row = board.read_row(worker)
    finally:
        board.close()
    pid = row["pid"]
    if pid <= 0 or row["state"] in ("dead", "fatal"):
        fail(f"worker {worker} has no live process (state {row['state']})")
    if seconds is None:
        cmd = [py_spy(), "dump", "--pid", str(pid)]
    else:
        output = output or Path(f"llmsup-worker-{worker}-{pid}.svg")
        duration = str(max(1, round(seconds)))
        cmd = [py_spy(), "record", "--pid", str(pid), "--duration", duration, "--idle",
               "--output", str(output), "--format", "flamegraph", "--nonblocking"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=(seconds or 0) + 60)
    except FileNotFoundError:
        fail("py-spy is not installed in this environment (pip install py-spy)")
    except subprocess.TimeoutExpired:
        fail(f"py-spy did not finish in time on worker {worker} (pid {pid})")
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if "ermission" in text or "ptrace" in text.lower():
            fail(f"py-spy may not trace pid {pid}: it needs ptrace permission. Run as root, or "
                 "as the same user with kernel.yama.ptrace_scope=0, or with CAP_SYS_PTRACE.\n"
                 f"{text.strip()}")  # fmt: skip
        fail(f"py-spy failed on worker {worker} (pid {pid}):\n{text.strip()}")
    if seconds is None:
        click.echo(proc.stdout.rstrip())
    else:
        click.echo(f"flame graph of worker {worker} (pid {pid}) written to {output}")
