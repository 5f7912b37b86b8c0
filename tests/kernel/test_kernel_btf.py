"""KernelBtf on this machine's real /sys/kernel/btf (KVM built in here: vmlinux only;
Debian's kvm=m split files are covered by tests/unit/test_btf.py and the VM tier)."""

from __future__ import annotations

import os

import pytest

from hekitrace.capture import loader
from hekitrace.capture.btf import KVM_MODULES, Btf, KernelBtf

pytestmark = pytest.mark.kernel


def test_real_kernel_btf_gives_the_same_offsets_as_vmlinux_alone():
    kbtf = KernelBtf.load()
    present = [m for m in KVM_MODULES if os.path.exists(f"/sys/kernel/btf/{m}")]
    assert [p.path for p in kbtf.modules] == [f"/sys/kernel/btf/{m}" for m in present]
    offsets = loader.kernel_offsets(kbtf)
    assert all(v >= 0 for v in offsets.values()), offsets
    if not present:  # built-in KVM: vmlinux alone must agree
        assert offsets == loader.kernel_offsets(Btf.load())
