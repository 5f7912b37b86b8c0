"""The HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one port, over HTTPS
when ``metrics.tls`` says so.

prometheus_client renders ``/metrics`` (no hand-written exposition); this module adds the
two probes and a small bounded server (:class:`HttpServer`). It runs in its own thread so
a slow scraper never delays event processing; the probes only read two plain values the loop keeps current
(:class:`Health`), so they never take the state lock.

Defaults (observability conventions 10): loopback only, port 9864, set by
``metrics.listen`` ("ADDR:PORT", "[v6addr]:PORT"), plain HTTP. With ``metrics.tls`` the
port speaks only TLS (docs/metrics-tls.md). Nothing but metrics and probe results is
served: no state dumps on the metrics port.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from hekitrace.config import limits
from hekitrace.config.metrics_endpoint import TlsConfig, split_listen
from hekitrace.config.tls import server_context
from hekitrace.errors import ConfigError
from hekitrace.service.metrics import CLIENT_COUNTS, ClientCounts, ClientCountsCollector

DEFAULT_PORT = 9864
#: /healthz fails when the loop has not finished an iteration for this long. The loop
#: wakes at least once a second (its timers), so 30 s means it is stuck, not idle.
HEALTH_STALE_SECONDS = 30.0
#: The first byte of every TLS connection: a handshake record (RFC 8446 section 5.1,
#: ContentType handshake(22); the same in TLS 1.2, RFC 5246 section 6.2.1).
TLS_HANDSHAKE_RECORD = b"\x16"
#: OpenSSL's reasons for a handshake refused because of the client's certificate
#: (none sent, or one the client CA did not sign): counted apart from other failures,
#: because they mean a scraper without the right certificate, not a broken client.
CLIENT_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE",
                                 "CERTIFICATE_VERIFY_FAILED", "NO_CERTIFICATE_RETURNED"})
NOT_TLS_REPLY = ("400 Bad Request", "this port serves HTTPS (metrics.tls): use https://\n")


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9864"``, ``"[::1]:9864"``, ``":9864"`` (all addresses) -> (host, port),
    by the same rules the config check applies (config.split_listen)."""
    try:
        host, port = split_listen(value.strip())
    except ValueError as error:
        raise ConfigError(f"expected {error}, got {value!r}", key="metrics.listen") from None
    return host or "0.0.0.0", port


def tls_context(settings: TlsConfig) -> ssl.SSLContext | None:
    """The server context ``metrics.tls`` asks for, None for plain HTTP; ConfigError
    when a file cannot be used (config/tls.py)."""
    return server_context(settings) if settings.enabled else None


class Health:
    """What the probes report: loop liveness and readiness with its reasons.

    The loop calls :meth:`beat` each iteration and sets ``ready``/``not_ready_reasons``;
    the HTTP thread only reads them (single attribute reads are atomic in CPython).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 stale_seconds: float = HEALTH_STALE_SECONDS) -> None:
        self._clock = clock
        self.stale_seconds = stale_seconds
        self.last_beat = clock()
        self.ready = False
        self.not_ready_reasons: tuple[str, ...] = ("starting",)

    def beat(self) -> None:
        self.last_beat = self._clock()

    def alive(self) -> tuple[bool, str]:
        age = self._clock() - self.last_beat
        if age > self.stale_seconds:
            return False, f"event loop stuck: last iteration {age:.1f} s ago\n"
        return True, f"ok: last loop iteration {age:.3f} s ago\n"

    def readiness(self) -> tuple[bool, str]:
        if self.ready:
            return True, "ready\n"
        return False, "not ready: " + "; ".join(self.not_ready_reasons) + "\n"


def make_app(registry: CollectorRegistry, health: Health) -> Callable:
    """The WSGI app: the probes here, everything else to prometheus_client."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, text = health.alive() if path == "/healthz" else health.readiness()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"hekitrace: /metrics /healthz /readyz\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; try /metrics /healthz /readyz\n"]

    return app


