"""records.decode_batch's run decoding (iter_unpack over runs of equal records) gives the
events the one-record-at-a-time path gives, on ring-shaped batches and on damaged ones."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from hekitrace.capture import records as r
from hekitrace.config.abi import DEFAULT_PROFILE

NUM = r.HypercallNumbers.from_profile(DEFAULT_PROFILE)
OFF = 1_000_000_000_000
LOCK_CR = NUM.lock_cr_update


def _record(kind: str, rng: random.Random) -> bytes:
    u64 = lambda: rng.choice([0, 1, 2**64 - 1, rng.getrandbits(64)])
    hdr = (getattr(r, "REC_" + kind.upper()), 1, 0, rng.randrange(1, 5), rng.randrange(9),
           rng.randrange(4), rng.getrandbits(62))
    body = {"hypercall": lambda: (rng.choice([LOCK_CR, 9, u64()]), u64(), u64(), u64(), u64()),
            "fault": lambda: (rng.getrandbits(32), rng.getrandbits(32), u64(), u64(), u64(),
                              u64(), rng.getrandbits(62)),
            "cr": lambda: (rng.choice([0, 4]), 0, u64()),
            "attr": lambda: (u64(), u64(), u64()),
            "protect_end": lambda: (u64(), u64(), rng.getrandbits(32), rng.getrandbits(32),
                                    u64())}[kind]()
    return r.STRUCTS[kind].pack(*hdr, *body)


def _ring(recs: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """As RingReader.drain returns them: 8-byte header, payload padded to 8 bytes."""
    buf, spans = bytearray(), []
    for rec in recs:
        buf += b"\x00" * 8
        spans.append((len(buf), len(rec)))
        buf += rec + b"\x00" * (-len(rec) % 8)
    return bytes(buf), spans


def _one_by_one(buf, spans):
    events, parts, stats = [], [], r.DecodeStats()
    for span in spans:   # a single span never forms a run
        events += r.decode_batch(buf, [span], OFF, NUM, parts, stats)
    return events, parts, (stats.short, stats.unknown_type)


def _batch(buf, spans):
    parts, stats = [], r.DecodeStats()
    events = r.decode_batch(buf, spans, OFF, NUM, parts, stats)
    return events, parts, (stats.short, stats.unknown_type)


KINDS = ["hypercall", "fault", "cr", "attr", "protect_end"]


@given(seed=st.integers(0, 2**32), runs=st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(1, 40)), min_size=1, max_size=12),
    damage=st.lists(st.tuples(st.integers(0, 10**6), st.integers(-9, 80)), max_size=3))
def test_runs_decode_like_single_records(seed, runs, damage):
    rng = random.Random(seed)
    recs = [_record(kind, rng) for kind, n in runs for _ in range(n)]
    buf, spans = _ring(recs)
    for where, delta in damage:   # a span moved or resized: the run must be cut there
        i = where % len(spans)
        off, length = spans[i]
        spans[i] = (max(0, min(off + delta, len(buf) - 1)),
                    min(length, len(buf) - max(0, min(off + delta, len(buf) - 1))))
    ref = _one_by_one(buf, spans)
    got = _batch(buf, spans)
    assert got == ref
    assert [type(e) for e in got[0]] == [type(e) for e in ref[0]]


def test_long_run_of_each_kind_with_a_different_record_inside():
    rng = random.Random(1)
    for kind in ["hypercall", "fault", "cr", "attr"]:
        recs = [_record(kind, rng) for _ in range(300)]
        recs[150] = _record("protect_end", rng)
        recs[151] = _record("fault" if kind != "fault" else "hypercall", rng)
        buf, spans = _ring(recs)
        got = _batch(buf, spans)
        assert got == _one_by_one(buf, spans)
        assert len(got[0]) == 299 and len(got[1]) == 1


def test_run_at_the_end_of_an_unpadded_buffer():
    rng = random.Random(2)
    recs = [_record("cr", rng) for _ in range(10)]
    buf, spans = _ring(recs)
    buf = buf[:spans[-1][0] + spans[-1][1]]   # last record's padding missing
    assert _batch(buf, spans) == _one_by_one(buf, spans)


def test_the_garbage_collector_is_left_as_it_was():
    import gc
    buf, spans = _ring([_record("cr", random.Random(3)) for _ in range(20)])
    assert gc.isenabled()
    _batch(buf, spans)
    assert gc.isenabled()
    gc.disable()
    try:
        _batch(buf, spans)
        assert not gc.isenabled()
    finally:
        gc.enable()
