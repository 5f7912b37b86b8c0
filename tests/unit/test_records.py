"""records.decode_batch and decode.ProtectAssembler on hand-built records: every record
type, the boot->epoch offset, short and unknown records counted (never raised), ioctl
numbers derived from their struct sizes, and page-list assembly including lost pieces."""

from __future__ import annotations

from hekitrace.capture import kvm_uapi
from hekitrace.capture import records as r
from hekitrace.capture.assemble import ProtectAssembler
from hekitrace.capture.engine import filter_buckets
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.state.events import (
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Fault,
    FaultAccess,
    Hypercall,
    Memslot,
    ProtectFlags,
    ProtectRequest,
    VmCreated,
)

NUM = r.HypercallNumbers.from_profile(DEFAULT_PROFILE)
OFF = 1_000_000_000_000


def hdr(rtype: int, tgid=10, tid=11, t=5) -> tuple:
    return (rtype, 1, 0, tgid, tid, 0, t)


def pack(name: str, *fields) -> bytes:
    return r.STRUCTS[name].pack(*fields)


def batch(*recs: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    buf, spans = b"", []
    for rec in recs:
        spans.append((len(buf) + 8, len(rec)))     # 8: a ring header in between
        buf += b"\xff" * 8 + rec
    return buf, spans


def decode(*recs, parts=None, stats=None):
    buf, spans = batch(*recs)
    return r.decode_batch(buf, spans, OFF, NUM, parts, stats)


def test_record_sizes_match_the_header_comments():
    assert {k: s.size for k, s in r.STRUCTS.items()} == {
        "hdr": 24, "ioctl": 72, "hypercall": 64, "protect_page": 4128, "protect_end": 56,
        "attr": 48, "fault": 72, "cr": 40, "loss_key": 8}


def test_ioctl_numbers_are_derived_from_struct_sizes():
    assert kvm_uapi.KVM_CREATE_VM == 0xAE01
    assert kvm_uapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm_uapi.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert kvm_uapi.KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2   # docs/heki-abi.md section 9


def test_each_record_type_decodes_to_its_event():
    evs = decode(
        pack("ioctl", *hdr(1), kvm_uapi.KVM_CREATE_VM, 3, 7, 0, 0, 0, 0),
        pack("ioctl", *hdr(1), kvm_uapi.KVM_SET_USER_MEMORY_REGION, 7, 0,
             2 | (1 << 32), 0x100000, 0x200000, 0x7F0000000000),
        pack("ioctl", *hdr(1), kvm_uapi.KVM_SET_MEMORY_ATTRIBUTES, 7, -25, 0x1000, 0x2000, 8, 0),
        pack("hypercall", *hdr(2), 13, 4, 0x300000, 0, 0),
        pack("hypercall", *hdr(2), 99, 1, 2, 3, 4),
        pack("attr", *hdr(5), 0x10, 0x20, 0x50),
        pack("fault", *hdr(6), 3, 2, 0x5000, 0x1AA, 0xFFFF0000, 42, 2),
        pack("cr", *hdr(7), 4, 0, 0x3406E0),
    )
    assert evs == [
        VmCreated(OFF + 5, 10, 11, vm_fd=7, stats_path="/kvm/11-7", source="ioctl"),
        Memslot(OFF + 5, 10, 11, 2, 1, 0x100000, 0x200000, 0x7F0000000000),
        AttrIoctl(OFF + 5, 10, 11, 0x1000, 0x2000, 8, 0, -25),
        CrPinRequest(OFF + 5, 10, 11, 4, 0x300000, 0),
        Hypercall(OFF + 5, 10, 11, 99, 1, 2, 3, 4),
        AttrApplied(OFF + 5, 10, 11, 0x10, 0x20, 0x50),
        Fault(OFF + 5, 10, 11, 3, 0x5000, 0x1AA, 0xFFFF0000, 2, 42, OFF + 2),
        CrWrite(OFF + 5, 10, 11, 4, 0x3406E0),
    ]


def test_short_and_unknown_records_are_counted_not_raised():
    stats = r.DecodeStats()
    good = pack("cr", *hdr(7), 0, 0, 1)
    buf, spans = batch(good[:30], bytes([200]) + b"\0" * 60, good)
    evs = r.decode_batch(buf, spans, OFF, NUM, None, stats)
    assert len(evs) == 1 and stats.short == 1 and stats.unknown_type == 1


def _page(call_id, index, entries, npages=None, flags=0, next_pa=0, gpa=0x1000):
    flat = [x for e in entries for x in e]
    flat += [0] * (r.HEKI_MAX_ENTRIES * 3 - len(flat))
    return pack("protect_page", *hdr(3), call_id, gpa, index, flags, 0, next_pa,
                len(entries) if npages is None else npages, *flat)


def test_page_records_assemble_into_one_request():
    e1 = [(0x1000 * i, 0x1000 * i + 0x1000, 5) for i in range(169)]
    e2 = [(0xA000000, 0xA001000, 1)]
    parts = []
    decode(_page(7, 0, e1, next_pa=0x2000), _page(7, 1, e2, gpa=0x2000),
           pack("protect_end", *hdr(4), 7, 0x1000, 2, 0, 170), parts=parts)
    (req,) = ProtectAssembler().feed(parts)
    assert isinstance(req, ProtectRequest)
    assert [tuple(e) for e in req.entries] == e1 + e2
    assert (req.list_gpa, req.pages, req.flags, req.declared_entries) == (0x1000, 2, 0, 170)


def test_oversized_npages_is_cut_at_169_and_lost_pages_flagged():
    parts = []
    decode(_page(8, 0, [(0, 4096, 1)] * 169, npages=10**6, flags=8),
           pack("protect_end", *hdr(4), 8, 0x1000, 2, 8, 10**6 + 3), parts=parts)
    (req,) = ProtectAssembler().feed(parts)
    assert len(req.entries) == 169
    assert req.flags == ProtectFlags.NPAGES_OVERSIZE | ProtectFlags.LOST_PAGES


def test_pages_without_end_record_are_flushed_flagged():
    asm = ProtectAssembler(stale_batches=2)
    parts = []
    decode(_page(9, 0, [(0, 4096, 1)]), parts=parts)
    assert asm.feed(parts) == []
    assert asm.feed([]) == []
    (req,) = asm.feed([])
    assert req.flags == ProtectFlags.LOST_PAGES and len(req.entries) == 1


def test_filter_buckets_set_one_bit_per_page():
    b = filter_buckets([(0x12345, 0x12348), (510, 514, FaultAccess.FETCH)])
    assert set(b) == {0x12345 >> 9, 0, 1}
    w, f = b[0x12345 >> 9]
    assert w == f == 0b111 << (0x12345 & 511)
    assert b[0] == (0, (1 << 510) | (1 << 511))
    assert b[1] == (0, 0b11)
    big = filter_buckets([(1000, 1000 + 512 * 3)])
    assert sum(w.bit_count() for w, _ in big.values()) == 512 * 3
    assert filter_buckets([(5, 5)]) == {}


def test_c_struct_has_the_layout_offsets():
    """bench/ reads ring records through c_struct: the same offsets and sizes as LAYOUTS,
    which tests/kernel/test_bpf_layout.py proves equal to the C header's."""
    import ctypes

    header = r.c_struct("hdr")
    for name, offsets in r.OFFSETS.items():
        made = r.c_struct(name)
        assert ctypes.sizeof(made) == r.STRUCTS[name].size, name
        for field, (off, size) in offsets.items():
            if field.startswith("hdr."):
                sub = getattr(header, field[4:])
                got = (made.hdr.offset + sub.offset, sub.size)
            else:
                got = (getattr(made, field).offset, getattr(made, field).size)
            assert got == (off, size), f"{name}.{field}"
    rec = r.c_struct("hypercall").from_buffer_copy(
        pack("hypercall", *hdr(r.REC_HYPERCALL), 9, 1, 2, 3, 4))
    assert (rec.hdr.tgid, rec.hdr.time_ns, rec.nr, rec.a3) == (10, 5, 9, 4)


def test_one_record_decoders_name_the_c_fields():
    """Each one-record decoder unpacks its record into names that are the C struct's
    fields in order (LAYOUTS; ``_`` marks an unused one, an array expands to name0..)."""
    import ast
    import inspect

    for kind in ("fault", "hypercall", "cr", "attr", "ioctl", "protect_page", "protect_end"):
        expected = []
        for field, fmt in r.LAYOUTS[kind]:
            name = field.removeprefix("hdr.")
            if name == "entries":
                continue          # read separately, after the page head
            count = int(fmt[:-1] or 1)
            expected += [f"{name}{i}" for i in range(count)] if count > 1 else [name]
        tree = ast.parse(inspect.getsource(getattr(r, f"_one_{kind}")))
        target = next(n.targets[0] for n in ast.walk(tree) if isinstance(n, ast.Assign)
                      and isinstance(n.targets[0], ast.Tuple))
        names = [e.id.lstrip("_") for e in target.elts]   # type: ignore[attr-defined]
        assert names == expected, kind