class HttpServer:
    """Serves :func:`make_app` on ``listen`` from one daemon thread, to a bounded number
    of clients, over TLS when given a ``tls`` context.

    Why not a thread per connection (``ThreadingMixIn``): a flood of silent or slow
    clients then costs a thread and its stack each, for as long as they like. Here one
    thread runs a selector: a connection is read without blocking until its request head
    is complete (at most :data:`~hekitrace.config.limits.HTTP_MAX_REQUEST_BYTES`, within
    :data:`~hekitrace.config.limits.HTTP_REQUEST_TIMEOUT_SECONDS` of its accept: the idle
    and read timeout), then answered at once (a scrape renders in about a millisecond)
    and closed; the reply is written as far as the peer accepts and the rest later, within
    the same timeout. At most :data:`~hekitrace.config.limits.HTTP_MAX_CONNECTIONS` are
    open: a new client past that evicts the oldest one still waiting for its request, so
    a flood of silent clients can delay a real scrape by one loop iteration, not by a
    timeout. Every client dropped that way, timed out or refused is counted in
    ``hekitrace_clients_refused_total{server="metrics"}`` (:class:`ClientCounts`).

    With TLS the same selector drives the handshake without blocking (``do_handshake``
    on a non-blocking socket, resumed when the socket is ready), inside the same
    deadline and eviction: a client that stalls its handshake is dropped like a silent
    plain one. A connection whose first byte is not a TLS handshake record gets a plain
    ``400`` saying to use https (``not_tls``); a failed handshake is counted as
    ``tls_client_certificate`` (no certificate, or one the client CA did not sign) or
    ``tls_handshake`` (anything else). :meth:`set_tls` swaps the context for new
    connections (a reload's renewed certificate).
    """

    def __init__(self, listen: str, registry: CollectorRegistry, health: Health, *,
                 tls: ssl.SSLContext | None = None,
                 counts: ClientCounts | None = None,
                 max_connections: int = limits.HTTP_MAX_CONNECTIONS,
                 timeout_seconds: float = limits.HTTP_REQUEST_TIMEOUT_SECONDS) -> None:
        self.host, self.port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(limits.HTTP_LISTEN_BACKLOG)
        except OSError as error:
            sock.close()
            raise ConfigError(f"cannot listen on {listen}: {error.strerror or error}",
                              key="metrics.listen") from None
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._tls = tls
        self._app = make_app(registry, health)
        self.counts = counts if counts is not None else CLIENT_COUNTS
        self._registry = registry
        self._collector = ClientCountsCollector(self.counts)
        registry.register(self._collector)
        self._max_conns = max_connections
        self._timeout = timeout_seconds
        self._conns: dict[int, _HttpConn] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="hekitrace-http",
                                        daemon=True)

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def url(self) -> str:
        """``https://HOST:PORT`` when new connections get TLS, else ``http://HOST:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls is not None else 'http'}://{host}:{self.port}"

    def set_tls(self, context: ssl.SSLContext | None) -> bool:
        """Serve connections accepted from now on with ``context`` (None: plain HTTP);
        those already open finish with what they had. One attribute store: the HTTP
        thread reads it once per accept. True when there is something to say: TLS is in
        use (its files were read again) or was just turned off."""
        was, self._tls = self._tls, context
        return context is not None or was is not None

    def describe_tls(self) -> str:
        """What new connections get, for the log: "plain HTTP", or TLS and whether
        client certificates are required."""
        if self._tls is None:
            return "plain HTTP"
        mode = ("client certificates required" if self._tls.verify_mode == ssl.CERT_REQUIRED
                else "no client authentication")
        return f"TLS ({mode})"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port; safe before :meth:`start`."""
        self._stop = True
        if self._thread.is_alive():
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(5)
        for conn in list(self._conns.values()):
            self._drop(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()
        try:
            self._registry.unregister(self._collector)
        except KeyError:
            pass

    # -- the loop -----------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop:
            now = time.monotonic()
            wait = min((c.deadline for c in self._conns.values()), default=now + 1.0) - now
            for key, _mask in self._selector.select(max(0.0, min(wait, 1.0))):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    return
                else:
                    self._step(key.data)
            self._expire(time.monotonic())

    def _step(self, conn: _HttpConn) -> None:
        """Move ``conn`` on from whatever it was waiting for."""
        if conn.outbuf:
            self._write(conn)
        elif conn.stage == _SNIFF:
            self._sniff(conn)
        elif conn.stage == _HANDSHAKE:
            self._handshake(conn)
        else:
            self._read(conn)

    def _accept(self) -> None:
        for _ in range(limits.HTTP_LISTEN_BACKLOG):  # bounded work per wake-up
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the kernel keeps it queued; next wake-up
            client.setblocking(False)
            if len(self._conns) >= self._max_conns and not self._evict_oldest_reader():
                self.counts.count("metrics", "busy")
                client.close()
                continue
            conn = _HttpConn(client, time.monotonic() + self._timeout, self._tls)
            self._conns[client.fileno()] = conn
            self._selector.register(client, selectors.EVENT_READ, conn)
            self._step(conn)  # a scraper usually sent its first bytes with the connect

    def _evict_oldest_reader(self) -> bool:
        readers = [c for c in self._conns.values() if not c.outbuf]
        if not readers:
            return False
        self.counts.count("metrics", "busy")
        self._drop(min(readers, key=lambda c: c.deadline))
        return True

    # -- TLS: recognise, then handshake without blocking ----------------------------------
    def _sniff(self, conn: _HttpConn) -> None:
        """Look at the first byte without taking it: a TLS client starts with a
        handshake record; anything else (a plain-HTTP scrape) is answered in plain text
        and closed, so its operator sees why instead of a reset."""
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not first:
            self._drop(conn)
            return
        if first != TLS_HANDSHAKE_RECORD or conn.tls is None:
            self.counts.count("metrics", "not_tls")
            try:  # take what it sent, so closing does not reset the connection first
                conn.sock.recv(limits.HTTP_MAX_REQUEST_BYTES)
            except OSError:
                pass
            self._respond(conn, _simple(*NOT_TLS_REPLY))
            return
        self._selector.unregister(conn.sock)
        try:
            conn.sock = conn.tls.wrap_socket(conn.sock, server_side=True,
                                             do_handshake_on_connect=False)
        except (ssl.SSLError, OSError):
            self.counts.count("metrics", "tls_handshake")
            conn.sock.close()
            self._conns.pop(conn.fd, None)
            return
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.stage = _HANDSHAKE
        self._handshake(conn)

    def _handshake(self, conn: _HttpConn) -> None:
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._wait(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._wait(conn, selectors.EVENT_WRITE)
            return
        except ssl.SSLError as error:
            reason = ("tls_client_certificate" if error.reason in CLIENT_CERT_REASONS
                      else "tls_handshake")
            self.counts.count("metrics", reason)
            self._drop(conn)
            return
        except OSError:  # reset or closed mid-handshake
            self.counts.count("metrics", "tls_handshake")
            self._drop(conn)
            return
        conn.stage = _REQUEST
        self._wait(conn, selectors.EVENT_READ)
        self._read(conn)  # the request may have come with the client's Finished

    def _wait(self, conn: _HttpConn, events: int) -> None:
        if conn.events != events:
            self._selector.modify(conn.sock, events, conn)
            conn.events = events

    # -- HTTP ---------------------------------------------------------------------------
    def _read(self, conn: _HttpConn) -> None:
        data = b""
        # an SSL socket may hold decrypted bytes the selector cannot see: take them too
        for _ in range(limits.HTTP_MAX_REQUEST_BYTES // 512):
            try:
                chunk = conn.sock.recv(limits.HTTP_MAX_REQUEST_BYTES)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                break
            except OSError:
                self._drop(conn)
                return
            if not chunk:
                if not data:
                    self._drop(conn)
                    return
                break
            data += chunk
            if not (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()):
                break
        if not data:
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if end < 0:
            if len(conn.inbuf) > limits.HTTP_MAX_REQUEST_BYTES:
                self.counts.count("metrics", "too_large")
                self._respond(conn, _simple("431 Request Header Fields Too Large",
                                            "request head too large\n"))
            return
        try:
            reply = self._answer(bytes(conn.inbuf[:end]))
        except Exception as error:  # noqa: BLE001 - a collector bug must not end serving
            reply = _simple("500 Internal Server Error",
                            f"{type(error).__name__}: {error}\n")
        self._respond(conn, reply)

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _simple("400 Bad Request", "bad request line\n")
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            return _simple("405 Method Not Allowed", "only GET and HEAD\n")
        path, _, query = target.partition("?")
        # HEAD is answered as GET without the body (prometheus_client refuses HEAD)
        environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": path,
                                   "QUERY_STRING": query, "SERVER_PROTOCOL": "HTTP/1.1"}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        reply: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> None:
            reply["status"], reply["headers"] = status, headers

        body = b"".join(self._app(environ, start_response))
        headers = [(k, v) for k, v in reply["headers"] if k.lower() != "content-length"]
        out = [f"HTTP/1.1 {reply['status']}"] + [f"{k}: {v}" for k, v in headers]
        out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        return "\r\n".join(out).encode("latin-1") + (b"" if method == "HEAD" else body)

    def _respond(self, conn: _HttpConn, data: bytes) -> None:
        conn.outbuf = data
        conn.deadline = time.monotonic() + self._timeout
        self._write(conn)

    def _write(self, conn: _HttpConn) -> None:
        wait = selectors.EVENT_WRITE
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            sent = 0
        except ssl.SSLWantReadError:
            sent, wait = 0, selectors.EVENT_READ
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._finish(conn)
            return
        self._wait(conn, wait)

    def _finish(self, conn: _HttpConn) -> None:
        """The reply is out: say so (TLS close_notify, then FIN) and close."""
        if isinstance(conn.sock, ssl.SSLSocket):
            try:
                # sends close_notify; the peer's reply is not awaited (non-blocking)
                conn.sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._drop(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.counts.count("metrics", "timeout")
            self._drop(conn)

    def _drop(self, conn: _HttpConn) -> None:
        self._conns.pop(conn.fd, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


#: connection stages: waiting for the first byte (TLS only), in the TLS handshake,
#: reading the request head (a reply being written is ``outbuf`` not empty)
_SNIFF, _HANDSHAKE, _REQUEST = "sniff", "handshake", "request"


class _HttpConn:
    __slots__ = ("deadline", "events", "fd", "inbuf", "outbuf", "sock", "stage", "tls")

    def __init__(self, sock: socket.socket, deadline: float,
                 tls: ssl.SSLContext | None) -> None:
        self.sock = sock
        #: the descriptor, kept because a closed or unwrapped socket forgets it
        self.fd = sock.fileno()
        self.deadline = deadline
        self.tls = tls
        self.stage = _SNIFF if tls is not None else _REQUEST
        self.events = selectors.EVENT_READ
        self.inbuf = bytearray()
        self.outbuf = b""


def _simple(status: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
