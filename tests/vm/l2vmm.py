"""A tiny VMM that runs inside L1 and behaves like a Heki v2 guest (the vm tier's L2).

Why it exists: the only way to prove hekitrace on a real KVM host here is to make a real
guest issue real ``vmmcall``s and real nested page faults under the L1 kernel's kvm_amd
(docs/vm-tier.md). This script is the VMM: ioctls on /dev/kvm, guest memory
in an anonymous mmap, one vCPU in real mode (CS base 0, RIP 0x1000, no irqchip).

What the guest does, in order (each step is a separate KVM_RUN of a two-byte program, the
registers being set by the VMM so any 64-bit value reaches the hypercall):
1. ``LOCK_CR_UPDATE`` (nr 13 in heki-v2; RBX = CR number, RCX = mask, RDX = flags) for
   CR4 SMEP|SMAP and CR0 WP;
2. ``PROTECT_MEMORY`` (nr 14; RBX = GPA of the newest struct heki_page_list page) with a
   valid chain of two pages, the first full (169 entries), then hostile lists: a deep
   chain beyond the capture limit, a self loop, an oversize ``npages``, malformed entries,
   a W+X request, and a list GPA outside every memslot;
3. touches: a write to a text page and an instruction fetch from a rodata page, both
   never touched before, so L1's nested page tables fault (kvm:kvm_page_fault).
On an unpatched kernel every Heki hypercall returns -KVM_ENOSYS (RAX = 0xfffffc18, as a
real-mode guest sees 32 bits). Page list layout (docs/heki-abi.md section 4): header ``{next (guest
VA, ignored), next_pa, npages}`` then ``npages`` entries ``{pa, epa (exclusive),
permissions}``, 24 bytes each, 169 per 4 KiB page, ``next_pa == 0`` ends the chain.

Command line (QEMU-like so that hekitrace's VMM name parsing finds the name):
``l2vmm.py -name guest=l2-heki -uuid UUID --manifest FILE [--vm-type N] [--hold]``.
The manifest (JSON) records exactly what was written and issued, for the checks.
With ``--hold`` the VMM keeps the VM open until stdin closes, so a daemon can be asked
about a live VM. Only the standard library is used: this runs in L1's bare python3.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import struct
import sys
import time

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


# include/uapi/linux/kvm.h
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_SET_MEMORY_ATTRIBUTES = _iow(0xD2, 32)     # 0x4020AED2 (docs/heki-abi.md section 9)
KVM_ENABLE_CAP = _iow(0xA3, 104)
KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, 160)
KVM_CREATE_GUEST_MEMFD = (3 << 30) | (64 << 16) | (KVMIO << 8) | 0xD4   # _IOWR
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_VM_TYPES = 235
KVM_CAP_EXIT_HYPERCALL = 201
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_HLT = 5
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
# Heki bits as the Heki-v2-compatible test host keeps them (KVM_MEMORY_ATTRIBUTE_HEKI_*)
KVM_HEKI_READ, KVM_HEKI_WRITE, KVM_HEKI_EXEC, KVM_HEKI_IMMUTABLE = 0x10, 0x20, 0x40, 0x80

PAGE = 4096
ENTRIES_PER_PAGE = 169          # (4096 - 24) / 24
HEADER = struct.Struct("<QQQ")  # next (guest VA), next_pa, npages
ENTRY = struct.Struct("<QQQ")   # pa, epa (exclusive), permissions

# heki-v2 numbers and guest permission bits (docs/heki-abi.md sections 2, 3)
LOCK_CR_UPDATE = 13
PROTECT_MEMORY = 14
MEM_ATTR_READ, MEM_ATTR_WRITE, MEM_ATTR_EXEC, MEM_ATTR_IMMUTABLE = 1, 2, 4, 8
CR4_SMEP, CR4_SMAP, CR0_WP = 1 << 20, 1 << 21, 1 << 16

# guest-physical layout: slot 0 = [0, 1 MiB) code + lists + "kernel";
# slot 1 = [1 MiB, 2 MiB) the pages named by the full list page
SLOT0_GPA, SLOT0_SIZE = 0x0, 0x100000
SLOT1_GPA, SLOT1_SIZE = 0x100000, 0x100000
CODE_GPA = 0x1000                       # vmmcall; hlt
WRITE_CODE_GPA = 0x1100                 # mov [bx], al; hlt
TEXT = (0x60000, 0x70000)               # r-x immutable
RODATA = (0x70000, 0x78000)             # r-- immutable
VALID_HEAD, VALID_TAIL = 0x10000, 0x11000
DEEP_CHAIN, DEEP_PAGES = 0x20000, 20
LOOP_LIST, OVERSIZE_LIST, MALFORMED_LIST, WX_LIST = 0x30000, 0x31000, 0x32000, 0x33000
OUTSIDE_GPA = 0x40000000                # no memslot there
OVERSIZE_NPAGES = 0x10000
KVM_ENOSYS = 1000
KVM_EPERM, KVM_EINVAL = 1, 22

# --scenario heki (the Heki-v2-compatible test host): real-mode exception handlers
# reached through the IVT at GPA 0 (#GP = 13, #PF = 14)
DATA = (0x78000, 0x80000)               # rw- (mutable), on the valid list's head page
PF_HANDLER_GPA, GP_HANDLER_GPA = 0x1200, 0x1300
PF_COUNT_GPA = 0x500                    # the #PF handler's counter (u16)
STORM_FAULTS = 40                       # the handler returns into the write this often
CR0_CODE_GPA = 0x1400                   # mov eax, cr0; mov cr0, eax; hlt
GP_MARK = 0xDEAD                        # AX after the #GP handler ran
RELAX_LIST = 0x34000                    # rodata -> rw- (mutable): the host answers -EPERM
VMM_ATTR = (SLOT1_GPA + 0xC0000, 4)     # KVM_SET_MEMORY_ATTRIBUTES without any hypercall
VMM_ATTR_VALUE = KVM_HEKI_READ | KVM_HEKI_EXEC
# --scenario private (KVM_X86_SW_PROTECTED_VM, guest_memfd)
PRIVATE_VMM = (0x80000, 0x4000)         # made private then shared by the VMM
PRIVATE_L2 = 0x90000                    # the L2 asks for it with KVM_HC_MAP_GPA_RANGE
MAP_GPA_CODE_GPA = 0x1500               # vmmcall; mov [si], al; hlt


class Kvm:
    """Just enough of /dev/kvm for one real-mode vCPU."""

    def __init__(self, vm_type: int = 0):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        if fcntl.ioctl(self.kvm, KVM_GET_API_VERSION) != 12:
            raise SystemExit("unexpected KVM API version")
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, vm_type)
        self.slots: list[dict] = []
        self.mems: list[mmap.mmap] = []

    def check_extension(self, cap: int, on_vm: bool = False) -> int:
        return fcntl.ioctl(self.vm if on_vm else self.kvm, KVM_CHECK_EXTENSION, cap)

    def add_slot(self, gpa: int, size: int) -> mmap.mmap:
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        slot = len(self.slots)
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION,
                    struct.pack("<IIQQQ", slot, 0, gpa, size, hva))
        self.slots.append({"slot": slot, "gpa": gpa, "size": size, "hva": hva})
        self.mems.append(mem)
        return mem

    def create_vcpu(self) -> None:
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.run_map = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)

    def write(self, gpa: int, data: bytes) -> None:
        for s, mem in zip(self.slots, self.mems):
            if s["gpa"] <= gpa and gpa + len(data) <= s["gpa"] + s["size"]:
                off = gpa - s["gpa"]
                mem[off:off + len(data)] = data
                return
        raise ValueError(f"GPA {gpa:#x} is not in a memslot")

    def set_memory_attributes(self, gpa: int, size: int, attrs: int) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES; returns 0 or -errno (never raises)."""
        try:
            fcntl.ioctl(self.vm, KVM_SET_MEMORY_ATTRIBUTES,
                        struct.pack("<QQQQ", gpa, size, attrs, 0))
            return 0
        except OSError as e:
            return -e.errno

    def enable_cap(self, cap: int, arg0: int) -> None:
        fcntl.ioctl(self.vm, KVM_ENABLE_CAP, struct.pack("<II4Q64x", cap, 0, arg0, 0, 0, 0))

    def add_gmem_slot(self, gpa: int, size: int) -> mmap.mmap:
        """A memslot backed by guest_memfd (private) and an anonymous mmap (shared)."""
        # a mutable buffer: fcntl.ioctl then returns the ioctl's value (the new fd)
        gmem = fcntl.ioctl(self.vm, KVM_CREATE_GUEST_MEMFD,
                           bytearray(struct.pack("<QQ48x", size, 0)), True)
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        mmap.PROT_READ | mmap.PROT_WRITE)
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        slot = len(self.slots)
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION2,
                    struct.pack("<IIQQQQI4x112x", slot, KVM_MEM_GUEST_MEMFD, gpa, size, hva,
                                0, gmem))
        self.slots.append({"slot": slot, "gpa": gpa, "size": size, "hva": hva})
        self.mems.append(mem)
        return mem

    def read(self, gpa: int, size: int) -> bytes:
        for s, mem in zip(self.slots, self.mems):
            if s["gpa"] <= gpa and gpa + size <= s["gpa"] + s["size"]:
                off = gpa - s["gpa"]
                return bytes(mem[off:off + size])
        raise ValueError(f"GPA {gpa:#x} is not in a memslot")

    def run(self, rip: int, cs_base: int = 0, ds_base: int = 0,
            regs: tuple[int, ...] = (), on_exit=None) -> int:
        """Run from CS:IP with RAX,RBX,RCX,RDX,RSI = ``regs``; return RAX at the hlt.

        ``on_exit(reason, run_map)`` handles other exits (returning True to resume)."""
        sregs = bytearray(fcntl.ioctl(self.vcpu, KVM_GET_SREGS, bytes(312)))
        for seg, base in ((0, cs_base), (1, ds_base)):   # kvm_segment: base u64, limit, sel
            struct.pack_into("<QIH", sregs, seg * 24, base, 0xFFFF, base >> 4)
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))
        values = list(regs) + [0] * (18 - len(regs))
        values[6] = 0x9000      # rsp: SS:SP for the exception handlers' frames
        values[16] = rip        # rip
        values[17] = 2          # rflags
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, struct.pack("<18Q", *values))
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", self.run_map, 8)[0]
        while reason != KVM_EXIT_HLT and on_exit is not None and on_exit(reason,
                                                                         self.run_map):
            fcntl.ioctl(self.vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("<I", self.run_map, 8)[0]
        if reason != KVM_EXIT_HLT:
            raise SystemExit(f"guest exit reason {reason}, expected HLT ({KVM_EXIT_HLT})")
        out = struct.unpack("<18Q", fcntl.ioctl(self.vcpu, KVM_GET_REGS, bytes(144)))
        return out[0]


def page_list(next_pa: int, entries: list[tuple[int, int, int]],
              npages: int | None = None) -> bytes:
    """One struct heki_page_list page (``npages`` may lie, for the hostile lists)."""
    data = HEADER.pack(0xffff888000000000 | next_pa, next_pa,
                       len(entries) if npages is None else npages)
    for e in entries:
        data += ENTRY.pack(*e)
    if len(data) > PAGE:
        raise ValueError("page list overflows its page")
    return data.ljust(PAGE, b"\0")


def build_lists(kvm: Kvm) -> list[dict]:
    """Write every page list into guest memory; return what was written, per request."""
    rx_i = MEM_ATTR_READ | MEM_ATTR_EXEC | MEM_ATTR_IMMUTABLE
    r_i = MEM_ATTR_READ | MEM_ATTR_IMMUTABLE
    full = [(SLOT1_GPA + i * PAGE, SLOT1_GPA + (i + 1) * PAGE,
             MEM_ATTR_READ if i % 2 == 0 else MEM_ATTR_READ | MEM_ATTR_WRITE)
            for i in range(ENTRIES_PER_PAGE)]
    tail = [(TEXT[0], TEXT[1], rx_i), (RODATA[0], RODATA[1], r_i)]
    requests = []

    def put(name: str, head: int, pages: list[tuple[int, int, list, int | None]],
            expect: str) -> None:
        for gpa, nxt, entries, npages in pages:
            kvm.write(gpa, page_list(nxt, entries, npages))
        requests.append({"name": name, "head_gpa": head, "expect": expect,
                         "pages": [{"gpa": g, "next_pa": n, "npages":
                                    len(e) if np is None else np, "entries": e}
                                   for g, n, e, np in pages]})

    # the guest's newest page is the head (docs/heki-abi.md section 4): full page -> tail page
    put("valid", VALID_HEAD, [(VALID_HEAD, VALID_TAIL, full, None),
                              (VALID_TAIL, 0, tail, None)], "valid")
    deep = []
    for i in range(DEEP_PAGES):
        gpa = DEEP_CHAIN + i * PAGE
        nxt = gpa + PAGE if i + 1 < DEEP_PAGES else 0
        pa = SLOT1_GPA + 0xC0000 + i * PAGE
        deep.append((gpa, nxt, [(pa, pa + PAGE, MEM_ATTR_READ)], None))
    put("deep_chain", DEEP_CHAIN, deep, "truncated")
    put("self_loop", LOOP_LIST, [(LOOP_LIST, LOOP_LIST,
                                  [(SLOT1_GPA + 0xE0000, SLOT1_GPA + 0xE1000, r_i)], None)],
        "loop")
    put("oversize_npages", OVERSIZE_LIST,
        [(OVERSIZE_LIST, 0, [(SLOT1_GPA + 0xE2000, SLOT1_GPA + 0xE3000, r_i)],
          OVERSIZE_NPAGES)], "malformed")
    bad = [(SLOT1_GPA + 0xE4010, SLOT1_GPA + 0xE5000, r_i),          # misaligned pa
           (SLOT1_GPA + 0xE6000, SLOT1_GPA + 0xE5000, r_i),          # end before start
           (SLOT1_GPA + 0xE7000, SLOT1_GPA + 0xE8000, 0),            # no permission
           (SLOT1_GPA + 0xE8000, SLOT1_GPA + 0xE9000, 0x30 | MEM_ATTR_READ)]  # unknown bits
    put("malformed_entries", MALFORMED_LIST, [(MALFORMED_LIST, 0, bad, None)], "malformed")
    put("wx", WX_LIST, [(WX_LIST, 0, [(SLOT1_GPA + 0xF0000, SLOT1_GPA + 0xF1000,
                                       MEM_ATTR_READ | MEM_ATTR_WRITE | MEM_ATTR_EXEC)],
                         None)], "wx")
    requests.append({"name": "outside_memslots", "head_gpa": OUTSIDE_GPA,
                     "expect": "unreadable", "pages": []})
    return requests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-name", default="guest=l2-heki")
    ap.add_argument("-uuid", default="00000000-0000-0000-0000-000000000000")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--vm-type", type=int, default=0)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--touch-delay", type=float, default=0.0, metavar="S",
                    help="pause between the hypercalls and the touches, so a monitor can "
                         "install its fault filter first (default: 0)")
    ap.add_argument("--private-attr", action="store_true",
                    help="also set and clear KVM_MEMORY_ATTRIBUTE_PRIVATE on a range")
    ap.add_argument("--scenario", choices=("stock", "heki", "private"), default="stock",
                    help="stock: the hostile-list guest for the stock kernels (default); "
                         "heki: the guest for the Heki-v2-compatible test host; private: "
                         "a KVM_X86_SW_PROTECTED_VM guest with guest_memfd")
    args = ap.parse_args(argv)

    t0 = time.time()
    if args.scenario == "private":
        return private_scenario(args, t0)
    kvm = Kvm(args.vm_type)
    manifest: dict = {"pid": os.getpid(), "name": args.name.split("guest=")[-1].split(",")[0],
                      "uuid": args.uuid, "vm_type": args.vm_type, "hypercalls": [],
                      "touches": [], "attr_ioctls": []}
    kvm.add_slot(SLOT0_GPA, SLOT0_SIZE)
    kvm.add_slot(SLOT1_GPA, SLOT1_SIZE)
    manifest["memslots"] = kvm.slots
    kvm.create_vcpu()
    kvm.write(CODE_GPA, b"\x0f\x01\xd9\xf4")             # vmmcall; hlt
    kvm.write(WRITE_CODE_GPA, b"\x88\x07\xf4")           # mov [bx], al; hlt
    kvm.write(RODATA[0], b"\xf4")                        # fetched by the fetch touch
    install_handlers(kvm)

    def hypercall(nr: int, a0: int, a1: int = 0, a2: int = 0, a3: int = 0,
                  what: str = "") -> None:
        rax = kvm.run(CODE_GPA, regs=(nr, a0, a1, a2, a3))
        manifest["hypercalls"].append({"what": what, "nr": nr, "a0": a0, "a1": a1, "a2": a2,
                                       "a3": a3, "ret32": rax & 0xffffffff})

    if args.scenario == "heki":
        heki_scenario(kvm, manifest, hypercall, args.touch_delay)
        return finish(manifest, args, t0)
    requests = build_lists(kvm)
    manifest["requests"] = requests
    hypercall(LOCK_CR_UPDATE, 4, CR4_SMEP | CR4_SMAP, 0, 0, "lock_cr4")
    hypercall(LOCK_CR_UPDATE, 0, CR0_WP, 0, 0, "lock_cr0")
    for req in requests:
        # a1..a3 carry leftovers in a real guest (kvm_hypercall1); make them recognisable
        hypercall(PROTECT_MEMORY, req["head_gpa"], 0xa1, 0xa2, 0xa3, req["name"])
    # touches after the requests: a write to text, a fetch from rodata (first accesses)
    time.sleep(args.touch_delay)
    kvm.run(WRITE_CODE_GPA, ds_base=TEXT[0], regs=(0x5a, 0))
    manifest["touches"].append({"kind": "write", "gpa": TEXT[0]})
    kvm.run(0, cs_base=RODATA[0])
    manifest["touches"].append({"kind": "fetch", "gpa": RODATA[0]})

    if args.private_attr:
        manifest["mem_attr_cap"] = kvm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES, True)
        gpa, size = SLOT1_GPA + 0x80000, 0x4000
        for attrs in (KVM_MEMORY_ATTRIBUTE_PRIVATE, 0):
            manifest["attr_ioctls"].append({"gpa": gpa, "size": size, "attributes": attrs,
                                            "result": kvm.set_memory_attributes(gpa, size,
                                                                                attrs)})
        gpa2 = SLOT1_GPA + 0x90000
        manifest["attr_ioctls"].append({"gpa": gpa2, "size": PAGE,
                                        "attributes": KVM_MEMORY_ATTRIBUTE_PRIVATE,
                                        "result": kvm.set_memory_attributes(
                                            gpa2, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE)})

    return finish(manifest, args, t0)


