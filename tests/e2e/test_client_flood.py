"""Issue 19: a flood of silent or slow clients on the metrics port of a real daemon.

500 TCP clients connect to the metrics port and send nothing (or one byte now and then):
a scrape of /metrics still answers within 100 ms, the daemon keeps fewer than 64 threads
and its memory does not grow with the flood, and the clients it dropped are counted in
hekitrace_clients_refused_total{server="metrics"}. The control socket's slots held by
silent clients make the CLI say "busy" (exit status 7), not "daemon gone" (6).
"""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.daemon_proc import HEKITRACE, DaemonProcess, metric_value

pytestmark = pytest.mark.e2e

FLOOD = 500


@pytest.fixture(scope="module")
def daemon():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * FLOOD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    d = DaemonProcess().start()
    yield d
    d.close()


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _scrape_ms(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    elapsed = (time.perf_counter() - started) * 1000
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"hekitrace_ready" in data
    return elapsed


def _flood(port: int, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        clients.append(s)
    return clients


def test_silent_clients_neither_delay_a_scrape_nor_grow_threads(daemon):
    pid = daemon.proc.pid
    _scrape_ms(daemon.port)
    rss_before = _status_field(pid, "VmRSS")
    clients = _flood(daemon.port, FLOOD)
    try:
        time.sleep(1.0)
        latencies = sorted(_scrape_ms(daemon.port) for _ in range(10))
        threads = _status_field(pid, "Threads")
        rss_after = _status_field(pid, "VmRSS")
        # the slow-drip kind: one byte each, never a full request
        for s in clients[:200]:
            try:
                s.send(b"G")
            except OSError:
                pass
        latencies += [_scrape_ms(daemon.port) for _ in range(5)]
    finally:
        for s in clients:
            s.close()
    print(f"scrape with {FLOOD} silent clients: max {max(latencies):.1f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2]:.1f} ms; threads {threads}; "
          f"RSS {rss_before} -> {rss_after} KiB")
    assert max(latencies) < 100, latencies
    assert threads < 64, threads
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    text = daemon.metrics()
    refused = metric_value(text, 'hekitrace_clients_refused_total{reason="busy",server="metrics"}')
    assert refused is not None and refused >= FLOOD - 64, text[-2000:]


def test_silent_clients_on_the_control_socket_make_the_cli_say_busy(daemon):
    held = []
    try:
        for _ in range(40):                    # more than the 32 slots
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon.socket_path)
            held.append(s)
        time.sleep(0.5)
        proc = subprocess.run([*HEKITRACE, "vms", "--socket", daemon.socket_path],
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        for s in held:
            s.close()
    assert proc.returncode == 7, (proc.returncode, proc.stderr)
    assert "busy" in proc.stderr and "died" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    text = daemon.metrics()
    assert (metric_value(text, 'hekitrace_clients_refused_total{reason="busy",server="control"}')
            or 0) >= 1
