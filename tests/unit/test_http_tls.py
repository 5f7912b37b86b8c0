"""hekitrace.service.http over TLS (metrics.tls): a real server on a loopback port and real
TLS clients (Python's ssl, with certificates made by the openssl command): mutual TLS
answers, a client without a certificate or with a stranger's is refused and counted, a
plain-HTTP client is told to use https, silent and stalled handshakes are evicted and
timed out without holding up a scrape, and a swapped context serves a new certificate."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from hekitrace.config.metrics_endpoint import TlsConfig
from hekitrace.config.tls import server_context
from hekitrace.service.http import Health, HttpServer
from hekitrace.service.metrics import ClientCounts
from tests.certs import Pki, make_leaf, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def mtls(pki: Pki) -> ssl.SSLContext:
    return server_context(TlsConfig(str(pki.server_cert), str(pki.server_key),
                                    str(pki.ca_cert), True))


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None
                   ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/metrics") -> bytes:
    """One request over TLS; the whole reply (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLZeroReturnError:
                return data
            if not chunk:
                return data
            data += chunk


@pytest.fixture
def tls_server(pki):
    counts = ClientCounts()
    registry = CollectorRegistry()
    Counter("hekitrace_test_total", "a counter for this test", registry=registry).inc(7)
    server = HttpServer("127.0.0.1:0", registry, Health(), tls=mtls(pki), counts=counts,
                        max_connections=4, timeout_seconds=0.5)
    server.start()
    yield server, counts
    server.close()


def test_mutual_tls_scrape_answers(tls_server, pki):
    server, counts = tls_server
    assert server.url == f"https://127.0.0.1:{server.port}"
    reply = https_get(server.port, client_context(pki, pki.client_cert, pki.client_key))
    assert reply.startswith(b"HTTP/1.1 200") and b"hekitrace_test_total 7.0" in reply
    healthz = https_get(server.port, client_context(pki, pki.client_cert, pki.client_key),
                        "/healthz")
    assert healthz.startswith(b"HTTP/1.1 200")
    assert not any(counts.snapshot().values())


@pytest.mark.parametrize("who", ["no certificate", "a stranger's certificate"])
def test_client_without_a_trusted_certificate_is_refused_and_counted(tls_server, pki, who):
    server, counts = tls_server
    ctx = (client_context(pki) if who == "no certificate"
           else client_context(pki, pki.stranger_cert, pki.stranger_key))
    # TLS 1.3: the client may finish its side first and learn of the refusal on read
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        reply = https_get(server.port, ctx)
        assert not reply  # a refused client gets no byte of HTTP
        raise ConnectionResetError("closed without a reply")
    deadline = time.monotonic() + 5
    while counts.snapshot().get(("metrics", "tls_client_certificate")) != 1:
        assert time.monotonic() < deadline, counts.snapshot()
        time.sleep(0.02)
    # the server is still serving
    ok = https_get(server.port, client_context(pki, pki.client_cert, pki.client_key))
    assert ok.startswith(b"HTTP/1.1 200")


def test_plain_http_to_the_tls_port_is_told_to_use_https(tls_server, pki):
    server, counts = tls_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 Bad Request")
    assert reply.endswith(b"this port serves HTTPS (metrics.tls): use https://\n")
    assert b"hekitrace_test_total" not in reply
    assert {k: v for k, v in counts.snapshot().items() if v} == {("metrics", "not_tls"): 1}


def test_silent_and_stalled_handshakes_are_evicted_and_timed_out(tls_server, pki):
    server, counts = tls_server
    # half of them connect and say nothing; half start a TLS record and stall in the
    # handshake (the server has taken them past the first byte)
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    stalled = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"\x16\x03\x01\x02\x00\x01")   # a ClientHello's first bytes, no more
        stalled.append(s)
    try:
        time.sleep(0.1)
        assert server.connections <= 4
        started = time.perf_counter()
        reply = https_get(server.port, client_context(pki, pki.client_cert, pki.client_key))
        assert reply.startswith(b"HTTP/1.1 200")
        assert time.perf_counter() - started < 0.4   # not behind a 0.5 s timeout
        assert counts.snapshot()[("metrics", "busy")] >= 6
        assert threading.active_count() < 10
        time.sleep(1.0)
        assert server.connections == 0
        assert counts.snapshot()[("metrics", "timeout")] >= 1
    finally:
        for s in silent + stalled:
            s.close()


def test_a_swapped_context_serves_the_renewed_certificate(tls_server, pki, tmp_path):
    server, _counts = tls_server
    ca = (pki.ca_cert, pki.ca_key)
    cert, key = make_leaf(tmp_path, "renewed", ca, "serverAuth", "IP:127.0.0.1")
    client = client_context(pki, pki.client_cert, pki.client_key)

    def served_cert() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)

    before = served_cert()
    assert server.set_tls(server_context(TlsConfig(str(cert), str(key),
                                                   str(pki.ca_cert), True)))
    after = served_cert()
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert "client certificates required" in server.describe_tls()
    assert server.set_tls(None) and server.url.startswith("http://")
    assert not server.set_tls(None)   # plain before and after: nothing to say
