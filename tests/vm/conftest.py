"""Fixtures of the vm tier: one L1 boot per kernel per session, and the tier's wall time.

Why session scope: a boot costs 20-60 s of TCG time; every check of a kernel comes from
the same boot (the payload writes them all to results.json). The image comes from the
cache (tests/vm/image.py), built on first use. The summary line at the end of the run
reports the tier's wall time, split into image and boot time per kernel.
"""

from __future__ import annotations

import time

import pytest

from tests.vm import harness
from tests.vm.tier import HEKI_HOST, KERNELS, REPO, boot_tree

_TIMES_KEY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def vm_times(request) -> dict:
    return request.config.stash.setdefault(_TIMES_KEY, {"start": time.monotonic()})


@pytest.fixture(scope="session", params=KERNELS)
def l1_run(request, vm_times) -> harness.VmRun:
    """The one boot of this kernel for the session, with the working tree as is."""
    return boot_tree(request.param, REPO, "tree", vm_times)


@pytest.fixture(scope="session")
def heki_host_run(vm_times) -> harness.VmRun:
    """The one boot of the Heki-v2-compatible test host for the session."""
    return boot_tree(HEKI_HOST, REPO, "tree", vm_times)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    times = config.stash.get(_TIMES_KEY, None)
    if not times:
        return
    total = time.monotonic() - times["start"]
    parts = [f"{k} [{v['abi']}]: image {v['image_s']:.0f} s"
             f"{' (built)' if v['built'] else ' (cached)'}, boot+payload {v['boot_s']:.0f} s"
             for k, v in times.items() if k not in ("start", "retries")]
    if times.get("retries"):
        parts.append(f"retried after an L1 hang: {', '.join(times['retries'])}")
    terminalreporter.write_line(f"vm tier wall time: {total:.0f} s; " + "; ".join(parts))
