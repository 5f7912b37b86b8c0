"""systemd service notifications (``sd_notify``), written to ``$NOTIFY_SOCKET`` directly.

Why not libsystemd or the ``sdnotify`` package: the protocol is one datagram of
``KEY=value`` lines on a Unix socket (sd_notify(3)), and a direct implementation has no
dependency and works the same in containers and tests (a test owns the socket and reads
what the daemon says). When ``NOTIFY_SOCKET`` is unset (run from a shell) every call is
a cheap no-op, so the daemon never branches on "am I under systemd".

Addresses starting with ``@`` are Linux abstract sockets (sd_notify(3)); ``vsock:`` ones
are not supported and are reported once, never silently ignored.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping


class Notifier:
    """Sends ``STATUS=``, ``READY=1``, ``RELOADING=1``, ``STOPPING=1`` and ``WATCHDOG=1``.

    ``environ`` is read once at construction (pass a dict in tests). ``watchdog_interval``
    is half of ``WATCHDOG_USEC`` in seconds (systemd.service(5) recommends pinging at
    half the timeout), or None when systemd does not watch us (or ``WATCHDOG_PID`` names
    another process). Send errors never raise: a notification that cannot be delivered
    is counted in ``errors`` and the last one kept in ``last_error``, because losing
    systemd must not stop the monitoring of VMs.
    """

    def __init__(self, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self._clock = clock
        self.address: str | bytes | None = None
        self.unsupported: str | None = None
        self.errors = 0
        self.last_error: str | None = None
        self._sock: socket.socket | None = None
        raw = env.get("NOTIFY_SOCKET") or ""
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            self.unsupported = f"NOTIFY_SOCKET={raw!r} is not a Unix socket path; " \
                               "systemd notifications disabled"
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=value`` each) as one datagram; False if not delivered."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                # Non-blocking: a Unix datagram send blocks when the receiver's queue is
                # full (net.unix.max_dgram_qlen, often 10), and the event loop must never
                # wait on systemd. A full queue counts as an undelivered notification.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM
                                           | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(payload, self.address)
            return True
        except BlockingIOError:
            self.errors += 1
            self.last_error = "NOTIFY_SOCKET queue full (receiver not reading)"
            return False
        except OSError as error:
            self.errors += 1
            self.last_error = f"{error.strerror or error} sending to NOTIFY_SOCKET"
            return False

    def status(self, text: str) -> bool:
        """``STATUS=`` line shown by ``systemctl status`` (one line; newlines replaced)."""
        return self.send("STATUS=" + text.replace("\n", " "))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: hooks attached and start-up discovery done."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by Type=notify-reload, harmless
        for Type=notify); follow with :meth:`ready` when the reload is done."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1")

    def watchdog(self, force: bool = False) -> bool:
        """``WATCHDOG=1`` if half the watchdog timeout passed since the last ping.

        Called from the event loop on every iteration; cheap when not due. Returns True
        when a ping was sent.
        """
        if self.watchdog_interval is None or self.address is None:
            return False
        now = self._clock()
        if not force and now - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the datagram socket (the daemon calls this last)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
