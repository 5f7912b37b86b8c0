"""UeventSource on the real kernel: a VM created and closed by this test is announced.

The VM is created from a second thread so the uevent's PID (the creator *thread*) differs
from the process id the events must carry. Other tests may create VMs at the same time:
events are matched by this VM's stats path.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time

import pytest

from hekitrace.capture.uevents import UeventSource, parse_uevent
from hekitrace.state.events import Lost, VmCreated, VmDestroyed

pytestmark = pytest.mark.kernel

KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01), include/uapi/linux/kvm.h

if os.geteuid() != 0:
    pytest.skip("kernel tests need root (uevent socket, /dev/kvm)", allow_module_level=True)


class _VmThread(threading.Thread):
    """Creates a VM, then stays alive until released (as a VMM's vCPU/main thread does)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.created = threading.Event()
        self.release = threading.Event()
        self.vm_fd = -1
        self.tid = -1

    def run(self) -> None:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        try:
            self.vm_fd = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
            self.tid = threading.get_native_id()
        finally:
            os.close(kvm)
            self.created.set()
        self.release.wait(30)


def _create_vm_in_thread() -> tuple[int, int, _VmThread]:
    """(vm fd, creator tid, thread): the VM created by a second thread still alive."""
    thread = _VmThread()
    thread.start()
    assert thread.created.wait(10)
    assert thread.vm_fd >= 0
    return thread.vm_fd, thread.tid, thread


def _wait_for(source: UeventSource, match, timeout_s: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([source.fileno()], [], [], 0.2)
        if ready:
            got += source.read_events()
        hits = [ev for ev in got if match(ev)]
        if hits:
            return hits
    return []


@pytest.fixture()
def source():
    src = UeventSource()
    yield src
    src.close()


def test_vm_create_and_destroy_uevents_carry_tgid_tid_and_stats_path(source):
    vm_fd, tid, thread = _create_vm_in_thread()
    stats_path = f"/kvm/{tid}-{vm_fd}"
    try:
        created = _wait_for(source, lambda ev: isinstance(ev, VmCreated)
                            and ev.stats_path == stats_path)
    finally:
        os.close(vm_fd)
        thread.release.set()
        thread.join()
    assert len(created) == 1, f"no create uevent for {stats_path}"
    ev = created[0]
    assert (ev.tgid, ev.tid, ev.vm_fd, ev.source, ev.preexisting) == \
        (os.getpid(), tid, vm_fd, "uevent", False)
    assert tid != os.getpid()
    assert ev.time_ns > 0
    destroyed = _wait_for(source, lambda e: isinstance(e, VmDestroyed)
                          and e.stats_path == stats_path)
    assert destroyed == [VmDestroyed(destroyed[0].time_ns, os.getpid(), tid, stats_path)]
    assert source.malformed_total == 0


def test_read_events_on_an_idle_socket_returns_nothing_without_blocking(source):
    t0 = time.monotonic()
    events = [ev for ev in source.read_events() if not isinstance(ev, (VmCreated, VmDestroyed))]
    assert events == []
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("data", [
    b"",
    b"\xff\xfe garbage",
    b"change@/devices/virtual/misc/kvm\0ACTION=change\0DEVPATH=/devices/virtual/misc/kvm\0"
    b"EVENT=create\0PID=notanumber\0",
    b"change@/devices/virtual/misc/kvm\0DEVPATH=/devices/virtual/misc/kvm\0EVENT=explode\0"
    b"PID=5\0",
    b"change@/devices/virtual/misc/kvm\0DEVPATH=/devices/virtual/misc/kvm\0EVENT=create\0"
    b"PID=5\0STATS_PATH=" + b"x" * 5000 + b"\0",
])
def test_garbage_kvm_uevents_are_counted_as_lost_never_raised(source, data):
    event = source.decode(data)
    assert isinstance(event, Lost)
    assert (event.stage, event.reason, event.count) == ("uevent", "malformed", 1)
    assert source.malformed_total == 1


def test_other_devices_uevents_are_ignored_and_counted(source):
    data = b"add@/devices/virtual/net/veth0\0ACTION=add\0DEVPATH=/devices/virtual/net/veth0\0"
    assert source.decode(data) is None
    assert source.ignored_total == 1


def test_destroy_of_a_vm_created_before_listening_uses_the_live_thread_tgid(source):
    data = (b"change@/devices/virtual/misc/kvm\0DEVPATH=/devices/virtual/misc/kvm\0"
            b"EVENT=destroy\0PID=%d\0STATS_PATH=/kvm/%d-9\0" % (os.getpid(), os.getpid()))
    event = source.decode(data)
    assert event == VmDestroyed(event.time_ns, os.getpid(), os.getpid(), f"/kvm/{os.getpid()}-9")


def test_create_from_an_exited_thread_finds_the_process_holding_the_vm_fd(source, tmp_path):
    # A fake /proc: thread 7001 is gone; only process 7000 holds a VM at fd 12.
    for pid, target in ((7000, "anon_inode:kvm-vm"), (7002, "/dev/null")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "fd" / "12").symlink_to(target)
    src = UeventSource(proc_root=tmp_path)
    try:
        data = (b"change@/devices/virtual/misc/kvm\0DEVPATH=/devices/virtual/misc/kvm\0"
                b"EVENT=create\0PID=7001\0STATS_PATH=/kvm/7001-12\0")
        event = src.decode(data)
        assert (event.tgid, event.tid, event.vm_fd) == (7000, 7001, 12)
        (tmp_path / "7002" / "fd" / "12").unlink()
        (tmp_path / "7002" / "fd" / "12").symlink_to("anon_inode:kvm-vm")
        event = src.decode(data)  # two holders: ambiguous, the tid stands in
        assert (event.tgid, event.tid) == (7001, 7001)
    finally:
        src.close()


def test_parse_uevent_keeps_values_with_equals_signs():
    assert parse_uevent(b"change@/x\0A=b=c\0novalue\0") == {"@": "change@/x", "A": "b=c"}


def test_pyroute2_0_7_2_bind_without_groups_keyword_still_binds_the_kernel_group():
    """Debian bookworm's python3-pyroute2 0.7.2 overrides ``UeventSocket.bind()`` with no
    argument (binding every group); the source must still bind group 1 only."""
    from pyroute2 import UeventSocket

    from hekitrace.capture.uevents import _bind_kernel_group

    class UeventSocket072(UeventSocket):
        def bind(self):  # pyroute2 0.7.2's exact signature (netlink/uevent/__init__.py)
            return super().bind(groups=-1)

    nl = UeventSocket072()
    try:
        with pytest.raises(TypeError):
            nl.bind(groups=1)
        _bind_kernel_group(nl)
        import socket
        with socket.socket(fileno=os.dup(nl.fileno())) as sock:
            assert sock.getsockname()[1] == 1
    finally:
        nl.close()


def test_no_usable_pyroute2_is_an_attach_error_with_the_announced_line(monkeypatch):
    import sys

    from hekitrace.capture.uevents import unavailable_message
    from hekitrace.errors import AttachError
    monkeypatch.setitem(sys.modules, "pyroute2", None)  # as on a host without pyroute2
    with pytest.raises(AttachError) as info:
        UeventSource()
    line = unavailable_message(info.value)
    assert line.startswith("uevents unavailable: cannot open the uevent socket: ")
    assert "pyroute2" in line and line.endswith("; VM lifecycle from ioctls and /proc only")
