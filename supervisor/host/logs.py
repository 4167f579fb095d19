"""The supervisor's log: a handler that survives a full or read-only disk, a rate limit on
repeated warnings, reopening the file for logrotate, and disk errors in one line.

The log is file descriptor 2 (the workers and the HTTP gateway inherit it, so their
lines land in the same file). Each record is one os.write to it: nothing is buffered, so
after SIGUSR1 dup2()s a freshly opened supervisor.log onto fd 2 the next line goes there.
A write that fails (ENOSPC, EROFS, EIO, EFBIG, ...) is counted, never raised: the
supervisor keeps serving, and `status` shows the path, the count and the last error.
Every later record tries again, so the log resumes by itself once there is room, with a
line saying how many were lost.

The line formats (--log-format text or json, and text for systemd's journal) are
worker/logformat.py's, which the workers use too; setup() puts them on the sink.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import orjson

from llmsup.protocol.statedir import StateDirError
from llmsup.worker import logformat

log = logging.getLogger("llmsup.supervisor")

RATE_INTERVAL_S = 10.0  # a repeated warning: once per interval, with a count


class DiskError(Exception):
    """A file of the state dir could not be written: str() is the one line to show."""


def errno_name(code: int | None) -> str:
    return errno.errorcode.get(code, str(code)) if code is not None else "?"


def describe_os_error(exc: OSError, verb: str = "write", path=None) -> str:
    """One line: "cannot write /x/supervisor.json: No space left on device (ENOSPC)"."""
    where = path if path is not None else (exc.filename or "a file of the state dir")
    reason = exc.strerror or os.strerror(exc.errno or 0)
    return f"cannot {verb} {where}: {reason} ({errno_name(exc.errno)})"


class RateLimit(logging.Filter):
    """Lets the first of a repeated WARNING-or-worse record through, then at most one per
    `interval` with "(and N more in the last S s)". Records are the same when they share
    level and format string (record.msg), whatever their arguments: distinct messages are
    never hidden. INFO and below always pass."""

    def __init__(self, interval: float = RATE_INTERVAL_S, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        # (level, msg) -> [window start, suppressed, the last suppressed record]
        self.seen: dict[tuple, list] = {}
        self.suppressed = 0  # records held back so far, all keys

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, str(record.msg))
        now = self.clock()
        with self.lock:
            entry = self.seen.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                entry[2] = record
                self.suppressed += 1
                return False
            held = entry[1] if entry is not None else 0
            window = now - entry[0] if entry is not None else 0.0
            self.seen[key] = [now, 0, None]
            if len(self.seen) > 1024:  # bounded: forget windows that are over
                self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.interval}
        if held:
            record.msg = f"{record.msg} (and {held} more in the last {window:.0f} s)"
        return True

    def expired(self, everything: bool = False) -> list[logging.LogRecord]:
        """Windows that are over (or all of them: the process is exiting) with records held
        back: the last of each, its message saying how many there were (so a burst that
        stops is still counted in the log)."""
        now = self.clock()
        out = []
        with self.lock:
            for key, (start, held, last) in list(self.seen.items()):
                if everything or now - start >= self.interval:
                    del self.seen[key]
                    if held > 1:
                        more = f"(and {held - 1} more in the last {now - start:.0f} s)"
                        last.msg = f"{last.msg} {more}"
                    if held:
                        out.append(last)
        return out


class LogSink(logging.Handler):
    """Formats a record and writes it to fd 2 with os.write; a failed write is counted."""

    def __init__(self, path=None, fd: int = 2):
        super().__init__()
        self.path = path  # the log file fd 2 is, or None (foreground: stderr as given)
        self.fd = fd
        self.errors = 0  # records that could not be written
        self.lost_since_ok = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # time.time()
        self.reopened = 0
        self.limiter: RateLimit | None = None  # its rate limit, counted in status()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # a bad format string in a log call must not stop the loop
            line = self.notice(
                record.levelno, f"unformattable log record: {record.msg!r} {record.args!r}"
            )
        if self.lost_since_ok:
            lost = f"log: {self.lost_since_ok} line(s) lost ({self.last_error})"
            line = self.notice(logging.WARNING, lost) + line
        self.write(line.encode(errors="replace"))

    def notice(self, level: int, message: str) -> str:
        """A line of the sink's own, in the format of the others (one JSON object in json)."""
        record = logging.LogRecord("llmsup.log", level, __file__, 0, message, None, None)
        try:
            return self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - as plain as it gets
            return message + "\n"

    def write(self, data: bytes) -> bool:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:
            self.errors += 1
            self.lost_since_ok += 1
            self.last_error = f"{exc.strerror} ({errno_name(exc.errno)})"
            self.last_error_at = time.time()
            return False
        self.lost_since_ok = 0
        return True

    def flush_held(self, everything: bool = False) -> None:
        """Log what the rate limit held back in windows that are over (once a second), or
        in every window (on exit: a warning held back must not be lost with the process)."""
        if self.limiter is not None:
            for record in self.limiter.expired(everything):
                self.handle_unfiltered(record)

    def handle_unfiltered(self, record: logging.LogRecord) -> None:
        self.acquire()
        try:
            self.emit(record)
        finally:
            self.release()

    def handleError(self, record) -> None:  # never print a traceback to a broken fd 2
        self.errors += 1

    def reopen(self, open_log) -> str | None:
        """SIGUSR1: open the log file anew (logrotate moved it) and dup2 it onto fds 1 and
        2, which children spawned from now on inherit. Returns an error line, or None."""
        if self.path is None:
            return "SIGUSR1: logging to stderr, not to a file: nothing to reopen"
        try:
            fd = open_log()
        except OSError as exc:
            return "SIGUSR1: " + describe_os_error(exc, "reopen", self.path)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        self.reopened += 1
        return None

    def status(self) -> dict:
        return {
            "path": str(self.path) if self.path is not None else None,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "writing": self.lost_since_ok == 0,
            "reopened": self.reopened,
            "rate_limited": self.limiter.suppressed if self.limiter is not None else 0,
        }


