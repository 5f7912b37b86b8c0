"""Binary trace records: one event to bytes and a block payload back to events.

This is the record layer of the binary trace encoding (docs/trace-format.md, "Binary
encoding"); :mod:`hekitrace.trace.file` frames the records into checked blocks behind a file
header. It is kept apart so the hot decoder (BENCHMARKS.md "Replay") reads on its own, and
so the record layout is declared in one place, next to the code that packs and unpacks it::

    record = u8 kind | u32 body_len | body   (fixed struct per kind, then
             length-prefixed parts: u16 + UTF-8 for strings, u32 count + 3 x u64 for entries)

The per-record ``body_len`` lets a reader skip a kind it does not know. Decoding never
raises: a record that does not decode is reported to the caller with its offset.
"""

from __future__ import annotations

import functools
import gc
import struct
from collections.abc import Callable
from typing import Any

from hekitrace.errors import TraceFormatError
from hekitrace.state.events import (
    KIND_OF,
    NAME_OF,
    Event,
    EventKind,
    Lost,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)

_REC_HEAD = struct.Struct("<BI")             # kind, body_len
_ENTRY = struct.Struct("<QQQ")
_U16 = struct.Struct("<H")

# Fixed part of each kind's body, fields in NamedTuple order. time_ns is signed (q);
# tgid/tid are u32; guest-controlled values are u64 as the kernel hands them over.
_FIXED: dict[EventKind, struct.Struct] = {
    EventKind.VM_CREATED: struct.Struct("<qIIi?"),             # + 5 strings
    EventKind.VM_DESTROYED: struct.Struct("<qII"),             # + stats_path
    EventKind.MEMSLOT: struct.Struct("<qIIIIQQQ"),
    EventKind.HYPERCALL: struct.Struct("<qIIQQQQQ"),
    EventKind.PROTECT_REQUEST: struct.Struct("<qIIQIIQI"),     # + entries (count last)
    EventKind.CR_PIN_REQUEST: struct.Struct("<qIIQQQ"),
    EventKind.ATTR_APPLIED: struct.Struct("<qIIQQQ"),
    EventKind.ATTR_IOCTL: struct.Struct("<qIIQQQQq"),
    EventKind.FAULT: struct.Struct("<qIIIQQQIQq"),
    EventKind.CR_WRITE: struct.Struct("<qIIQQ"),
    EventKind.LOST: struct.Struct("<qIIQ"),                     # count; + stage, reason, hook
}
#: kinds whose body is exactly the fixed struct, decoded by one unpack
_PLAIN = (EventKind.MEMSLOT, EventKind.HYPERCALL, EventKind.CR_PIN_REQUEST,
          EventKind.ATTR_APPLIED, EventKind.ATTR_IOCTL, EventKind.FAULT, EventKind.CR_WRITE)


def _pack_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")[:0xFFFF]
    return _U16.pack(len(raw)) + raw


def encode_event(event: Event) -> bytes:
    """The binary record of ``event`` (kind, length, body).

    Raises :class:`TraceFormatError` for a value outside its field's range (e.g. a
    negative gpa), which only a bug upstream can produce.
    """
    kind = KIND_OF[type(event)]
    fixed = _FIXED[kind]
    try:
        if kind in _PLAIN:
            body = fixed.pack(*event)
        elif kind is EventKind.PROTECT_REQUEST:
            ev: Any = event
            parts = [fixed.pack(ev.time_ns, ev.tgid, ev.tid, ev.list_gpa, ev.pages, ev.flags,
                                ev.declared_entries, len(ev.entries))]
            parts.extend(_ENTRY.pack(*entry) for entry in ev.entries)
            body = b"".join(parts)
        elif kind is EventKind.VM_CREATED:
            ev = event
            body = (fixed.pack(ev.time_ns, ev.tgid, ev.tid, ev.vm_fd, ev.preexisting)
                    + _pack_str(ev.stats_path) + _pack_str(ev.name) + _pack_str(ev.uuid)
                    + _pack_str(ev.vmm) + _pack_str(ev.source))
        elif kind is EventKind.VM_DESTROYED:
            ev = event
            body = fixed.pack(ev.time_ns, ev.tgid, ev.tid) + _pack_str(ev.stats_path)
        else:  # LOST
            ev = event
            body = (fixed.pack(ev.time_ns, ev.tgid, ev.tid, ev.count) + _pack_str(ev.stage)
                    + _pack_str(ev.reason) + _pack_str(ev.hook))
    except (struct.error, TypeError, AttributeError) as error:
        raise TraceFormatError(f"cannot encode {NAME_OF[type(event)]} event {event!r}: "
                               f"{error}") from None
    return _REC_HEAD.pack(kind, len(body)) + body


def _strings(buf: bytes | memoryview, pos: int, count: int) -> tuple[list[str], int]:
    out = []
    for _ in range(count):
        (n,) = _U16.unpack_from(buf, pos)
        pos += 2
        raw = bytes(buf[pos:pos + n])
        if len(raw) != n:
            raise struct.error("string runs past the record")
        out.append(raw.decode("utf-8", "surrogateescape"))
        pos += n
    return out, pos


