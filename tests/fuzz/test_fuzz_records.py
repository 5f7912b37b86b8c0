"""Fuzz the ring-record decoder and everything after it with hostile record bytes.

Ring records are written by the BPF programs, but every value in them except the header
the program fills itself is guest-controlled (hypercall arguments, page-list contents,
fault addresses), and a reader bug or a layout drift would show up as odd bytes. So the
decoder is fed record-shaped byte strings with random contents, truncated records,
unknown types and random spans, and its output goes on through the page-list assembler
and the full Pipeline (host state + rules). Properties: nothing raises, and every span
is accounted for exactly once (an event, a page-list part, or a counted short/unknown
record): nothing is dropped silently.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from hekitrace.capture import records
from hekitrace.capture.assemble import ProtectAssembler
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.config.settings import default_config
from hekitrace.pipeline import Pipeline
from hekitrace.state.events import ProtectRequest
from tests.fuzz.fuzzbudget import bounded, budget

SIZES = records.RECORD_SIZES
NUMBERS = records.HypercallNumbers.from_profile(DEFAULT_PROFILE)
OFF = records.OFFSETS


def put(body: bytearray, rec: str, field: str, value: int) -> None:
    """Write one u64 field of record layout ``rec`` (offsets from records.OFFSETS)."""
    struct.pack_into("<Q", body, OFF[rec][field][0], value)


@st.composite
def record(draw) -> bytes:
    """One record: a known type with random body (often), cut short (sometimes), or junk."""
    rtype = draw(st.sampled_from(sorted(SIZES) + [0, 8, 255]))
    size = SIZES.get(rtype, draw(st.integers(1, 128)))
    if rtype in SIZES and draw(st.booleans()):
        # structured: the header is plausible, the body is the guest's to choose
        body = bytearray(draw(st.binary(min_size=size, max_size=size)))
        body[0] = rtype
        struct.pack_into("<I", body, 4, draw(st.sampled_from([1, 4242, 2**32 - 1])))
        if rtype == records.REC_HYPERCALL and draw(st.booleans()):  # the lock-CR number
            put(body, "hypercall", "nr", DEFAULT_PROFILE.lock_cr_update)
        if rtype == records.REC_PROTECT_PAGE:  # npages near and far above 169
            put(body, "protect_page", "npages", draw(st.sampled_from(
                [0, 1, 168, 169, 170, 100000, 2**64 - 1])))
            put(body, "protect_page", "call_id", draw(st.integers(0, 3)))  # ids collide
        if rtype == records.REC_PROTECT_END:
            put(body, "protect_end", "call_id", draw(st.integers(0, 3)))
        data = bytes(body)
    else:
        data = draw(st.binary(min_size=1, max_size=size))
        data = bytes([rtype]) + data[1:]
    if draw(st.integers(0, 9)) == 0:  # truncated
        data = data[:draw(st.integers(1, len(data)))]
    return data


@given(recs=st.lists(record(), max_size=24), epoch=st.integers(0, 2**63),
       garbage_spans=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5000)),
                              max_size=4))
@budget(300)
@bounded(seconds=10.0, megabytes=32)
def test_decode_batch_accounts_for_every_span_and_pipeline_never_raises(
        recs, epoch, garbage_spans):
    buf = bytearray()
    spans = []
    for data in recs:
        spans.append((len(buf), len(data)))
        buf += data
        buf += b"\0" * (-len(buf) % 8)
    # spans the ring walker might produce over damaged data: anywhere inside the buffer,
    # claiming any length (the record's own size is what the decoder must trust least)
    if buf:
        for off, length in garbage_spans:
            off %= len(buf)
            spans.append((off, min(length, len(buf) - off)))
    stats = records.DecodeStats()
    parts: list = []
    events = records.decode_batch(bytes(buf), spans, epoch, NUMBERS, parts, stats)
    assert len(events) + len(parts) + stats.short + stats.unknown_type == len(spans)

    assembler = ProtectAssembler(stale_batches=1)
    requests = assembler.feed(parts) + assembler.flush()
    ends = sum(1 for p in parts if isinstance(p, records.ProtectEnd))
    assert all(isinstance(r, ProtectRequest) for r in requests)
    assert len(requests) >= ends  # every end record is a request; orphan pages too
    for p in parts:   # a page never yields more than a list page holds, whatever npages says
        if isinstance(p, records.ProtectPage):
            assert len(p.entries) <= records.HEKI_MAX_ENTRIES

    pipe = Pipeline(default_config(), clock=lambda: epoch)
    for ev in sorted(events + requests, key=lambda e: e.time_ns):
        pipe.feed(ev)
    pipe.tick(2**64)


@given(st.binary(max_size=8192), st.lists(st.tuples(st.integers(0, 8191),
                                                    st.integers(0, 8192)), max_size=16))
@budget(300)
@bounded(seconds=10.0, megabytes=32)
def test_decode_batch_on_raw_bytes_never_raises(data, raw_spans):
    if not data:
        return
    spans = [(o % len(data), min(n, len(data) - o % len(data))) for o, n in raw_spans]
    stats = records.DecodeStats()
    parts: list = []
    out = records.decode_batch(data, spans, 0, NUMBERS, parts, stats)
    assert len(out) + len(parts) + stats.short + stats.unknown_type == len(spans)