def install_handlers(kvm: Kvm) -> None:
    """Real-mode #PF and #GP handlers (IVT at GPA 0), for the Heki test host's injected
    exceptions; never reached on a stock host."""
    # #PF: count in cs:[PF_COUNT_GPA]; iret back into the faulting write until
    # STORM_FAULTS faults were taken, then hlt (a bounded, real #PF storm)
    kvm.write(PF_HANDLER_GPA, b"\x2e\xff\x06" + struct.pack("<H", PF_COUNT_GPA)
              + b"\x2e\x83\x3e" + struct.pack("<HB", PF_COUNT_GPA, STORM_FAULTS)
              + b"\x73\x01\xcf\xf4")
    kvm.write(GP_HANDLER_GPA, b"\xb8" + struct.pack("<H", GP_MARK) + b"\xf4")
    kvm.write(13 * 4, struct.pack("<HH", GP_HANDLER_GPA, 0))
    kvm.write(14 * 4, struct.pack("<HH", PF_HANDLER_GPA, 0))
    kvm.write(CR0_CODE_GPA, b"\x0f\x20\xc0\x0f\x22\xc0\xf4")


def heki_scenario(kvm: Kvm, manifest: dict, hypercall, touch_delay: float) -> None:
    """A Heki guest on the Heki-v2-compatible test host.

    Pins CR0.WP and CR4 SMEP|SMAP, protects text r-x immutable, rodata r-- immutable and
    data rw- with a chained list (a full 169-entry head page, then a tail page), then
    tries to relax an immutable rodata page (-EPERM) and sends two lists the host must
    refuse with -KVM_EINVAL (npages beyond a page, a self loop). After ``touch_delay``:
    writes its rodata until STORM_FAULTS #PFs were injected, writes data (allowed),
    writes CR0 without the pinned WP (#GP), and the VMM sets Heki bits on a range with
    KVM_SET_MEMORY_ATTRIBUTES, which no hypercall asked for.
    """
    rx_i = MEM_ATTR_READ | MEM_ATTR_EXEC | MEM_ATTR_IMMUTABLE
    r_i = MEM_ATTR_READ | MEM_ATTR_IMMUTABLE
    rw = MEM_ATTR_READ | MEM_ATTR_WRITE
    full = [(SLOT1_GPA + i * PAGE, SLOT1_GPA + (i + 1) * PAGE,
             MEM_ATTR_READ if i % 2 == 0 else rw) for i in range(ENTRIES_PER_PAGE - 1)]
    full.append((DATA[0], DATA[1], rw))
    tail = [(TEXT[0], TEXT[1], rx_i), (RODATA[0], RODATA[1], r_i)]
    requests = []

    def put(name, head, pages, expect):
        for gpa, nxt, entries, npages in pages:
            kvm.write(gpa, page_list(nxt, entries, npages))
        requests.append({"name": name, "head_gpa": head, "expect": expect,
                         "pages": [{"gpa": g, "next_pa": n, "npages":
                                    len(e) if np is None else np, "entries": e}
                                   for g, n, e, np in pages]})
    put("valid", VALID_HEAD, [(VALID_HEAD, VALID_TAIL, full, None),
                              (VALID_TAIL, 0, tail, None)], "applied")
    put("relax_immutable", RELAX_LIST,
        [(RELAX_LIST, 0, [(RODATA[0], RODATA[0] + PAGE, rw)], None)], "eperm")
    put("oversize_npages", OVERSIZE_LIST,
        [(OVERSIZE_LIST, 0, [(SLOT1_GPA + 0xE2000, SLOT1_GPA + 0xE3000, r_i)],
          OVERSIZE_NPAGES)], "einval")
    put("self_loop", LOOP_LIST, [(LOOP_LIST, LOOP_LIST,
                                  [(SLOT1_GPA + 0xE0000, SLOT1_GPA + 0xE1000, r_i)], None)],
        "einval")
    manifest["requests"] = requests
    hypercall(LOCK_CR_UPDATE, 0, 0, 1, 0, "cr_version")
    hypercall(LOCK_CR_UPDATE, 4, CR4_SMEP | CR4_SMAP, 0, 0, "lock_cr4")
    hypercall(LOCK_CR_UPDATE, 0, CR0_WP, 0, 0, "lock_cr0")
    for req in requests:
        hypercall(PROTECT_MEMORY, req["head_gpa"], 0, 0, 0, req["name"])
    time.sleep(touch_delay)
    kvm.write(PF_COUNT_GPA, b"\0\0")
    t = time.time()
    kvm.run(WRITE_CODE_GPA, ds_base=RODATA[0], regs=(0x5a, 0))
    count = struct.unpack("<H", kvm.read(PF_COUNT_GPA, 2))[0]
    manifest["touches"].append({"kind": "write_storm", "gpa": RODATA[0], "pf_injected": count,
                                "seconds": round(time.time() - t, 3),
                                "unchanged": kvm.read(RODATA[0], 1) == b"\xf4"})
    kvm.write(PF_COUNT_GPA, b"\0\0")
    kvm.run(WRITE_CODE_GPA, ds_base=DATA[0], regs=(0x5a, 0))
    manifest["touches"].append({"kind": "write", "gpa": DATA[0],
                                "pf_injected": struct.unpack("<H", kvm.read(PF_COUNT_GPA,
                                                                            2))[0],
                                "written": kvm.read(DATA[0], 1) == b"\x5a"})
    rax = kvm.run(CR0_CODE_GPA, regs=(0, 0))
    manifest["touches"].append({"kind": "cr0_write_without_wp",
                                "gp_injected": rax & 0xffff == GP_MARK})
    gpa, pages = VMM_ATTR
    manifest["attr_ioctls"].append({"gpa": gpa, "size": pages * PAGE,
                                    "attributes": VMM_ATTR_VALUE,
                                    "result": kvm.set_memory_attributes(gpa, pages * PAGE,
                                                                        VMM_ATTR_VALUE)})


