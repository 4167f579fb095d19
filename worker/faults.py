"""Fault injection for tests only: make a real worker leak, hang, spin or crash on demand.

Off unless the worker's environment has LLMSUP_FAULT_INJECTION set to ENABLE_VALUE, a
value nobody types by accident; the supervisor logs a warning when it is set. A fault is
asked for by a `complete` request whose prompt is "LLMSUP-FAULT:<kind>[:<arg>]", so it
travels the normal request path into the normal worker loop. "cache-crash:<text>" is read
as a prompt like any other, and the worker SIGKILLs itself half way through writing its
state into the prefix cache. "raise" fails the job with an exception the worker logs;
"uncaught" raises one no handler catches: the worker logs it and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

ENV = "LLMSUP_FAULT_INJECTION"
ENABLE_VALUE = "tests-only-this-breaks-workers"
PREFIX = "LLMSUP-FAULT:"

_leaked: list[bytearray] = []
# Set by a "cache-crash" prompt: the next prefix-cache write dies half way (prefix.py).
cache_write_crash = False


class InjectedExit(BaseException):
    """An exception no handler of the worker catches (the "uncaught" fault)."""


def enabled() -> bool:
    return os.environ.get(ENV) == ENABLE_VALUE


def inject(prompt: str) -> None:
    """Run the fault a prompt asks for; returns for faults that let the request go on."""
    if not prompt.startswith(PREFIX):
        return
    kind, _, arg = prompt[len(PREFIX) :].partition(":")
    if kind == "leak":
        block = bytearray(int(arg or 64) << 20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, anonymous
        _leaked.append(block)
    elif kind == "hang":
        # Stuck in native code with the GIL released, like a decode that never returns.
        ctypes.CDLL(None).sleep(3600)
    elif kind == "spin":
        threading.Thread(target=_spin, daemon=True).start()
    elif kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "raise":  # the job fails, the worker logs it and goes on
        raise RuntimeError(f"injected fault: {arg or 'raise'}")
    elif kind == "uncaught":  # past the worker loop's handlers: the worker exits with it
        raise InjectedExit(f"injected fault: {arg or 'uncaught'}")
    elif kind == "cache-crash":
        global cache_write_crash
        cache_write_crash = True


def _spin() -> None:
    while True:
        pass
