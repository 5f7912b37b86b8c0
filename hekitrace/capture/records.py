"""Ring record layouts (the Python half of bpf/hekitrace.h) and the batch decoder.

Each record starts with ``struct hk_hdr``, whose first byte is the record type, so the
decoder dispatches on ``buf[off]`` and unpacks the whole record with one
``Struct.unpack_from``. Layouts are declared as (name, format) field lists beside the C
structs they mirror; ``tests/kernel/test_bpf_layout.py`` compares every field's offset
and size with clang's view of the C header (through bcc's ctypes leaf types) and
``tests/unit/test_records.py`` round-trips them.

C (bpf/hekitrace.h)::

    struct hk_hdr { u8 type; u8 version; u16 reserved; u32 tgid; u32 tid; u32 cpu;
                    u64 time_ns; };                                        // 24 bytes
    struct hk_ioctl_rec { struct hk_hdr hdr; u32 cmd; s32 fd; s64 ret; u64 arg[4]; };  // 72
    struct hk_hypercall_rec { struct hk_hdr hdr; u64 nr, a0, a1, a2, a3; };           // 64
    struct hk_protect_page_rec { struct hk_hdr hdr; u64 call_id; u64 page_gpa; u32 index;
        u32 flags; u64 next_va; u64 next_pa; u64 npages;
        struct hk_heki_pages { u64 pa, epa, permissions; } entries[169]; };          // 4128
    struct hk_protect_end_rec { struct hk_hdr hdr; u64 call_id; u64 list_gpa; u32 pages;
        u32 flags; u64 declared_entries; };                                           // 56
    struct hk_attr_rec { struct hk_hdr hdr; u64 gfn_start, gfn_end, attributes; };     // 48
    struct hk_fault_rec { struct hk_hdr hdr; u32 vcpu; u32 access; u64 gpa;
        u64 error_code; u64 rip; u64 count; u64 first_ns; };                          // 72
    struct hk_cr_rec { struct hk_hdr hdr; u32 cr; u32 reserved; u64 value; };         // 40
    struct hk_loss_key { u32 tgid; u8 ring; u8 hook; u8 reason; u8 reserved; };       // 8

Times in records are the kernel's boot-time clock; the decoder adds one offset per batch
to make them Unix-epoch ns. Guest-controlled values are kept verbatim; a record that is
short or of unknown type is counted in :class:`DecodeStats`, never raised.
"""

from __future__ import annotations

import gc
import struct
from collections.abc import Callable
from itertools import repeat
from typing import Any, NamedTuple

from hekitrace.capture import kvm_uapi
from hekitrace.state.events import (
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Event,
    Fault,
    Hypercall,
    Memslot,
    ProtectEntry,
    VmCreated,
)

REC_IOCTL = 1
REC_HYPERCALL = 2
REC_PROTECT_PAGE = 3
REC_PROTECT_END = 4
REC_ATTR = 5
REC_FAULT = 6
REC_CR = 7

RING_CONTROL = 1
RING_TELEMETRY = 2
RING_NAMES = {0: "kernel", RING_CONTROL: "control", RING_TELEMETRY: "telemetry"}

HOOK_NAMES = {1: "hypercall", 2: "protect_memory", 3: "ioctl", 4: "attr_applied",
              5: "page_fault", 6: "cr", 7: "flood"}
DROP_REASONS = {1: "ring_full", 2: "memslot_table_full", 3: "pending_table_full",
                4: "vm_budget"}

HEKI_MAX_ENTRIES = 169
#: nr of the test-only flood generator's records (bpf/flood.c)
FLOOD_NR = 0xF100D


def _layout(fields: list[tuple[str, str]]) -> tuple[struct.Struct, dict[str, tuple[int, int]]]:
    """Struct for ``fields`` plus name -> (offset, size); names starting with ``_`` are pads."""
    fmt = "<" + "".join(f for _, f in fields)
    offsets = {}
    pos = 0
    for name, f in fields:
        size = struct.calcsize("<" + f)
        offsets[name] = (pos, size)
        pos += size
    return struct.Struct(fmt), offsets


HDR_FIELDS = [("type", "B"), ("version", "B"), ("reserved", "H"), ("tgid", "I"),
              ("tid", "I"), ("cpu", "I"), ("time_ns", "Q")]