def private_scenario(args, t0: float) -> int:
    """A KVM_X86_SW_PROTECTED_VM guest whose one memslot is backed by guest_memfd: the
    VMM makes a range private and shared again, then the L2 asks for a page to become
    private with KVM_HC_MAP_GPA_RANGE (an exit to the VMM, which sets PRIVATE) and
    writes it."""
    kvm = Kvm(1)
    manifest: dict = {"pid": os.getpid(), "name": args.name.split("guest=")[-1].split(",")[0],
                      "uuid": args.uuid, "vm_type": 1, "hypercalls": [], "touches": [],
                      "attr_ioctls": [], "map_gpa_exits": []}
    kvm.add_gmem_slot(SLOT0_GPA, SLOT0_SIZE)
    manifest["memslots"] = kvm.slots
    kvm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    kvm.create_vcpu()
    kvm.write(MAP_GPA_CODE_GPA, b"\x0f\x01\xd9\x88\x04\xf4")  # vmmcall; mov [si],al; hlt
    time.sleep(args.touch_delay)

    def attrs(gpa: int, size: int, value: int, why: str) -> int:
        r = kvm.set_memory_attributes(gpa, size, value)
        manifest["attr_ioctls"].append({"gpa": gpa, "size": size, "attributes": value,
                                        "result": r, "why": why})
        return r
    gpa, size = PRIVATE_VMM
    attrs(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE, "vmm")
    attrs(gpa, size, 0, "vmm")

    def on_exit(reason: int, run_map) -> bool:
        if reason != KVM_EXIT_HYPERCALL:
            return False
        nr, a0, a1, a2 = struct.unpack_from("<4Q", run_map, 32)
        value = KVM_MEMORY_ATTRIBUTE_PRIVATE if a2 & KVM_MAP_GPA_RANGE_ENCRYPTED else 0
        r = attrs(a0, a1 * PAGE, value, "map_gpa_range")
        manifest["map_gpa_exits"].append({"nr": nr, "gpa": a0, "npages": a1, "attrs": a2,
                                          "result": r})
        struct.pack_into("<Q", run_map, 88, 0 if r == 0 else (-KVM_EINVAL) & (2**64 - 1))
        return True
    rax = kvm.run(MAP_GPA_CODE_GPA, ds_base=PRIVATE_L2,
                  regs=(KVM_HC_MAP_GPA_RANGE, PRIVATE_L2, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, 0),
                  on_exit=on_exit)
    manifest["hypercalls"].append({"what": "map_gpa_range", "nr": KVM_HC_MAP_GPA_RANGE,
                                   "a0": PRIVATE_L2, "a1": 1,
                                   "a2": KVM_MAP_GPA_RANGE_ENCRYPTED, "a3": 0,
                                   "ret32": rax & 0xffffffff})
    manifest["touches"].append({"kind": "write_private", "gpa": PRIVATE_L2})
    return finish(manifest, args, t0)


def finish(manifest: dict, args, t0: float) -> int:
    manifest["seconds"] = time.time() - t0
    tmp = args.manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.rename(tmp, args.manifest)
    if args.hold:
        print("HOLDING", flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
