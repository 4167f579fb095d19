"""How every llmsup process writes a log record to fd 2: a text line, a text line for
systemd's journal, or one JSON object a line (`--log-format`).

The supervisor, its HTTP gateway and its workers share fd 2 (supervisor.log when
detached), so they must write it alike. This module is the lowest layer that logs (the
worker; worker/ may not import supervisor/), and supervisor/host/logs.py builds the
supervisor's and the gateway's log on it.

- text: `2026-12-05 10:36:01,123 llmsup[PID] WARNING message`, as before.
- journal: when fd 2 is the stream systemd's JOURNAL_STREAM names ("DEV:INODE", set for a
  service whose stderr is the journal), a line carries no timestamp (the journal stamps
  it) and starts with its syslog priority, `<4>` for a warning (sd-daemon(3)), which
  journald takes as the entry's priority and strips. Every line of a multi-line record
  gets the prefix, since the journal makes each line an entry.
- json: `{"time": "2026-12-05T10:36:01.123Z", "level": "warning", "logger": ...,
  "message": ..., "request"/"worker"/"model"/"pid": where the record has them (`extra=`),
  "exc": the traceback}`; under the journal too, with the priority prefix.

In json mode, what would otherwise reach fd 2 as raw lines from Python is made records
too (capture()): uncaught exceptions in any thread, "Exception ignored in" messages,
warnings, and text written to sys.stdout or sys.stderr. What is written to fd 2 below
Python (llama.cpp's own fprintf, faulthandler, a crash of the interpreter) cannot be.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time

import orjson

JOURNAL_ENV = "JOURNAL_STREAM"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Record attributes (from extra=) a JSON line carries when present: what the record is
# about. `pid` is that worker's or gateway's pid (their own records carry their own).
SUBJECT_KEYS = ("request", "worker", "model", "pid")


def level_of(name: str) -> int:
    """A --log-level value as a logging level; ValueError for any other name."""
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}: one of {', '.join(LEVELS)}") from None


def syslog_priority(levelno: int) -> int:
    """sd-daemon(3)'s priority for a logging level: SD_ERR 3, SD_WARNING 4, SD_INFO 6..."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_stream(fd: int = 2, env=None) -> bool:
    """True if `fd` is the journal stream JOURNAL_STREAM ("DEV:INODE", systemd.exec(5))
    names. The variable alone says nothing: children inherit it, and a daemon detached
    from the service has its log file, not the journal, on fd 2."""
    value = (os.environ if env is None else env).get(JOURNAL_ENV, "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC with milliseconds: 2026-12-05T10:36:01.123Z."""
    seconds = int(created)
    ms = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def _jsonable(value):
    """orjson's fallback: bytes (request ids are the client's bytes) as text, the rest str()."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a record. `defaults`: subject keys every record of this process
    carries unless it names its own (a worker's id and pid)."""

    def __init__(self, defaults: dict | None = None, journal: bool = False):
        super().__init__()
        self.defaults = dict(defaults or {})
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage().rstrip("\n"),
        }
        for key in SUBJECT_KEYS:
            value = getattr(record, key, None)
            if value is None:
                value = self.defaults.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        line = orjson.dumps(out, default=_jsonable).decode()
        return f"<{syslog_priority(record.levelno)}>{line}" if self.journal else line


class TextFormatter(logging.Formatter):
    """`TIME TAG[PID] LEVEL message`; for the journal `<N>TAG[PID] LEVEL message`, each
    line of a multi-line record (a traceback) with the priority prefix."""

    def __init__(self, tag: str = "llmsup", journal: bool = False):
        stamp = "" if journal else "%(asctime)s "
        super().__init__(f"{stamp}{tag}[%(process)d] %(levelname)s %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def formatter(fmt: str, tag: str = "llmsup", defaults: dict | None = None, fd: int = 2):
    """The formatter for --log-format `fmt` ("text" or "json") of a process writing to `fd`."""
    journal = journal_stream(fd)
    if fmt == "json":
        return JsonFormatter(defaults, journal=journal)
    if fmt == "text":
        return TextFormatter(tag, journal=journal)
    raise ValueError(f"unknown log format {fmt!r}: text or json")


class FdHandler(logging.Handler):
    """One os.write to `fd` a record (a worker's log): lines of processes sharing the fd
    never interleave. A write that fails is dropped: fd 2 is all a worker has."""

    def __init__(self, fd: int = 2):
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:  # noqa: BLE001 - a log line is never worth the process
            pass

    def handleError(self, record) -> None:  # nothing to print it to
        pass


class LinesToLog(io.TextIOBase):
    """sys.stdout or sys.stderr in json mode: each line written becomes a record of
    `logger` at `level`, written whatever --log-level says (it is output, not a log
    call). A partial line waits for its newline, or for flush()."""

    def __init__(self, logger: logging.Logger, level: int, stream):
        super().__init__()
        self.logger = logger
        self.level = level
        self.stream = stream  # the original, for fileno() and encoding
        self.pending = ""
        self.lock = threading.RLock()
        self.local = threading.local()  # a record written while writing one: dropped

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self.stream, "errors", "strict")

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            if "\n" in self.pending:
                *lines, self.pending = self.pending.split("\n")
                for line in lines:
                    self.emit(line)
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                line, self.pending = self.pending, ""
                self.emit(line)

    def emit(self, line: str) -> None:
        if not line.strip() or getattr(self.local, "busy", False):
            return
        self.local.busy = True
        try:
            record = self.logger.makeRecord(
                self.logger.name, self.level, "(stream)", 0, line, None, None
            )
            self.logger.handle(record)
        finally:
            self.local.busy = False


_originals: dict[str, object] = {}


def capture(json_mode: bool) -> None:
    """Route Python's own stderr output through logging: uncaught exceptions (every thread),
    unraisable ones, warnings; in json mode also sys.stdout and sys.stderr, line by line.
    Calling it again (a second setup) replaces what the first installed."""
    log = logging.getLogger("llmsup")

    def excepthook(exc_type, exc, tb) -> None:
        log.critical("uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))

    def thread_excepthook(args) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.critical(
            "uncaught %s in thread %s: %s",
            args.exc_type.__name__,
            name,
            args.exc_value,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def unraisablehook(u) -> None:
        exc_info = (u.exc_type, u.exc_value, u.exc_traceback) if u.exc_type else None
        log.error("%s: %r", u.err_msg or "Exception ignored in", u.object, exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    logging.captureWarnings(True)
    for name, level in (("stdout", logging.INFO), ("stderr", logging.WARNING)):
        original = _originals.setdefault(name, getattr(sys, name))
        if json_mode and original is not None:
            stream = LinesToLog(logging.getLogger(f"llmsup.{name}"), level, original)
            setattr(sys, name, stream)
        else:
            setattr(sys, name, original)


def setup_fd(fmt: str, level: str, tag: str, defaults: dict | None = None) -> logging.Handler:
    """A process's log on fd 2 without the supervisor's sink (a worker's): every record of
    the root logger, one os.write each, in `fmt`, from `level` up."""
    handler = FdHandler(2)
    handler.setFormatter(formatter(fmt, tag, defaults))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_of(level))
    logging.raiseExceptions = False
    capture(fmt == "json")
    return handler
