"""Boot one L1 image under QEMU TCG with AMD SVM, run a payload in it, bring back results.

Why TCG: this build host has no kvm_amd, and QEMU's software emulation of SVM lets a stock
Debian kernel load kvm_amd with nested paging, so a tiny L2 guest makes the real KVM
tracepoints fire (docs/vm-tier.md: how L1 is built, timings, the missing kvm_cr).

Two 9p shares: ``host0`` is a fresh per-run directory (read-write) holding ``run.sh``
and receiving ``out.log`` and ``results.json``; ``src`` is the project working tree,
read-only, so the hekitrace under test is exactly what the tree holds, with no copy and
no image rebuild when the code changes. The L1 console goes to ``console.log`` in the run
directory; every failure message includes its tail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.image import L1Image

QEMU = "qemu-system-x86_64"


class VmRunError(RuntimeError):
    """The L1 run failed; the message ends with the L1 console log."""

    def __init__(self, what: str, console: str):
        super().__init__(f"{what}\n----- L1 console (tail) -----\n{console[-12000:]}")
        self.console = console


class L1HangError(VmRunError):
    """L1 stopped making progress: the run is stuck, not slow."""


#: a soft lockup this long means the L1 run will not finish (seen under TCG on a loaded
#: 2-core host: both vCPUs stuck for minutes); give up early instead of waiting it out
HANG_SECONDS = 90
_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s")

#: L1 touches this file in the run directory every HEARTBEAT_PERIOD seconds from the
#: moment run.sh starts. Some TCG hangs are silent: every vCPU stops taking timer
#: interrupts, so the watchdog never prints a soft lockup and only the missing
#: heartbeat tells a hang from a slow bcc compile (which never starves a shell loop
#: for long: the scheduler is fair).
HEARTBEAT = "heartbeat"
HEARTBEAT_PERIOD = 5
#: no heartbeat for this long (counted from QEMU's start before the first one) is a hang
HEARTBEAT_STALL_SECONDS = 120

#: the first lines of every run.sh: the heartbeat, detached from run.sh's output so that
#: l1init's ``tee`` ends when run.sh does
_HEARTBEAT_SH = (f"(while :; do cut -d' ' -f1 /proc/uptime > /mnt/host/{HEARTBEAT}; "
                 f"sleep {HEARTBEAT_PERIOD}; done) </dev/null >/dev/null 2>&1 &\n")


def _hang(run_dir: Path, started: float) -> str:
    """Why L1 is considered hung (``""`` while it is making progress)."""
    try:
        data = (run_dir / "console.log").read_bytes()[-20000:]
    except OSError:
        data = b""
    stuck = [int(m.group(1)) for m in _LOCKUP.finditer(data)]
    if stuck and max(stuck) >= HANG_SECONDS:
        return f"soft lockup, a vCPU stuck for {max(stuck)} s"
    try:
        last = (run_dir / HEARTBEAT).stat().st_mtime
    except OSError:
        last = started
    silent = time.time() - last
    if silent >= HEARTBEAT_STALL_SECONDS:
        return f"no heartbeat from L1 for {silent:.0f} s"
    return ""


@dataclass
class VmRun:
    """What one boot brought back."""

    image: L1Image
    run_dir: Path
    console: str
    out_log: str
    results: dict
    boot_seconds: float


def qemu_command(image: L1Image, run_dir: Path, src: Path, memory: str = "2G",
                 cpus: int = 1) -> list[str]:
    """The QEMU invocation of docs/vm-tier.md ("How the L1 machine is built"), plus src.

    One vCPU, not the two first used: every L1 hang seen with two (about one boot in
    ten under CI) had the second vCPU stop taking timer interrupts, leaving the first
    waiting on it (RCU stalls, KVM_CREATE_VM stuck in a cross-CPU call). With one vCPU
    a boot takes as long (about 105 s for the 6.1 payload, against 97-140 s with two):
    the payload's time is bcc compiling, which is single-threaded.
    """
    # a kernel with everything built in (the Heki test host) needs no initramfs: it
    # mounts the root itself and starts l1init directly
    boot = ["-initrd", str(image.initrd)] if image.initrd is not None else []
    init = "" if image.initrd is not None else " init=/sbin/l1init"
    return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm,+npt",
            "-smp", str(cpus), "-m", memory, "-nographic", "-no-reboot", "-nodefaults",
            "-serial", "stdio", "-kernel", str(image.vmlinuz), *boot,
            "-append", f"console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=4{init}",
            "-drive", f"file={image.root},format=raw,if=virtio,cache=unsafe,snapshot=on",
            "-virtfs", f"local,path={run_dir},mount_tag=host0,security_model=none,id=host0",
            "-virtfs", f"local,path={src},mount_tag=src,security_model=none,id=src,"
                       "readonly=on"]


def boot(image: L1Image, run_dir: Path, src: Path, run_sh: str,
         timeout_seconds: float = 300) -> VmRun:
    """Boot ``image`` with ``run_sh`` as the payload; return the console and results.

    Raises VmRunError (with the console) when QEMU fails, times out, or the payload left
    no ``results.json``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    shebang, _, body = run_sh.partition("\n")
    (run_dir / "run.sh").write_text(f"{shebang}\n{_HEARTBEAT_SH}{body}")
    os.chmod(run_dir / "run.sh", 0o755)
    cmd = qemu_command(image, run_dir, src)
    (run_dir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
    start = time.monotonic()
    started_wall = time.time()
    console_path = run_dir / "console.log"
    with open(console_path, "wb") as console_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console_file,
                                stderr=subprocess.STDOUT)
        rc = None
        hung = ""
        deadline = start + timeout_seconds
        while time.monotonic() < deadline:
            try:
                rc = proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                hung = _hang(run_dir, started_wall)
                if hung:
                    break
        if rc is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - start
    console = console_path.read_text(errors="replace")
    out_log = (run_dir / "out.log").read_text(errors="replace") \
        if (run_dir / "out.log").exists() else ""
    if rc is None and hung:
        raise L1HangError(f"L1 ({image.abi}) hung: {hung}", console)
    if rc is None:
        raise VmRunError(f"L1 ({image.abi}) did not power off within {timeout_seconds:.0f} s",
                         console)
    if rc != 0:
        raise VmRunError(f"QEMU exited with status {rc} for {image.abi}", console)
    results_path = run_dir / "results.json"
    if not results_path.exists():
        raise VmRunError(f"the payload in L1 ({image.abi}) wrote no results.json "
                         f"(run dir {run_dir})", console)
    try:
        results = json.loads(results_path.read_text())
    except ValueError as e:
        raise VmRunError(f"results.json from L1 ({image.abi}) is not JSON: {e}", console)
    return VmRun(image, run_dir, console, out_log, results, elapsed)


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None
