"""hekitrace.trace.file: both encodings round-trip every event; damage is located and survived."""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hekitrace.errors import TraceFormatError
from hekitrace.state.events import (
    AttrApplied,
    AttrIoctl,
    CrPinRequest,
    CrWrite,
    Fault,
    Hypercall,
    Lost,
    Memslot,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)
from hekitrace.trace import binary as tracecodec
from hekitrace.trace import file as trace
from hekitrace.trace.file import TraceHeader, TraceProblem, open_trace, read_events
from hekitrace.trace.writer import TraceWriter, write_events

# -- strategies: every field over its full encoded range ---------------------------------
u8 = st.integers(0, 2**8 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-2**31, 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-2**63, 2**63 - 1)
text = st.text(max_size=40)
common = (i64, u32, u32)

events = st.one_of(
    st.builds(VmCreated, *common, i32, text, text, text, text, text, st.booleans()),
    st.builds(VmDestroyed, *common, text),
    st.builds(Memslot, *common, u32, u32, u64, u64, u64),
    st.builds(Hypercall, *common, u64, u64, u64, u64, u64),
    st.builds(ProtectRequest, *common, u64,
              st.lists(st.builds(ProtectEntry, u64, u64, u64), max_size=30).map(tuple),
              u32, u32, u64),
    st.builds(CrPinRequest, *common, u64, u64, u64),
    st.builds(AttrApplied, *common, u64, u64, u64),
    st.builds(AttrIoctl, *common, u64, u64, u64, u64, i64),
    st.builds(Fault, *common, u32, u64, u64, u64, u32, u64, i64),
    st.builds(CrWrite, *common, u64, u64),
    st.builds(Lost, *common, text, text, u64, text),
)

SAMPLE = [
    VmCreated(1_000, 4242, 4242, 12, "/kvm/4242-12", "web1", "u-1", "qemu", "sim", False),
    Memslot(1_001, 4242, 4242, 1, 0, 0x100000, 0xBFF00000, 0x7F0000000000),
    ProtectRequest(1_002, 4242, 4243, 0x4470000,
                   (ProtectEntry(0x1000000, 0x1E02000, 13), ProtectEntry(0, 0xA0000, 3)), 1, 0,
                   2),
    AttrApplied(1_003, 4242, 4243, 0x1000, 0x1E02, 0xD0),
    Fault(1_004, 4242, 4244, 1, 0x1000040, 0x1AA, 0xFFFFFFFFC0001000, 2, 40, 1_000),
    Lost(1_005, 0, 0, "ring:telemetry", "full", 7, "kvm_page_fault"),
]


@settings(max_examples=150, deadline=None)
@given(st.lists(events, max_size=25), st.sampled_from(["binary", "jsonl"]),
       st.integers(256, 4096))
def test_round_trip_identical(tmp_path_factory, evs, encoding, block_bytes):
    path = tmp_path_factory.mktemp("rt") / "t"
    header = TraceHeader(kernel_release="6.18.44", abi_profile="heki-v2", start_time_ns=5,
                         hostname="h1", extra={"mbec": True})
    with TraceWriter(path, header, encoding=encoding, block_bytes=block_bytes) as writer:
        writer.write_all(evs)
    problems: list = []
    reader = open_trace(path, problems)
    assert reader.encoding == encoding
    assert reader.header == header and reader.header.extra == {"mbec": True}
    assert list(reader) == evs
    assert problems == []


def _binary(tmp_path, events, block_bytes=256):
    path = tmp_path / "t.htrace"
    with TraceWriter(path, TraceHeader(hostname="h"), block_bytes=block_bytes) as writer:
        writer.write_all(events)
    return path


def _blocks(path):
    """(offset, payload_len, records) of each block, walking the file's framing."""
    data = path.read_bytes()
    _, _, _, json_len, _ = struct.unpack_from("<8sHHII", data)
    pos = 20 + json_len
    out = []
    while pos < len(data):
        _, size, records, _ = struct.unpack_from("<8sIII", data, pos)
        out.append((pos, size, records))
        pos += 20 + size
    return out


MANY = [Hypercall(i, 7, 8, 5, i, 0, 0, 0) for i in range(300)]


