"""The HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one port.

prometheus_client renders ``/metrics`` (no hand-written exposition); this module adds the
two probes and the threading server. It runs in its own thread so a slow scraper never
delays event processing; the probes only read two plain values the loop keeps current
(:class:`Health`), so they never take the state lock.

Defaults (observability conventions 10): loopback only, port 9864, set by
``metrics.listen`` ("ADDR:PORT", "[v6addr]:PORT"). Nothing but metrics and probe
results is served: no state dumps on the metrics port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from hekitrace.config.settings import split_listen
from hekitrace.errors import ConfigError

DEFAULT_PORT = 9864
#: /healthz fails when the loop has not finished an iteration for this long. The loop
#: wakes at least once a second (its timers), so 30 s means it is stuck, not idle.
HEALTH_STALE_SECONDS = 30.0


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9864"``, ``"[::1]:9864"``, ``":9864"`` (all addresses) -> (host, port),
    by the same rules the config check applies (config.split_listen)."""
    try:
        host, port = split_listen(value.strip())
    except ValueError as error:
        raise ConfigError(f"expected {error}, got {value!r}", key="metrics.listen") from None
    return host or "0.0.0.0", port


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


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape would flood the journal


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
    """Serves :func:`make_app` on ``listen`` from a daemon thread."""

    def __init__(self, listen: str, registry: CollectorRegistry, health: Health) -> None:
        self.host, self.port = parse_listen(listen)
        server_class = _V6Server if ":" in self.host else _Server
        try:
            self._server = make_server(self.host, self.port, make_app(registry, health),
                                       server_class=server_class, handler_class=_QuietHandler)
        except OSError as error:
            raise ConfigError(f"cannot listen on {listen}: {error.strerror or error}",
                              key="metrics.listen") from None
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="hekitrace-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port; safe before :meth:`start` (shutdown() would
        wait forever for a serving loop that never ran)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
