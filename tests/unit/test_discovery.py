"""discovery: running VMs from a fixture /proc tree and debugfs, merged."""

from __future__ import annotations

from pathlib import Path

from hekitrace.capture.discovery import debugfs_vms, discover_vms, vm_fds
from hekitrace.state.events import VmCreated

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "proc" / "host1"
PROC, DEBUGFS, NO_DEBUGFS = HOST / "proc", HOST / "debugfs", HOST / "nodebugfs"


def _discover(debugfs=DEBUGFS):
    said: list[str] = []
    events = discover_vms(PROC, debugfs, clock=lambda: 1_000, say=said.append)
    return events, said


def test_vm_fds_finds_only_kvm_vm_links():
    assert vm_fds(PROC) == [(1001, 12), (1002, 5), (1003, 9), (1004, 20), (1005, 7),
                            (1006, 3), (1007, 4)]


def test_debugfs_vms_ignores_other_names():
    assert debugfs_vms(DEBUGFS) == [(1002, 5), (1004, 20), (1010, 12), (1999, 6)]
    assert debugfs_vms(NO_DEBUGFS) is None


def test_discover_merges_proc_and_debugfs():
    events, said = _discover()
    assert said == []
    by_tgid = {ev.tgid: ev for ev in events}
    # web1 was created by thread 1010 of process 1001: matched through /proc/1010/status
    assert by_tgid[1001] == VmCreated(1_000, 1001, 1010, 12, "/kvm/1010-12", "web1",
                                      "8f4f5a4e-2a0b-4c8e-9a57-3d1c1b9e0a01", "qemu",
                                      "discovery", True)
    assert by_tgid[1002].stats_path == "/kvm/1002-5"
    assert by_tgid[1003].stats_path == ""  # held open, but no debugfs entry
    assert by_tgid[1003].name == "mail-server"
    # creator thread gone and nobody holds fd 6 under it: reported with the tid as tgid
    assert by_tgid[1999] == VmCreated(1_000, 1999, 1999, -1, "/kvm/1999-6", "", "", "",
                                      "discovery", True)
    assert len(events) == 8
    assert all(ev.preexisting and ev.source == "discovery" for ev in events)


def test_discover_without_debugfs_says_so_once_and_uses_proc():
    events, said = _discover(NO_DEBUGFS)
    assert len(said) == 1 and "debugfs is not mounted" in said[0]
    assert sorted(ev.tgid for ev in events) == [1001, 1002, 1003, 1004, 1005, 1006, 1007]
    assert all(ev.stats_path == "" for ev in events)


def test_discover_on_a_missing_proc_root_finds_nothing(tmp_path):
    assert discover_vms(tmp_path / "absent", NO_DEBUGFS, say=lambda _l: None) == []
