"""Fuzz the control-socket protocol against a real daemon process.

The control socket is root-only, but whatever talks to it (scripts, monitoring agents,
a confused operator with socat) can send anything. Each example opens a connection to a
real ``hekitrace daemon`` (tests/e2e/daemon_proc.py), sends random bytes or random JSON
objects (every op, random argument shapes), half-closes, and reads: the reply, if the
request was a complete line, must be one JSON object, ``ok`` true or an error with a
code from the contract (docs/internals.md); a request without a newline may get no
reply. Payloads include requests nested up to 60,000 levels deep (a ``bad_request``,
never ``internal``). Each exchange is bounded in time, and afterwards the daemon must
still answer ``status``, be alive, hold no more than 32 MiB of resident memory beyond what
it had before the fuzzing, and its stderr must hold no Python traceback.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hekitrace.service.control_client import ControlClient
from tests.e2e.daemon_proc import DaemonProcess
from tests.fuzz.fuzzbudget import bounded, budget

pytestmark = pytest.mark.e2e

CODES = {"unknown_vm", "ambiguous_vm", "bad_request", "too_large", "timeout", "denied",
         "internal", "busy"}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess().start()
    d.rss_before_kib = _rss_kib(d.proc.pid)
    yield d
    d.close()


def exchange(path: str, payload: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(path)
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def check_reply(payload: bytes, data: bytes) -> None:
    if b"\n" not in payload and not data:
        return      # no complete request: the server may just hang up
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data[:200]
    reply = json.loads(data)
    assert isinstance(reply, dict) and reply.get("ok") in (True, False), reply
    if reply["ok"] is False:
        assert reply["error"]["code"] in CODES, reply
        assert reply["error"]["code"] != "internal", f"handler bug for {payload[:200]!r}"
        assert reply["error"]["message"]


ARG = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                   | st.text(max_size=12),
                   lambda inner: st.lists(inner, max_size=3)
                   | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
REQUEST = st.fixed_dictionaries(
    {"op": st.sampled_from(["status", "vms", "snapshot", "reload", "", "STATUS"]) | ARG},
    optional={"vm": st.sampled_from(["1", "0", "*", "-1", "a" * 300]) | ARG,
              "maps": st.sampled_from([["requested"], ["applied"], [], ["x"]]) | ARG,
              "extra": ARG})


@given(payload=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b + b"\n"),
    REQUEST.map(lambda r: json.dumps(r).encode() + b"\n"),
    REQUEST.map(lambda r: json.dumps(r).encode()[:-1] + b"\n"),     # cut JSON
    ARG.map(lambda r: json.dumps(r).encode() + b"\n"),
    st.tuples(st.sampled_from([b"[", b'{"a":', b'{"op":"status","x":']),
              st.integers(1, 60_000)).map(lambda t: t[0] * t[1] + b"\n")))
@budget(150)
@bounded(seconds=15.0, megabytes=32)
def test_random_requests_get_a_contract_reply(daemon, payload):
    check_reply(payload, exchange(daemon.socket_path, payload))


def test_daemon_survived_the_fuzzing(daemon):
    assert ControlClient(daemon.socket_path).request("status")["ready"] is True
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.stderr(), daemon.stderr()
    grown = _rss_kib(daemon.proc.pid) - daemon.rss_before_kib
    assert grown < 32 * 1024, f"the daemon grew by {grown} KiB during the fuzzing"