#: record name -> field list (header fields prefixed ``hdr.``), mirroring bpf/hekitrace.h
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "hdr": HDR_FIELDS,
    "ioctl": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("cmd", "I"), ("fd", "i"), ("ret", "q"), ("arg", "4Q")],
    "hypercall": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("nr", "Q"), ("a0", "Q"), ("a1", "Q"), ("a2", "Q"), ("a3", "Q")],
    "protect_page": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("call_id", "Q"), ("page_gpa", "Q"), ("index", "I"), ("flags", "I"),
        ("next_va", "Q"), ("next_pa", "Q"), ("npages", "Q"),
        ("entries", f"{HEKI_MAX_ENTRIES * 3}Q")],
    "protect_end": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("call_id", "Q"), ("list_gpa", "Q"), ("pages", "I"), ("flags", "I"),
        ("declared_entries", "Q")],
    "attr": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("gfn_start", "Q"), ("gfn_end", "Q"), ("attributes", "Q")],
    "fault": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("vcpu", "I"), ("access", "I"), ("gpa", "Q"), ("error_code", "Q"), ("rip", "Q"),
        ("count", "Q"), ("first_ns", "Q")],
    "cr": [("hdr." + n, f) for n, f in HDR_FIELDS] + [
        ("cr", "I"), ("reserved", "I"), ("value", "Q")],
    "loss_key": [("tgid", "I"), ("ring", "B"), ("hook", "B"), ("reason", "B"),
                 ("reserved", "B")],
}
STRUCTS = {name: _layout(fields)[0] for name, fields in LAYOUTS.items()}
OFFSETS = {name: _layout(fields)[1] for name, fields in LAYOUTS.items()}
#: C struct name of each layout (bpf/hekitrace.h)
C_NAMES = {"hdr": "hk_hdr", "ioctl": "hk_ioctl_rec", "hypercall": "hk_hypercall_rec",
           "protect_page": "hk_protect_page_rec", "protect_end": "hk_protect_end_rec",
           "attr": "hk_attr_rec", "fault": "hk_fault_rec", "cr": "hk_cr_rec",
           "loss_key": "hk_loss_key"}

_CTYPES: dict[str, type] = {}


def c_struct(name: str) -> type:
    """A ``ctypes.Structure`` of layout ``name`` built from :data:`LAYOUTS`, for readers
    that take ctypes types (bcc's ``table.event``, bench/); header fields nest under
    ``hdr`` as in the C struct. Its size and offsets are those of :data:`STRUCTS`."""
    import ctypes  # only bench/ and tests need it: not imported with the module

    made = _CTYPES.get(name)
    if made is not None:
        return made
    scalar = {"B": ctypes.c_uint8, "H": ctypes.c_uint16, "I": ctypes.c_uint32,
              "i": ctypes.c_int32, "Q": ctypes.c_uint64, "q": ctypes.c_int64}

    def ctype(fmt: str) -> Any:
        count, code = fmt[:-1], fmt[-1]
        return scalar[code] * int(count) if count else scalar[code]

    fields: list[tuple[str, Any]] = []
    for field, fmt in LAYOUTS[name]:
        if field.startswith("hdr."):
            if not fields:
                fields.append(("hdr", c_struct("hdr")))
            continue
        fields.append((field, ctype(fmt)))
    made = type(C_NAMES[name], (ctypes.Structure,), {"_fields_": fields})
    _CTYPES[name] = made
    return made


_IOCTL = STRUCTS["ioctl"]
_HYPERCALL = STRUCTS["hypercall"]
_PAGE_HEAD = struct.Struct(STRUCTS["protect_page"].format[:-len(f"{HEKI_MAX_ENTRIES * 3}Q")])
_END = STRUCTS["protect_end"]
_ATTR = STRUCTS["attr"]
_FAULT = STRUCTS["fault"]
_CR = STRUCTS["cr"]
_ENTRY = struct.Struct("<QQQ")
PAGE_ENTRIES_OFFSET = OFFSETS["protect_page"]["entries"][0]
RECORD_SIZES = {REC_IOCTL: _IOCTL.size, REC_HYPERCALL: _HYPERCALL.size,
                REC_PROTECT_PAGE: STRUCTS["protect_page"].size, REC_PROTECT_END: _END.size,
                REC_ATTR: _ATTR.size, REC_FAULT: _FAULT.size, REC_CR: _CR.size}


class ProtectPage(NamedTuple):
    """One list page of a PROTECT_MEMORY walk (not an event: decode.py assembles these).

    ``entries`` holds min(npages, 169) entries verbatim; ``npages`` is the guest's value.
    """

    time_ns: int
    tgid: int
    tid: int
    call_id: int
    page_gpa: int
    page_index: int
    flags: int
    next_pa: int
    npages: int
    entries: tuple[ProtectEntry, ...]


