"""The real-KVM tier: Debian 6.1 and 6.12 with kvm_amd under QEMU TCG, an L2 Heki guest.

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

import payload
from conftest import KERNELS, REPO, boot_tree

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
        # 6.1 predates KVM_CAP_VM_TYPES (6.8): the capability is unknown, so 0
        assert facts["kvm_cap_vm_types"] == 0, facts
    else:
        assert facts["attr_symbol"] is True, \
            f"6.12 must have kvm_arch_post_set_memory_attributes: {facts}"
        # Debian 6.12 is built without CONFIG_KVM_SW_PROTECTED_VM: KVM_CAP_VM_TYPES
        # reports DEFAULT_VM (bit 0) and the SEV types (bits 2-4) only, so no VM whose
        # attributes can change exists here without SEV-SNP hardware; the applied map is
        # tested through the simulator (docs/vm-tier.md).
        assert not facts["kvm_cap_vm_types"] & (1 << 1), \
            f"SW_PROTECTED_VM is available after all: drive KVM_SET_MEMORY_ATTRIBUTES ({facts})"
        assert facts["sw_protected_vm"].startswith("KVM_CREATE_VM(1) failed"), facts


def test_cached_image_is_reused(l1_run):
    """A second request for the same kernel must come from the cache, not rebuild."""
    import image
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
        run = boot_tree("6.1", tree, "mutant", vm_times)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    good = _result(run, "raw.hypercalls_seen")
    assert good["ok"], f"the mutant run itself is broken: {good['detail']}"
    c = _result(run, "record.page_lists_equal_written")
    assert "not implemented yet" not in c["detail"] and "failed" not in c["detail"][:40], \
        f"cannot judge the mutant: {c['detail']}"
    assert not c["ok"], "a page-list reader that reads 8 bytes off went unnoticed: " \
                        f"{c['detail']}"
