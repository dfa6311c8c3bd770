"""systemd's notify protocol (Type=notify): READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

A datagram to $NOTIFY_SOCKET; nothing happens when the variable is unset (not under systemd).
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends state changes to systemd when run under it."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        self._address = None
        if address:
            # An abstract socket is written with a leading @; the kernel wants a NUL there.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watched = usec and usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if watched else None

    def send(self, *lines: str) -> None:
        """Send one notification (several `KEY=value` lines); errors are ignored, as sd_notify does."""
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            pass
