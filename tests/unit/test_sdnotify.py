"""hekitrace.service.sdnotify: datagrams on a real Unix socket owned by the test."""

from __future__ import annotations

import os
import socket

import pytest

from hekitrace.service.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def _recv(sock):
    return sock.recv(4096).decode()


def test_sdnotify_messages_arrive_in_order(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.status("attaching")
    assert n.ready("ok")
    assert n.reloading()
    assert n.stopping()
    assert _recv(sock) == "STATUS=attaching"
    assert _recv(sock) == "READY=1\nSTATUS=ok"
    reload_msg = _recv(sock).split("\n")
    assert reload_msg[0] == "RELOADING=1" and reload_msg[1].startswith("MONOTONIC_USEC=")
    assert _recv(sock) == "STOPPING=1"


def test_sdnotify_status_newlines_are_flattened(notify_socket):
    path, sock = notify_socket
    Notifier({"NOTIFY_SOCKET": path}).status("a\nb")
    assert _recv(sock) == "STATUS=a b"


def test_sdnotify_abstract_socket():
    name = f"hekitrace-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert _recv(sock) == "READY=1"
    finally:
        sock.close()


def test_sdnotify_watchdog_pings_at_half_the_timeout(notify_socket):
    path, sock = notify_socket
    now = [100.0]
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"}, clock=lambda: now[0])
    assert n.watchdog_interval == 2.0
    assert n.watchdog()            # first call pings
    now[0] += 1.9
    assert not n.watchdog()        # not yet due
    now[0] += 0.2
    assert n.watchdog()
    assert [_recv(sock), _recv(sock)] == ["WATCHDOG=1", "WATCHDOG=1"]


def test_sdnotify_watchdog_for_another_pid_is_ignored(notify_socket):
    path, _sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                  "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval is None
    assert not n.watchdog()


def test_sdnotify_without_socket_is_a_noop():
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and n.errors == 0


def test_sdnotify_unsupported_address_is_reported():
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "vsock:2:1234" in n.unsupported


def test_sdnotify_send_error_is_counted_not_raised(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert not n.ready()
    assert n.errors == 1
    assert "NOTIFY_SOCKET" in n.last_error


def test_sdnotify_never_blocks_on_a_full_receiver(notify_socket):
    path, _sock = notify_socket   # the test never reads: the queue fills up
    n = Notifier({"NOTIFY_SOCKET": path})
    results = [n.status(f"line {i}") for i in range(2000)]
    assert results[0] is True
    assert results[-1] is False
    assert n.errors == results.count(False) and "queue full" in n.last_error
