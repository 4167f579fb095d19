"""Which signals the supervisor takes, and how: none of them is the default death.

Every handled signal only writes its number to the loop's wakeup fd (signal.set_wakeup_fd):
the loop acts on it between events. Python handlers, not SIG_IGN, so that exec'd children
(workers, the gateway, py-spy) start with the default dispositions again.

- SIGTERM, SIGINT: drain and stop; SIGQUIT: stop now, failing what is in flight.
- SIGHUP: reload the settings (core/reload.py; `llmsup reload`).
- SIGUSR2: replace the workers one core group at a time (pool.py: Pool.replace_all;
  `llmsup restart-workers`).
- SIGUSR1: reopen supervisor.log (logrotate).
- SIGALRM, SIGVTALRM, SIGPROF, SIGIO (SIGPOLL), SIGPWR, SIGSTKFLT and the
  real-time signals: logged (rate-limited) and otherwise ignored.
- SIGXCPU (soft RLIMIT_CPU reached) and SIGXFSZ (RLIMIT_FSIZE reached: the write then
  fails with EFBIG, which the log handler counts): logged as warnings, serving goes on.
- SIGPIPE: ignored (Python's own setting; a write to a closed pipe raises EPIPE instead).
- Left at their default: SIGKILL, SIGSTOP (cannot be caught); SIGTSTP, SIGTTIN, SIGTTOU
  (stop, not kill); SIGCHLD, SIGCONT, SIGURG, SIGWINCH (ignored by default); and the
  signals of a bug in the process itself, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT,
  SIGSYS, SIGTRAP: a core dump and the debugger's view are what they are for.
"""

from __future__ import annotations

import signal

STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD = signal.SIGHUP
REPLACE = signal.SIGUSR2
REOPEN_LOG = signal.SIGUSR1
WARN = (signal.SIGXCPU, signal.SIGXFSZ)
# Kept as a table (fmt: skip below): one signal a line would be 17 lines of names.
DEFAULT = {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGSEGV,
    signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP,
    signal.SIGPIPE,  # already SIG_IGN (Python); subprocess restores it for children
}  # fmt: skip


def _noop(*_) -> None:
    pass  # the wakeup fd carries the number into the loop


def install(wakeup_fd: int) -> list[int]:
    """Route every catchable signal that would kill the process to the wakeup fd; returns
    the signal numbers installed."""
    signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    installed = []
    for sig in sorted(signal.valid_signals()):
        if sig in DEFAULT:
            continue
        try:
            signal.signal(sig, _noop)
        except (OSError, ValueError, RuntimeError):
            continue  # reserved by the C library (32, 33 for threads), or not catchable
        installed.append(int(sig))
    return installed


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        rt = signum - signal.SIGRTMIN
        return f"SIGRTMIN+{rt}" if 0 <= rt <= signal.SIGRTMAX - signal.SIGRTMIN else str(signum)
