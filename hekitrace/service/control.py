"""The control socket: the daemon's small JSON request/reply service, server and client.

Protocol (docs/internals.md "Control socket protocol"): a Unix stream socket in the
runtime directory, mode 0600, root only (the peer's uid is checked with ``SO_PEERCRED``,
so a socket made world-writable by mistake still refuses others). One request per
connection: a JSON object ending in ``\\n``, at most 64 KiB, complete within 5 s. One reply:
a JSON object ending in ``\\n``, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code", "message", "choices"?}}``.

Why the server runs inside the daemon's selector loop, non-blocking, rather than in a
thread: the replies are read from ``Host``, which only the loop mutates. In the loop the
handler sees a consistent state without locks and without copying every map on every
event; a thread would need either a lock on the hot path or a snapshot copy per change.
What stops a slow or hostile client from stalling event processing: the sockets are
non-blocking, a request is parsed only once complete, a reply is written as far as the
peer accepts and the rest on later iterations, each connection has a deadline, and the
number of open connections is capped. The one blocking part is building a reply (a
snapshot of a 10k-range map takes milliseconds), during which events wait in the ring
buffers, which is what they are for.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from hekitrace.config.limits import MAX_JSON_DEPTH, loads_bounded
from hekitrace.errors import (
    ControlError,
)
from hekitrace.service.follow import Record, Subscriber
from hekitrace.service.metrics import CLIENT_COUNTS, ClientCounts

#: Request limits from the protocol contract.
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 5.0
#: More concurrent clients than this is an abuse, not an operator; the newest are refused.
MAX_CONNECTIONS = 32
#: struct ucred {pid_t pid; uid_t uid; gid_t gid;} (socket(7), SO_PEERCRED)
_UCRED = struct.Struct("iII")

ERROR_CODES = ("unknown_vm", "ambiguous_vm", "bad_request", "too_large", "timeout", "denied",
               "internal", "busy")


class RequestError(Exception):
    """Raised by a request handler to send an error reply; ``code`` is one of
    :data:`ERROR_CODES`, ``choices`` lists candidate VMs for ``ambiguous_vm``."""

    def __init__(self, code: str, message: str, choices: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.choices = choices


class ControlReplyError(ControlError):
    """The daemon answered with an error; ``code`` and ``message`` are its fields."""

    def __init__(self, code: str, message: str, *, path: str) -> None:
        self.code = code
        self.message = message
        self.path = path
        super().__init__(f"daemon at {path} refused the request ({code}): {message}")


def error_reply(code: str, message: str, choices: list[str] | None = None) -> dict:
    """The error object of the protocol."""
    err: dict[str, Any] = {"code": code, "message": message}
    if choices is not None:
        err["choices"] = choices
    return {"ok": False, "error": err}


def encode(obj: dict) -> bytes:
    """One protocol line (compact JSON, newline-terminated)."""
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def parse_request(line: bytes) -> dict:
    """Decode and check one request line; raises :class:`RequestError` (bad_request)."""
    try:
        line.decode("utf-8")
        obj = loads_bounded(line, max_bytes=MAX_REQUEST_BYTES, max_depth=MAX_JSON_DEPTH)
    except (UnicodeDecodeError, ValueError) as error:
        raise RequestError("bad_request", f"request is not JSON: {error}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad_request",
                           f"request must be a JSON object, got {type(obj).__name__}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise RequestError("bad_request", 'request needs "op": a string such as "status"')
    return obj


class _Conn:
    __slots__ = ("deadline", "follower", "inbuf", "outbuf", "replied", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = b""
        self.deadline = deadline
        self.replied = False
        #: set for a ``follow`` connection: it stays open and receives published lines
        self.follower: Subscriber | None = None


class ControlServer:
    """Serves the control protocol from a selector owned by the caller.

    ``handler(request: dict) -> result`` runs in the caller's thread (the daemon loop); it
    raises :class:`RequestError` for an error reply; any other exception becomes an
    ``internal`` error reply and is counted in ``stats["internal_errors"]``, never a
    crash. ``allowed_uids`` defaults to root only. ``stats`` counts requests by outcome
    (for status and tests).
    """

    def __init__(self, path: str, handler: Callable[[dict], Any], *,
                 allowed_uids: tuple[int, ...] = (0,),
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
                 max_connections: int = MAX_CONNECTIONS,
                 clock: Callable[[], float] = time.monotonic,
                 counts: ClientCounts | None = None) -> None:
        self.path = path
        #: refused and timed-out clients for hekitrace_clients_refused_total
        self.counts = counts if counts is not None else CLIENT_COUNTS
        self._handler = handler
        self._allowed = allowed_uids
        self._max_request = max_request_bytes
        self._timeout = timeout_seconds
        self._max_conns = max_connections
        self._clock = clock
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._conns: dict[int, _Conn] = {}
        self._followers = 0
        self.stats = {"requests": 0, "ok": 0, "errors": 0, "denied": 0, "too_large": 0,
                      "timeout": 0, "bad_request": 0, "internal_errors": 0, "refused_busy": 0}

    # -- lifecycle ------------------------------------------------------------------
    def open(self, selector: selectors.BaseSelector) -> None:
        """Bind the socket (mode 0600, replacing a stale socket file) and register it.

        A path that exists and is not a socket is an error, never deleted: it may be
        something the operator cares about. A socket a live daemon still answers on is
        also an error (two daemons would fight over the same BPF hooks).
        """
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"{self.path} exists and is not a socket; "
                                   "refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # stale: nobody listens
            else:
                raise ControlError(f"another daemon is listening on {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is created 0600, no window at 0777
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._listener = sock
        self._selector = selector
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        """Close every connection and the listener, and remove the socket file."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._listener is not None:
            if self._selector is not None:
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- selector callbacks -----------------------------------------------------------
    def _on_accept(self, sock: socket.socket, mask: int) -> None:
        assert self._selector is not None
        for _ in range(16):  # bounded: a flood of connects cannot starve the loop
            try:
                client, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the client sees a reset; try again later
            client.setblocking(False)
            conn = _Conn(client, self._clock() + self._timeout)
            if len(self._conns) >= self._max_conns:
                # One small reply fits the fresh socket's send buffer: the client learns
                # that the daemon is alive but busy (not gone), and the slot is never held.
                self.stats["refused_busy"] += 1
                self.counts.count("control", "busy")
                try:
                    client.send(encode(error_reply(
                        "busy", f"all {self._max_conns} control connections are in use; "
                                "try again in a few seconds")))
                except OSError:
                    pass
                client.close()
                continue
            self._conns[client.fileno()] = conn
            try:
                _pid, uid, _gid = _UCRED.unpack(client.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except OSError:
                uid = -1
            if uid not in self._allowed:
                self.stats["denied"] += 1
                self._reply(conn, error_reply("denied", f"uid {uid} may not use the control "
                                                        "socket (root only)"))
                continue
            self._selector.register(client, selectors.EVENT_READ,
                                    lambda s, m, c=conn: self._on_conn(c, m))

    def _on_conn(self, conn: _Conn, mask: int) -> None:
        if conn.follower is not None:
            self._on_follower(conn, mask)
            return
        if mask & selectors.EVENT_READ and not conn.replied:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            if not data:
                self._drop(conn)  # the client gave up before a full line
                return
            conn.inbuf += data
            end = conn.inbuf.find(b"\n")
            if end < 0 and len(conn.inbuf) <= self._max_request:
                return
            if end < 0 or end + 1 > self._max_request:
                self.stats["too_large"] += 1
                self.counts.count("control", "too_large")
                self._reply(conn, error_reply(
                    "too_large", f"request exceeds {self._max_request} bytes"))
                return
            reply = self._answer(bytes(conn.inbuf[:end]))
            if isinstance(reply.get("result"), Subscriber):
                conn.follower = reply["result"]
                self._followers += 1
                reply = {"ok": True, "result": {"following": True}}
            self._reply(conn, reply)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)

    # -- follow connections -----------------------------------------------------------
    @property
    def followers(self) -> int:
        """Open ``follow`` connections (the daemon publishes only when there are some;
        kept as a count because the daemon asks once per event)."""
        return self._followers

    def publish(self, records: list[Record]) -> None:
        """Offer ``records`` to every ``follow`` connection and send what fits; never
        blocks, whatever a subscriber does."""
        now = self._clock()
        for conn in list(self._conns.values()):
            follower = conn.follower
            if follower is None:
                continue
            lost = follower.offer(records, now)
            if lost:
                self.stats["follow_lines_lost"] = self.stats.get("follow_lines_lost", 0) + lost
            self._send_follower(conn)

    def _on_follower(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                data = b"-"
            except OSError:
                data = b""
            if not data:
                self._drop(conn)   # the subscriber went away
                return
        if mask & selectors.EVENT_WRITE:
            self._send_follower(conn)

    def _send_follower(self, conn: _Conn) -> None:
        assert self._selector is not None and conn.follower is not None
        pending = conn.follower.pending
        if conn.outbuf:                       # the ok reply, not fully sent yet
            pending[:0] = conn.outbuf
            conn.outbuf = b""
        if pending:
            try:
                sent = conn.sock.send(pending)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(conn)
                return
            conn.follower.sent(sent)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
        callback = lambda s, m, c=conn: self._on_conn(c, m)
        try:
            self._selector.modify(conn.sock, events, callback)
        except KeyError:
            self._selector.register(conn.sock, events, callback)

    def _answer(self, line: bytes) -> dict:
        self.stats["requests"] += 1
        try:
            result = self._handler(parse_request(line))
        except RequestError as error:
            self.stats["errors"] += 1
            if error.code == "bad_request":
                self.stats["bad_request"] += 1
            return error_reply(error.code, error.message, error.choices)
        except Exception as error:  # noqa: BLE001 - a handler bug must not kill the daemon
            self.stats["internal_errors"] += 1
            return error_reply("internal", f"{type(error).__name__}: {error}")
        self.stats["ok"] += 1
        return {"ok": True, "result": result}

    def _reply(self, conn: _Conn, reply: dict) -> None:
        conn.replied = True
        conn.outbuf = encode(reply)
        conn.deadline = self._clock() + self._timeout
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        assert self._selector is not None
        if conn.follower is not None:
            self._send_follower(conn)
            return
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._drop(conn)
            return
        callback = lambda s, m, c=conn: self._on_conn(c, m)
        try:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, callback)
        except KeyError:
            self._selector.register(conn.sock, selectors.EVENT_WRITE, callback)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is not None and conn.follower is not None:
            self._followers -= 1
        if self._selector is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def expire(self, now: float | None = None) -> None:
        """Answer ``timeout`` to requests not complete in time, drop stuck writers.

        Called by the daemon's timer; a client that sends half a line and waits forever
        costs one slot for at most the timeout.
        """
        now = self._clock() if now is None else now
        for conn in list(self._conns.values()):
            if conn.follower is not None:
                if conn.follower.stalled(now):
                    self.counts.count("control", "slow_subscriber")
                    self._drop(conn)
                continue
            if now < conn.deadline:
                continue
            if conn.replied:
                self._drop(conn)  # it does not read its reply
            else:
                self.stats["timeout"] += 1
                self.counts.count("control", "timeout")
                self._reply(conn, error_reply(
                    "timeout", f"request not complete within {self._timeout:g} s"))
                if conn.sock.fileno() in self._conns:
                    self._drop(conn)  # one chance to read the error, then gone
