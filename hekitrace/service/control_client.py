"""The client side of the control socket: one request, one reply (or a stream of lines
for ``follow``), with failures turned into errors that say what to do.

The protocol is documented with the server in service/control.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

from hekitrace.errors import (
    ControlError,
    ControlPermissionError,
    DaemonBusyError,
    NoDaemonError,
    VmLookupError,
)
from hekitrace.service.control import ControlReplyError, encode


class ControlClient:
    """Client side, used by ``hekitrace snapshot`` and ``hekitrace vms``.

    ``request(op, **args)`` returns the ``result`` of an ok reply. Failures raise, with
    messages meant for operators: :class:`NoDaemonError` (nothing listens at ``path``),
    :class:`ControlError` (permission denied, daemon died mid-reply, garbage reply),
    :class:`DaemonBusyError` (alive, but every connection slot is held),
    :class:`ControlReplyError` for protocol errors, and :class:`VmLookupError` (with
    ``choices``) for ``unknown_vm`` / ``ambiguous_vm``.
    """

    def __init__(self, path: str, timeout_seconds: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout_seconds

    def follow(self, **filters: Any) -> Iterator[dict]:
        """The daemon's stream of events and findings (``{"op": "follow", ...}``), one
        dict per line, until the daemon closes the connection; the first reply is checked
        like any other (a bad filter raises)."""
        sock = self._connect()
        try:
            sock.sendall(encode({"op": "follow", **filters}))
            reader = sock.makefile("rb")
            first = reader.readline()
            self._result(self._parse(first))
            sock.settimeout(None)          # a quiet host sends nothing for a long time
            for line in reader:
                if line.endswith(b"\n"):
                    yield json.loads(line)
        finally:
            sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise NoDaemonError(f"no hekitrace daemon is listening on {self.path} "
                                "(is 'hekitrace daemon' or hekitrace.service running?)"
                                ) from None
        except PermissionError:
            sock.close()
            raise ControlPermissionError(f"permission denied connecting to {self.path}: "
                                         "the control socket is for root only") from None
        return sock

    def request(self, op: str, **args: Any) -> Any:
        payload = encode({"op": op, **args})
        sock = self._connect()
        try:
            try:
                sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon may have refused us before reading; read its reply
            reply = self._read_reply(sock)
        except TimeoutError:
            raise ControlError(f"the daemon at {self.path} did not answer within "
                               f"{self.timeout:g} s") from None
        finally:
            sock.close()
        return self._result(reply)

    def _read_reply(self, sock: socket.socket) -> dict:
        chunks: list[bytes] = []
        while True:
            try:
                data = sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            chunks.append(data)
            if data.endswith(b"\n"):
                break
        return self._parse(b"".join(chunks))

    def _parse(self, raw: bytes) -> dict:
        """One reply line checked: complete, JSON, and shaped like a reply."""
        if not raw.endswith(b"\n"):
            got = f"after {len(raw)} bytes" if raw else "before replying"
            raise ControlError(f"the daemon at {self.path} closed the connection {got} "
                               "(did it die? see 'journalctl -u hekitrace')")
        try:
            reply = json.loads(raw)
        except ValueError as error:
            raise ControlError(f"the daemon at {self.path} sent a reply that is not JSON: "
                               f"{error}") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError(f"the daemon at {self.path} sent an unexpected reply: "
                               f"{str(reply)[:200]}")
        return reply

    def _result(self, reply: dict) -> Any:
        if reply.get("ok") is True:
            return reply.get("result")
        err = reply.get("error") or {}
        code = str(err.get("code", "unknown"))
        message = str(err.get("message", "no message"))
        if code in ("unknown_vm", "ambiguous_vm"):
            raise VmLookupError(message, choices=list(err.get("choices") or []),
                                ambiguous=code == "ambiguous_vm")
        if code == "denied":
            raise ControlPermissionError(f"the daemon at {self.path} refused us: {message}")
        if code == "busy":
            raise DaemonBusyError(f"the daemon at {self.path} is alive but busy: {message}")
        raise ControlReplyError(code, message, path=self.path)