class ProtectEnd(NamedTuple):
    """End of one PROTECT_MEMORY walk: ``pages`` read, ``flags`` (ProtectFlags)."""

    time_ns: int
    tgid: int
    tid: int
    call_id: int
    list_gpa: int
    pages: int
    flags: int
    declared_entries: int


class DecodeStats:
    """Records the decoder could not turn into events (counted, never raised)."""

    __slots__ = ("failed_ioctl", "short", "unknown_type")

    def __init__(self) -> None:
        self.short = 0
        self.unknown_type = 0
        self.failed_ioctl = 0


class HypercallNumbers(NamedTuple):
    """The ABI profile's hypercall numbers the decoder needs (-1 = none)."""

    lock_cr_update: int = -1

    @classmethod
    def from_profile(cls, abi) -> HypercallNumbers:
        nr = abi.lock_cr_update
        return cls(lock_cr_update=-1 if nr is None else nr)


#: kinds decoded a run at a time (runs of equal records are the ring's common case)
_RUN_KINDS = frozenset({REC_HYPERCALL, REC_FAULT, REC_CR, REC_ATTR})
#: shortest run worth an ``iter_unpack`` (its setup costs about two records)
_MIN_RUN = 4
#: spans checked per run attempt: grows x4 while runs fill it, shrinks when they do not,
#: so a mixed batch costs a few comparisons per record, never a quadratic scan
_MIN_PROBE = 8
_MAX_PROBE = 4096
#: after a failed run attempt, the next one waits 2, 4 ... this many records (a mixed
#: batch then pays almost nothing for run detection; a run found resets it)
_MAX_BACKOFF = 64


# ---------------------------------------------------------------------------------------
# run detection: where a run of equal records starts and how long it is

