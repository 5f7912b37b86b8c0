"""hekitrace.service.control: the control protocol over real Unix sockets.

The server runs in a selector loop on a thread of the test (as in the daemon, where the
loop thread drives it); clients are real sockets, a forked child with uid 65534 plays
the unprivileged peer.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest

from hekitrace.errors import ControlError, NoDaemonError, VmLookupError
from hekitrace.service.control import (
    MAX_REQUEST_BYTES,
    ControlReplyError,
    ControlServer,
    RequestError,
)
from hekitrace.service.control_client import ControlClient

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setuid(65534) needs root")


def _handler(request):
    op = request["op"]
    if op == "status":
        return {"alive": True}
    if op == "echo":
        return {"args": {k: v for k, v in request.items() if k != "op"}}
    if op == "snapshot":
        raise RequestError("unknown_vm", f"no VM named {request.get('vm')!r}", ["web1", "db"])
    if op == "crash":
        raise ZeroDivisionError("handler bug")
    raise RequestError("bad_request", f"unknown op {op!r}")


class Loop:
    def __init__(self, path, **kwargs):
        self.selector = selectors.DefaultSelector()
        self.server = ControlServer(path, _handler, **kwargs)
        self.server.open(self.selector)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            for key, mask in self.selector.select(0.05):
                key.data(key.fileobj, mask)
            self.server.expire()

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def loop():
    # Not under tmp_path: pytest makes those 0700, and the uid-65534 child must be
    # stopped by the socket itself, not by a directory it cannot enter.
    directory = tempfile.mkdtemp(prefix="hekitrace-ctl-")
    os.chmod(directory, 0o755)
    lp = Loop(os.path.join(directory, "control.sock"), timeout_seconds=0.5)
    yield lp
    lp.close()
    shutil.rmtree(directory, ignore_errors=True)


def _raw(path, payload, shutdown=False):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    try:
        sock.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    return json.loads(data) if data else None


def test_control_status_round_trip(loop):
    assert ControlClient(loop.server.path).request("status") == {"alive": True}
    assert ControlClient(loop.server.path).request("echo", vm="web1", maps=["applied"]) == \
        {"args": {"vm": "web1", "maps": ["applied"]}}


def test_control_socket_mode_is_0600(loop):
    st = os.stat(loop.server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("payload,code", [
    (b"garbage\n", "bad_request"),
    (b"\xff\xfe\n", "bad_request"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"op": 3}\n', "bad_request"),
    (b'{"op": "nope"}\n', "bad_request"),
])
def test_control_bad_request_gets_error_reply_and_server_keeps_serving(loop, payload, code):
    reply = _raw(loop.server.path, payload)
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert ControlClient(loop.server.path).request("status") == {"alive": True}


def test_control_request_of_several_megabytes_is_refused(loop):
    reply = _raw(loop.server.path, b"x" * (4 << 20))
    assert reply["error"]["code"] == "too_large"
    assert str(MAX_REQUEST_BYTES) in reply["error"]["message"]
    assert loop.server.stats["too_large"] == 1
    assert ControlClient(loop.server.path).request("status") == {"alive": True}


def test_control_incomplete_request_times_out(loop):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(loop.server.path)
    sock.sendall(b'{"op": "sta')
    started = time.monotonic()
    reply = json.loads(sock.recv(65536))
    sock.close()
    assert reply["error"]["code"] == "timeout"
    assert time.monotonic() - started < 3
    assert ControlClient(loop.server.path).request("status") == {"alive": True}


def test_control_handler_bug_is_an_internal_error_not_a_crash(loop):
    with pytest.raises(ControlReplyError) as info:
        ControlClient(loop.server.path).request("crash")
    assert info.value.code == "internal" and "ZeroDivisionError" in info.value.message
    assert loop.server.stats["internal_errors"] == 1
    assert ControlClient(loop.server.path).request("status") == {"alive": True}


def test_control_unknown_vm_raises_vm_lookup_error_with_choices(loop):
    with pytest.raises(VmLookupError) as info:
        ControlClient(loop.server.path).request("snapshot", vm="nope")
    assert info.value.choices == ["web1", "db"]


def test_control_many_idle_clients_do_not_block_others(tmp_path):
    lp = Loop(str(tmp_path / "c.sock"), timeout_seconds=5.0, max_connections=4)
    idle = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(lp.server.path)
            idle.append(s)
        assert ControlClient(lp.server.path).request("status") == {"alive": True}
    finally:
        for s in idle:
            s.close()
        lp.close()


def _as_nobody(path):
    """Fork a child that drops to uid 65534 and asks for status; returns its outcome."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                ControlClient(path, timeout_seconds=5).request("status")
                out = "ok"
            except ControlReplyError as error:
                out = f"reply:{error.code}"
            except ControlError as error:
                out = f"error:{error}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@needs_root
