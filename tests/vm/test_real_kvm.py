"""The real-KVM tier: Debian 6.1 and 6.12 with kvm_amd under QEMU TCG, an L2 Heki guest,
and a Heki-v2-compatible test host (``test_heki_host_*``, ``make test-heki-host``).

Each check of the in-L1 payload (tests/vm/payload.py) is its own test here, named
``test_payload_check[<kernel>-<check>]``, so a failure names the kernel and the check and
carries the payload's detail. All checks of a kernel come from one boot (conftest.py).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.vm import payload
from tests.vm.tier import HEKI_HOST, REPO, boot_tree

pytestmark = pytest.mark.vm


def _result(run, name: str) -> dict:
    for c in run.results.get("checks", []):
        if c["name"] == name:
            return c
    pytest.fail(f"the payload reported no check {name!r} on {run.image.abi}; it stopped "
                f"early?\n----- payload output (tail) -----\n{run.out_log[-6000:]}")


@pytest.mark.parametrize("check", payload.CHECK_NAMES)
def test_payload_check(l1_run, check):
    c = _result(l1_run, check)
    assert c["ok"], f"{l1_run.image.abi}: {check}: {c['detail']}"


def test_kernel_facts_attr_hook_and_vm_types(l1_run):
    """The discovered kernel facts, asserted (not skipped): where the attribute hook
    exists and whether a VM type with changeable memory attributes can be created."""
    facts = l1_run.results["facts"]
    flavour = facts["flavour"]
    if flavour == "6.1":
        assert facts["attr_symbol"] is False, facts
        # 6.1 predates KVM_CAP_VM_TYPES and memory attributes (both 6.8): unknown caps
        # answer 0, and KVM_SET_MEMORY_ATTRIBUTES is an unknown ioctl (ENOTTY)
        assert facts["kvm_cap_vm_types"] == 0, facts
        assert facts["default_vm_set_private"] == -25, facts
    else:
        assert facts["attr_symbol"] is True, \
            f"6.12 must have kvm_arch_post_set_memory_attributes: {facts}"
        # Discovered fact: Debian 6.12 is built without CONFIG_KVM_SW_PROTECTED_VM and
        # this (emulated) CPU has no SEV, so KVM_CAP_VM_TYPES reports only DEFAULT_VM.
        # /dev/kvm advertises PRIVATE (KVM_CAP_MEMORY_ATTRIBUTES = 8, the no-VM answer),
        # but a default VM supports no attribute and KVM_SET_MEMORY_ATTRIBUTES fails with
        # EINVAL: no VM whose attributes change can exist here, the attribute hook can
        # attach but never fire, and the applied map is tested through the simulator.
        assert facts["kvm_cap_vm_types"] == 1 << 0, \
            "6.12 Debian: KVM_CAP_VM_TYPES should report only DEFAULT_VM; it reports " \
            f"{facts['kvm_cap_vm_types']:#x}: if SW_PROTECTED_VM (bit 1) is there, drive " \
            "KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) and check the applied map"
        assert facts["sw_protected_vm"].startswith("KVM_CREATE_VM(1) failed"), facts
        assert facts["kvm_cap_memory_attributes"] == 1 << 3, facts
        assert facts["default_vm_memory_attributes"] == 0, facts
        assert facts["default_vm_set_private"] == -22, facts


def test_cached_image_is_reused(l1_run):
    """A second request for the same kernel must come from the cache, not rebuild."""
    from tests.vm import image
    again = image.ensure_image(l1_run.results["facts"]["flavour"])
    assert not again.built_now and again.abi == l1_run.image.abi, again


# the page-list read in bpf/hypercall.c: header + all entry slots in one read
READER = re.compile(r"(bpf_probe_read_user\(&r->next_va, 24 \+ sizeof\(r->entries\), "
                    r"\(void \*\))hva\)")


def test_broken_page_list_reader_is_caught(vm_times):
    """Reading each list page 8 bytes off must make the page-list check fail: the tier
    really exercises hekitrace's reader (issue 12, "what will be checked")."""
    source = (REPO / "bpf/hypercall.c").read_text()
    assert READER.search(source), \
        "the page-list read in bpf/hypercall.c changed: update READER in this test"
    tmp = Path(tempfile.mkdtemp(prefix="hekitrace-mutant-"))
    try:
        tree = tmp / "tree"
        shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis"))
        (tree / "bpf/hypercall.c").write_text(READER.sub(r"\1(hva + 8))", source))
        run = boot_tree("6.1", tree, "mutant", vm_times, "--record-only")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    good = _result(run, "raw.hypercalls_seen")
    assert good["ok"], f"the mutant run itself is broken: {good['detail']}"
    c = _result(run, "record.page_lists_equal_written")
    assert "not implemented yet" not in c["detail"] and "failed" not in c["detail"][:40], \
        f"cannot judge the mutant: {c['detail']}"
    assert not c["ok"], "a page-list reader that reads 8 bytes off went unnoticed: " \
                        f"{c['detail']}"


