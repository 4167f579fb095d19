"""systemd's service notifications (sd_notify(3)), over the NOTIFY_SOCKET datagram socket:
READY=1 once every worker serves, STATUS= lines, WATCHDOG=1 from the event loop itself
(a wedged loop stops the pings and systemd restarts the service), RELOADING=1 with
MONOTONIC_USEC then READY=1 around a reload, STOPPING=1 when a drain begins.

Nothing happens without NOTIFY_SOCKET (not under systemd, or not Type=notify). The
variables are taken out of the environment at start, so the workers, the gateway and
py-spy, which are not the main process (NotifyAccess=main), never see them. A send that
fails is dropped: systemd not listening must never stop the supervisor.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """The one NOTIFY_SOCKET of this process; every method is a no-op without it."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.sock: socket.socket | None = None
        self.address = address
        # Ping at half the watchdog's timeout, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec else None
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env=os.environ) -> Notifier:
        """Take NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID out of `env`."""
        address = env.pop("NOTIFY_SOCKET", None)
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", None)
        if not address or address[0] not in "/@":
            return cls()
        if address[0] == "@":  # an abstract socket
            address = "\0" + address[1:]
        mine = pid is None or pid == str(os.getpid())
        return cls(address, int(usec) if usec.isdigit() and mine else None)

    def send(self, *fields: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(errors="replace"), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