def test_flipped_byte_reports_offset_and_keeps_other_blocks(tmp_path):
    path = _binary(tmp_path, MANY)
    blocks = _blocks(path)
    assert len(blocks) >= 4
    bad_off, bad_size, bad_records = blocks[1]
    data = bytearray(path.read_bytes())
    data[bad_off + 20 + bad_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    problems: list[TraceProblem] = []
    got = list(read_events(path, problems))
    assert len(problems) == 1
    assert problems[0].offset == bad_off and "checksum" in problems[0].message
    assert f"next block at byte {blocks[2][0]}" in problems[0].message
    lost = set(range(blocks[0][2], blocks[0][2] + bad_records))
    assert [ev.a0 for ev in got] == [i for i in range(300) if i not in lost]


def test_corrupt_sync_marker_resyncs(tmp_path):
    path = _binary(tmp_path, MANY)
    blocks = _blocks(path)
    data = bytearray(path.read_bytes())
    data[blocks[2][0]] = 0
    path.write_bytes(bytes(data))
    problems: list = []
    got = list(read_events(path, problems))
    assert [p.offset for p in problems] == [blocks[2][0]]
    assert len(got) == 300 - blocks[2][2]


def test_truncated_tail_reports_offset_and_keeps_complete_blocks(tmp_path):
    path = _binary(tmp_path, MANY)
    blocks = _blocks(path)
    last_off, _, last_records = blocks[-1]
    data = path.read_bytes()
    path.write_bytes(data[:last_off + 30])
    problems: list = []
    got = list(read_events(path, problems))
    assert len(problems) == 1
    assert problems[0].offset == last_off and "truncated block" in problems[0].message
    assert [ev.a0 for ev in got] == list(range(300 - last_records))


def test_truncated_block_header(tmp_path):
    path = _binary(tmp_path, MANY)
    end = len(path.read_bytes())
    with open(path, "ab") as f:
        f.write(trace.SYNC[:5])
    problems: list = []
    assert len(list(read_events(path, problems))) == 300
    assert problems[0].offset == end and "truncated block header" in problems[0].message


def test_append_after_torn_block_reads_both_sides(tmp_path):
    """A crash mid-block, then the journal appends: the torn block is reported once and
    the appended events still read."""
    path = _binary(tmp_path, MANY[:100])
    data = path.read_bytes()
    blocks = _blocks(path)
    path.write_bytes(data[:blocks[-1][0] + 25])
    with TraceWriter(path, append=True, block_bytes=256) as writer:
        writer.write_all(MANY[100:150])
    problems: list = []
    got = [ev.a0 for ev in read_events(path, problems)]
    assert len(problems) == 1 and problems[0].offset == blocks[-1][0]
    assert got == list(range(100 - blocks[-1][2])) + list(range(100, 150))


def test_garbage_line_reports_line_number_and_continues(tmp_path):
    path = tmp_path / "s.jsonl"
    write_events(path, SAMPLE, TraceHeader(), encoding="jsonl")
    lines = path.read_text().splitlines()
    lines.insert(3, "this is not json")
    lines.insert(5, json.dumps({"kind": "memslot", "tgid": 1, "slot": "zero"}))
    path.write_text("\n".join(lines) + "\n")
    problems: list = []
    assert list(read_events(path, problems)) == SAMPLE
    assert [p.line for p in problems] == [4, 6]
    assert "slot" in problems[1].message


def test_errors_none_raises_on_first_problem(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"kind":"cr_write","tgid":1,"cr":4,"value":"0x10"}\n{"kind":"nope"}\n')
    with pytest.raises(TraceFormatError) as info:
        list(read_events(path))
    assert info.value.line == 2


def test_callback_receives_problems(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"kind":"cr_write","tgid":1,"cr":4,"value":1}\n[1,2]\n')
    seen: list = []
    assert len(list(read_events(path, seen.append))) == 1
    assert seen[0].line == 2


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"\x00\x01\x02binary junk",
                                     b"[1, 2, 3]\n", b"\x89HKT\r\n"])
def test_not_a_trace_raises(tmp_path, content):
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(TraceFormatError):
        open_trace(path, [])


def test_bad_header_checksum_raises_with_offset(tmp_path):
    path = _binary(tmp_path, SAMPLE)
    data = bytearray(path.read_bytes())
    data[22] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError) as info:
        open_trace(path, [])
    assert info.value.offset == 20


def test_hand_written_jsonl_conveniences(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join([
        '# a comment, then a header giving the start time',
        '{"kind": "header", "start_time": "2026-11-25T15:00:00Z"}',
        '',
        '{"kind": "vm_created", "t": 0, "tgid": 100, "name": "demo"}',
        ('{"kind": "protect_request", "t": 1.5, "tgid": 100, "tid": 101,'
         ' "list_gpa": "0x5000", "entries": [["0x1000000", "0x1e02000", 13]]}'),
        '{"kind": "cr_write", "tgid": 100, "cr": 4, "value": "0x270ef0"}',
        ('{"kind": "cr_write", "time": "2026-11-25T15:00:02.25Z", "tgid": 100, "cr": 4,'
         ' "value": 1}'),
    ]) + "\n")
    problems: list = []
    got = list(read_events(path, problems))
    start = 1_795_618_800 * 10**9
    assert problems == []
    assert got[0] == VmCreated(start, 100, 100, name="demo")
    assert got[1] == ProtectRequest(start + 1_500_000_000, 100, 101, 0x5000,
                                    (ProtectEntry(0x1000000, 0x1E02000, 13),))
    assert got[2].time_ns == got[1].time_ns and got[2].tid == 100
    assert got[3].time_ns == start + 2_250_000_000


