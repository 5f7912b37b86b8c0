"""The typed events every part of hekitrace speaks.

Live capture, recorded traces and the simulator all produce these records, and
everything downstream (state, rules, sinks) consumes only them (docs/internals.md, principle 1).
They are NamedTuples rather than dataclasses because one is built per kernel record on
the hot path: a NamedTuple costs about a third of a frozen dataclass to create.

Common fields, first in every event:

``time_ns``
    Nanoseconds since the Unix epoch (capture converts the kernel's boot-time clock once
    per batch). Traces keep this value, so replays are deterministic.
``tgid``
    Process id of the VMM that owns the VM (0 when unknown, e.g. some ``lost`` events).
    One VM per VMM process is assumed; a VM is identified by (tgid, creation time).
``tid``
    Thread that triggered the event (a vCPU thread for hypercalls and faults).

Addresses are guest-physical (``gpa``, bytes) or guest frame numbers (``gfn``, 4 KiB
pages), as each field name says. Guest-controlled values are kept verbatim, however
absurd: deciding what is malformed is the state's and the rules' job, not the decoder's.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class EventKind(IntEnum):
    """Stable numeric kind of each event (used by the trace format; never renumber)."""

    VM_CREATED = 1
    VM_DESTROYED = 2
    MEMSLOT = 3
    HYPERCALL = 4
    PROTECT_REQUEST = 5
    CR_PIN_REQUEST = 6
    ATTR_APPLIED = 7
    ATTR_IOCTL = 8
    FAULT = 9
    CR_WRITE = 10
    LOST = 11


class ProtectFlags(IntFlag):
    """Why a page-list walk was cut short or looked wrong (set by the BPF walker)."""

    NONE = 0
    TRUNCATED = 1 << 0        # more pages in the chain than the configured maximum
    LOOP = 1 << 1             # next_pa pointed back to a page already read
    OUTSIDE_MEMSLOT = 1 << 2  # a list page's GPA lies in no known memslot
    NPAGES_OVERSIZE = 1 << 3  # a page declared more than 169 entries; cut at 169
    READ_FAULT = 1 << 4       # bpf_probe_read_user failed on the VMM's memory
    MISALIGNED_LIST = 1 << 5  # a list page GPA that is not page aligned
    LOST_PAGES = 1 << 6       # some page records of this request were dropped in transit


class FaultAccess(IntFlag):
    """Vendor-neutral access type of a nested page fault (decoded from the error code)."""

    NONE = 0
    READ = 1 << 0
    WRITE = 1 << 1
    FETCH = 1 << 2


class VmCreated(NamedTuple):
    """A VM was created (uevent, ``KVM_CREATE_VM`` ioctl, start-up discovery or sim).

    ``stats_path`` is the debugfs path (``/kvm/<pid>-<fd>``); ``name``, ``uuid`` and
    ``vmm`` come from the VMM command line where capture could read it ("" otherwise).
    ``source`` says which of the producers saw it; ``preexisting`` is True for VMs found
    running at start-up (their history before that moment is unknown).
    """

    time_ns: int
    tgid: int
    tid: int
    vm_fd: int = -1
    stats_path: str = ""
    name: str = ""
    uuid: str = ""
    vmm: str = ""
    source: str = ""
    preexisting: bool = False


class VmDestroyed(NamedTuple):
    """The last reference to a VM was dropped (uevent ``EVENT=destroy``)."""

    time_ns: int
    tgid: int
    tid: int
    stats_path: str = ""


class Memslot(NamedTuple):
    """``KVM_SET_USER_MEMORY_REGION(2)`` succeeded: slot ``slot`` now maps
    ``size_bytes`` at guest-physical ``gpa`` to VMM address ``hva`` (size 0 deletes it)."""

    time_ns: int
    tgid: int
    tid: int
    slot: int
    flags: int
    gpa: int
    size_bytes: int
    hva: int


class Hypercall(NamedTuple):
    """A hypercall other than the Heki ones (those become the events below).

    ``nr`` and ``a0``..``a3`` exactly as ``kvm:kvm_hypercall`` reports them.
    """

    time_ns: int
    tgid: int
    tid: int
    nr: int
    a0: int
    a1: int
    a2: int
    a3: int


class ProtectEntry(NamedTuple):
    """One ``struct heki_pages`` entry: [gpa, end_gpa) gets guest permission bits
    ``permissions`` (``MEM_ATTR_*``). Values are verbatim guest input."""

    gpa: int
    end_gpa: int
    permissions: int


class ProtectRequest(NamedTuple):
    """A ``KVM_HC_PROTECT_MEMORY`` hypercall with its page list as read from the VMM.

    ``entries`` are in the order they were read (list page by list page, head first);
    the host applies them in reverse (docs/heki-abi.md section 4), which is the state's concern.
    ``pages`` is the number of list pages read; ``flags`` are :class:`ProtectFlags`.
    ``declared_entries`` sums the guest's ``npages`` fields before any cut.
    """

    time_ns: int
    tgid: int
    tid: int
    list_gpa: int
    entries: tuple[ProtectEntry, ...]
    pages: int = 1
    flags: int = 0
    declared_entries: int = 0


class CrPinRequest(NamedTuple):
    """A ``KVM_HC_LOCK_CR_UPDATE`` hypercall: pin ``mask`` in control register ``cr``."""

    time_ns: int
    tgid: int
    tid: int
    cr: int
    mask: int
    flags: int


class AttrApplied(NamedTuple):
    """``kvm_arch_post_set_memory_attributes`` ran: gfns [gfn_start, gfn_end) now hold
    exactly ``attributes`` (KVM attribute bits, e.g. PRIVATE=bit 3, HEKI_*=bits 4-7)."""

    time_ns: int
    tgid: int
    tid: int
    gfn_start: int
    gfn_end: int
    attributes: int


class AttrIoctl(NamedTuple):
    """``KVM_SET_MEMORY_ATTRIBUTES`` from the VMM, with the kernel's ``result``
    (0 or a negative errno)."""

    time_ns: int
    tgid: int
    tid: int
    address: int
    size_bytes: int
    attributes: int
    flags: int
    result: int


class Fault(NamedTuple):
    """Write or fetch fault(s) on one protected page, ``count`` of them since
    ``first_ns`` (storms are collapsed in the kernel). ``error_code`` is raw (VMX exit
    qualification or SVM #NPF bits); ``access`` is the decoded :class:`FaultAccess`."""

    time_ns: int
    tgid: int
    tid: int
    vcpu: int
    gpa: int
    error_code: int
    rip: int
    access: int
    # the field shadows tuple.count(); the name is the contract's (docs/internals.md)
    count: int = 1  # type: ignore[assignment]
    first_ns: int = 0


class CrWrite(NamedTuple):
    """A guest write to CR0 or CR4 that KVM intercepted (``kvm:kvm_cr``, rw=1)."""

    time_ns: int
    tgid: int
    tid: int
    cr: int
    value: int


class Lost(NamedTuple):
    """``count`` events were lost at ``stage`` (e.g. ``ring:control``, ``ring:telemetry``,
    ``queue``, ``decode``) for ``reason``; ``tgid`` 0 when the VM is unknown.
    ``hook`` names the producing hook where known."""

    time_ns: int
    tgid: int
    tid: int
    stage: str
    reason: str
    count: int  # type: ignore[assignment]  # shadows tuple.count(), as in Fault
    hook: str = ""


Event = (VmCreated | VmDestroyed | Memslot | Hypercall | ProtectRequest | CrPinRequest
         | AttrApplied | AttrIoctl | Fault | CrWrite | Lost)

#: event class -> kind, and the snake_case name used in JSON (docs/internals.md, Event kinds)
KIND_OF: dict[type, EventKind] = {
    VmCreated: EventKind.VM_CREATED,
    VmDestroyed: EventKind.VM_DESTROYED,
    Memslot: EventKind.MEMSLOT,
    Hypercall: EventKind.HYPERCALL,
    ProtectRequest: EventKind.PROTECT_REQUEST,
    CrPinRequest: EventKind.CR_PIN_REQUEST,
    AttrApplied: EventKind.ATTR_APPLIED,
    AttrIoctl: EventKind.ATTR_IOCTL,
    Fault: EventKind.FAULT,
    CrWrite: EventKind.CR_WRITE,
    Lost: EventKind.LOST,
}
CLASS_OF: dict[EventKind, type] = {kind: cls for cls, kind in KIND_OF.items()}
NAME_OF: dict[type, str] = {cls: kind.name.lower() for cls, kind in KIND_OF.items()}
CLASS_BY_NAME: dict[str, type] = {name: cls for cls, name in NAME_OF.items()}


def event_name(event: Event) -> str:
    """The snake_case kind name of ``event`` (``vm_created``, ``protect_request``...)."""
    return NAME_OF[type(event)]
