"""A tiny VMM for tests: a real KVM VM with memslots backed by this process's memory.

The test process becomes the VMM the capture watches: its ioctls go through the real
``syscalls:sys_{enter,exit}_ioctl`` tracepoints, and a BPF program run with
BPF_PROG_TEST_RUN in this process reads "guest memory" from it exactly as it would read a
real VMM's (docs/kernel-support.md section 3). No vCPU is created: nothing here needs to
run guest code.

    with Vmm() as vm:
        slot = vm.add_memslot(gpa=0x100000, size_bytes=1 << 20)
        vm.write_gpa(0x100000, b"...")                  # guest memory = our mmap
        gpa = vm.write_heki_list(0x100000, entries)     # Heki v2 page-list chain
        err = vm.set_memory_attributes(0x100000, 4096, 1 << 3)   # -errno or 0

Addresses are guest-physical bytes (``gpa``); ``hva`` is this process's address.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

from hekitrace.capture import kvm_uapi

PAGE = 4096
HEKI_MAX_ENTRIES = 169
_LIST_HEADER = struct.Struct("<QQQ")     # struct heki_page_list: next, next_pa, npages
_ENTRY = struct.Struct("<QQQ")           # struct heki_pages: pa, epa, permissions


@dataclass
class Slot:
    slot: int
    gpa: int
    size_bytes: int
    hva: int
    memory: mmap.mmap
    flags: int = 0


class Vmm:
    """One VM (``KVM_CREATE_VM``) and its memslots; close() releases everything."""

    def __init__(self, dev: str = "/dev/kvm") -> None:
        self.kvm_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        self.vm_fd = fcntl.ioctl(self.kvm_fd, kvm_uapi.KVM_CREATE_VM, 0)
        self.slots: dict[int, Slot] = {}

    def __enter__(self) -> Vmm:  # noqa: PYI034 (typing.Self needs 3.11 callers only; keep it plain)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_memslot(self, gpa: int, size_bytes: int, slot: int | None = None,
                    flags: int = 0) -> Slot:
        """Back [gpa, gpa + size_bytes) with fresh anonymous memory
        (KVM_SET_USER_MEMORY_REGION). Raises OSError if KVM refuses."""
        if slot is None:
            slot = max(self.slots, default=-1) + 1
        memory = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        hva = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        region = kvm_uapi.USERSPACE_MEMORY_REGION.pack(slot, flags, gpa, size_bytes, hva)
        fcntl.ioctl(self.vm_fd, kvm_uapi.KVM_SET_USER_MEMORY_REGION, region)
        s = Slot(slot, gpa, size_bytes, hva, memory, flags)
        self.slots[slot] = s
        return s

    def delete_memslot(self, slot: int) -> None:
        """Size 0 deletes the slot in KVM (the memory stays mapped until close)."""
        s = self.slots[slot]
        region = kvm_uapi.USERSPACE_MEMORY_REGION.pack(slot, s.flags, s.gpa, 0, s.hva)
        fcntl.ioctl(self.vm_fd, kvm_uapi.KVM_SET_USER_MEMORY_REGION, region)

    def _locate(self, gpa: int, length: int) -> tuple[Slot, int]:
        for s in self.slots.values():
            if s.gpa <= gpa and gpa + length <= s.gpa + s.size_bytes:
                return s, gpa - s.gpa
        raise ValueError(f"gpa {gpa:#x}+{length} is in no memslot")

    def write_gpa(self, gpa: int, data: bytes) -> None:
        s, off = self._locate(gpa, len(data))
        s.memory[off:off + len(data)] = data

    def read_gpa(self, gpa: int, length: int) -> bytes:
        s, off = self._locate(gpa, length)
        return bytes(s.memory[off:off + length])

    def write_list_page(self, gpa: int, entries: list[tuple[int, int, int]], next_pa: int = 0,
                        npages: int | None = None, next_va: int = 0) -> None:
        """Write one ``struct heki_page_list`` page at ``gpa`` (page aligned).
        ``npages`` defaults to len(entries); pass a larger value to lie like a hostile guest."""
        if len(entries) > HEKI_MAX_ENTRIES:
            raise ValueError(f"{len(entries)} entries do not fit one list page (max 169)")
        page = bytearray(PAGE)
        _LIST_HEADER.pack_into(page, 0, next_va, next_pa,
                               len(entries) if npages is None else npages)
        for i, e in enumerate(entries):
            _ENTRY.pack_into(page, 24 + 24 * i, *e)
        self.write_gpa(gpa, bytes(page))

    def write_heki_list(self, page_gpas: list[int], entries: list[tuple[int, int, int]]) -> int:
        """Spread ``entries`` (pa, epa, permissions) over list pages at ``page_gpas``,
        chained head -> next by next_pa, 169 per page; returns the head GPA (a0 of
        PROTECT_MEMORY). Entries come back in this order from a correct walk."""
        chunks = [entries[i:i + HEKI_MAX_ENTRIES]
                  for i in range(0, len(entries), HEKI_MAX_ENTRIES)] or [[]]
        if len(chunks) > len(page_gpas):
            raise ValueError(f"{len(entries)} entries need {len(chunks)} list pages, "
                             f"{len(page_gpas)} given")
        for i, chunk in enumerate(chunks):
            nxt = page_gpas[i + 1] if i + 1 < len(chunks) else 0
            self.write_list_page(page_gpas[i], chunk, next_pa=nxt)
        return page_gpas[0]

    def set_memory_attributes(self, address: int, size_bytes: int, attributes: int,
                              flags: int = 0) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES on the VM fd: 0 or the kernel's -errno."""
        arg = kvm_uapi.MEMORY_ATTRIBUTES.pack(address, size_bytes, attributes, flags)
        try:
            fcntl.ioctl(self.vm_fd, kvm_uapi.KVM_SET_MEMORY_ATTRIBUTES, arg)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def close(self) -> None:
        for fd in (getattr(self, "vm_fd", -1), getattr(self, "kvm_fd", -1)):
            if fd >= 0:
                os.close(fd)
        self.vm_fd = self.kvm_fd = -1
        for s in self.slots.values():
            try:
                s.memory.close()
            except BufferError:
                pass   # a ctypes view still points at it; freed with the process
        self.slots.clear()
