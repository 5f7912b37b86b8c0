"""Fixtures of the vm tier: one L1 boot per kernel per session, and the tier's wall time.

Why session scope: a boot costs 20-60 s of TCG time; every check of a kernel comes from
the same boot (the payload writes them all to results.json). The image comes from the
cache (tests/vm/image.py), built on first use. The summary line at the end of the run
reports the tier's wall time, split into image and boot time per kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import image  # noqa: E402

REPO = HERE.parents[1]
KERNELS = ("6.1", "6.12")
_TIMES_KEY = pytest.StashKey[dict]()

#: the hekitrace CLI inside L1: the working tree (9p, read-only) on PYTHONPATH
HEKITRACE_WRAPPER = """#!/bin/sh
PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1 \\
  exec python3 -c 'import sys; from hekitrace.cli import main; sys.exit(main())' "$@"
"""

RUN_SH = """#!/bin/sh
export PATH=/mnt/host/bin:$PATH PYTHONDONTWRITEBYTECODE=1
cd /tmp
echo "PAYLOAD: start $(cut -d' ' -f1 /proc/uptime)"
python3 /mnt/src/tests/vm/payload.py --flavour {flavour} --out /mnt/host
echo "PAYLOAD: exit $? at $(cut -d' ' -f1 /proc/uptime)"
"""


def boot_tree(flavour: str, src: Path, label: str, times: dict) -> harness.VmRun:
    """Build/reuse the image for ``flavour`` and boot it with ``src`` shared in."""
    if not harness.have_qemu():
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup.sh")
    if os.geteuid() != 0:
        pytest.fail("the vm tier needs root (debootstrap, image build): run as root")
    t0 = time.monotonic()
    try:
        img = image.ensure_image(flavour)
    except image.ImageBuildError as e:
        pytest.fail(str(e))
    t1 = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix=f"hekitrace-vm-{flavour}-{label}-"))
    (run_dir / "bin").mkdir()
    (run_dir / "bin/hekitrace").write_text(HEKITRACE_WRAPPER)
    os.chmod(run_dir / "bin/hekitrace", 0o755)
    try:
        run = harness.boot(img, run_dir, src, RUN_SH.format(flavour=flavour),
                           timeout_seconds=float(os.environ.get("HEKITRACE_VM_TIMEOUT", 420)))
    except harness.VmRunError as e:
        pytest.fail(f"{flavour} ({label}): {e}\n(run dir kept: {run_dir})")
    times[f"{flavour}/{label}"] = {"image_s": t1 - t0, "boot_s": run.boot_seconds,
                                   "built": img.built_now, "abi": img.abi}
    return run


@pytest.fixture(scope="session")
def vm_times(request) -> dict:
    return request.config.stash.setdefault(_TIMES_KEY, {"start": time.monotonic()})


@pytest.fixture(scope="session", params=KERNELS)
def l1_run(request, vm_times) -> harness.VmRun:
    """The one boot of this kernel for the session, with the working tree as is."""
    return boot_tree(request.param, REPO, "tree", vm_times)


def tracked_tree_copy(dest: Path) -> Path:
    """A copy of the tracked files of the working tree (for mutation runs)."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.split(b"\0")
    for rel in files:
        if not rel:
            continue
        src = REPO / rel.decode()
        if src.is_file():
            (dest / rel.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel.decode())
    return dest


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    times = config.stash.get(_TIMES_KEY, None)
    if not times:
        return
    total = time.monotonic() - times["start"]
    parts = [f"{k} [{v['abi']}]: image {v['image_s']:.0f} s"
             f"{' (built)' if v['built'] else ' (cached)'}, boot+payload {v['boot_s']:.0f} s"
             for k, v in times.items() if k != "start"]
    terminalreporter.write_line(f"vm tier wall time: {total:.0f} s; " + "; ".join(parts))
