"""KVM ioctl numbers and UAPI struct layouts, derived with their formulas.

A leaf shared by capture (which filters these ioctls in the kernel) and the tests (whose
tiny VMM issues them). Numbers are computed from ``_IOC`` exactly as
``include/uapi/asm-generic/ioctl.h`` does, from the struct sizes declared here, so a wrong
size shows up as a wrong number in ``tests/unit/test_records.py`` rather than as a filter
that silently never matches. Sources: include/uapi/linux/kvm.h (v6.12; docs/heki-abi.md section 9).
"""

from __future__ import annotations

import struct

# include/uapi/asm-generic/ioctl.h (x86 uses the generic layout)
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


KVMIO = 0xAE

#: struct kvm_userspace_memory_region { __u32 slot; __u32 flags; __u64 guest_phys_addr;
#:                                      __u64 memory_size; __u64 userspace_addr; }
USERSPACE_MEMORY_REGION = struct.Struct("<IIQQQ")
#: struct kvm_userspace_memory_region2 { same 5 fields; __u64 guest_memfd_offset;
#:     __u32 guest_memfd; __u32 pad1; __u64 pad2[14]; }
USERSPACE_MEMORY_REGION2 = struct.Struct("<IIQQQQII14Q")
#: struct kvm_memory_attributes { __u64 address; __u64 size; __u64 attributes; __u64 flags; }
MEMORY_ATTRIBUTES = struct.Struct("<QQQQ")

KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_SET_USER_MEMORY_REGION = _iow(KVMIO, 0x46, USERSPACE_MEMORY_REGION.size)
KVM_SET_USER_MEMORY_REGION2 = _iow(KVMIO, 0x49, USERSPACE_MEMORY_REGION2.size)
KVM_SET_MEMORY_ATTRIBUTES = _iow(KVMIO, 0xD2, MEMORY_ATTRIBUTES.size)

#: KVM_CHECK_EXTENSION capabilities (include/uapi/linux/kvm.h)
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_VM_TYPES = 235

KVM_API_VERSION = 12
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

#: name -> number of every ioctl the capture watches (the -D constants of bpf/ioctl.c)
WATCHED_IOCTLS: dict[str, int] = {
    "KVM_CREATE_VM": KVM_CREATE_VM,
    "KVM_SET_USER_MEMORY_REGION": KVM_SET_USER_MEMORY_REGION,
    "KVM_SET_USER_MEMORY_REGION2": KVM_SET_USER_MEMORY_REGION2,
    "KVM_SET_MEMORY_ATTRIBUTES": KVM_SET_MEMORY_ATTRIBUTES,
}
