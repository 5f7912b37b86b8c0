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
