"""hekitrace.state.fault_filter: the pages and accesses the kernel fault filter reports."""

from __future__ import annotations

from hekitrace.config.abi import DEFAULT_PROFILE as ABI
from hekitrace.state.events import FaultAccess
from hekitrace.state.fault_filter import protected_ranges

W, X = int(FaultAccess.WRITE), int(FaultAccess.FETCH)
R = 1 << ABI.kvm_read
KW, KX, KI = 1 << ABI.kvm_write, 1 << ABI.kvm_exec, 1 << ABI.kvm_immutable
PRIVATE = 1 << ABI.kvm_private


def test_faultfilter_reports_what_each_class_forbids():
    segments = [(0, 10, R | KX | KI),        # text r-x: writes
                (10, 20, R),                 # rodata r--: writes and fetches
                (20, 30, R | KW),            # data rw-: fetches
                (30, 40, R | KW | KX),       # rwx: nothing
                (40, 50, PRIVATE)]           # no Heki bits: nothing
    assert protected_ranges(segments, ABI) == [(0, 10, W), (10, 20, W | X), (20, 30, X)]


def test_faultfilter_empty_map():
    assert protected_ranges([], ABI) == []
