"""The daemon watching this test process as a VMM: real KVM VMs, hypercalls driven
through the daemon's own loaded programs (BPF_PROG_TEST_RUN), metrics, findings and
the control socket, including hostile clients.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from hekitrace.capture.testrun import run_raw_tracepoint
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.errors import ControlError, VmLookupError
from hekitrace.service.control import ControlReplyError
from hekitrace.service.control_client import ControlClient
from tests.e2e.daemon_proc import (
    DaemonProcess,
    bpf_prog_ids_of,
    bpf_progs,
    metric_value,
    prog_fd_by_id,
    wait_for,
)
from tests.vmm import Vmm

pytestmark = pytest.mark.e2e

READ, WRITE, EXEC, IMMUTABLE = 1, 2, 4, 8  # guest MEM_ATTR_* bits (heki-v2 profile)


@pytest.fixture(scope="module")
def daemon():
    # grace 0: a destroyed VM is retired at the next expiry pass (every 10 s)
    d = DaemonProcess(extra_config="state:\n  grace_period_seconds: 0\n").start()
    yield d
    d.close()


@pytest.fixture(scope="module")
def hypercall_fd(daemon):
    ids = bpf_prog_ids_of(daemon.proc.pid)
    names = bpf_progs()
    prog_id = next(i for i in ids if names.get(i) == "hk_hypercall_raw")
    fd = prog_fd_by_id(prog_id)
    yield fd
    os.close(fd)


def vm_series(daemon: DaemonProcess, vm: str) -> list[str]:
    return [line for line in daemon.metrics().splitlines()
            if f'vm="{vm}"' in line and not line.startswith("#")]


def test_daemon_sees_vm_and_hypercalls_through_its_programs(daemon, hypercall_fd):
    ctl = ControlClient(daemon.socket_path)
    me = str(os.getpid())
    profile = DEFAULT_PROFILE
    with Vmm() as vm:
        vm.add_memslot(0x0, 64 << 20)
        info = wait_for(lambda: [l for l in daemon.metrics().splitlines()
                                 if l.startswith("hekitrace_vm_info") and f'pid="{me}"' in l],
                        "the VM in hekitrace_vm_info", daemon)
        label = info[0].split('vm="')[1].split('"')[0]
        vms = ctl.request("vms")["vms"]
        assert any(str(row.get("pid")) == me for row in vms), vms

        # Kernel text R-X immutable: 16 MiB..24 MiB, as a Heki v2 guest does at boot.
        head = vm.write_heki_list([0x100000], [(0x1000000, 0x1800000, READ | EXEC | IMMUTABLE)])
        run_raw_tracepoint(hypercall_fd, [profile.protect_memory, head, 0, 0, 0])
        wait_for(lambda: metric_value(daemon.metrics(),
                                      f'hekitrace_vm_protected_pages{{class="r-x_immutable",'
                                      f'map="requested",vm="{label}"}}') == 2048.0,
                 "2048 requested r-x immutable pages", daemon)
        snap = ctl.request("snapshot", vm=me, maps=["requested"])
        assert json.dumps(snap).count("r-x") >= 1

        # A W+X request: the wx_request finding is counted.
        head = vm.write_heki_list([0x101000], [(0x2000000, 0x2001000, READ | WRITE | EXEC)])
        run_raw_tracepoint(hypercall_fd, [profile.protect_memory, head, 0, 0, 0])
        wait_for(lambda: any(l.startswith("hekitrace_findings_total") and 'rule="wx_request"'
                             in l and f'vm="{label}"' in l
                             for l in daemon.metrics().splitlines()),
                 "a wx_request finding in hekitrace_findings_total", daemon)
        text = daemon.metrics()
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, check=False,
                              capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr   # with per-VM series too
        assert metric_value(text, 'hekitrace_events_total{kind="protect_request"}') >= 2
        assert metric_value(text, 'hekitrace_events_total{kind="memslot"}') >= 1
        assert metric_value(text, "hekitrace_last_event_timestamp_seconds") > 0
    # closed: the VM goes away (uevent destroy), then its series after the grace period
    wait_for(lambda: not vm_series(daemon, label), "the VM's series to disappear", daemon,
             timeout=30)
    with pytest.raises(VmLookupError):
        ctl.request("snapshot", vm=me)


def test_control_socket_refuses_non_root_peer_and_keeps_serving(daemon):
    os.chmod(daemon.socket_path, 0o666)   # even so, SO_PEERCRED says no
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    ControlClient(daemon.socket_path).request("status")
                    out = "served"
                except ControlReplyError as error:
                    out = error.code
                except ControlError as error:
                    out = f"error: {error}"
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            # the daemon's "denied" reply reaches the caller as a permission error (exit 9)
            outcome = f.read()
            assert outcome.startswith("error:") and "may not use the control socket" in outcome
    finally:
        os.chmod(daemon.socket_path, 0o600)
    assert ControlClient(daemon.socket_path).request("status")["ready"] is True


def _raw(path: str, payload: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data)


@pytest.mark.parametrize("payload,code", [
    (b"\x00\xffgarbage\n", "bad_request"),
    (b'{"op": "snapshot"}\n', "bad_request"),
    (b'{"op": "snapshot", "vm": "x", "maps": ["bogus"]}\n', "unknown_vm"),
    (b'{"op": "format_disk"}\n', "bad_request"),
    (b"A" * (5 << 20), "too_large"),
])
def test_control_socket_hostile_requests_get_errors_and_daemon_keeps_serving(
        daemon, payload, code):
    reply = _raw(daemon.socket_path, payload)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    status = ControlClient(daemon.socket_path).request("status")
    assert status["ready"] is True
    assert daemon.proc.poll() is None