class _RunFinder:
    """Finds runs of equal records (same type and length, evenly spaced: what the ring
    walker returns for a burst of one hook's records) in one batch's spans.

    A run is checked as a whole at C speed: the spans compared with the ones a run would
    have, the type bytes read in one strided slice. ``next_try`` is the first span index
    worth another attempt (backing off after failures); the caller checks it before
    calling :meth:`length`, so a mixed batch pays one comparison per record.
    """

    __slots__ = ("backoff", "next_try", "probe")

    def __init__(self) -> None:
        self.probe = _MIN_PROBE
        self.next_try = 0
        self.backoff = 1

    def length(self, buf, spans, j: int, off: int, size: int, rtype: int, need: int) -> int:
        """Records in the run that starts at span ``j`` (at ``off``, ``size`` bytes, type
        ``rtype`` whose layout is ``need`` bytes): at least ``_MIN_RUN``, or 0 if none."""
        nspans = len(spans)
        if j + _MIN_RUN > nspans:
            return 0
        step = spans[j + 1][0] - off
        if step <= 0:
            return 0
        k = min(nspans - j, (len(buf) - off) // step, self.probe)
        if k < _MIN_RUN:
            return 0
        # cheap rejection first (mixed batches): the record _MIN_RUN - 1 further on
        far = off + (_MIN_RUN - 1) * step
        if spans[j + _MIN_RUN - 1] != (far, size) or buf[far] != rtype:
            self._missed(j, 0)
            return 0
        expect = list(zip(range(off, off + k * step, step), repeat(size, k)))
        got = spans[j:j + k]
        if got == expect:
            self.probe = min(self.probe * 4, _MAX_PROBE)
        else:
            m = 0
            for one, other in zip(got, expect):
                if one != other:
                    break
                m += 1
            k = m
            self.probe = max(_MIN_PROBE, 2 * m)
        types = bytes(buf[off:off + k * step:step])
        k -= len(types.lstrip(types[:1]))   # cut at the first record of another type
        if k >= _MIN_RUN and step >= need:
            self.backoff = 1
            return k
        # too short: these records go one by one; try again after them
        self._missed(j, k)
        return 0

    def _missed(self, j: int, k: int) -> None:
        self.backoff = min(self.backoff * 2, _MAX_BACKOFF)
        self.next_try = j + max(k, self.backoff)


# ---------------------------------------------------------------------------------------
# per-type decoding: fields named as in the C structs (struct hk_hdr first)

def _run_struct(rtype: int, step: int, cache: dict) -> struct.Struct:
    """Struct of one record of ``rtype`` padded to ``step`` bytes (>= its size)."""
    key = (rtype, step)
    st = cache.get(key)
    if st is None:
        base = _BY_TYPE[rtype]
        st = cache[key] = struct.Struct(base.format + f"{step - base.size}x")
    return st


def _decode_run(rtype: int, values, e: int, lock_cr: int) -> list:
    """Events of a run of ``rtype`` records (``values``: their unpacked field tuples).

    Comprehensions name every field (as the C structs do, header first), so each event is
    one tuple build plus a ``tuple.__new__``.
    """
    new = tuple.__new__
    if rtype == REC_HYPERCALL:
        return [new(CrPinRequest, (time_ns + e, tgid, tid, a0, a1, a2)) if nr == lock_cr else
                new(Hypercall, (time_ns + e, tgid, tid, nr, a0, a1, a2, a3))
                for _type, _version, _reserved, tgid, tid, _cpu, time_ns, nr, a0, a1, a2, a3
                in values]
    if rtype == REC_FAULT:
        return [new(Fault, (time_ns + e, tgid, tid, vcpu, gpa, error_code, rip, access, count,
                            first_ns + e))
                for (_type, _version, _reserved, tgid, tid, _cpu, time_ns,
                     vcpu, access, gpa, error_code, rip, count, first_ns) in values]
    if rtype == REC_CR:
        return [new(CrWrite, (time_ns + e, tgid, tid, cr, value))
                for _type, _version, _reserved, tgid, tid, _cpu, time_ns, cr, _reserved, value
                in values]
    return [new(AttrApplied, (time_ns + e, tgid, tid, gfn_start, gfn_end, attributes))
            for (_type, _version, _reserved, tgid, tid, _cpu, time_ns,
                 gfn_start, gfn_end, attributes) in values]


# One record each: (buf, off, epoch offset, lock_cr nr, protect_parts) -> event or None.
# Defaults bind the unpacker and tuple.__new__ as fast locals; tuple.__new__ skips the
# NamedTuple's Python-level __new__ (every field is passed, so the result is equal).

def _one_fault(buf, off: int, e: int, lock_cr: int, parts: list | None,
               unpack=_FAULT.unpack_from, new=tuple.__new__) -> Event:
    (_type, _version, _reserved, tgid, tid, _cpu, time_ns,
     vcpu, access, gpa, error_code, rip, count, first_ns) = unpack(buf, off)
    return new(Fault, (time_ns + e, tgid, tid, vcpu, gpa, error_code, rip, access, count,
                       first_ns + e))


def _one_hypercall(buf, off: int, e: int, lock_cr: int, parts: list | None,
                   unpack=_HYPERCALL.unpack_from, new=tuple.__new__) -> Event:
    _type, _version, _reserved, tgid, tid, _cpu, time_ns, nr, a0, a1, a2, a3 = unpack(buf, off)
    if nr == lock_cr:
        return new(CrPinRequest, (time_ns + e, tgid, tid, a0, a1, a2))
    return new(Hypercall, (time_ns + e, tgid, tid, nr, a0, a1, a2, a3))


def _one_cr(buf, off: int, e: int, lock_cr: int, parts: list | None,
            unpack=_CR.unpack_from, new=tuple.__new__) -> Event:
    _type, _version, _reserved, tgid, tid, _cpu, time_ns, cr, _reserved, value = unpack(buf, off)
    return new(CrWrite, (time_ns + e, tgid, tid, cr, value))


def _one_attr(buf, off: int, e: int, lock_cr: int, parts: list | None,
              unpack=_ATTR.unpack_from, new=tuple.__new__) -> Event:
    (_type, _version, _reserved, tgid, tid, _cpu, time_ns,
     gfn_start, gfn_end, attributes) = unpack(buf, off)
    return new(AttrApplied, (time_ns + e, tgid, tid, gfn_start, gfn_end, attributes))


def _one_ioctl(buf, off: int, e: int, lock_cr: int, parts: list | None,
               unpack=_IOCTL.unpack_from) -> Event:
    (_type, _version, _reserved, tgid, tid, _cpu, time_ns,
     cmd, _fd, ret, arg0, arg1, arg2, arg3) = unpack(buf, off)
    t = time_ns + e
    if cmd == kvm_uapi.KVM_CREATE_VM:
        return VmCreated(t, tgid, tid, vm_fd=ret, stats_path=f"/kvm/{tid}-{ret}",
                         source="ioctl")
    if cmd == kvm_uapi.KVM_SET_MEMORY_ATTRIBUTES:
        return AttrIoctl(t, tgid, tid, arg0, arg1, arg2, arg3, ret)
    # KVM_SET_USER_MEMORY_REGION(2): arg0 is slot (low 32 bits) and flags (high 32)
    return Memslot(t, tgid, tid, arg0 & 0xFFFFFFFF, arg0 >> 32, arg1, arg2, arg3)


def _one_protect_page(buf, off: int, e: int, lock_cr: int, parts: list | None) -> None:
    if parts is None:
        return
    (_type, _version, _reserved, tgid, tid, _cpu, time_ns, call_id, page_gpa, index, flags,
     _next_va, next_pa, npages) = _PAGE_HEAD.unpack_from(buf, off)
    n = min(npages, HEKI_MAX_ENTRIES)
    if flags & (1 << 4):          # READ_FAULT: nothing was read
        n = 0
    base = off + PAGE_ENTRIES_OFFSET
    entries = tuple(ProtectEntry._make(entry) for entry in
                    _ENTRY.iter_unpack(bytes(buf[base:base + n * 24]))) if n else ()
    parts.append(ProtectPage(time_ns + e, tgid, tid, call_id, page_gpa, index, flags, next_pa,
                             npages, entries))


def _one_protect_end(buf, off: int, e: int, lock_cr: int, parts: list | None) -> None:
    if parts is None:
        return
    (_type, _version, _reserved, tgid, tid, _cpu, time_ns, call_id, list_gpa, pages, flags,
     declared_entries) = _END.unpack_from(buf, off)
    parts.append(ProtectEnd(time_ns + e, tgid, tid, call_id, list_gpa, pages, flags,
                            declared_entries))


#: record type -> its one-record decoder
_DECODE_ONE: dict[int, Callable[[Any, int, int, int, list | None], Event | None]] = {REC_FAULT: _one_fault, REC_HYPERCALL: _one_hypercall, REC_CR: _one_cr,
               REC_ATTR: _one_attr, REC_IOCTL: _one_ioctl,
               REC_PROTECT_PAGE: _one_protect_page, REC_PROTECT_END: _one_protect_end}
#: record type -> its layout (run decoding pads it to the run's stride)
_BY_TYPE = {REC_HYPERCALL: _HYPERCALL, REC_FAULT: _FAULT, REC_CR: _CR, REC_ATTR: _ATTR}


def decode_batch(buf, spans, epoch_offset_ns: int, numbers: HypercallNumbers,
                 protect_parts: list | None = None,
                 stats: DecodeStats | None = None) -> list[Event]:
    """Decode the records ``buf[off:off+length]`` for each (off, length) in ``spans``.

    ``epoch_offset_ns`` is added to every kernel boot-time stamp (computed once per
    batch). Page-list records (:class:`ProtectPage`, :class:`ProtectEnd`) go to
    ``protect_parts`` for decode.py to assemble (dropped when None). Short records and
    unknown types are counted in ``stats``.

    Runs of equal records (:class:`_RunFinder`) are decoded with one ``iter_unpack``;
    anything else takes one ``unpack_from`` per record. Both give the same events
    (tests/unit/test_records.py).
    """
    # The cyclic GC would otherwise run a generation-0 pass every 700 events built here
    # and, as the kept events pile up, full passes over the whole heap: half the decode
    # time for events that are plain tuples of ints and can never form a cycle. It is
    # paused for the batch and restored as it was (refcounting still frees everything).
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _decode(buf, spans, epoch_offset_ns, numbers, protect_parts, stats)
    finally:
        if paused:
            gc.enable()


def _decode(buf, spans, epoch_offset_ns: int, numbers: HypercallNumbers,
            protect_parts: list | None, stats: DecodeStats | None) -> list[Event]:
    """The loop: check each record, decode runs whole and the rest one by one."""
    out: list[Event] = []
    append = out.append
    lock_cr = numbers.lock_cr_update
    sizes = RECORD_SIZES
    decode_one = _DECODE_ONE
    run_kinds = _RUN_KINDS
    runs = _RunFinder()
    run_structs: dict = {}
    view = None
    nspans = len(spans)
    j = 0
    while j < nspans:
        off, length = spans[j]
        rtype = buf[off]
        need = sizes.get(rtype)
        if need is None or length < need:
            if stats is not None:
                if need is None:
                    stats.unknown_type += 1
                else:
                    stats.short += 1
            j += 1
            continue
        if rtype in run_kinds and j >= runs.next_try:
            k = runs.length(buf, spans, j, off, length, rtype, need)
            if k:
                step = spans[j + 1][0] - off
                if view is None:
                    view = memoryview(buf)
                out += _decode_run(rtype, _run_struct(rtype, step, run_structs).iter_unpack(
                    view[off:off + k * step]), epoch_offset_ns, lock_cr)
                j += k
                continue
        event = decode_one[rtype](buf, off, epoch_offset_ns, lock_cr, protect_parts)
        if event is not None:
            append(event)
        j += 1
    return out
