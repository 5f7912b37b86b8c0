"""RingReader's header walk on synthetic ring images, against a one-record-at-a-time
reference walker (libbpf's loop, transcribed).

A verified BPF program cannot leave a record BUSY on purpose (reserve and commit are
paired), so BUSY records, runs of equal headers of every length, discards inside runs,
``max_records`` cut-offs and wraps at every offset are exercised here, on an image laid
out as the kernel maps it (data area twice in a row). The real-kernel comparison with
bcc's consumer is tests/kernel/test_ringbuf.py.
"""

from __future__ import annotations

import random
import struct

import pytest

from hekitrace.capture.ringbuf import BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT, RingReader
from hekitrace.errors import AttachError

BUSY, DISCARD = BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT


def _fake_reader(records: list[tuple[int, bytes]], size: int = 256,
                 start: int = 0) -> RingReader:
    """A RingReader over a synthetic image: ``records`` (header flags, payload) written
    from free-running position ``start`` (so they may wrap), data area mapped twice."""
    image = bytearray(size)
    pos = start
    for flags, payload in records:
        header = struct.pack("<Ii", len(payload) | flags, 0)
        for k, byte in enumerate(header + payload):
            image[(pos + k) % size] = byte
        pos += (len(payload) + 15) & ~7
    assert pos - start <= size, "test bug: records do not fit the ring"
    reader = RingReader.__new__(RingReader)
    reader.name, reader.data_size_bytes, reader._fd, reader._mask = "fake", size, -1, size - 1
    reader._cons = memoryview(bytearray(8)).cast("Q")
    reader._prod = memoryview(bytearray(8)).cast("Q")
    reader._cons[0] = start
    reader._prod[0] = pos
    reader._data = memoryview(bytes(image) * 2)
    reader._words = reader._data.cast("I")
    reader.records_total = reader.discarded_total = reader.bytes_total = 0
    reader.busy_stops_total = 0
    return reader


def _reference(records: list[tuple[int, bytes]], max_records: int | None
               ) -> tuple[list[bytes], int]:
    """(payloads, bytes consumed) as libbpf's ringbuf_process_ring would take them."""
    out: list[bytes] = []
    consumed = 0
    for flags, payload in records:
        if flags & BUSY or (max_records is not None and len(out) == max_records):
            break
        consumed += (len(payload) + 15) & ~7
        if not flags & DISCARD:
            out.append(payload)
    return out, consumed


def _payloads(buf: bytes, spans: list[tuple[int, int]]) -> list[bytes]:
    return [buf[off:off + length] for off, length in spans]


def test_drain_stops_at_the_first_busy_record_even_if_later_ones_are_committed():
    reader = _fake_reader([(0, b"A" * 8), (0, b"B" * 8), (BUSY, b"C" * 8), (0, b"D" * 8)])
    buf, spans = reader.drain()
    assert _payloads(buf, spans) == [b"A" * 8, b"B" * 8]
    assert reader.consumer_pos == 32
    assert reader.busy_stops_total == 1
    assert reader.drain() == (b"", [])  # still busy: nothing more, position unchanged
    assert reader.consumer_pos == 32


def test_drain_skips_discarded_records_inside_a_run():
    reader = _fake_reader([(0, b"A" * 8)] * 5 + [(DISCARD, b"X" * 8)] + [(0, b"B" * 8)] * 3)
    buf, spans = reader.drain()
    assert _payloads(buf, spans) == [b"A" * 8] * 5 + [b"B" * 8] * 3
    assert reader.discarded_total == 1
    assert reader.consumer_pos == 9 * 16


def test_a_record_wrapping_the_end_is_returned_whole():
    reader = _fake_reader([(0, bytes(range(40)))], start=256 - 16)
    buf, spans = reader.drain()
    assert _payloads(buf, spans) == [bytes(range(40))]
    assert reader.consumer_pos == 256 - 16 + 48


def test_drain_rejects_a_producer_further_ahead_than_the_ring():
    reader = _fake_reader([(0, b"A" * 8)])
    reader._prod[0] = 10_000
    with pytest.raises(AttachError, match="more than its 256 bytes"):
        reader.drain()


def test_drain_rejects_a_header_running_past_the_producer():
    reader = _fake_reader([(0, b"A" * 8)])
    reader._prod[0] = 8  # producer inside the first record
    with pytest.raises(AttachError, match="past the producer position"):
        reader.drain()


@pytest.mark.parametrize("seed", range(300))
def test_drain_matches_the_reference_walker(seed):
    rng = random.Random(seed)
    size = rng.choice((256, 512, 1024))
    records: list[tuple[int, bytes]] = []
    used = 0
    while True:
        # runs of equal lengths (the fast path) mixed with singles
        length = rng.choice((0, 1, 4, 8, 12, 16, 40, 64))
        for _ in range(rng.choice((1, 1, 2, 5, 17))):
            flags = rng.choices((0, DISCARD, BUSY), weights=(90, 7, 3))[0]
            step = (length + 15) & ~7
            if used + step > size:
                break
            records.append((flags, bytes(rng.randrange(256) for _ in range(length))))
            used += step
        else:
            continue
        break
    start = rng.randrange(0, 1 << 40, 8)
    max_records = rng.choice((None, None, 1, 3, 50))
    reader = _fake_reader(records, size, start)
    buf, spans = reader.drain(max_records)
    expected, consumed = _reference(records, max_records)
    assert _payloads(buf, spans) == expected
    assert reader.consumer_pos == start + consumed
    assert len(buf) == consumed
    assert reader.records_total == len(expected)
