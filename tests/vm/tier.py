"""Boot helpers of the vm tier shared by conftest.py and the tests (a module of its own:
tests import helpers, never a conftest)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.vm import harness, hekihost, image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNELS = ("6.1", "6.12")
#: the third L1 kernel: Debian's 6.12 source with the project's Heki v2 host port
HEKI_HOST = hekihost.FLAVOUR

#: the hekitrace CLI inside L1: the working tree (9p, read-only) on PYTHONPATH
HEKITRACE_WRAPPER = """#!/bin/sh
PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1 \\
  exec python3 -c 'import sys; from hekitrace.cli import main; sys.exit(main())' "$@"
"""

RUN_SH = """#!/bin/sh
export PATH=/mnt/host/bin:$PATH PYTHONDONTWRITEBYTECODE=1
cd /tmp
echo "PAYLOAD: start $(cut -d' ' -f1 /proc/uptime)"
PYTHONPATH=/mnt/src python3 /mnt/src/tests/vm/payload.py --flavour {flavour} --out /mnt/host {extra}
echo "PAYLOAD: exit $? at $(cut -d' ' -f1 /proc/uptime)"
"""


#: boots of one tree before a hang counts as a failure. Hangs are QEMU TCG's, not
#: hekitrace's (timers stop firing in L1; docs/vm-tier.md, "Hangs"); one of about ten
#: boots hung on the 2-core build host, and a hang is detected within two minutes.
BOOT_ATTEMPTS = 3


def _run_dir(flavour: str, label: str) -> Path:
    """A fresh run directory holding the hekitrace wrapper L1 calls."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"hekitrace-vm-{flavour}-{label}-"))
    (run_dir / "bin").mkdir()
    (run_dir / "bin/hekitrace").write_text(HEKITRACE_WRAPPER)
    os.chmod(run_dir / "bin/hekitrace", 0o755)
    return run_dir


def boot_tree(flavour: str, src: Path, label: str, times: dict,
              payload_args: str = "") -> harness.VmRun:
    """Build/reuse the image for ``flavour`` and boot it with ``src`` shared in."""
    if not harness.have_qemu():
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup.sh")
    if os.geteuid() != 0:
        pytest.fail("the vm tier needs root (debootstrap, image build): run as root")
    t0 = time.monotonic()
    try:
        img = hekihost.ensure_image() if flavour == HEKI_HOST else image.ensure_image(flavour)
    except image.ImageBuildError as e:
        pytest.fail(str(e))
    t1 = time.monotonic()
    # the Heki host's payload runs two L2 guests and extracts bcc's headers from
    # CONFIG_IKHEADERS first: a longer bound
    timeout = float(os.environ.get("HEKITRACE_VM_TIMEOUT",
                                   "600" if flavour == HEKI_HOST else "420"))
    script = RUN_SH.format(flavour=flavour, extra=payload_args)
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        run_dir = _run_dir(flavour, label)
        try:
            run = harness.boot(img, run_dir, src, script, timeout_seconds=timeout)
            break
        except harness.L1HangError as e:
            if attempt == BOOT_ATTEMPTS:
                pytest.fail(f"{flavour} ({label}): hung in all {BOOT_ATTEMPTS} boots; last: "
                            f"{e}\n(run dir kept: {run_dir})")
            # announced: a hung TCG run is retried in a fresh run directory
            print(f"vm tier: {flavour} ({label}): {str(e).splitlines()[0]}; retrying "
                  f"(hung run kept in {run_dir})", file=sys.stderr)
            times.setdefault("retries", []).append(f"{flavour}/{label}")
        except harness.VmRunError as e:
            pytest.fail(f"{flavour} ({label}): {e}\n(run dir kept: {run_dir})")
    times[f"{flavour}/{label}"] = {"image_s": t1 - t0, "boot_s": run.boot_seconds,
                                   "built": img.built_now, "abi": img.abi}
    return run


