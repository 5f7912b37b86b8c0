"""service.follow and the control server's follow connections, over real Unix sockets:
filters, a subscriber that reads everything, and one that reads nothing (its lines are
dropped and counted, a 'lost' line tells it how many, the daemon never waits)."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time

import pytest

from hekitrace.service.control import ControlReplyError, ControlServer, RequestError
from hekitrace.service.control_client import ControlClient
from hekitrace.service.follow import MAX_BUFFER_BYTES, Filter, Subscriber

WEB = {"name": "web1", "pid": 42, "uuid": "7F0C2A1E-0000-4000-8000-00000000ABCD"}


def _finding(rule="wx_request", severity="critical"):
    return ("finding", WEB, {"rule": rule, "severity": severity, "vm": WEB, "time_ns": 1})


def test_filter_by_kind_vm_rule_and_severity():
    event = ("hypercall", WEB, {"kind": "hypercall", "tgid": 42, "nr": 5})
    everything = Filter()
    assert everything.wants(*event) and everything.wants(*_finding())
    assert not Filter(kinds=frozenset({"finding"})).wants(*event)
    for name in ("web1", "42", "pid-42", "7f0c2a1e", "7F0C2A1E-0000-4000-8000-00000000abcd"):
        assert Filter(vm=name).wants(*event), name
    assert not Filter(vm="web2").wants(*event) and not Filter(vm="7f0c").wants(*event)
    assert not Filter(vm="web1").wants("hypercall", None, {"kind": "hypercall"})
    critical = Filter(severities=frozenset({"critical"}))
    assert critical.wants(*_finding()) and not critical.wants(*_finding(severity="info"))
    assert not critical.wants(*event)      # a severity filter keeps findings only
    assert not Filter(rules=frozenset({"protected_write"})).wants(*_finding())


@pytest.mark.parametrize("request_, message", [
    ({"kinds": "finding"}, "must be a list"),
    ({"kinds": ["nope"]}, "unknown kinds nope"),
    ({"rules": ["wx_request", "bogus"]}, "unknown rules bogus"),
    ({"vm": 42}, '"vm" must be'),
])
def test_bad_filters_say_what_is_wrong(request_, message):
    with pytest.raises(ValueError, match=message):
        Filter.from_request(request_)


class Server:
    """A ControlServer whose handler answers 'follow', pumped from the test thread."""

    def __init__(self, path: str) -> None:
        self.selector = selectors.DefaultSelector()
        self.server = ControlServer(path, self._handle, timeout_seconds=1.0)
        self.server.open(self.selector)

    @staticmethod
    def _handle(request: dict):
        if request["op"] != "follow":
            raise RequestError("bad_request", "follow only")
        try:
            return Subscriber(Filter.from_request(request))
        except ValueError as error:
            raise RequestError("bad_request", str(error)) from None

    def pump(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, mask in self.selector.select(0.02):
                key.data(key.fileobj, mask)


def _connect(path: str, request: dict) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(json.dumps(request).encode() + b"\n")
    return sock


def test_a_follower_gets_what_it_asked_for_and_the_daemon_never_waits(tmp_path):
    srv = Server(str(tmp_path / "c.sock"))
    try:
        reader = _connect(srv.server.path, {"op": "follow", "kinds": ["finding"]})
        silent = _connect(srv.server.path, {"op": "follow"})
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        srv.pump()
        assert srv.server.followers == 2
        record = ("hypercall", WEB, {"kind": "hypercall", "tgid": 42, "pad": "x" * 1000})
        start = time.monotonic()
        for _ in range(3000):                      # ~3 MB: far more than the buffer
            srv.server.publish([record, _finding()])
        assert time.monotonic() - start < 10       # publish never blocked on 'silent'
        assert srv.server.stats["follow_lines_lost"] > 0
        reader.settimeout(0.05)
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"\n") < 3001 and time.monotonic() < deadline:
            srv.pump(0.02)
            try:
                data += reader.recv(1 << 20)
            except TimeoutError:
                pass
        lines = [json.loads(x) for x in data.split(b"\n")[:3001]]
        assert lines[0] == {"ok": True, "result": {"following": True}}
        assert all(x["kind"] == "finding" for x in lines[1:])  # nothing it did not ask for
        # the silent one now reads: what it got is bounded, then a 'lost' line counts
        # the dropped ones once there is room again
        silent.settimeout(0.05)
        got = b""
        deadline = time.monotonic() + 10
        while b'"kind":"lost"' not in got and time.monotonic() < deadline:
            srv.pump(0.02)
            if len(got) > MAX_BUFFER_BYTES // 2:
                srv.server.publish([_finding()])   # room again: the 'lost' line goes first
            try:
                got += silent.recv(1 << 20)
            except TimeoutError:
                pass
        lost = [json.loads(x) for x in got.split(b"\n") if b'"kind":"lost"' in x]
        assert lost and lost[0]["count"] > 0 and "too slowly" in lost[0]["reason"]
        silent.close()
        srv.pump()
        assert srv.server.followers == 1
    finally:
        srv.server.close()


def test_the_client_streams_and_rejects_a_bad_filter(tmp_path):
    """ControlClient.follow against a server that publishes a finding every 50 ms."""
    srv = Server(str(tmp_path / "c.sock"))
    stop = threading.Event()

    def serve() -> None:            # the server is single-threaded: pump and publish here
        while not stop.is_set():
            srv.pump(0.05)
            srv.server.publish([_finding()])

    pumper = threading.Thread(target=serve, daemon=True)
    pumper.start()
    try:
        client = ControlClient(srv.server.path, timeout_seconds=5)
        with pytest.raises(ControlReplyError, match="unknown kinds"):
            next(client.follow(kinds=["nope"]))
        stream = client.follow(kinds=["finding"], severities=["critical"])
        record = next(stream)
        assert record["kind"] == "finding" and record["rule"] == "wx_request"
        stream.close()
    finally:
        stop.set()
        pumper.join(5)
        srv.server.close()
