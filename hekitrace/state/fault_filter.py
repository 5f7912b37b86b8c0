"""Which pages of a guest the kernel's fault filter should report, and for which access.

Only write and fetch faults on protected pages reach userspace (docs/internals.md, Hooks); the
daemon computes the set from a guest map after each batch that changed it and hands it
to ``Capture.protect_filter_update``. Pure, so it is tested apart from the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hekitrace.state.events import FaultAccess

_WRITE = int(FaultAccess.WRITE)
_FETCH = int(FaultAccess.FETCH)


def protected_ranges(segments: Iterable[tuple[int, int, int]], abi: Any
                     ) -> list[tuple[int, int, int]]:
    """(gfn_start, gfn_end, FaultAccess bits to report) for each stored range of a map.

    ``segments`` are a map's stored (start, end, KVM attribute value) ranges. A range
    with Heki bits reports writes when it lacks HEKI_WRITE and fetches when it lacks
    HEKI_EXEC; ranges without Heki bits (default RWX, or only PRIVATE) report nothing.
    """
    heki, w_bit, x_bit = abi.kvm_heki_mask, 1 << abi.kvm_write, 1 << abi.kvm_exec
    out = []
    for start, end, value in segments:
        if value & heki:
            access = (0 if value & w_bit else _WRITE) | (0 if value & x_bit else _FETCH)
            if access:
                out.append((start, end, access))
    return out
