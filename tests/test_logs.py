"""The log's formats (issue 27 item 5): --log-format json (one object a line, from the
supervisor, its gateway and its workers alike), text lines without a timestamp under
systemd's journal (JOURNAL_STREAM), --log-level; the rate limit and the sink as before.

Unit tests of worker/logformat.py and supervisor/host/logs.py, small processes that set
their log up as the real ones do, and real llmsups whose supervisor.log is read back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest
from testkit import free_port

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from llmsup.supervisor.host import logs
from llmsup.worker import faults, logformat

from .conftest import wait_until

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REQUIRED = {"time", "level", "logger", "message"}
LEVEL_NAMES = {"debug", "info", "warning", "error", "critical"}
MODEL = "smollm2-135m-instruct"  # the catalog's default
FAULTS = {faults.ENV: faults.ENABLE_VALUE}


def record(msg, *args, level=logging.WARNING, name="llmsup.supervisor", exc_info=None, **extra):
    r = logging.LogRecord(name, level, __file__, 1, msg, args or None, exc_info)
    r.__dict__.update(extra)
    return r


def parse(line: str) -> dict:
    obj = json.loads(line)
    assert isinstance(obj, dict) and REQUIRED <= obj.keys(), line
    assert RFC3339_MS.match(obj["time"]) and obj["level"] in LEVEL_NAMES, line
    return obj


def parse_all(text: str) -> list[dict]:
    """Every line of a log: each must be one JSON object with the required keys."""
    lines = text.splitlines()
    assert lines, "the log is empty"
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(parse(line))
        except (ValueError, AssertionError) as exc:
            raise AssertionError(f"line {n} is not a JSON record ({exc}): {line!r}") from None
    return out


# --- formatters ----------------------------------------------------------------------------


def test_json_formatter_writes_one_object_with_the_subject_keys():
    fmt = logformat.JsonFormatter()
    r = record(
        "worker %d (pid %d) killed\nby %s",
        0,
        4242,
        "SIGKILL",
        worker=0,
        pid=4242,
        model=MODEL,
        request=b"req-\xff1",
    )
    r.created = 1764930961.1239
    line = fmt.format(r)
    assert "\n" not in line  # a multi-line message is still one line
    obj = parse(line)
    assert obj == {
        "time": "2025-12-05T10:36:01.123Z",
        "level": "warning",
        "logger": "llmsup.supervisor",
        "message": "worker 0 (pid 4242) killed\nby SIGKILL",
        "request": "req-\\xff1",  # the client's bytes, as text
        "worker": 0,
        "model": MODEL,
        "pid": 4242,
    }
    assert list(obj)[:4] == ["time", "level", "logger", "message"]
    plain = parse(fmt.format(record("ready", level=logging.INFO)))
    assert plain.keys() == REQUIRED and plain["level"] == "info"


def test_json_formatter_puts_a_traceback_in_exc_and_defaults_yield_to_the_record():
    fmt = logformat.JsonFormatter(defaults={"worker": 3, "pid": 99})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        r = record("job failed", level=logging.ERROR, exc_info=sys.exc_info())
    obj = parse(fmt.format(r))
    assert obj["worker"] == 3 and obj["pid"] == 99 and obj["message"] == "job failed"
    assert obj["exc"].startswith("Traceback (most recent call last):")
    assert obj["exc"].endswith("ValueError: bad\nvalue")
    assert parse(fmt.format(record("x", worker=1)))["worker"] == 1
    # Whatever an extra holds, the line is JSON (str() of it).
    assert parse(fmt.format(record("x", model=object())))["model"].startswith("<object")


def test_text_lines_keep_their_timestamp_except_under_the_journal():
    r = record("worker %d is FATAL", 1, level=logging.ERROR)
    text = logformat.TextFormatter("llmsup").format(r)
    assert re.match(
        rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} llmsup\[{os.getpid()}\] ERROR ", text
    )
    journal = logformat.TextFormatter("llmsup", journal=True)
    assert journal.format(r) == f"<3>llmsup[{os.getpid()}] ERROR worker 1 is FATAL"
    levels = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>"}
    for level, prefix in levels.items():
        assert journal.format(record("m", level=level)).startswith(prefix)
    # Each line of a traceback becomes a journal entry: each carries the priority.
    try:
        raise KeyError("k")
    except KeyError:
        r = record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    lines = journal.format(r).split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert parse(logformat.JsonFormatter(journal=True).format(record("w"))[3:])


def test_journal_stream_matches_the_device_and_inode_of_fd_2_only():
    with tempfile.TemporaryFile() as journal, tempfile.TemporaryFile() as other:
        st = os.fstat(journal.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logformat.journal_stream(journal.fileno(), env)
        assert not logformat.journal_stream(other.fileno(), env)
        for value in ("", "x", f"{st.st_dev}", f"{st.st_dev}:", f"a:{st.st_ino}"):
            assert not logformat.journal_stream(journal.fileno(), {"JOURNAL_STREAM": value})
        assert not logformat.journal_stream(journal.fileno(), {})
        # The formatter for that fd: journal lines.
        fmt = logformat.formatter("text", "llmsup", fd=journal.fileno())
        assert not fmt.journal  # the real environment names no such stream
        os.environ["JOURNAL_STREAM"] = env["JOURNAL_STREAM"]
        try:
            assert logformat.formatter("text", fd=journal.fileno()).journal
            assert logformat.formatter("json", fd=journal.fileno()).journal
            assert not logformat.formatter("json", fd=other.fileno()).journal
        finally:
            del os.environ["JOURNAL_STREAM"]
    with pytest.raises(ValueError):
        logformat.formatter("xml")


def test_log_levels():
    assert logformat.level_of("debug") == logging.DEBUG
    assert logformat.level_of("WARNING") == logging.WARNING
    with pytest.raises(ValueError, match="unknown log level"):
        logformat.level_of("verbose")
    root = logging.getLogger()
    before = root.level
    try:
        logs.set_level("error")
        assert root.level == logging.ERROR
        logs.set_level("debug")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


# --- the sink and the rate limit, in json ---------------------------------------------------


def test_rate_limit_and_lost_lines_are_json_too():
    r, w = os.pipe()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        sink = logs.LogSink(fd=w)
        sink.setFormatter(logformat.JsonFormatter())
        now = [100.0]
        sink.limiter = logs.RateLimit(interval=10.0, clock=lambda: now[0])
        sink.addFilter(sink.limiter)
        for i in range(5):
            sink.handle(record("message from %r dropped", i, worker=i))
        now[0] += 11
        sink.flush_held()  # the burst's summary
        sink.fd = full
        sink.handle(record("lost", level=logging.INFO))
        sink.fd = w
        sink.handle(record("%d and %d", 1, level=logging.INFO))  # a bad format string
        sink.handle(record("back", level=logging.INFO))
        os.close(w)
        w = -1
        objs = parse_all(os.read(r, 65536).decode())
    finally:
        for fd in (r, w, full):
            if fd >= 0:
                os.close(fd)
    messages = [o["message"] for o in objs]
    assert messages[0] == "message from 0 dropped"
    assert messages[1] == "message from 4 dropped (and 3 more in the last 11 s)"
    assert objs[1]["worker"] == 4
    assert messages[2] == "log: 1 line(s) lost (No space left on device (ENOSPC))"
    assert messages[3].startswith("unformattable log record: '%d and %d'")
    assert messages[4] == "back"
    assert sink.limiter.suppressed == 4


# --- processes that set their log up as llmsup's do ----------------------------------------


def run_python(code: str, env: dict | None = None, stderr=subprocess.PIPE):
    return subprocess.run(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


SETUP_AND_MISBEHAVE = """
import logging, sys, threading, warnings
from llmsup.supervisor.host import logs
logs.setup(None, sys.argv[1] if len(sys.argv) > 1 else "json", "warning")
log = logging.getLogger("llmsup.supervisor")
log.info("an info line")
log.warning("worker %d misbehaves", 2, extra={"worker": 2})
print("printed to stdout")
print("printed\\nto stderr", file=sys.stderr)
sys.stderr.write("a partial line")
warnings.warn("a warning")
class Leaky:
    def __del__(self):
        raise RuntimeError("in __del__")
