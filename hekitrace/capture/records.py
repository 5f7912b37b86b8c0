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


def _page(v: tuple, buf, off: int, epoch: int) -> ProtectPage:
    n = min(v[13], HEKI_MAX_ENTRIES)
    if v[10] & (1 << 4):          # READ_FAULT: nothing was read
        n = 0
    base = off + PAGE_ENTRIES_OFFSET
    entries = tuple(ProtectEntry._make(e) for e in
                    _ENTRY.iter_unpack(bytes(buf[base:base + n * 24]))) if n else ()
    return ProtectPage(v[6] + epoch, v[3], v[4], v[7], v[8], v[9], v[10], v[12], v[13], entries)


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


def _run_struct(rtype: int, step: int, cache: dict) -> struct.Struct | None:
    """Struct of one record of ``rtype`` padded to ``step`` bytes (None if it cannot be)."""
    key = (rtype, step)
    st = cache.get(key)
    if st is None and key not in cache:
        base = {REC_HYPERCALL: _HYPERCALL, REC_FAULT: _FAULT, REC_CR: _CR,
                REC_ATTR: _ATTR}[rtype]
        st = struct.Struct(base.format + f"{step - base.size}x") if step >= base.size else None
        cache[key] = st
    return st


def _decode_run(rtype: int, values, e: int, lock_cr: int) -> list:
    """Events of a run of ``rtype`` records (``values``: their unpacked field tuples).

    Comprehensions name every field, so each event is one tuple build plus a
    ``tuple.__new__``; the layouts are the LAYOUTS field lists (header first).
    """
    new = tuple.__new__
    if rtype == REC_HYPERCALL:
        return [new(CrPinRequest, (t + e, tgid, tid, a0, a1, a2)) if nr == lock_cr else
                new(Hypercall, (t + e, tgid, tid, nr, a0, a1, a2, a3))
                for _ty, _ve, _re, tgid, tid, _cpu, t, nr, a0, a1, a2, a3 in values]
    if rtype == REC_FAULT:
        return [new(Fault, (t + e, tgid, tid, vcpu, gpa, ec, rip, access, count, first + e))
                for _ty, _ve, _re, tgid, tid, _cpu, t, vcpu, access, gpa, ec, rip, count, first
                in values]
    if rtype == REC_CR:
        return [new(CrWrite, (t + e, tgid, tid, cr, value))
                for _ty, _ve, _re, tgid, tid, _cpu, t, cr, _res, value in values]
    return [new(AttrApplied, (t + e, tgid, tid, gs, ge, attrs))
            for _ty, _ve, _re, tgid, tid, _cpu, t, gs, ge, attrs in values]