def setup(
    path=None,
    fmt: str = "text",
    level: str = "info",
    tag: str = "llmsup",
    defaults: dict | None = None,
    rate_limit: bool = True,
) -> LogSink:
    """Route every record (root logger) through one LogSink, as --log-format `fmt` ("text"
    or "json") from --log-level `level` up, with the rate limit unless `rate_limit` is
    False (the gateway: its loop does not call flush_held). `tag` names the process in
    text lines (llmsup, llmsup-gateway); `defaults`, the JSON keys each of its records
    carries (the gateway's pid). In json mode Python's own output to stdout and stderr
    becomes records too (logformat.capture). Called again, it replaces the first."""
    sink = LogSink(path)
    sink.setFormatter(logformat.formatter(fmt, tag, defaults))
    if rate_limit:
        limiter = RateLimit()
        sink.addFilter(limiter)
        sink.limiter = limiter
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(sink)
    set_level(level)
    logging.raiseExceptions = False
    logformat.capture(fmt == "json")
    return sink


def set_level(name: str) -> None:
    """--log-level `name` (debug, info, warning, error) from now on: a reload changes it."""
    logging.getLogger().setLevel(logformat.level_of(name))


# --- the stop record, which a full disk must not lose ---------------------------------------

STOP_RECORD_BYTES = 512
RUNNING = b'{"running": true}'  # what the reserved record says until the supervisor exits


def reserve_stop_record(state) -> None:
    """At start: last-stop.json, padded to STOP_RECORD_BYTES, so that the record of how the
    supervisor ended is written over space it already has (a full disk cannot lose it)."""
    state.write_file(state.stop_file, RUNNING.ljust(STOP_RECORD_BYTES))


def write_stop_record(state, record: dict) -> bool:
    """On exit: the record in the reserved space (JSON allows the trailing blanks), or a new
    file if that is gone; a failure is logged. True if it was written."""
    data = orjson.dumps(record)
    try:
        if len(data) <= STOP_RECORD_BYTES:
            try:
                fd = state.open_file(state.stop_file, os.O_WRONLY)
            except (FileNotFoundError, StateDirError):
                fd = None  # gone, or not a regular file of ours: replaced below
            if fd is not None:
                try:
                    if os.fstat(fd).st_size >= STOP_RECORD_BYTES:
                        os.pwrite(fd, data.ljust(STOP_RECORD_BYTES), 0)
                        return True
                finally:
                    os.close(fd)
        state.write_file(state.stop_file, data)
        return True
    except OSError as exc:
        log.error("%s", describe_os_error(exc, path=state.stop_file))
        return False


def remove_runtime_files(state) -> None:
    """StateDir.remove_runtime_files, logging (not raising) what a read-only disk refuses."""
    try:
        state.remove_runtime_files()
    except OSError as exc:
        log.error("cannot clean up the state dir: %s", describe_os_error(exc, "remove"))
