"""Compile bpf/capture.c once, with every setting passed as a -D flag.

Settings come from the config (``capture`` section and the ABI profile); kernel struct
offsets from the running kernel's BTF (btf.py); ioctl numbers from kvm_uapi.py; tracepoint
context structs declared in the C are checked against tracefs ``format`` files so a
kernel that moved a field fails loudly (AttachError) instead of reading garbage.
``dump_source=True`` or ``HEKITRACE_DUMP_BPF=1`` prints the exact C and flags compiled.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from hekitrace.capture import kvm_uapi
from hekitrace.capture.btf import Btf, KernelBtf
from hekitrace.capture.hooks import ATTR_FUNCTION
from hekitrace.capture.hostenv import kallsyms_has
from hekitrace.config.abi import AbiProfile
from hekitrace.errors import AttachError, BtfError

DUMP_ENV = "HEKITRACE_DUMP_BPF"
BPF_DIR_ENV = "HEKITRACE_BPF_DIR"
MAIN_SOURCE = "capture.c"
#: compiled as one text, in this order (bcc takes programs only from its main text)
PROGRAM_SOURCES = ("capture.c", "hypercall.c", "ioctl.c", "fault.c", "attr.c", "flood.c")
SOURCES = ("hekitrace.h",) + PROGRAM_SOURCES
TRACEFS = "/sys/kernel/tracing"
PAGE_SIZE = 4096
#: Largest capture.max_list_pages the verifier accepts for the walk (its nested bounded
#: loops: pages x memslots x already-seen pages). Measured on 6.18 with 64 memslots: 24
#: loads, 28 fails with "The sequence of 8193 jumps is too complex";
#: tests/kernel/test_bpf_loader.py loads this limit so a kernel that lowers it is caught.
MAX_LIST_PAGES_LIMIT = 24

VENDOR_VMX = 1
VENDOR_SVM = 2

#: tracefs field offsets the C ctx structs assume (bpf/*.c hk_tp_*), per tracepoint
TRACEPOINT_FIELDS: dict[str, dict[str, int]] = {
    "kvm/kvm_hypercall": {"nr": 8, "a0": 16, "a1": 24, "a2": 32, "a3": 40},
    "kvm/kvm_page_fault": {"vcpu_id": 8, "guest_rip": 16, "fault_address": 24,
                           "error_code": 32},
    "kvm/kvm_cr": {"rw": 8, "cr": 12, "val": 16},
    "syscalls/sys_enter_ioctl": {"fd": 16, "cmd": 24, "arg": 32},
    "syscalls/sys_exit_ioctl": {"ret": 16},
}


@dataclass(frozen=True)
class CaptureSettings:
    """The ``capture`` config section as the loader needs it (bytes, seconds, pages)."""

    max_list_pages: int = 16
    control_ring_bytes: int = 4 * 1024 * 1024
    telemetry_ring_bytes: int = 4 * 1024 * 1024
    fault_report_interval_seconds: float = 1.0
    vendor: str = "auto"
    max_memslots: int = 64
    #: per-VM budget for guest-triggered control records (bpf/capture.c hk_budget_take);
    #: None = a quarter of the control ring, as burst and per second
    vm_control_budget_bytes: int | None = None

    @classmethod
    def from_config(cls, config) -> CaptureSettings:
        c = config.capture
        return cls(max_list_pages=c.max_list_pages, control_ring_bytes=c.control_ring_bytes,
                   telemetry_ring_bytes=c.telemetry_ring_bytes,
                   fault_report_interval_seconds=c.fault_report_interval_seconds,
                   vendor=c.vendor)


#: where the Debian package and packaging/install.sh put bpf/*.c
INSTALLED_BPF_DIR = Path("/usr/share/hekitrace/bpf")


def bpf_dir(installed: Path = INSTALLED_BPF_DIR) -> Path:
    """Where ``bpf/*.c`` are: ``$HEKITRACE_BPF_DIR``, else the checkout's ``bpf/`` when
    this code runs from a checkout, else the installed copy.

    bcc compiles the C from these files at run time (BPF C lives in files, not in Python
    strings); they sit outside the Python package, so an installed hekitrace finds them
    under /usr/share. Capture and the feature probes (capture/probe.py) both read them
    from here.
    """
    override = os.environ.get(BPF_DIR_ENV)
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parent.parent.parent / "bpf"
    if checkout.is_dir() or not installed.is_dir():
        return checkout
    return installed


def detect_vendor(settings_vendor: str, sys_module: str = "/sys/module",
                  say=None) -> int:
    """VENDOR_VMX or VENDOR_SVM: from the config (intel/amd/vmx/svm) or, for ``auto``,
    from which of kvm_intel / kvm_amd is loaded. Neither (e.g. a PVM host): VMX, said
    in one line, since the fault tracepoint then never fires anyway
    (docs/kernel-support.md section 2)."""
    v = settings_vendor.lower()
    if v in ("intel", "vmx"):
        return VENDOR_VMX
    if v in ("amd", "svm"):
        return VENDOR_SVM
    if os.path.isdir(os.path.join(sys_module, "kvm_intel")):
        return VENDOR_VMX
    if os.path.isdir(os.path.join(sys_module, "kvm_amd")):
        return VENDOR_SVM
    if say is not None:
        say("capture.vendor auto: neither kvm_intel nor kvm_amd is loaded; decoding fault "
            "error codes as VMX exit qualifications")
    return VENDOR_VMX


def _pow2_pages(nbytes: int, key: str) -> int:
    pages = nbytes // PAGE_SIZE
    if pages < 1 or pages & (pages - 1) or pages * PAGE_SIZE != nbytes:
        raise AttachError(f"capture.{key} = {nbytes} bytes: must be a power of two number "
                          f"of {PAGE_SIZE}-byte pages", method="compile")
    return pages


def kernel_offsets(btf: Btf | KernelBtf, attr: bool = True) -> dict[str, int]:
    """-D name -> byte offset from BTF. kvm_gfn_range is needed only for the attr hook
    (``attr``: BtfError if missing); without it its offsets are -1 and the attr hook must
    not attach (6.1 has no kvm_arch_post_set_memory_attributes and no arg.attributes).
    kvm_vcpu fields are best-effort (-1: the raw fault program reports vcpu/rip 0)."""
    out = {
        "HK_GFN_RANGE_START_OFF": btf.member_offset("kvm_gfn_range", "start") if attr else -1,
        "HK_GFN_RANGE_END_OFF": btf.member_offset("kvm_gfn_range", "end") if attr else -1,
        "HK_GFN_RANGE_ATTR_OFF": (btf.member_offset("kvm_gfn_range", "arg.attributes")
                                  if attr else -1),
    }
    for name, path in (("HK_VCPU_ID_OFF", "vcpu_id"),
                       # regs[VCPU_REGS_RIP]; VCPU_REGS_RIP = 16 (arch/x86/include/asm/kvm_vcpu_regs.h)
                       ("HK_VCPU_RIP_OFF", "arch.regs[16]")):
        try:
            out[name] = btf.member_offset("kvm_vcpu", path)
        except BtfError:
            out[name] = -1
    return out


#: the reason the attr hook cannot attach on a kernel without its function
ATTR_ABSENT = "absent from this kernel (not in /proc/kallsyms)"


def attr_hook_blocker(btf: Btf | KernelBtf, kallsyms: str = "/proc/kallsyms") -> str:
    """Why the attr hook cannot attach on this kernel whatever the method, or "".

    The one answer ``hekitrace check`` and the daemon both give: first whether
    kvm_arch_post_set_memory_attributes exists at all, then whether BTF has the
    kvm_gfn_range members its program reads (the function arrived in v6.8 with
    CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES; ``arg.attributes`` with it).
    """
    if ATTR_FUNCTION not in kallsyms_has((ATTR_FUNCTION,), kallsyms):
        return ATTR_ABSENT
    try:
        kernel_offsets(btf)
    except BtfError as exc:
        return f"kvm_gfn_range offsets: {exc}"
    return ""


def kernel_hz(paths: tuple[str, ...] | None = None, say=None) -> int:
    """The kernel's CONFIG_HZ (jiffies per second), from /proc/config.gz or
    /boot/config-<release>. Unknown: 100, the lowest common value, said in one line (a
    too-low HZ makes storm reports more frequent, never rarer)."""
    import gzip
    if paths is None:
        paths = ("/proc/config.gz", f"/boot/config-{os.uname().release}")
    for path in paths:
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            continue
    if say is not None:
        say("kernel CONFIG_HZ not found in /proc/config.gz or /boot: assuming 100 for the "
            "fault storm interval (reports may come more often than configured)")
    return 100


def build_cflags(settings: CaptureSettings, abi: AbiProfile, offsets: dict[str, int],
                 vendor: int, hz: int = 100, extra: tuple[str, ...] = ()) -> list[str]:
    """Every -D/-I flag of the compile, in a stable order (shown by the dump)."""
    if not 1 <= settings.max_list_pages <= MAX_LIST_PAGES_LIMIT:
        raise AttachError(f"capture.max_list_pages = {settings.max_list_pages}: must be "
                          f"1..{MAX_LIST_PAGES_LIMIT}", method="compile")
    slots = settings.max_memslots
    if slots < 1 or slots & (slots - 1):
        raise AttachError(f"max_memslots = {slots}: must be a power of two", method="compile")
    interval_jiffies = max(1, math.ceil(settings.fault_report_interval_seconds * hz))
    flags = [f"-I{bpf_dir()}",
             f"-DHK_CTRL_PAGES={_pow2_pages(settings.control_ring_bytes, 'control_ring_bytes')}",
             f"-DHK_TELE_PAGES={_pow2_pages(settings.telemetry_ring_bytes, 'telemetry_ring_bytes')}",
             f"-DHK_MAX_LIST_PAGES={settings.max_list_pages}",
             f"-DHK_MAX_MEMSLOTS={slots}",
             f"-DHK_VENDOR={vendor}",
             f"-DHK_FAULT_INTERVAL_JIFFIES={interval_jiffies}ULL"]
    budget = settings.vm_control_budget_bytes or settings.control_ring_bytes // 4
    if budget < 2 * 4128:
        raise AttachError(f"per-VM control budget {budget} bytes: must hold at least two "
                          "4128-byte list-page records", method="compile")
    flags += [f"-DHK_VM_BUDGET_BURST={budget}ULL",
              f"-DHK_VM_BUDGET_PER_JIFFY={max(1, budget // hz)}ULL"]
    for name, nr in (("HK_NR_PROTECT_MEMORY", abi.protect_memory),
                     ("HK_NR_LOCK_CR_UPDATE", abi.lock_cr_update),
                     ("HK_NR_LOCK_MEM_PAGE_RANGES", abi.lock_mem_page_ranges),
                     ("HK_NR_MAP_GPA_RANGE", abi.map_gpa_range)):
        if nr is not None:
            flags.append(f"-D{name}={int(nr)}ULL")
    for name, number in kvm_uapi.WATCHED_IOCTLS.items():
        flags.append(f"-DHK_{name}={number:#x}U")
    for name, value in offsets.items():
        flags.append(f"-D{name}={value}")
    flags.extend(extra)
    return flags


def read_sources() -> dict[str, str]:
    base = bpf_dir()
    out = {}
    for name in SOURCES:
        try:
            out[name] = (base / name).read_text()
        except OSError as exc:
            raise AttachError(f"cannot read BPF source {base / name}: {exc.strerror}; set "
                              f"{BPF_DIR_ENV} to the directory holding bpf/*.c",
                              method="compile") from exc
    return out


def program_text() -> str:
    """The exact C text compiled: bpf/capture.c then the hook files, each introduced by a
    #line directive so compiler errors name the real file and line."""
    sources = read_sources()
    base = bpf_dir()
    return "".join(f'#line 1 "{base / name}"\n{sources[name]}\n' for name in PROGRAM_SOURCES)


def dump_sources(cflags: list[str], out=None) -> None:
    """Print the flags, the shared header and the exact text compiled."""
    out = out or sys.stderr
    print(f"# hekitrace BPF compile from {bpf_dir()}", file=out)
    print("# cflags: " + " ".join(cflags), file=out)
    print("# ---- hekitrace.h (#included) ----", file=out)
    print(read_sources()["hekitrace.h"], file=out)
    print("# ---- compiled text ----", file=out)
    print(program_text(), file=out)


def compile_bpf(cflags: list[str], dump: bool = False):
    """bcc BPF object for bpf/capture.c (compiled, programs not loaded yet)."""
    from bcc import BPF  # imported here: bcc is heavy and only capture needs it

    if dump or os.environ.get(DUMP_ENV) == "1":
        dump_sources(cflags)
    text = program_text()
    try:
        return BPF(text=text.encode(), cflags=cflags)
    except Exception as exc:  # bcc raises plain Exception on compile errors
        raise AttachError(f"compiling {bpf_dir() / MAIN_SOURCE} failed: {exc}",
                          method="compile") from exc


_FIELD_RE = re.compile(r"field:[^;]*?(\w+)(\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);")


def tracepoint_offsets(category: str, event: str, tracefs: str = TRACEFS) -> dict[str, int]:
    """Field name -> offset from ``events/<category>/<event>/format``."""
    path = os.path.join(tracefs, "events", category, event, "format")
    with open(path) as f:
        return {m.group(1): int(m.group(3)) for m in _FIELD_RE.finditer(f.read())}


def check_tracepoint(category: str, event: str, tracefs: str = TRACEFS) -> None:
    """Raise AttachError unless the tracepoint's fields sit where bpf/*.c expects them."""
    want = TRACEPOINT_FIELDS[f"{category}/{event}"]
    try:
        have = tracepoint_offsets(category, event, tracefs)
    except OSError as exc:
        raise AttachError(f"cannot read the format of {category}:{event} under {tracefs}: "
                          f"{exc.strerror}", hook=event, method="tracepoint") from exc
    for field, offset in want.items():
        if have.get(field) != offset:
            raise AttachError(f"{category}:{event} field {field!r} is at offset "
                              f"{have.get(field)}, expected {offset} (bpf/*.c hk_tp_*)",
                              method="tracepoint")
