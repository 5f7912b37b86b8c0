"""The loader and attach strategy against the running kernel: BTF offsets agree with
bpftool's reading of the same BTF, a missing member is a clear BtfError, a required hook
that cannot attach raises AttachError naming hook and method, optional ones are reported,
the dump flag prints the exact text compiled, and a full control ring shows up as a
flagged request plus a Lost event for this VM."""

from __future__ import annotations

import functools
import json
import os
import subprocess

import pytest

from hekitrace.capture import loader, testrun
from hekitrace.capture.btf import Btf
from hekitrace.capture.engine import Capture
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.errors import AttachError, BtfError
from hekitrace.state.events import Lost, ProtectFlags, ProtectRequest
from tests.vmm import Vmm

pytestmark = pytest.mark.kernel
SMALL = {"control_ring_bytes": 65536, "telemetry_ring_bytes": 65536}


@functools.lru_cache(maxsize=1)
def _bpftool_types() -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["types"]


def _bpftool_members(struct_name: str) -> dict[str, int]:
    for t in _bpftool_types():
        if t.get("kind") == "STRUCT" and t.get("name") == struct_name:
            return {m["name"]: m["bits_offset"] // 8 for m in t["members"]}
    raise AssertionError(f"bpftool found no struct {struct_name}")


def test_btf_offsets_agree_with_bpftool():
    btf = Btf.load()
    want = _bpftool_members("kvm_gfn_range")
    for member in ("slot", "start", "end", "arg", "may_block"):
        assert btf.member_offset("kvm_gfn_range", member) == want[member], member
    assert btf.member_offset("kvm_gfn_range", "arg.attributes") == want["arg"]
    vcpu = _bpftool_members("kvm_vcpu")
    assert btf.member_offset("kvm_vcpu", "vcpu_id") == vcpu["vcpu_id"]


def test_missing_btf_member_names_type_and_member():
    with pytest.raises(BtfError, match=r"kvm_gfn_range has no member 'no_such'"):
        Btf.load().member_offset("kvm_gfn_range", "no_such")
    with pytest.raises(BtfError, match=r"no struct hk_not_a_kernel_struct"):
        Btf.load().member_offset("hk_not_a_kernel_struct", "x")


def test_required_hook_that_cannot_attach_raises(tmp_path):
    cap = Capture(settings=loader.CaptureSettings(**SMALL), tracefs=str(tmp_path),
                  required={"hypercall": False, "ioctl": True}, say=lambda m: None)
    with pytest.raises(AttachError) as info:
        cap.start()
    assert info.value.hook == "ioctl" and info.value.method == "tracepoint"
    assert "format" in str(info.value)
    cap.close()


def test_optional_hooks_fall_back_and_report_why(tmp_path):
    # without tracefs formats the tracepoint fallbacks fail; raw tracepoints still attach
    cap = Capture(settings=loader.CaptureSettings(**SMALL), tracefs=str(tmp_path),
                  required={"hypercall": True, "ioctl": False}, say=lambda m: None).start()
    try:
        st = cap.hook_status()
        assert (st["hypercall"].attached, st["hypercall"].method) == (True, "raw_tracepoint")
        assert not st["ioctl"].attached and "tracepoint" in st["ioctl"].reason
        assert not st["attr_applied"].attached
        assert "kprobe" in st["attr_applied"].reason
    finally:
        cap.close()


def test_dump_prints_the_flags_and_text(capsys):
    flags = loader.build_cflags(loader.CaptureSettings(), DEFAULT_PROFILE,
                                {"HK_GFN_RANGE_START_OFF": 8}, loader.VENDOR_SVM, 250)
    loader.dump_sources(flags)
    err = capsys.readouterr().err
    assert "-DHK_NR_PROTECT_MEMORY=14ULL" in err and "-DHK_VENDOR=2" in err
    assert "-DHK_FAULT_INTERVAL_JIFFIES=250ULL" in err
    assert "int hk_hypercall_raw(" in err and "struct hk_fault_rec {" in err


def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(AttachError, match="max_list_pages = 0"):
        loader.build_cflags(loader.CaptureSettings(max_list_pages=0), DEFAULT_PROFILE, {}, 1)
    with pytest.raises(AttachError, match="control_ring_bytes = 5000"):
        loader.build_cflags(loader.CaptureSettings(control_ring_bytes=5000), DEFAULT_PROFILE,
                            {}, 1)


def test_full_control_ring_flags_the_request_and_counts_the_loss():
    # 8 KiB control ring: the first 4 KiB list page fits, the next two do not
    cap = Capture(settings=loader.CaptureSettings(control_ring_bytes=8192,
                                                  telemetry_ring_bytes=65536,
                                                  vm_control_budget_bytes=1 << 20),
                  required={"hypercall": False, "ioctl": True}, say=lambda m: None).start()
    try:
        with Vmm() as vm:
            vm.add_memslot(0x100000, 1 << 20)
            cap.read()
            entries = [(0x200000 + i * 0x1000, 0x201000 + i * 0x1000, 1) for i in range(400)]
            head = vm.write_heki_list([0x101000, 0x102000, 0x103000], entries)
            testrun.run_raw_tracepoint(cap.program_fd("hk_hypercall_raw"),
                                       [DEFAULT_PROFILE.protect_memory, head, 0, 0, 0])
            evs = [e for e in cap.read() + cap.poll_losses() if e.tgid == os.getpid()]
        (req,) = [e for e in evs if isinstance(e, ProtectRequest)]
        assert req.pages == 3 and req.flags == ProtectFlags.LOST_PAGES
        assert len(req.entries) == 169 and req.declared_entries == 400
        lost = [e for e in evs if isinstance(e, Lost)]
        assert [(e.stage, e.reason, e.hook, e.count) for e in lost] == [
            ("ring:control", "ring_full", "protect_memory", 2)]
    finally:
        cap.close()


def _run_in_child(fn) -> int:
    """Run ``fn`` in a forked child (another tgid, same BPF fds); its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001 (the child must never return into pytest)
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_flooding_guest_spends_only_its_own_budget():
    page = 4128
    budget = 3 * page + 56          # three list pages and one end record
    cap = Capture(settings=loader.CaptureSettings(control_ring_bytes=1 << 20,
                                                  telemetry_ring_bytes=65536,
                                                  vm_control_budget_bytes=budget),
                  required={"hypercall": False, "ioctl": True}, say=lambda m: None).start()
    try:
        hc = cap.program_fd("hk_hypercall_raw")
        lock_cr = DEFAULT_PROFILE.lock_cr_update
        with Vmm() as vm:
            vm.add_memslot(0x100000, 1 << 20)
            gpas = [0x101000 + 0x1000 * i for i in range(5)]
            head = vm.write_heki_list(gpas, [(0, 4096, 1)] * (169 * 5))
            cap.read()
            testrun.run_raw_tracepoint(hc, [DEFAULT_PROFILE.protect_memory, head, 0, 0, 0])
            # another VMM (a forked child: another tgid) still gets its record through
            assert _run_in_child(lambda: testrun.run_raw_tracepoint(
                hc, [lock_cr, 4, 1 << 20, 0, 0])) == 0
            evs = cap.read() + cap.poll_losses()
        mine = [e for e in evs if e.tgid == os.getpid()]
        (req,) = [e for e in mine if isinstance(e, ProtectRequest)]
        assert req.pages == 5 and req.flags == ProtectFlags.LOST_PAGES
        assert len(req.entries) == 3 * 169
        lost = [(e.reason, e.hook, e.count) for e in mine if isinstance(e, Lost)]
        assert lost == [("vm_budget", "protect_memory", 2)]
        others = [e for e in evs if e.tgid not in (0, os.getpid())
                  and type(e).__name__ == "CrPinRequest"]
        assert [(e.cr, e.mask) for e in others] == [(4, 1 << 20)]
    finally:
        cap.close()


def test_vendor_and_hz_detection(tmp_path):
    said = []
    (tmp_path / "kvm_amd").mkdir()
    assert loader.detect_vendor("auto", str(tmp_path)) == loader.VENDOR_SVM
    assert loader.detect_vendor("intel", str(tmp_path)) == loader.VENDOR_VMX
    assert loader.detect_vendor("auto", str(tmp_path / "none"), say=said.append) == \
        loader.VENDOR_VMX
    assert len(said) == 1 and "neither kvm_intel nor kvm_amd" in said[0]
    cfg = tmp_path / "config"
    cfg.write_text("CONFIG_X=y\nCONFIG_HZ=300\n")
    assert loader.kernel_hz((str(cfg),)) == 300
    assert loader.kernel_hz((str(tmp_path / "missing"),), say=said.append) == 100
    assert "assuming 100" in said[-1]
    assert loader.kernel_hz() in (100, 250, 300, 1000)     # this kernel's own config


def test_the_largest_allowed_chain_bound_passes_the_verifier():
    s = loader.CaptureSettings(max_list_pages=loader.MAX_LIST_PAGES_LIMIT,
                               control_ring_bytes=65536, telemetry_ring_bytes=65536)
    cap = Capture(settings=s, required={"hypercall": False, "ioctl": False}, attach=False,
                  say=lambda m: None).start()
    try:
        assert cap.program_fd("hk_hypercall_raw") > 0
    finally:
        cap.close()
    with pytest.raises(AttachError, match=f"1..{loader.MAX_LIST_PAGES_LIMIT}"):
        loader.build_cflags(loader.CaptureSettings(
            max_list_pages=loader.MAX_LIST_PAGES_LIMIT + 1), DEFAULT_PROFILE, {}, 1)