def _decode_complex(kind: int, buf: bytes, pos: int, end: int) -> Event:
    """Decode a record with variable parts (strings, entries) in buf[pos:end]."""
    fixed = _FIXED_BY_INT[kind]
    head = fixed.unpack_from(buf, pos)
    p = pos + fixed.size
    if kind == _PROTECT:
        count = head[7]
        if p + count * 24 != end:
            raise struct.error(f"{count} entries do not fill the {end - pos}-byte record")
        entries = tuple(map(_new_entry, _ENTRY.iter_unpack(buf[p:end])))
        return ProtectRequest(head[0], head[1], head[2], head[3], entries, head[4], head[5],
                              head[6])
    if kind == EventKind.VM_CREATED:
        (stats_path, name, uuid, vmm, source), p = _strings(buf, p, 5)
        event: Event = VmCreated(head[0], head[1], head[2], head[3], stats_path, name, uuid,
                                 vmm, source, head[4])
    elif kind == EventKind.VM_DESTROYED:
        (stats_path,), p = _strings(buf, p, 1)
        event = VmDestroyed(head[0], head[1], head[2], stats_path)
    else:
        (stage, reason, hook), p = _strings(buf, p, 3)
        event = Lost(head[0], head[1], head[2], stage, reason, head[3], hook)
    if p != end:
        raise struct.error(f"{end - p} trailing bytes in the record")
    return event


def decode_block(payload: bytes, base: int, report: Callable[[str, int], None]
                 ) -> list[Event]:
    """Events of one checked block payload; ``base`` is its file offset (for reports).

    A record that does not decode is reported with its offset and skipped by its length;
    an impossible length ends the block (the remaining bytes cannot be framed).

    Hot path (BENCHMARKS.md "Replay"): a fixed-size kind is decoded by one unpack of
    its length and fields together, checked against the expected length, and turned into
    its NamedTuple with ``tuple.__new__`` (no per-field Python code). The cyclic GC is
    paused for the block, as in ``capture.records.decode_batch``: the events are acyclic,
    and its passes over them as they pile up cost as much as decoding them.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _decode_block(payload, base, report)
    finally:
        if paused:
            gc.enable()


def _decode_block(payload: bytes, base: int, report: Callable[[str, int], None]
                  ) -> list[Event]:
    out: list[Event] = []
    append = out.append
    plain = _PLAIN_DECODERS
    new = tuple.__new__
    view = memoryview(payload)
    pos = 0
    end = len(payload)
    while pos < end:
        fast = plain.get(payload[pos])
        if fast is not None:
            stop = pos + fast[1]
            if stop <= end:
                values = fast[0](payload, pos)
                if values[0] == fast[2]:
                    append(new(fast[3], values[1:]))
                    pos = stop
                    continue
        # general path: variable-size kinds, unknown kinds, and anything odd
        if end - pos < 5:
            report(f"{end - pos} stray bytes at the end of a block", base + pos)
            break
        kind, length = _REC_HEAD.unpack_from(payload, pos)
        body = pos + 5
        stop = body + length
        if stop > end:
            report(f"record length {length} runs past the end of its block", base + pos)
            break
        try:
            if kind == _PROTECT:
                t, tgid, tid, list_gpa, pages, flags, declared, count = _PROTECT_HEAD(
                    payload, body)
                if body + 44 + count * 24 != stop:
                    raise struct.error(f"{count} entries do not fill the {length}-byte "
                                       "record")
                entries = tuple(map(_new_entry, _ENTRY.iter_unpack(view[body + 44:stop])))
                append(new(ProtectRequest, (t, tgid, tid, list_gpa, entries, pages, flags,
                                            declared)))
            elif kind in _COMPLEX_KINDS:
                append(_decode_complex(kind, payload, body, stop))
            elif kind in plain:
                report(f"bad {EventKind(kind).name.lower()} record: length {length}, "
                       f"expected {plain[kind][2]}", base + pos)
            else:
                report(f"unknown event kind {kind} ({length}-byte record skipped)",
                       base + pos)
        except (struct.error, ValueError) as error:
            report(f"bad {EventKind(kind).name.lower()} record: {error}", base + pos)
        pos = stop
    return out


CLASS_OF_KIND: dict[EventKind, type] = {kind: cls for cls, kind in KIND_OF.items()}
_FIXED_BY_INT = {int(k): v for k, v in _FIXED.items()}
_PROTECT = int(EventKind.PROTECT_REQUEST)
_PROTECT_HEAD = _FIXED[EventKind.PROTECT_REQUEST].unpack_from
#: the protect-request record: 44-byte fixed part, then 24-byte entries (decode_block
#: uses the literals; the round-trip tests fail if the structs change)
_new_entry = functools.partial(tuple.__new__, ProtectEntry)


def _plain_decoder(kind: EventKind) -> tuple:
    """(unpack_from of kind+length+fields skipping the kind byte, record size, body
    size, class) for a fixed-size kind."""
    fixed = _FIXED[kind]
    whole = struct.Struct("<xI" + fixed.format.lstrip("<"))
    return (whole.unpack_from, whole.size, fixed.size, CLASS_OF_KIND[kind])


_PLAIN_DECODERS = {int(k): _plain_decoder(k) for k in _PLAIN}
_COMPLEX_KINDS = frozenset(int(k) for k in (EventKind.PROTECT_REQUEST, EventKind.VM_CREATED,
                                            EventKind.VM_DESTROYED, EventKind.LOST))
