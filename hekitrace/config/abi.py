"""Heki ABI profiles: hypercall numbers and attribute bits, as data.

Heki was never merged and its numbers moved between RFC versions (docs/heki-abi.md sections 2-3):
v1 used 13 for LOCK_MEM_PAGE_RANGES and 14 for LOCK_CR_UPDATE, v2 13 for LOCK_CR_UPDATE
and 14 for PROTECT_MEMORY, v3 kept only LOCK_CR_UPDATE=13. A monitor must therefore be
told which build the host runs; the profile is chosen in the config.

This module is a leaf: it knows the numbers and how to name attribute values, nothing
about events or state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: upstream include/uapi/linux/kvm_para.h (v6.12): KVM_HC_MAP_GPA_RANGE
KVM_HC_MAP_GPA_RANGE = 12
#: upstream include/uapi/linux/kvm_para.h: returned by KVM for an unknown hypercall
KVM_ENOSYS = 1000

#: Heki v2 struct heki_page_list: (4096 - 24-byte header) / 24-byte entries
#: (docs/heki-abi.md section 4)
HEKI_MAX_ENTRIES_PER_PAGE = 169

# x86 control-register bits that Heki may pin (docs/heki-abi.md section 7, processor-flags.h)
CR_BIT_NAMES: dict[int, dict[int, str]] = {
    0: {16: "WP"},
    4: {11: "UMIP", 16: "FSGSBASE", 20: "SMEP", 21: "SMAP", 23: "CET", 32: "FRED"},
}


def cr_bit_names(cr: int, mask: int) -> list[str]:
    """Names like ``CR4.SMEP`` for each set bit of ``mask``; unknown bits as ``CR4.bit5``."""
    known = CR_BIT_NAMES.get(cr, {})
    names = []
    for bit in range(64):
        if mask >> bit & 1:
            names.append(f"CR{cr}.{known.get(bit, f'bit{bit}')}")
    return names


@dataclass(frozen=True)
class AbiProfile:
    """Hypercall numbers and attribute-bit positions of one Heki build.

    ``lock_cr_update`` / ``protect_memory`` / ``lock_mem_page_ranges`` are hypercall
    numbers (None when that build has no such call). ``guest_*`` are bit positions of the
    guest ABI (``MEM_ATTR_*``), ``kvm_*`` those of KVM's internal attributes
    (``KVM_MEMORY_ATTRIBUTE_HEKI_*``, ``KVM_MEMORY_ATTRIBUTE_PRIVATE``). ``mbec`` says
    whether the host enforces kernel-exec permissions; without it Heki v2 silently adds
    EXEC back to every request (always the case on AMD).
    """

    name: str
    lock_cr_update: int | None
    protect_memory: int | None
    lock_mem_page_ranges: int | None = None
    map_gpa_range: int | None = KVM_HC_MAP_GPA_RANGE
    guest_read: int = 0
    guest_write: int = 1
    guest_exec: int = 2
    guest_immutable: int = 3
    kvm_private: int = 3
    kvm_read: int = 4
    kvm_write: int = 5
    kvm_exec: int = 6
    kvm_immutable: int = 7
    mbec: bool = False
    max_entries_per_page: int = HEKI_MAX_ENTRIES_PER_PAGE
    extra: dict = field(default_factory=dict, compare=False)

    # -- derived masks -----------------------------------------------------------------
    @property
    def guest_valid_mask(self) -> int:
        """``MEM_ATTR_PROT``: every guest permission bit the host accepts."""
        return ((1 << self.guest_read) | (1 << self.guest_write) | (1 << self.guest_exec)
                | (1 << self.guest_immutable))

    @property
    def kvm_heki_mask(self) -> int:
        """The KVM attribute bits a PROTECT_MEMORY request may change (its set mask)."""
        return ((1 << self.kvm_read) | (1 << self.kvm_write) | (1 << self.kvm_exec)
                | (1 << self.kvm_immutable))

    @property
    def kvm_private_mask(self) -> int:
        return 1 << self.kvm_private

    def hypercall_numbers(self) -> dict[str, int]:
        """Name -> number of every hypercall this profile decodes."""
        numbers = {
            "lock_cr_update": self.lock_cr_update,
            "protect_memory": self.protect_memory,
            "lock_mem_page_ranges": self.lock_mem_page_ranges,
            "map_gpa_range": self.map_gpa_range,
        }
        return {name: nr for name, nr in numbers.items() if nr is not None}

    def guest_to_kvm(self, permissions: int) -> int:
        """Translate guest ``MEM_ATTR_*`` bits to KVM ``HEKI_*`` bits (heki_attr_to_kvm_attr)."""
        out = 0
        for guest_bit, kvm_bit in ((self.guest_read, self.kvm_read),
                                   (self.guest_write, self.kvm_write),
                                   (self.guest_exec, self.kvm_exec),
                                   (self.guest_immutable, self.kvm_immutable)):
            if permissions >> guest_bit & 1:
                out |= 1 << kvm_bit
        return out

    def attr_flags(self, attributes: int) -> str:
        """Short flags for KVM attribute bits: ``r-x I``, ``rw-``, ``rwx P``, ``none``.

        ``none`` is 0, no attribute at all. A Heki host treats such a page as RWX
        (kvm_permissions_get), but it is shown apart from an explicit RWX: "the guest
        asked for RWX" and "nobody set anything" are different facts.
        """
        if attributes == 0:
            return NO_ATTRIBUTE
        heki = attributes & self.kvm_heki_mask
        if heki:
            rwx = ("r" if attributes >> self.kvm_read & 1 else "-") + \
                  ("w" if attributes >> self.kvm_write & 1 else "-") + \
                  ("x" if attributes >> self.kvm_exec & 1 else "-")
        else:
            rwx = "rwx"
        extra = ""
        if attributes >> self.kvm_immutable & 1:
            extra += "I"
        if attributes & self.kvm_private_mask:
            extra += "P"
        unknown = attributes & ~(self.kvm_heki_mask | self.kvm_private_mask)
        if unknown:
            extra += f"?{unknown:#x}"
        return f"{rwx} {extra}" if extra else rwx

    def attr_class(self, attributes: int) -> str:
        """A bounded class name for metrics and legends: ``r-x_immutable``, ``rw-``,
        ``default`` (no attribute: RWX), ``private``, ``private_r--``, ``unknown``.

        At most 2 x 16 Heki combinations plus ``unknown``, so safe as a label value.
        """
        if attributes == 0:
            return "default"
        if attributes & ~(self.kvm_heki_mask | self.kvm_private_mask):
            return "unknown"
        parts = []
        if attributes & self.kvm_private_mask:
            parts.append("private")
        if attributes & self.kvm_heki_mask:
            rwx = ("r" if attributes >> self.kvm_read & 1 else "-") + \
                  ("w" if attributes >> self.kvm_write & 1 else "-") + \
                  ("x" if attributes >> self.kvm_exec & 1 else "-")
            if attributes >> self.kvm_immutable & 1:
                rwx += "_immutable"
            parts.append(rwx)
        return "_".join(parts)


#: the flags of a page with no attribute at all
NO_ATTRIBUTE = "none"


HEKI_V1 = AbiProfile(name="heki-v1", lock_cr_update=14, protect_memory=None,
                     lock_mem_page_ranges=13)
HEKI_V2 = AbiProfile(name="heki-v2", lock_cr_update=13, protect_memory=14)
HEKI_V3 = AbiProfile(name="heki-v3", lock_cr_update=13, protect_memory=None)

BUILTIN_PROFILES: dict[str, AbiProfile] = {p.name: p for p in (HEKI_V1, HEKI_V2, HEKI_V3)}
DEFAULT_PROFILE = HEKI_V2
