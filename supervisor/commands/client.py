"""Commands that are protocol requests: status, generate, chat, tokenize, detokenize."""

from __future__ import annotations

import click
import orjson

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from llmsup.supervisor.commands.common import connect, endpoint_option, fail, state_option
from llmsup.supervisor.commands.topview import cache_line


@click.command()
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
    loaded = {m["name"]: m["groups"] for m in st.get("models", [])}
    others = [name for name in loaded if name != st["model"]]
    click.echo(f"model {st['model']} (default)" + (f"; also {', '.join(others)}" if others else ""))
    click.echo(
        f"queue {st['queue']['depth']}/{st['queue']['limit']}  in flight {req['in_flight']}"
        f"  accepted {req['accepted']}  rejected {req['rejected']}"
    )
    click.echo(cache_line(st.get("cache")))
    gateway = st.get("gateway")
    if gateway:
        click.echo(
            f"http gateway {gateway['url']}/v1  {gateway['state']}  pid "
            f"{gateway['pid'] or '-'}  restarts {gateway['restarts']}"
            f"  last exit {gateway['last_exit'] or '-'}"
        )
    for line in daemon_lines(st):
        click.echo(line)
    click.echo(
        f"{'ID':>3} {'PID':>8} {'CORES':<8} {'MODEL':<22} {'STATE':<9} {'SLOTS':>5} "
        f"{'SERVED':>7}  LAST EXIT"
    )
    for w in st["workers"]:
        click.echo(
            f"{w['id']:>3} {w['pid'] or '-':>8} {','.join(map(str, w['cores'])):<8} "
            f"{w.get('model', '-'):<22} "
            f"{w['state']:<9} {w['slots'] - w['free_slots']}/{w['slots']:<3} "
            f"{w['served']:>7}  {w['last_exit'] or '-'}"
        )


def daemon_lines(st: dict) -> list[str]:
    """A rolling replacement in progress (SIGHUP), and a log that cannot be written."""
    lines = []
    if r := st.get("replacing"):
        lines.append(
            f"replacing workers ({r['why']}): worker {r['group']} now, then "
            f"{r['todo'] or 'none'}; done {r['done'] or 'none'}"
        )
    log = st.get("log") or {}
    if log.get("errors"):
        now = "failing" if not log.get("writing") else "writing again"
        lines.append(
            f"log {log['path'] or 'stderr'}: {log['errors']} line(s) could not be "
            f"written, last: {log['last_error']} ({now}); serving goes on"
        )
    return lines


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
            click.option(
                "--choices",
                "n",
                type=int,
                default=None,
                metavar="N",
                help="N completions of one prompt read (the body's `n`, SPEC.md 3.16; at most "
                "the server's --slots-per-worker), printed one after another at the end.",
            ),
            click.option("--stop", multiple=True, help="Stop string (repeatable)."),
            click.option("--model", default=None, help="A served model's name [the default]."),
            click.option("--min-p", type=float, default=None),
            click.option("--presence-penalty", type=float, default=None),
            click.option("--frequency-penalty", type=float, default=None),
            click.option("--repeat-penalty", type=float, default=None, help="1 disables it."),
            click.option("--repeat-last-n", type=int, default=None, help="The penalties' window."),
            click.option(
                "--logit-bias",
                multiple=True,
                callback=parse_logit_bias,
                metavar="TOKEN=BIAS",
                help="Add BIAS (-100 to 100) to TOKEN's logit (repeatable; `llmsup tokenize` "
                "gives token ids).",
            ),
            click.option(
                "--json-schema",
                type=click.Path(exists=True, dir_okay=False),
                callback=read_json_schema,
                help="A JSON Schema file the output must match (SPEC.md 3.11).",
            ),
            click.option(
                "--grammar",
                type=click.Path(exists=True, dir_okay=False),
                callback=read_grammar,
                help="A GBNF grammar file the output must match (SPEC.md 3.11).",
            ),
        ]
    ):
        f = option(f)
    return f


def parse_logit_bias(ctx, param, values) -> dict | None:
    bias = {}
    for value in values:
        token, sep, amount = value.partition("=")
        try:
            bias[str(int(token))] = float(amount)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not TOKEN=BIAS (e.g. 1234=-100)") from None
        if not sep:
            raise click.BadParameter(f"{value!r} is not TOKEN=BIAS (e.g. 1234=-100)")
    return bias or None


def tool_options(f):
    """chat's tools (SPEC.md 3.12): they go into the body with the sampling options."""
    for option in reversed(
        [
            click.option(
                "--tools",
                type=click.Path(exists=True, dir_okay=False),
                callback=read_json_schema,
                help='A JSON file: the list of tools the model may call ({"type": "function", '
                '"function": {name, description, parameters}}).',
            ),
            click.option(
                "--tool-choice",
                default=None,
                callback=parse_tool_choice,
                metavar="none|auto|required|NAME",
                help="Whether (and which tool) to call [auto].",
            ),
            click.option(
                "--parallel-tool-calls",
                is_flag=True,
                default=None,
                help="The answer may hold several calls.",
            ),
        ]
    ):
        f = option(f)
    return f


