"""discover_vms on the real host: a VM held open by a child process is found, named and
marked preexisting; with debugfs mounted (by the test, on a private mount point) its
stats path is found too."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import uuid

import pytest

from hekitrace.capture.discovery import debugfs_vms, discover_vms

pytestmark = pytest.mark.kernel

if os.geteuid() != 0:
    pytest.skip("kernel tests need root (/dev/kvm, other processes' fd links, mount)",
                allow_module_level=True)

# The child acts as a QEMU that already runs: argv[0] and -name/-uuid as QEMU's, a VM
# created with KVM_CREATE_VM, held until its stdin closes.
_CHILD = (
    "import fcntl, os, sys\n"
    "kvm = os.open('/dev/kvm', os.O_RDWR)\n"
    "vm = fcntl.ioctl(kvm, 0xAE01, 0)\n"
    "os.close(kvm)\n"
    "print(vm, flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture()
def running_vm():
    name = f"ktest-{os.getpid()}"
    vm_uuid = str(uuid.uuid4())
    child = subprocess.Popen(
        ["qemu-system-x86_64", "-c", _CHILD, "-name", f"guest={name},debug-threads=on",
         "-uuid", vm_uuid], executable=sys.executable, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        vm_fd = int(child.stdout.readline())
        yield child.pid, vm_fd, name, vm_uuid
    finally:
        child.stdin.close()
        child.wait(10)


def test_discovery_finds_a_vm_held_by_another_process(running_vm, tmp_path):
    pid, vm_fd, name, vm_uuid = running_vm
    said: list[str] = []
    events = discover_vms("/proc", tmp_path / "no-debugfs", say=said.append)
    mine = [ev for ev in events if ev.tgid == pid]
    assert len(mine) == 1
    ev = mine[0]
    assert (ev.vm_fd, ev.name, ev.uuid, ev.vmm, ev.source, ev.preexisting) == \
        (vm_fd, name, vm_uuid, "qemu", "discovery", True)
    assert ev.tid == pid and ev.stats_path == ""
    assert len(said) == 1 and "not mounted" in said[0]


def test_discovery_reads_stats_path_where_debugfs_is_mounted(running_vm, tmp_path):
    pid, vm_fd, name, _ = running_vm
    mount_point = tmp_path / "debug"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "debugfs", "none", str(mount_point)], check=True)
    try:
        assert (pid, vm_fd) in debugfs_vms(mount_point)
        events = discover_vms("/proc", mount_point, say=lambda line: pytest.fail(line))
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    mine = [ev for ev in events if ev.tgid == pid]
    assert [ev.stats_path for ev in mine] == [f"/kvm/{pid}-{vm_fd}"]
    assert mine[0].name == name


def test_a_closed_vm_is_no_longer_discovered(tmp_path):
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm_fd = fcntl.ioctl(kvm, 0xAE01, 0)
    finally:
        os.close(kvm)
    try:
        before = [ev for ev in discover_vms("/proc", tmp_path, say=lambda _l: None)
                  if ev.tgid == os.getpid()]
    finally:
        os.close(vm_fd)
    after = [ev for ev in discover_vms("/proc", tmp_path, say=lambda _l: None)
             if ev.tgid == os.getpid()]
    assert [ev.vm_fd for ev in before] == [vm_fd]
    assert after == []