# ---------------------------------------------------------------------------------------
# the Heki-v2-compatible test host (tests/vm/hekihost.py): test names carry "heki_host"
# so that `pytest tests/vm -k heki_host` (make test-heki-host) runs only this kernel

@pytest.mark.parametrize("check", payload.HEKI_CHECK_NAMES)
def test_heki_host_check(heki_host_run, check):
    c = _result(heki_host_run, check)
    assert c["ok"], f"{heki_host_run.image.abi}: {check}: {c['detail']}"


def test_heki_host_kernel_facts(heki_host_run):
    """What the test host offers: SW_PROTECTED_VM (bit 1 of KVM_CAP_VM_TYPES, needs the
    TDP MMU: -cpu qemu64,+svm,+npt), and the Heki bits 4-7 as memory attributes of
    every VM besides PRIVATE (which only SW_PROTECTED VMs support)."""
    facts = heki_host_run.results["facts"]
    assert facts["attr_symbol"] is True, facts
    assert facts["kvm_cap_vm_types"] == 0x3, facts
    assert facts["sw_protected_vm"] == "created", facts
    assert facts["kvm_cap_memory_attributes"] == 0xF8, facts
    assert facts["default_vm_memory_attributes"] == 0xF0, facts
    assert facts["default_vm_set_private"] == -22, facts


def test_heki_host_cached_image_is_reused(heki_host_run):
    from tests.vm import hekihost
    again = hekihost.ensure_image()
    assert not again.built_now and again.abi == heki_host_run.image.abi, again


# the attribute hook's range end read in bpf/attr.c (the real hook's reader)
ATTR_END = re.compile(r"(bpf_probe_read_kernel\(&end, sizeof\(end\), range \+ )"
                      r"HK_GFN_RANGE_END_OFF\)")


def test_heki_host_broken_attr_reader_is_caught(vm_times):
    """An attribute hook that takes the range end from the wrong field (start) must make
    the applied map differ from the kernel's: the tier really checks the applied side."""
    source = (REPO / "bpf/attr.c").read_text()
    assert len(ATTR_END.findall(source)) == 1, \
        "the range-end read in bpf/attr.c changed: update ATTR_END in this test"
    tmp = Path(tempfile.mkdtemp(prefix="hekitrace-mutant-"))
    try:
        tree = tmp / "tree"
        shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis"))
        (tree / "bpf/attr.c").write_text(ATTR_END.sub(r"\1HK_GFN_RANGE_START_OFF)", source))
        run = boot_tree(HEKI_HOST, tree, "mutant", vm_times, "--record-only")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    good = _result(run, "heki.hypercall_returns")
    assert good["ok"], f"the mutant run itself is broken: {good['detail']}"
    fired = _result(run, "record.attr_hook_fired")
    assert fired["ok"], f"cannot judge the mutant: {fired['detail']}"
    c = _result(run, "record.applied_equals_kernel")
    assert not c["ok"], "an attribute hook reading the range end from the start field " \
                        f"went unnoticed: {c['detail']}"
