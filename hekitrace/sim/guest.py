"""One simulated Heki v2 guest and the host's handling of its hypercalls (:class:`SimVm`).

The host model is the part hekitrace is checked against, so it follows KVM where it
matters (docs/heki-abi.md sections 4-7 and 12): entries are applied in reverse order; alignment,
permission bits and ``end > start`` are checked (-EINVAL), immutability too (-EPERM, the
range applies nothing); it stops at the first error, skips ranges that already match,
re-adds EXEC without MBEC, and reports each applied range once per memslot it touches
(``AttrApplied``), as ``kvm_handle_gfn_range`` calls
``kvm_arch_post_set_memory_attributes``. Scenarios that drive it are in hekitrace.sim.scenarios.
"""

from __future__ import annotations

import random
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import replace

from hekitrace.config.abi import HEKI_V2, KVM_HC_MAP_GPA_RANGE, AbiProfile
from hekitrace.sim.page_lists import KernelLayout, RangeMap, build_page_list, load_layout
from hekitrace.state.events import (
    PAGE_SIZE,
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Event,
    Fault,
    FaultAccess,
    Hypercall,
    Memslot,
    ProtectEntry,
    ProtectFlags,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)

#: 2026-11-25T15:00:00Z: the default start of simulated traces (any fixed value would do)
DEFAULT_START_NS = 1_795_618_800 * 1_000_000_000
GIB = 1 << 30
MIB = 1 << 20

# x86 control registers (arch/x86/include/uapi/asm/processor-flags.h)
X86_CR0_WP = 1 << 16
X86_CR4_UMIP, X86_CR4_FSGSBASE, X86_CR4_SMEP, X86_CR4_SMAP, X86_CR4_CET = (
    1 << 11, 1 << 16, 1 << 20, 1 << 21, 1 << 23)
X86_CR4_PGE = 1 << 7
#: PE|MP|ET|NE|WP|AM|PG: a booted x86-64 Linux guest's CR0
GUEST_CR0 = 0x80050033
#: PSE|PAE|MCE|PGE|OSFXSR|OSXMMEXCPT|UMIP|FSGSBASE|PCIDE|OSXSAVE|SMEP|SMAP
GUEST_CR4 = 0x370EF0
#: cr4_pinned_mask of Heki v2 (docs/heki-abi.md section 7)
CR4_PINNED_MASK = X86_CR4_SMEP | X86_CR4_SMAP | X86_CR4_UMIP | X86_CR4_FSGSBASE | X86_CR4_CET

# VMX EPT-violation exit qualification bits (SDM 28.3.3.2): access W=1, fetch=2; the
# entry was readable=3, writable=4, executable=5; GLA valid=7, translation=8
EPT_WRITE, EPT_FETCH = 1 << 1, 1 << 2
EPT_READABLE, EPT_WRITABLE, EPT_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
EPT_GLA_VALID = (1 << 7) | (1 << 8)

#: upstream KVM_MEM_GUEST_MEMFD (include/uapi/linux/kvm.h)
KVM_MEM_GUEST_MEMFD = 1 << 2
#: upstream KVM_MAP_GPA_RANGE_ENCRYPTED (include/uapi/linux/kvm_para.h)
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
#: KVM_HC_KICK_CPU, KVM_HC_SEND_IPI: ordinary hypercalls of a busy guest
KVM_HC_KICK_CPU, KVM_HC_SEND_IPI = 5, 10
EINVAL = 22