Leaky()
t = threading.Thread(target=lambda: 1 / 0)
t.start(); t.join()
raise SystemError("uncaught")
"""


def test_json_mode_makes_pythons_own_output_records_too():
    result = run_python(SETUP_AND_MISBEHAVE, stderr=subprocess.STDOUT)
    assert result.returncode == 1
    objs = parse_all(result.stdout)
    by_message = {o["message"]: o for o in objs}
    assert "an info line" not in by_message  # --log-level warning
    assert by_message["worker 2 misbehaves"]["worker"] == 2
    assert by_message["printed to stdout"]["logger"] == "llmsup.stdout"
    assert by_message["printed"]["logger"] == "llmsup.stderr"
    assert "to stderr" in by_message
    assert "a partial line" in by_message  # flushed at exit
    assert any(o["logger"] == "py.warnings" and "a warning" in o["message"] for o in objs)
    unraisable = [o for o in objs if "in __del__" in o.get("exc", "")]
    assert unraisable and unraisable[0]["level"] == "error"
    thread = [o for o in objs if o["message"].startswith("uncaught ZeroDivisionError in thread")]
    assert thread and thread[0]["level"] == "critical" and "ZeroDivision" in thread[0]["exc"]
    last = by_message["uncaught SystemError: uncaught"]
    assert last["level"] == "critical"
    assert last["exc"].startswith("Traceback") and last["exc"].endswith("SystemError: uncaught")


def test_text_under_the_journal_has_priorities_and_no_timestamps(tmp_path):
    path = tmp_path / "journal"
    with open(path, "w") as journal:
        st = os.fstat(journal.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        code = SETUP_AND_MISBEHAVE.replace('"json", "warning"', '"text", "info"')
        code = code.replace('sys.stderr.write("a partial line")', "")  # raw in text mode
        result = run_python(code, env=env, stderr=journal)
    assert result.returncode == 1
    lines = path.read_text().splitlines()
    head = r"^<(\d)>llmsup\[\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    assert re.match(head + "an info line$", lines[0]).group(1) == "6", lines
    assert re.match(head + "worker 2 misbehaves$", lines[1]).group(1) == "4", lines
    # Every record's first line: priority, tag, level, and no time of its own.
    records = [line for line in lines if "llmsup[" in line]
    assert len(records) >= 5 and all(re.match(head, line) for line in records), records
    # The uncaught exception: a critical record, every line of its traceback prefixed <2>.
    start = next(n for n, line in enumerate(lines) if "uncaught SystemError" in line)
    assert len(lines[start:]) > 2 and all(line.startswith("<2>") for line in lines[start:])


def test_a_worker_without_its_spawn_line_says_so_in_json():
    argv = ["--worker-id", "7", "--cores", "0", "--endpoint", "ipc:///nonexistent"]
    argv += ["--model", "/nonexistent", "--ctx-size", "256", "--supervisor-pid", str(os.getpid())]
    result = subprocess.run(
        [sys.executable, "-m", "llmsup.worker", *argv, "--log-format", "json"],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    (obj,) = parse_all(result.stderr.decode())
    assert obj["level"] == "error" and obj["worker"] == 7 and obj["pid"] > 0
    assert "identity and secret on stdin" in obj["message"]


def test_the_gateway_refuses_in_json():
    listen = f"0.0.0.0:{free_port()}"
    cmd = [sys.executable, "-m", "llmsup.supervisor.gateway", "--endpoint", "ipc:///x"]
    cmd += ["--listen", listen, "--log-format", "json", "--log-level", "warning"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (obj,) = parse_all(result.stderr)
    assert obj["logger"] == "llmsup.gateway" and "--allow-remote" in obj["message"]
    bad = subprocess.run(
        [*cmd[:-2], "--log-level", "loud"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# --- real llmsups ---------------------------------------------------------------------------


def fault(inst, kind: str) -> dict:
    with inst.client(timeout=90) as client:
        with pytest.raises(LlmsupError) as err:
            client.complete(f"{faults.PREFIX}{kind}", max_tokens=4).text()
    return err.value.body


def serving_again(inst, old_pid: int, timeout: float = 60) -> int:
    def check():
        (w,) = inst.status()["workers"]
        return w["pid"] if w["state"] == "ready" and w["pid"] != old_pid else None

    pid = wait_until(check, timeout=timeout, interval=0.25)
    assert pid, inst.log()[-3000:]
    return pid


@pytest.mark.timeout(300)
def test_every_line_of_the_log_is_json(started):
    port = free_port()
    inst = started(
        *("--model", MODEL, "--workers", "1", "--cores-per-worker", "1", "--ctx-size", "512"),
        *("--log-format", "json", "--http", f"127.0.0.1:{port}"),
        env=FAULTS,
    )
    with inst.client() as client:
        assert client.complete("Once upon a time", max_tokens=4, temperature=0).text()
        with pytest.raises(LlmsupError) as err:  # a bad request
            client.complete("Hi", max_tokens=4, temperature=7).text()
        assert err.value.code == C.E_BAD_REQUEST
    bad_http = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=b'{"messages": 3}',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(bad_http, timeout=30)
    assert http_err.value.code == 400
    # A worker killed with SIGKILL, one that logs a failed job (its traceback), and one that
    # dies of an uncaught exception (twice: the job is retried once). The kill comes first:
    # the deaths after it within 10 s are the same warning, which the rate limit holds.
    (w,) = inst.status()["workers"]
    pid = w["pid"]
    os.kill(pid, signal.SIGKILL)
    serving_again(inst, pid)
    assert fault(inst, "raise")["code"] == C.E_WORKER_FAILED
    (w,) = inst.status()["workers"]
    assert fault(inst, "uncaught")["code"] == C.E_WORKER_LOST
    serving_again(inst, w["pid"])
    assert inst.stop().returncode == 0

    objs = parse_all(inst.log())
    supervisor = [o for o in objs if o["logger"] == "llmsup.supervisor"]
    assert any(o["message"].startswith("ready: 1 workers") for o in supervisor)
    assert any("fault injection is ON" in o["message"] for o in objs)
    killed = [o for o in supervisor if "killed by SIGKILL" in o["message"]]
    assert killed and killed[0]["worker"] == 0 and killed[0]["pid"] == pid, inst.log()[-4000:]
    assert killed[0]["model"] == MODEL and killed[0]["level"] == "warning"
    assert any("request" in o and "retried after worker 0 died" in o["message"] for o in objs)
    # The workers' own lines: their id and pid, the traceback in exc.
    failed = [
        o for o in objs if o["logger"] == "llmsup.worker" and "failed to start" in o["message"]
    ]
    assert failed and failed[0]["worker"] == 0 and "injected fault: raise" in failed[0]["exc"]
    assert "request" in failed[0]
    uncaught = [o for o in objs if o["message"].startswith("uncaught InjectedExit")]
    assert len(uncaught) == 2 and all(
        o["worker"] == 0 and o["level"] == "critical" for o in uncaught
    )
    assert "Traceback" in uncaught[0]["exc"]
    # The gateway's, with its pid.
    gateway = [o for o in objs if o["logger"] == "llmsup.gateway"]
    assert any(o["message"].startswith("listening on") for o in gateway)
    assert all(o["pid"] > 0 for o in gateway)


@pytest.mark.timeout(300)
def test_log_level_warning_hides_info_lines(started):
    inst = started(
        *("--model", MODEL, "--workers", "1", "--cores-per-worker", "1", "--ctx-size", "512"),
        *("--log-level", "warning"),
    )
    (w,) = inst.status()["workers"]
    os.kill(w["pid"], signal.SIGKILL)
    serving_again(inst, w["pid"])
    assert inst.stop().returncode == 0
    log = inst.log()
    assert "WARNING worker 0 (pid" in log and "killed by SIGKILL" in log, log
    assert " INFO " not in log and "ready:" not in log and "respawns in" not in log, log