def decode_batch(buf, spans, epoch_offset_ns: int, numbers: HypercallNumbers,
                 protect_parts: list | None = None,
                 stats: DecodeStats | None = None) -> list[Event]:
    """Decode the records ``buf[off:off+length]`` for each (off, length) in ``spans``.

    ``epoch_offset_ns`` is added to every kernel boot-time stamp (computed once per
    batch). Page-list records (:class:`ProtectPage`, :class:`ProtectEnd`) go to
    ``protect_parts`` for decode.py to assemble (dropped when None). Short records and
    unknown types are counted in ``stats``.

    Runs of equal records (same type and length, evenly spaced: what the ring walker
    returns for a burst of one hook's records) are checked as a whole at C speed (the
    spans compared with the expected ones, the type bytes counted in one strided slice)
    and decoded with one ``iter_unpack``; anything else takes one ``unpack_from`` per
    record. Both give the same events (tests/unit/test_records.py).
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
    out: list[Event] = []
    append = out.append
    lock_cr = numbers.lock_cr_update
    create_vm = kvm_uapi.KVM_CREATE_VM
    set_attrs = kvm_uapi.KVM_SET_MEMORY_ATTRIBUTES
    ioctl_u, hc_u, fault_u, cr_u = (_IOCTL.unpack_from, _HYPERCALL.unpack_from,
                                    _FAULT.unpack_from, _CR.unpack_from)
    attr_u, end_u, page_u = _ATTR.unpack_from, _END.unpack_from, _PAGE_HEAD.unpack_from
    sizes = RECORD_SIZES
    run_kinds = _RUN_KINDS
    run_structs: dict = {}
    view = None
    nbuf = len(buf)
    nspans = len(spans)
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (3-4x cheaper); every
    # field is passed, so the result equals the normal construction (tests check it)
    new = tuple.__new__
    probe = _MIN_PROBE
    no_run_before = 0
    backoff = 1
    i = 0
    while i < nspans:
        off, length = spans[i]
        i += 1
        rtype = buf[off]
        need = sizes.get(rtype)
        if need is None or length < need:
            if stats is not None:
                if need is None:
                    stats.unknown_type += 1
                else:
                    stats.short += 1
            continue
        if i >= no_run_before and rtype in run_kinds and i + _MIN_RUN - 1 <= nspans:
            # a run starting here? stride from the next span; every span of the run is
            # compared with the one a run would have, and every record's type byte read
            step = spans[i][0] - off
            k = min(nspans - i + 1, (nbuf - off) // step, probe) if step > 0 else 0
            # cheap rejection first (mixed batches): the record _MIN_RUN - 1 further on
            if k >= _MIN_RUN and (spans[i + _MIN_RUN - 2] != (off + (_MIN_RUN - 1) * step,
                                                             length)
                                  or buf[off + (_MIN_RUN - 1) * step] != rtype):
                k = 0
                backoff = min(backoff * 2, _MAX_BACKOFF)
                no_run_before = i + backoff
            if k >= _MIN_RUN:
                expect = list(zip(range(off, off + k * step, step), repeat(length, k)))
                got = spans[i - 1:i - 1 + k]
                if got == expect:
                    probe = min(probe * 4, _MAX_PROBE)
                else:
                    m = 0
                    for one, other in zip(got, expect):
                        if one != other:
                            break
                        m += 1
                    k = m
                    probe = max(_MIN_PROBE, 2 * m)
                types = bytes(buf[off:off + k * step:step])
                k -= len(types.lstrip(types[:1]))   # cut at the first record of another type
                st = _run_struct(rtype, step, run_structs) if k >= _MIN_RUN else None
                if st is not None:
                    backoff = 1
                    if view is None:
                        view = memoryview(buf)
                    out += _decode_run(rtype, st.iter_unpack(view[off:off + k * step]),
                                       epoch_offset_ns, lock_cr)
                    i += k - 1
                    continue
                # too short: these records go one by one; try again after them
                backoff = min(backoff * 2, _MAX_BACKOFF)
                no_run_before = i + max(k, backoff)
        if rtype == REC_FAULT:
            v = fault_u(buf, off)
            append(new(Fault, (v[6] + epoch_offset_ns, v[3], v[4], v[7], v[9], v[10], v[11],
                               v[8], v[12], v[13] + epoch_offset_ns)))
        elif rtype == REC_HYPERCALL:
            v = hc_u(buf, off)
            if v[7] == lock_cr:
                append(new(CrPinRequest, (v[6] + epoch_offset_ns, v[3], v[4], v[8], v[9],
                                          v[10])))
            else:
                append(new(Hypercall, (v[6] + epoch_offset_ns, v[3], v[4], v[7], v[8], v[9],
                                       v[10], v[11])))
        elif rtype == REC_CR:
            v = cr_u(buf, off)
            append(new(CrWrite, (v[6] + epoch_offset_ns, v[3], v[4], v[7], v[9])))
        elif rtype == REC_ATTR:
            v = attr_u(buf, off)
            append(new(AttrApplied, (v[6] + epoch_offset_ns, v[3], v[4], v[7], v[8], v[9])))
        elif rtype == REC_IOCTL:
            v = ioctl_u(buf, off)
            t = v[6] + epoch_offset_ns
            cmd, ret = v[7], v[9]
            if cmd == create_vm:
                append(VmCreated(t, v[3], v[4], vm_fd=ret, stats_path=f"/kvm/{v[4]}-{ret}",
                                 source="ioctl"))
            elif cmd == set_attrs:
                append(AttrIoctl(t, v[3], v[4], v[10], v[11], v[12], v[13], ret))
            else:
                w0 = v[10]
                append(Memslot(t, v[3], v[4], w0 & 0xFFFFFFFF, w0 >> 32, v[11], v[12], v[13]))
        elif rtype == REC_PROTECT_PAGE:
            if protect_parts is not None:
                protect_parts.append(_page(page_u(buf, off), buf, off, epoch_offset_ns))
        else:  # REC_PROTECT_END
            if protect_parts is not None:
                v = end_u(buf, off)
                protect_parts.append(ProtectEnd(v[6] + epoch_offset_ns, v[3], v[4], v[7], v[8],
                                                v[9], v[10], v[11]))
    return out
