"""RingReader against bcc's own consumer, on the same records from a real BPF program.

The generator (bench/gen_ringbuf.c, XDP, run by BPF_PROG_TEST_RUN) writes every record
identically to two rings; RingReader reads ``ring``, bcc's ``ring_buffer_consume()`` reads
``mirror``. A one-page ring, three record sizes and many rounds make records wrap at many
offsets; every 7th record is reserved then discarded. The header walk itself (BUSY
records, runs of equal headers, wrap) is tested on synthetic rings in
tests/unit/test_ringbuf_walk.py.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
from pathlib import Path

import pytest

from hekitrace.capture.ringbuf import RingReader, map_info
from hekitrace.capture.testrun import run_xdp
from hekitrace.errors import AttachError

pytestmark = pytest.mark.kernel

bcc = pytest.importorskip("bcc", reason="python3-bpfcc is not installed")
if os.geteuid() != 0:
    pytest.skip("kernel tests need root (BPF)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]

GEN = str(REPO / "bench" / "gen_ringbuf.c").encode()
PAGE = mmap.PAGESIZE


@pytest.fixture()
def gen():
    """A fresh generator: one-page rings, three sizes, every 7th record discarded."""
    bpf = bcc.BPF(src_file=GEN, cflags=["-DGEN_RING_PAGES=1", "-DGEN_MIRROR",
                                        "-DGEN_VARLEN", "-DGEN_DISCARD_EVERY=7"])
    fd = bpf.load_func(b"gen", bcc.BPF.XDP).fd
    yield bpf, fd
    bpf.cleanup()


def _records(buf: bytes, spans: list[tuple[int, int]]) -> list[bytes]:
    return [buf[off:off + length] for off, length in spans]


def test_ringreader_same_records_as_bcc_through_wraps_and_discards(gen):
    bpf, fd = gen
    from_bcc: list[bytes] = []
    bpf[b"mirror"].open_ring_buffer(
        lambda ctx, data, size: from_bcc.append(ctypes.string_at(data, size)))
    reader = RingReader(bpf[b"ring"].map_fd)
    assert reader.data_size_bytes == PAGE
    mine: list[bytes] = []
    wrapped = 0
    for _ in range(40):
        run_xdp(fd, 37)
        start = reader.consumer_pos & (reader.data_size_bytes - 1)
        buf, spans = reader.drain()
        wrapped += sum(1 for off, ln in spans if start + off + ln > reader.data_size_bytes
                       and start + off < reader.data_size_bytes)
        mine += _records(buf, spans)
        bpf.ring_buffer_consume()
        assert reader.pending_bytes() == 0
    assert bpf[b"gen_lost"][0].value == 0
    assert mine == from_bcc
    generated = 40 * 37
    assert len(mine) == generated - generated // 7
    assert reader.discarded_total == generated // 7
    assert wrapped > 0, "no record straddled the end of the data area: wrap not tested"
    seqs = [struct.unpack_from("<Q", rec)[0] for rec in mine]
    assert seqs == [s for s in range(generated) if s % 7 != 6]
    sizes = {len(rec) for rec in mine}
    assert sizes == {16, 40, 72}
    reader.close()


def test_drain_max_records_leaves_the_rest_in_order(gen):
    bpf, fd = gen
    run_xdp(fd, 20)
    with RingReader(bpf[b"ring"].map_fd) as reader:
        buf, spans = reader.drain(max_records=5)
        assert len(spans) == 5
        first = _records(buf, spans)
        buf, spans = reader.drain()
        rest = _records(buf, spans)
        seqs = [struct.unpack_from("<Q", rec)[0] for rec in first + rest]
        assert seqs == [s for s in range(20) if s % 7 != 6]
        assert reader.drain() == (b"", [])


def test_drain_empty_ring(gen):
    bpf, _ = gen
    with RingReader(bpf[b"ring"].map_fd) as reader:
        assert reader.drain() == (b"", [])
        assert reader.records_total == 0


def test_ringreader_refuses_a_map_that_is_not_a_ring_buffer(gen):
    bpf, _ = gen
    array_fd = bpf[b"gen_seq"].map_fd
    assert map_info(array_fd).map_type == 2  # BPF_MAP_TYPE_ARRAY
    with pytest.raises(AttachError, match="expected BPF_MAP_TYPE_RINGBUF"):
        RingReader(array_fd)


def test_map_info_of_a_closed_fd_is_a_clear_error():
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(AttachError, match="BPF_OBJ_GET_INFO_BY_FD"):
            map_info(fd)
    finally:
        os.close(fd)


def test_map_fd_polls_readable_while_records_wait_and_not_after_drain(gen):
    bpf, fd = gen
    with RingReader(bpf[b"ring"].map_fd) as reader:
        poller = select.epoll()
        poller.register(reader.fileno(), select.EPOLLIN)  # level-triggered, as documented
        assert poller.poll(0) == []
        run_xdp(fd, 10)
        assert poller.poll(1.0) == [(reader.fileno(), select.EPOLLIN)]
        reader.drain(max_records=3)  # partial drain: still readable (level-triggered)
        assert poller.poll(0) == [(reader.fileno(), select.EPOLLIN)]
        reader.drain()
        assert poller.poll(0) == []
        poller.close()