def test_control_non_root_peer_is_refused_by_file_mode(loop):
    outcome = _as_nobody(loop.server.path)
    assert outcome.startswith("error:permission denied")


@needs_root
def test_control_non_root_peer_is_refused_by_peercred_even_if_socket_is_0666(loop):
    os.chmod(loop.server.path, 0o666)  # operator mistake: SO_PEERCRED must still refuse
    outcome = _as_nobody(loop.server.path)
    # the daemon's "denied" reply reaches the caller as a permission error (exit status 9)
    assert outcome.startswith("error:") and "may not use the control socket" in outcome
    assert loop.server.stats["denied"] == 1
    assert ControlClient(loop.server.path).request("status") == {"alive": True}


def test_control_client_no_daemon(tmp_path):
    with pytest.raises(NoDaemonError, match="no hekitrace daemon is listening"):
        ControlClient(str(tmp_path / "absent.sock")).request("status")


def test_control_client_stale_socket_file_means_no_daemon(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    with pytest.raises(NoDaemonError):
        ControlClient(path).request("status")


def test_control_client_daemon_dies_mid_reply(tmp_path):
    path = str(tmp_path / "dying.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b'{"ok": true, "result": {"vms": [')
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(ControlError, match="closed the connection after 32 bytes"):
        ControlClient(path).request("vms")
    t.join(5)
    srv.close()


def test_control_open_replaces_stale_socket_but_not_other_files(tmp_path):
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    lp = Loop(stale)
    try:
        assert ControlClient(stale).request("status") == {"alive": True}
        with pytest.raises(ControlError, match="another daemon is listening"):
            ControlServer(stale, _handler).open(selectors.DefaultSelector())
    finally:
        lp.close()
    regular = tmp_path / "file"
    regular.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(str(regular), _handler).open(selectors.DefaultSelector())
    assert regular.read_text() == "precious"


def test_control_deeply_nested_request_is_bad_request_not_internal(loop):
    reply = _raw(loop.server.path, b'{"op":"status","x":' + b"[" * 30_000 + b"\n")
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert "nested" in reply["error"]["message"]
    assert loop.server.stats["internal_errors"] == 0
    assert ControlClient(loop.server.path).request("status") == {"alive": True}


def test_control_all_slots_held_is_busy_not_gone(tmp_path):
    """Silent clients hold every slot: the next client hears 'busy' (DaemonBusyError,
    its own exit status), not 'the daemon may have died'; the slots free at the timeout."""
    from hekitrace.commands import exit_status
    from hekitrace.errors import DaemonBusyError, NoDaemonError

    lp = Loop(str(tmp_path / "c.sock"), timeout_seconds=1.0, max_connections=4)
    idle = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(lp.server.path)
            idle.append(s)
        time.sleep(0.2)
        with pytest.raises(DaemonBusyError) as info:
            ControlClient(lp.server.path, timeout_seconds=5).request("status")
        assert not isinstance(info.value, NoDaemonError)
        assert "busy" in str(info.value) and "died" not in str(info.value)
        assert exit_status.for_error(info.value) == exit_status.DAEMON_BUSY
        assert lp.server.stats["refused_busy"] >= 1
        time.sleep(1.5)   # the silent clients time out and free their slots
        assert ControlClient(lp.server.path).request("status") == {"alive": True}
    finally:
        for s in idle:
            s.close()
        lp.close()