def parse_tool_choice(ctx, param, value) -> str | dict | None:
    if value is None or value in C.TOOL_CHOICES:
        return value
    return {"type": "function", "function": {"name": value}}


def read_json_schema(ctx, param, path) -> dict | list | None:
    """A JSON file's value (--json-schema, --tools); click names the option in errors."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}") from None


def read_grammar(ctx, param, path) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from None


def sampling_params(kwargs) -> dict:
    params = {k: v for k, v in kwargs.items() if v is not None and k != "stop"}
    if kwargs.get("stop"):
        params["stop"] = list(kwargs["stop"])
    return params


def print_stream(stream, n: int | None = None) -> None:
    """Stream the text to stdout; with n above 1 the completions' frames interleave, so
    each is printed whole, under a header, once the request has ended."""
    several = (n or 1) > 1
    try:
        for text in stream:
            if not several:
                click.echo(text, nl=False)
    except LlmsupError as exc:
        click.echo()
        hint = f" (retry after {exc.retry_after_ms} ms)" if exc.retry_after_ms else ""
        if exc.body.get("field"):
            hint += f" (field {exc.body['field']})"
        fail(f"{exc.code}: {exc.message}{hint}", 2)
    done = stream.done
    if several:
        for choice, text in zip(done["choices"], stream.choices(), strict=True):
            click.echo(
                f"--- choice {choice['index']}: {choice['finish_reason']}, "
                f"{choice['completion_tokens']} tokens"
            )
            click.echo(text)
            print_tool_calls(choice)
    else:
        click.echo()
        print_tool_calls(done)
    t = done["timings"]
    click.echo(
        f"[{done['usage']['completion_tokens']} tokens, finish {done['finish_reason']}, "
        f"prompt {done['usage']['prompt_tokens']} tokens ({done['usage']['cached_tokens']} "
        f"cached) in {t['prompt_ms']:.0f} ms, {t['tokens_per_second'] or 0} tokens/s]",
        err=True,
    )


def print_tool_calls(answer: dict) -> None:
    """The calls of a chat with tools answered with calls (a DONE, or one of its choices)."""
    for call in answer.get("tool_calls") or ():
        function = call["function"]
        click.echo(f"call {function['name']}({function['arguments']}) [{call['id']}]")


@click.command()
@click.argument("prompt")
@sampling_options
@endpoint_option
@state_option
def generate(prompt, endpoint, state_dir, **kwargs):
    """Stream a completion of PROMPT to stdout."""
    with connect(state_dir, endpoint) as client:
        print_stream(client.complete(prompt, **sampling_params(kwargs)), kwargs["n"])


@click.command()
@click.argument("message")
@click.option("--system", default=None, help="A system message before MESSAGE.")
@sampling_options
@tool_options
@endpoint_option
@state_option
def chat(message, system, endpoint, state_dir, **kwargs):
    """Send one chat MESSAGE through the model's chat template and stream the answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    with connect(state_dir, endpoint) as client:
        print_stream(client.chat(messages, **sampling_params(kwargs)), kwargs["n"])


@click.command()
@click.argument("text")
@click.option("--model", default=None, help="A served model's name [the default].")
@endpoint_option
@state_option
def tokenize(text, model, endpoint, state_dir):
    """Print the model's token ids for TEXT."""
    with connect(state_dir, endpoint) as client:
        try:
            body = {"text": text, **({"model": model} if model else {})}
            click.echo(" ".join(map(str, client.call(C.TOKENIZE, body)["tokens"])))
        except LlmsupError as exc:
            fail(f"{exc.code}: {exc.message}", 2)


@click.command()
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=0))
@click.option("--model", default=None, help="A served model's name [the default].")
@endpoint_option
@state_option
def detokenize(ids, model, endpoint, state_dir):
    """Print the text of the model's token IDS (as `llmsup tokenize` prints them)."""
    with connect(state_dir, endpoint) as client:
        try:
            click.echo(client.detokenize(list(ids), model))
        except LlmsupError as exc:
            fail(f"{exc.code}: {exc.message}", 2)


@click.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--model", default=None, help="A served model's name [the default].")
@click.option("--raw", is_flag=True, help="Not normalized to unit length.")
@click.option("--truncate", is_flag=True, help="Cut a text over the context instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="The whole reply as JSON.")
@endpoint_option
@state_option
def embed(texts, model, raw, truncate, as_json, endpoint, state_dir):
    """Print an embedding vector for each of TEXTS, one line each (SPEC.md 3.15)."""
    with connect(state_dir, endpoint) as client:
        try:
            done = client.embed(list(texts), model, normalize=not raw, truncate=truncate)
        except LlmsupError as exc:
            field = f" (field {exc.body['field']})" if exc.body.get("field") else ""
            fail(f"{exc.code}: {exc.message}{field}", 2)
    if as_json:
        click.echo(orjson.dumps(done))
        return
    for vector in done["embeddings"]:
        click.echo(" ".join(f"{x:.6g}" for x in vector))
    click.echo(
        f"{len(done['embeddings'])} x {done['dimensions']}, {done['pooling']} pooling, "
        f"{done['usage']['prompt_tokens']} tokens",
        err=True,
    )