class SimVm:
    """One simulated VM: its VMM process, a Heki v2 guest kernel and the host's view.

    Methods append the events the host would see to :attr:`events`, advancing a private
    clock; time and random choices come from ``rng`` so runs are reproducible.
    """

    def __init__(self, rng: random.Random, *, name: str, start_ns: int,
                 abi: AbiProfile = HEKI_V2, mbec: bool = True, memory_bytes: int = 4 * GIB,
                 layout: KernelLayout | None = None, vcpus: int = 4,
                 confidential: bool = False) -> None:
        self.rng = rng
        self.abi = replace(abi, mbec=mbec) if abi.mbec != mbec else abi
        self.layout = layout or load_layout()
        self.name = name
        self.tgid = rng.randrange(1000, 4_000_000)
        self.uuid = str(uuid_mod.UUID(int=rng.getrandbits(128), version=4))
        self.vcpus = vcpus
        self.now = start_ns
        self.events: list[Event] = []
        self.attrs = RangeMap()
        self.confidential = confidential
        self.perm = {"r": 1 << abi.guest_read, "w": 1 << abi.guest_write,
                     "x": 1 << abi.guest_exec, "i": 1 << abi.guest_immutable}
        low = min(memory_bytes, 3 * GIB)
        # QEMU pc/q35 layout: conventional memory, RAM from 1 MiB up to the PCI hole at
        # 3 GiB, the rest above 4 GiB
        self.slots = [(0, 0, 0xA0000), (1, 0x100000, low - 0x100000)]
        if memory_bytes > low:
            self.slots.append((2, 4 * GIB, memory_bytes - low))
        self._used: set[int] = set()
        self._list_pool = self._list_pages()
        self.cr4 = GUEST_CR4
        self.modules: list[dict] = []

    # -- helpers ---------------------------------------------------------------------------
    def _tick(self, low_us: float = 5, high_us: float = 2000) -> int:
        self.now += int(self.rng.uniform(low_us, high_us) * 1000)
        return self.now

    def _vcpu_tid(self) -> int:
        return self.tgid + 1 + self.rng.randrange(self.vcpus)

    def _list_pages(self) -> Iterator[int]:
        """GPAs of list pages: kmalloc'd pages in the kernel's data area after _end."""
        gfn = self.layout.image_end_gfn + 64
        while True:
            yield gfn * PAGE_SIZE
            gfn += 1

    def alloc_pages(self, count: int) -> list[int]:
        """``count`` gfns as vmalloc would get them: scattered runs of 1-4 pages in RAM."""
        out: list[int] = []
        # above the kernel image and the list-page pool
        floor = self.layout.image_end_gfn + 8192
        ram = [(max(gpa // PAGE_SIZE, floor), (gpa + size) // PAGE_SIZE)
               for _, gpa, size in self.slots[1:]]
        while len(out) < count:
            lo, hi = self.rng.choice(ram)
            # mostly single pages, sometimes a few physically adjacent ones
            run = min(1 if self.rng.random() < 0.6 else self.rng.randint(2, 4),
                      count - len(out))
            start = self.rng.randrange(lo, hi - run)
            if any(g in self._used for g in range(start, start + run)):
                continue
            for g in range(start, start + run):
                self._used.add(g)
                out.append(g)
        return out

    def free_pages(self, gfns: list[int]) -> None:
        self._used.difference_update(gfns)

    @staticmethod
    def runs(gfns: list[int], perms: int) -> list[tuple[int, int, int]]:
        """(gpa, end_gpa, perms) per page in walk order (heki_add_pa merges them)."""
        return [(g * PAGE_SIZE, (g + 1) * PAGE_SIZE, perms) for g in gfns]

    # -- VMM-side events -------------------------------------------------------------------
    def create(self) -> None:
        fd = 12 + self.rng.randrange(8)
        self.events.append(VmCreated(self._tick(), self.tgid, self.tgid, fd,
                                     f"/kvm/{self.tgid}-{fd}", self.name, self.uuid,
                                     "qemu-system-x86_64", "sim", False))
        hva = 0x7F0000000000 + self.rng.randrange(1 << 16) * (1 << 24)
        flags = KVM_MEM_GUEST_MEMFD if self.confidential else 0
        for slot, gpa, size in self.slots:
            self.events.append(Memslot(self._tick(1, 20), self.tgid, self.tgid, slot, flags,
                                       gpa, size, hva))
            hva += size + (1 << 21)
        if self.confidential:
            # the VMM makes all RAM private before the first vCPU runs
            total = sum(size for _, _, size in self.slots)
            self._set_attributes(0, self.slots[-1][1] + self.slots[-1][2],
                                 self.abi.kvm_private_mask, self.tgid, ioctl_size=total)

    def destroy(self) -> None:
        self.events.append(VmDestroyed(self._tick(), self.tgid, self.tgid,
                                       f"/kvm/{self.tgid}"))

    def _applied(self, gfn_start: int, gfn_end: int, value: int, tid: int) -> None:
        """One AttrApplied per memslot the range touches (kvm_handle_gfn_range)."""
        for _, gpa, size in self.slots:
            lo = max(gfn_start, gpa // PAGE_SIZE)
            hi = min(gfn_end, (gpa + size) // PAGE_SIZE)
            if lo < hi:
                self.events.append(AttrApplied(self._tick(1, 5), self.tgid, tid, lo, hi, value))

    def _set_attributes(self, gpa: int, end_gpa: int, value: int, tid: int, *,
                        ioctl_size: int | None = None) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES from the VMM (upstream, whole-value set)."""
        start, end = gpa // PAGE_SIZE, end_gpa // PAGE_SIZE
        mask = self.abi.kvm_private_mask
        if not all(v & mask == value for _, _, v in self.attrs.segments(start, end)):
            self.attrs.set(start, end, value, mask)
            self._applied(start, end, value, tid)
        self.events.append(AttrIoctl(self._tick(1, 10), self.tgid, tid, gpa,
                                     end_gpa - gpa, value, 0, 0))

    # -- Heki hypercalls -------------------------------------------------------------------
    def lock_cr(self) -> None:
        """End of boot: pin CR0.WP and the pinnable CR4 bits the guest runs with."""
        tid = self._vcpu_tid()
        self.events.append(CrPinRequest(self._tick(), self.tgid, tid, 0, X86_CR0_WP, 0))
        self.events.append(CrPinRequest(self._tick(1, 10), self.tgid, tid, 4,
                                        self.cr4 & CR4_PINNED_MASK, 0))

    def protect(self, ranges: list[tuple[int, int, int]], *, flags: int = 0,
                declared: int | None = None, list_gpa: int | None = None) -> list[str]:
        """A KVM_HC_PROTECT_MEMORY hypercall for ``ranges`` (walk order) and what the host
        then applies; returns the errno names of rejected entries (at most one)."""
        tid = self._vcpu_tid()
        head, entries, pages = build_page_list(ranges, self._list_pool)
        if list_gpa is not None:
            head = list_gpa
        self.events.append(ProtectRequest(self._tick(), self.tgid, tid, head, entries, pages,
                                          flags, len(entries) if declared is None else declared))
        if flags & (ProtectFlags.LOOP | ProtectFlags.NPAGES_OVERSIZE):
            # the RFC host would loop allocating list buffers (-E2BIG) or overrun its
            # buffer: it applies nothing we could model
            return ["E2BIG"]
        return self._host_apply(entries, tid)

    def _host_apply(self, entries: tuple[ProtectEntry, ...], tid: int) -> list[str]:
        abi = self.abi
        valid = abi.guest_valid_mask
        exec_bit = 1 << abi.guest_exec
        immutable = 1 << abi.kvm_immutable
        for gpa, end_gpa, perms in reversed(entries):
            if gpa % PAGE_SIZE or end_gpa % PAGE_SIZE or perms == 0 or perms & ~valid:
                return ["EINVAL"]
            if not abi.mbec and not perms & exec_bit:
                perms |= exec_bit
            start, end = gpa // PAGE_SIZE, end_gpa // PAGE_SIZE
            if end <= start:
                return ["EINVAL"]
            segments = list(self.attrs.segments(start, end))
            if any(v & immutable for _, _, v in segments):
                return ["EPERM"]
            value = abi.guest_to_kvm(perms)
            mask = abi.kvm_heki_mask
            if all(v & mask == value for _, _, v in segments):
                continue  # kvm_range_has_memory_attributes: no hooks run
            self.attrs.set(start, end, value, mask)
            self._applied(start, end, value, tid)
        return []

    def boot(self) -> None:
        """heki_late_init(): lock the CRs, then protect every mapped page (text R_X and
        rodata R__ immutable, everything writable stays mutable RW)."""
        self.now += 2_000_000_000  # firmware and early boot
        self.lock_cr()
        p = self.perm
        text, rodata = self.layout.text, self.layout.rodata
        rw = p["r"] | p["w"]
        # the kernel image splits RAM; everything else the direct map holds is RW
        cuts = ((0, text[0], rw), (text[0], text[1], p["r"] | p["x"] | p["i"]),
                (text[1], rodata[0], rw), (rodata[0], rodata[1], p["r"] | p["i"]),
                (rodata[1], 1 << 52, rw))
        walk: list[tuple[int, int, int]] = []
        for _, gpa, size in self.slots:
            lo, hi = gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE
            for s, e, perms in cuts:
                s, e = max(s, lo), min(e, hi)
                if s < e:
                    walk.append((s * PAGE_SIZE, e * PAGE_SIZE, perms))
        self.protect(walk)

    # -- runtime: what the guest kernel does on purpose (docs/heki-abi.md section 12) ---
    def load_module(self, text_pages: int, ro_pages: int, data_pages: int) -> dict:
        """vmap (RW), then set_memory_ro on rodata and set_memory_rox on text."""
        p = self.perm
        text = self.alloc_pages(text_pages)
        ro = self.alloc_pages(ro_pages)
        data = self.alloc_pages(data_pages)
        rw = p["r"] | p["w"]
        self.protect(self.runs(text + ro + data, rw))
        self.protect(self.runs(ro, p["r"]))
        self.protect(self.runs(text, p["r"] | p["x"]))
        return {"text": text, "ro": ro, "data": data}

    def unload_module(self, module: dict) -> None:
        """set_memory_rw/nx, then vunmap: the pages revert to the default RW."""
        pages = module["text"] + module["ro"] + module["data"]
        self.protect(self.runs(pages, self.perm["r"] | self.perm["w"]))
        self.free_pages(pages)

    def text_poke(self, gfn: int) -> None:
        """Patch one page of module text: writable (not executable) while poked, then
        R_X again. Modelling choice: a W^X flip, never W+X (see docs/trace-format.md)."""
        p = self.perm
        self.protect(self.runs([gfn], p["r"] | p["w"]))
        self._tick(1, 50)
        self.protect(self.runs([gfn], p["r"] | p["x"]))

    def bpf_jit(self, pages: int = 1) -> list[int]:
        """bpf_prog_pack_alloc + text copy + seal: RW while filled, then R_X."""
        p = self.perm
        pack = self.alloc_pages(pages)
        self.protect(self.runs(pack, p["r"] | p["w"]))
        self.protect(self.runs(pack, p["r"] | p["x"]))
        return pack

    def bpf_free(self, pack: list[int]) -> None:
        self.protect(self.runs(pack, self.perm["r"] | self.perm["w"]))
        self.free_pages(pack)

    def other_hypercall(self) -> None:
        nr = self.rng.choice((KVM_HC_KICK_CPU, KVM_HC_SEND_IPI))
        self.events.append(Hypercall(self._tick(1, 100), self.tgid, self._vcpu_tid(), nr,
                                     self.rng.getrandbits(16), self.rng.randrange(self.vcpus),
                                     0, 0))

    def cr4_write(self, value: int | None = None) -> None:
        """A CR4 write KVM intercepts; by default a legitimate PGE flip (TLB flush)."""
        if value is None:
            value = self.cr4 ^ X86_CR4_PGE
        self.events.append(CrWrite(self._tick(), self.tgid, self._vcpu_tid(), 4, value))

    def map_gpa_range(self, gpa: int, pages: int, private: bool) -> None:
        """KVM_HC_MAP_GPA_RANGE from a confidential guest, then the VMM's conversion."""
        tid = self._vcpu_tid()
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0
        self.events.append(Hypercall(self._tick(), self.tgid, tid, KVM_HC_MAP_GPA_RANGE,
                                     gpa, pages, attrs, 0))
        self._set_attributes(gpa, gpa + pages * PAGE_SIZE,
                             self.abi.kvm_private_mask if private else 0, tid)

    # -- attacks -----------------------------------------------------------------------------
    def fault(self, gfn: int, access: FaultAccess, rip: int, count: int) -> None:
        tid = self._vcpu_tid()
        first = self._tick()
        if access == FaultAccess.WRITE:
            code = EPT_WRITE | EPT_READABLE | EPT_EXECUTABLE | EPT_GLA_VALID
        else:
            code = EPT_FETCH | EPT_READABLE | EPT_WRITABLE | EPT_GLA_VALID
        # the guest retries the faulting instruction "again and again": a collapsed storm
        self.now += count * 3000
        self.events.append(Fault(self.now, self.tgid, tid, tid - self.tgid - 1,
                                 gfn * PAGE_SIZE + self.rng.randrange(0, PAGE_SIZE, 8), code,
                                 rip, int(access), count, first))