@pytest.mark.parametrize("line, words", [
    ('{"kind": "fault", "tgid": 1}', "missing field"),
    ('{"kind": "cr_write", "tgid": 1, "cr": 4, "value": 1, "colour": 2}', "unknown field"),
    ('{"kind": "protect_request", "tgid": 1, "list_gpa": 0, "entries": [[1, 2]]}', "entry 0"),
    ('{"kind": "cr_write", "tgid": true, "cr": 4, "value": 1}', "tgid"),
    ('{"kind": "cr_write", "time": "yesterday", "tgid": 1, "cr": 4, "value": 1}', "time"),
])
def test_bad_jsonl_fields_are_named(tmp_path, line, words):
    path = tmp_path / "b.jsonl"
    path.write_text('{"kind": "cr_write", "tgid": 1, "cr": 4, "value": 1}\n' + line + "\n")
    problems: list = []
    assert len(list(read_events(path, problems))) == 1
    assert len(problems) == 1 and problems[0].line == 2
    assert words in problems[0].message


def test_writer_flush_fsync_and_bytes_written(tmp_path):
    path = tmp_path / "j.htrace"
    writer = TraceWriter(path, TraceHeader())
    header_bytes = writer.bytes_written
    writer.write(SAMPLE[0])
    assert writer.bytes_written == header_bytes  # still buffered in the open block
    writer.fsync()
    assert writer.bytes_written == path.stat().st_size > header_bytes
    # a reader sees everything flushed so far while the writer stays open
    assert list(read_events(path, [])) == SAMPLE[:1]
    writer.write(SAMPLE[1])
    writer.close()
    assert list(read_events(path, [])) == SAMPLE[:2]


def test_unencodable_event_is_a_clear_error(tmp_path):
    with TraceWriter(tmp_path / "e", TraceHeader()) as writer, \
            pytest.raises(TraceFormatError, match="memslot"):
        writer.write(Memslot(0, 1, 1, 0, 0, -5, 0, 0))


def test_unknown_kind_record_is_skipped_by_length(tmp_path):
    path = _binary(tmp_path, [])
    record = struct.pack("<BI", 99, 3) + b"abc"
    good = tracecodec.encode_event(SAMPLE[3])
    payload = record + good
    import zlib
    with open(path, "ab") as f:
        f.write(struct.pack("<8sIII", trace.SYNC, len(payload), 2, zlib.crc32(payload)))
        f.write(payload)
    problems: list = []
    assert list(read_events(path, problems)) == [SAMPLE[3]]
    assert "unknown event kind 99" in problems[0].message


@pytest.mark.parametrize("field, delta", [("length", 8), ("length", -8), ("length", 1 << 24),
                                          ("crc", 1)])
def test_damaged_block_header_loses_only_that_block(tmp_path, field, delta):
    path = _binary(tmp_path, MANY)
    blocks = _blocks(path)
    off, size, records = blocks[1]
    data = bytearray(path.read_bytes())
    at = off + (8 if field == "length" else 16)
    value = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at, (value + delta) % 2**32)
    path.write_bytes(bytes(data))
    problems: list = []
    got = [ev.a0 for ev in read_events(path, problems)]
    assert [p.offset for p in problems] == [off]
    lost = set(range(blocks[0][2], blocks[0][2] + records))
    assert got == [i for i in range(300) if i not in lost]


def test_wrong_record_count_is_reported_but_loses_nothing(tmp_path):
    path = _binary(tmp_path, MANY)
    off = _blocks(path)[1][0]
    data = bytearray(path.read_bytes())
    data[off + 12] ^= 1
    path.write_bytes(bytes(data))
    problems: list = []
    assert len(list(read_events(path, problems))) == 300
    assert [p.offset for p in problems] == [off] and "records" in problems[0].message


@pytest.mark.parametrize("encoding", ["binary", "jsonl"])
def test_reads_from_a_pipe_including_resync(tmp_path, encoding):
    """No seeking: `hekitrace simulate -w - | hekitrace replay /dev/stdin` works, and a
    damaged block in a pipe is still skipped with everything after it read."""
    import threading

    path = tmp_path / "p"
    with TraceWriter(path, TraceHeader(hostname="p"), encoding=encoding,
                     block_bytes=256) as writer:
        writer.write_all(MANY)
    data = bytearray(path.read_bytes())
    if encoding == "binary":
        off, size, records = _blocks(path)[2]
        data[off + 20 + size // 2] ^= 0x10
        expected_lost = records
    else:
        data[data.index(b'"a0":"0x7"')] = ord("!")
        expected_lost = 1
    r, w = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(w, bytes(data)), os.close(w)))
    feeder.start()
    try:
        problems: list = []
        reader = open_trace(f"/dev/fd/{r}", problems)
        assert reader.header.hostname == "p"
        got = list(reader)
    finally:
        feeder.join()
        os.close(r)
    assert len(problems) == 1
    assert len(got) == 300 - expected_lost
