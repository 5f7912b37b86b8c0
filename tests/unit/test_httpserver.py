"""hekitrace.service.http: the listen parser, the probes' verdicts, and a real server on a
loopback port answering /metrics, /healthz, /readyz and 404."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from hekitrace.errors import ConfigError
from hekitrace.service.http import Health, HttpServer, parse_listen


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9864", ("127.0.0.1", 9864)),
    (":9864", ("0.0.0.0", 9864)),
    ("[::1]:0", ("::1", 0)),
    (" localhost:80 ", ("localhost", 80)),
])
def test_parse_listen(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text, expected", [
    ("9864", "HOST:PORT"),
    ("127.0.0.1:70000", "HOST:PORT"),
    ("::1:9864", "an IPv6 address in brackets"),
    ("metrics.example:9864", "an IP address, localhost or nothing"),
])
def test_parse_listen_refuses_what_the_config_refuses(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_listen(text)
    assert info.value.key == "metrics.listen" and expected in info.value.reason
    assert repr(text) in info.value.reason


def test_health_goes_stale_and_readiness_names_reasons():
    now = [100.0]
    health = Health(clock=lambda: now[0], stale_seconds=30.0)
    assert health.alive()[0]
    now[0] += 31.0
    ok, text = health.alive()
    assert not ok and "31.0 s ago" in text
    assert health.readiness() == (False, "not ready: starting\n")
    health.ready = True
    assert health.readiness() == (True, "ready\n")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_server_answers_on_a_real_port():
    registry = CollectorRegistry()
    Counter("hekitrace_test_total", "a counter for this test", registry=registry).inc(3)
    health = Health()
    server = HttpServer("127.0.0.1:0", registry, health)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = _get(base + "/metrics")
        assert status == 200 and "hekitrace_test_total 3.0" in body
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz") == (503, "not ready: starting\n")
        health.ready = True
        assert _get(base + "/readyz") == (200, "ready\n")
        assert _get(base + "/nothing")[0] == 404
    finally:
        server.close()


def test_port_in_use_is_a_config_error():
    registry, health = CollectorRegistry(), Health()
    first = HttpServer("127.0.0.1:0", registry, health)
    try:
        with pytest.raises(ConfigError, match="cannot listen on"):
            HttpServer(f"127.0.0.1:{first.port}", registry, health)
    finally:
        first.close()


def test_close_before_start_returns_and_frees_the_port():
    registry, health = CollectorRegistry(), Health()
    server = HttpServer("127.0.0.1:0", registry, health)
    port = server.port
    server.close()                 # used to wait forever in socketserver.shutdown()
    HttpServer(f"127.0.0.1:{port}", registry, health).close()


def _raw(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


@pytest.fixture
def bounded_server():
    from hekitrace.service.metrics import ClientCounts
    counts = ClientCounts()
    registry = CollectorRegistry()
    server = HttpServer("127.0.0.1:0", registry, Health(), counts=counts, max_connections=4,
                        timeout_seconds=0.5)
    server.start()
    yield server, counts
    server.close()


def test_http_methods_head_and_oversized_heads(bounded_server):
    server, counts = bounded_server
    head = _raw(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert _raw(server.port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _raw(server.port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
    big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (64 * 1024)
    assert _raw(server.port, big).startswith(b"HTTP/1.1 431")
    assert counts.snapshot()[("metrics", "too_large")] == 1


def test_silent_and_slow_clients_are_timed_out_evicted_and_counted(bounded_server):
    import socket
    import threading
    import time
    server, counts = bounded_server
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    try:
        time.sleep(0.2)
        assert server.connections <= 4
        started = time.perf_counter()
        assert _raw(server.port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert time.perf_counter() - started < 0.1
        assert counts.snapshot()[("metrics", "busy")] >= 6
        assert threading.active_count() < 10
        time.sleep(1.0)               # past the 0.5 s idle timeout: the rest are dropped
        assert server.connections == 0
        assert counts.snapshot()[("metrics", "timeout")] >= 1
    finally:
        for s in silent:
            s.close()
    text = _raw(server.port, b"GET /metrics HTTP/1.1\r\n\r\n").decode()
    assert 'hekitrace_clients_refused_total{reason="timeout",server="metrics"}' in text


def test_a_collector_that_raises_is_a_500_and_the_server_keeps_serving():
    class Broken:
        def collect(self):
            raise RuntimeError("collector bug")

        def describe(self):
            return []

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Broken())
    server = HttpServer("127.0.0.1:0", registry, Health())
    server.start()
    try:
        assert _raw(server.port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500")
        assert _raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        server.close()
