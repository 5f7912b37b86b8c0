"""Read a BPF ring buffer map straight from its mmap'd pages, one copy per batch.

Why not bcc's ``ring_buffer_consume()``: it calls back into Python once per record, which
makes it the capture's bottleneck (BENCHMARKS.md, "Ring-buffer consumer"). :class:`RingReader`
instead walks the record headers in the shared pages, copies the whole committed span with
one ``bytes()`` slice and hands the decoder ``(buf, spans)`` to decode in a batch.

The protocol, from the kernel's ``kernel/bpf/ringbuf.c`` (introduced in v5.8, commit
457f44363a88 "bpf: Implement BPF ring buffer and verifier support for it") and libbpf's
``ringbuf.c`` consumer, which this module follows step by step:

- The map fd is mmap'd in two parts. Offset 0, one page, read-write: ``consumer_pos``
  (u64 at byte 0). Offset ``page_size``, read-only: one page holding ``producer_pos``
  (u64 at byte 0), then the data area (``max_entries`` bytes, a power-of-2 multiple of the
  page size) mapped **twice** back to back, so a record that wraps past the end of the
  data area is contiguous in virtual memory. The kernel refuses a writable mapping of
  anything but the consumer page.
- Positions are free-running u64 byte counters; ``pos & (size - 1)`` is the offset.
- Each record starts with ``struct bpf_ringbuf_hdr { u32 len; s32 pg_off; }`` (8 bytes):
  ``len`` is the payload length with ``BPF_RINGBUF_BUSY_BIT`` (bit 31: reserved, not yet
  committed) and ``BPF_RINGBUF_DISCARD_BIT`` (bit 30: committed but discarded); ``pg_off``
  is the kernel's own back-pointer and is of no use to a consumer. A record occupies
  ``round_up(len + 8, 8)`` bytes.
- Records commit out of order across CPUs: the consumer stops at the first BUSY record
  (later ones, even if committed, wait for it), skips DISCARD records, and moves
  ``consumer_pos`` only after the payload has been copied, because the producer may reuse
  the space as soon as ``consumer_pos`` passes it.

Memory ordering. The kernel writes the payload, then clears BUSY with
``smp_store_release``; libbpf reads ``producer_pos`` and each header with
``smp_load_acquire`` and publishes ``consumer_pos`` with ``smp_store_release``. CPython has
no barriers, but on x86-64 (the only architecture hekitrace supports: Heki is x86) the
hardware does not reorder a load with older loads nor a store with older loads or stores
(TSO), and each Python-level access below is a separate C call the compiler cannot move
across. So: every header is read (and found committed) before the one ``bytes()`` copy of
the span starts, and ``consumer_pos`` is stored after the copy finished. The headers are
deliberately *not* read from the copy: ``memcpy`` may load a record's payload before its
header, which could pair a freshly committed header with stale payload bytes.

Polling: the map fd is pollable (``EPOLLIN`` while ``consumer_pos != producer_pos``). The
kernel only sends a wake-up when a record is committed at the consumer position (or with
``BPF_RB_FORCE_WAKEUP``), so register the fd level-triggered, and drain until empty when
possible; a partial ``drain(max_records=...)`` is fine because a level-triggered epoll
re-checks the fd on the next wait.

Cost: records of one type arrive in runs of identical headers, so the walk reads a run's
headers with one strided slice instead of one Python step per record; what ``drain()``
still pays per record is mostly building the ``spans`` tuples (BENCHMARKS.md, "Ring-buffer
consumer"). Those tuples are GC-tracked: a consumer
that drains large batches gains from a raised generation-0 GC threshold.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from itertools import repeat
from typing import NamedTuple, Self

from hekitrace.errors import AttachError

# include/uapi/linux/bpf.h
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
BPF_MAP_TYPE_RINGBUF = 27
_BPF_OBJ_GET_INFO_BY_FD = 15
_SYS_BPF = 321  # x86-64 syscall number of bpf(2)

_PAYLOAD_MASK = ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT) & 0xFFFFFFFF
# Bounds of the run-length probe in drain(): headers read ahead per strided slice.
_MIN_PROBE = 4
_MAX_PROBE = 4096


class MapInfo(NamedTuple):
    """The fields of ``struct bpf_map_info`` a ring reader needs."""

    map_type: int
    map_id: int
    max_entries: int
    name: str


class _BpfMapInfo(ctypes.Structure):
    # struct bpf_map_info, include/uapi/linux/bpf.h (first fields; the kernel copies at
    # most info_len bytes, so a prefix of the struct is a valid argument).
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


class _InfoAttr(ctypes.Structure):
    # union bpf_attr, the BPF_OBJ_GET_INFO_BY_FD member ("info")
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def map_info(map_fd: int) -> MapInfo:
    """Type, id, ``max_entries`` and name of a BPF map, by ``BPF_OBJ_GET_INFO_BY_FD``.

    Used instead of bcc's table attributes so a reader works on any ring buffer fd
    (bcc's or a pinned map's). Raises :class:`AttachError` when the call fails.
    """
    info = _BpfMapInfo()
    attr = _InfoAttr(bpf_fd=map_fd, info_len=ctypes.sizeof(info),
                     info=ctypes.addressof(info))
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr),
                       ctypes.sizeof(attr))
    if ret != 0:
        err = ctypes.get_errno()
        raise AttachError(f"BPF_OBJ_GET_INFO_BY_FD on fd {map_fd} failed: "
                          f"{os.strerror(err)} (errno {err}); expected a BPF map fd",
                          method="ringbuf mmap")
    return MapInfo(info.type, info.id, info.max_entries,
                   info.name.decode("ascii", "replace"))


class RingReader:
    """Consumer of one ``BPF_MAP_TYPE_RINGBUF`` map, reading its pages directly.

    ``map_fd`` stays owned by the caller (bcc's table, usually ``b["ring"].map_fd``);
    the mappings hold their own references, so :meth:`close` is needed to free them.
    Only one consumer may read a ring: do not also open it with bcc's
    ``open_ring_buffer``.

    Counters (cumulative, for metrics and tests): ``records_total`` (records returned),
    ``discarded_total`` (DISCARD records skipped), ``bytes_total`` (payload bytes
    returned), ``busy_stops_total`` (drains that stopped at a BUSY record).
    """

    def __init__(self, map_fd: int, *, page_size: int = mmap.PAGESIZE) -> None:
        info = map_info(map_fd)
        if info.map_type != BPF_MAP_TYPE_RINGBUF:
            raise AttachError(f"map fd {map_fd} ({info.name!r}) has map type "
                              f"{info.map_type}; expected BPF_MAP_TYPE_RINGBUF "
                              f"({BPF_MAP_TYPE_RINGBUF})", method="ringbuf mmap")
        size = info.max_entries
        if size < page_size or size & (size - 1):
            raise AttachError(f"ring buffer {info.name!r} data size {size} bytes is not a "
                              f"power of 2 of at least one page ({page_size})",
                              method="ringbuf mmap")
        self.name = info.name
        self.data_size_bytes = size
        self._fd = map_fd
        self._mask = size - 1
        self._cons_map = mmap.mmap(map_fd, page_size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page_size + 2 * size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ, offset=page_size)
        self._cons = memoryview(self._cons_map)[:8].cast("Q")
        self._prod = memoryview(self._prod_map)[:8].cast("Q")
        self._data = memoryview(self._prod_map)[page_size:]
        # The data area (both copies) as u32 words: records are 8-byte aligned, so a
        # header's ``len`` is the word at byte offset / 4 (x86-64 is little-endian).
        self._words = self._data.cast("I")
        self.records_total = 0
        self.discarded_total = 0
        self.bytes_total = 0
        self.busy_stops_total = 0

    def fileno(self) -> int:
        """The map fd, pollable for ``EPOLLIN`` (register it level-triggered)."""
        return self._fd

    @property
    def consumer_pos(self) -> int:
        """Bytes consumed since the map was created (free-running u64)."""
        return self._cons[0]

    @property
    def producer_pos(self) -> int:
        """Bytes reserved by producers since the map was created (free-running u64)."""
        return self._prod[0]

    def pending_bytes(self) -> int:
        """Bytes between the consumer and producer positions (committed or not)."""
        return self._prod[0] - self._cons[0]

    def drain(self, max_records: int | None = None) -> tuple[bytes, list[tuple[int, int]]]:
        """Copy out the committed records and release their space to the producers.

        Returns ``(buf, spans)``: ``buf`` is one copy of the ring from the consumer
        position to the end of the last record taken; ``spans`` holds, per record in ring
        order, ``(offset, length)`` of its payload in ``buf`` (headers and discarded
        records stay in ``buf`` but have no span). Stops at the first BUSY record, after
        ``max_records`` records, or when the ring is empty (then ``(b"", [])``).
        """
        cons = self._cons[0]
        prod = self._prod[0]
        if cons == prod:
            return b"", []
        if prod - cons > self.data_size_bytes:
            raise AttachError(f"ring buffer {self.name!r}: producer {prod} is "
                              f"{prod - cons} bytes ahead of consumer {cons}, more than "
                              f"its {self.data_size_bytes} bytes; the map is not a ring "
                              "buffer written by the kernel", method="ringbuf mmap")
        words = self._words
        spans: list[tuple[int, int]] = []
        limit = -1 if max_records is None else max_records
        discarded = 0
        payload_bytes = 0
        # Offsets below are relative to the consumer position (= to ``buf``). Because
        # the data area is mapped twice, ``base + rel`` indexes it without wrapping.
        base = cons & self._mask
        end = prod - cons
        rel = 0
        probe = _MIN_PROBE
        while rel < end and limit != 0:
            hdr = words[(base + rel) >> 2]
            if hdr & BPF_RINGBUF_BUSY_BIT:
                self.busy_stops_total += 1
                break
            length = hdr & _PAYLOAD_MASK
            step = (length + BPF_RINGBUF_HDR_SZ + 7) & ~7
            if hdr & BPF_RINGBUF_DISCARD_BIT:
                discarded += 1
                rel += step
                continue
            # Fast path: records of one type come in runs of equal headers. Read the
            # headers the next ``probe`` records would have with one strided slice (C
            # speed) and take the leading ones equal to this header: same length, not
            # BUSY, not DISCARD. ``probe`` grows while runs fill it and shrinks when they
            # do not, so mixed sizes cost a few words per record, not a quadratic scan.
            # Each header is still read before the copy below (see module docstring).
            run = min((end - rel) // step, probe)
            if 0 <= limit < run:
                run = limit
            if run > 1:
                first = (base + rel) >> 2
                heads = words[first:first + run * (step >> 2):step >> 2].tolist()
                if heads.count(hdr) == run:
                    probe = min(probe * 4, _MAX_PROBE)
                else:
                    run = 1
                    for later in heads[1:]:
                        if later != hdr:
                            break
                        run += 1
                    probe = max(_MIN_PROBE, run * 2)
                spans.extend(zip(range(rel + BPF_RINGBUF_HDR_SZ,
                                       rel + BPF_RINGBUF_HDR_SZ + run * step, step),
                                 repeat(length, run), strict=True))
            else:
                run = 1
                spans.append((rel + BPF_RINGBUF_HDR_SZ, length))
            payload_bytes += length * run
            if limit > 0:
                limit -= run
            rel += step * run
        if rel > end:
            raise AttachError(f"ring buffer {self.name!r}: a record ends {rel - end} bytes "
                              f"past the producer position {prod}; the map is not a ring "
                              "buffer written by the kernel", method="ringbuf mmap")
        pos = cons + rel
        if pos == cons:
            return b"", []
        # The data area is mapped twice, so [base, base + span) never needs two slices
        # even when the span wraps (span <= data size <= the second copy).
        buf = bytes(self._data[base:base + rel])
        self._cons[0] = pos
        self.records_total += len(spans)
        self.discarded_total += discarded
        self.bytes_total += payload_bytes
        return buf, spans

    def close(self) -> None:
        """Unmap the pages (idempotent). The map fd itself is left to its owner."""
        if self._cons_map.closed:
            return
        for view in (self._words, self._data, self._cons, self._prod):
            view.release()
        self._cons_map.close()
        self._prod_map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
