"""Fuzz the metrics port under mutual TLS (metrics.tls) with hostile first bytes.

Anyone who can reach the port can send anything before authenticating. Each example opens
a connection to a real HttpServer (loopback, a context from config/tls.py, certificates
from the openssl command), sends random bytes, a TLS record header with random content,
or a real ClientHello (made by Python's ssl into a memory BIO) cut or with bytes flipped,
half-closes, and reads what comes back within a bounded time. Whatever came back is a
plain 400 (not TLS), TLS records (handshake or alert), or nothing: never a byte of the
metrics, which only a client with a certificate the CA signed may read. Afterwards the
server's thread is alive, holds no connection, and answers a real mTLS scrape.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from hekitrace.config.metrics_endpoint import TlsConfig
from hekitrace.config.tls import server_context
from hekitrace.service.http import Health, HttpServer
from hekitrace.service.metrics import ClientCounts
from tests.certs import make_pki
from tests.fuzz.fuzzbudget import bounded, budget

SECRET = b"hekitrace_fuzz_secret_total"


def client_hello() -> bytes:
    """The first flight of a real TLS client, as bytes."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    registry = CollectorRegistry()
    Counter(SECRET.decode().removesuffix("_total"), "must not leak",
            registry=registry).inc()
    ctx = server_context(TlsConfig(str(pki.server_cert), str(pki.server_key),
                                   str(pki.ca_cert), True))
    srv = HttpServer("127.0.0.1:0", registry, Health(), tls=ctx, counts=ClientCounts(),
                     timeout_seconds=1.0)
    srv.start()
    srv.pki = pki
    yield srv
    srv.close()


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already closed it (ENOTCONN, EPIPE, ECONNRESET)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
        return data


def mutated_hello(cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(HELLO[:cut])
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    return bytes(data)


PAYLOADS = st.one_of(
    st.binary(max_size=400),
    st.binary(max_size=400).map(lambda b: b"\x16\x03\x01" + b),
    st.builds(mutated_hello, st.integers(1, len(HELLO)),
              st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4)),
    st.just(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
)


@given(payload=PAYLOADS)
@budget(60)
@bounded(seconds=10.0, megabytes=32)
def test_hostile_first_bytes_never_reach_the_metrics(server, payload):
    reply = exchange(server.port, payload)
    assert SECRET not in reply
    if reply:
        assert reply.startswith(b"HTTP/1.1 400 Bad Request") or reply[0] in (0x15, 0x16), \
            reply[:40]


def test_the_server_survived_the_fuzzing(server):
    pki = server.pki
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and SECRET in reply
    deadline = time.monotonic() + 3 * 1.0   # the server's timeout, with a margin
    while server.connections:
        assert time.monotonic() < deadline, "a connection outlived the server's timeout"
        time.sleep(0.05)
    counts = server.counts.snapshot()
    assert counts[("metrics", "not_tls")] >= 1
    assert counts[("metrics", "tls_handshake")] + counts[("metrics", "tls_client_certificate")] >= 1
