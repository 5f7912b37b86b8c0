"""Ring-buffer consumer: RingReader + batch decode vs bcc's ``table.event(data)`` callback.

Both consumers read the *same* records in the *same* run: the in-kernel generator
(bench/gen_ringbuf.c, an XDP program run by ``BPF_PROG_TEST_RUN`` with ``repeat``) writes
every record identically to two ring buffers, ``ring`` and ``mirror``. Then

(a) baseline: bcc's idiom on ``mirror``: ``open_ring_buffer(cb)`` + ``ring_buffer_consume()``,
    the callback doing ``table.event(data)`` and reading one field;
(b) hekitrace: :class:`~hekitrace.capture.ringbuf.RingReader` ``drain()`` on ``ring``, then
    a decode of every record into a NamedTuple, in batches.

Each consumer is timed alone (the generator runs first, outside the timings), so the
figures are consumer cost only, in CPU time of this process (see ``_CLOCK``).

A second part does the same on real hekitrace records: the capture's own flood generator
(bpf/flood.c, ``-DHK_WITH_FLOOD``: 64-byte hypercall records in the telemetry ring) and
the real decoder, ``records.decode_batch`` -> ``Hypercall`` events. One ring there, so the
two consumers take turns on it: flood N, bcc callback drains; flood N, RingReader +
decode_batch drains (order alternating per round).

Part 1 records: 40-byte payloads (48 bytes in the ring), as in the baseline figures
of docs/kernel-support.md section 5. Usage (root)::

    .venv/bin/python bench/bench_consumer.py [--records 300000] [--rounds 3]
        [--gc-threshold 100000] [--skip-real]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import operator
import os
import platform
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from bcc import BPF

from hekitrace.capture.ringbuf import RingReader

GEN_SOURCE = Path(__file__).with_name("gen_ringbuf.c")
RECORD_RING_BYTES = 48  # 40-byte payload + 8-byte header
# CPU time of this process, not wall time: the build host is shared (other builds and
# tests run at the same time) and wall-clock rates there swing 2x from preemption alone.
# Both consumers run entirely on this process's CPU (bcc's consume is a synchronous call).
_CLOCK = time.process_time


class GenRecord(NamedTuple):
    """``struct gen_record`` of gen_ringbuf.c: u64 seq; u32 kind; u32 cpu; u64 a, b, c."""

    seq: int
    kind: int
    cpu: int
    a: int
    b: int
    c: int


_GEN_RECORD = struct.Struct("<QIIQQQ")


class _CGenRecord(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_uint64), ("kind", ctypes.c_uint32),
                ("cpu", ctypes.c_uint32), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64),
                ("c", ctypes.c_uint64)]


def _decoder() -> tuple[str, Callable[[bytes, list[tuple[int, int]]], list]]:
    """The batch decoder (b) uses, and a label saying which.

    Stand-in until ``hekitrace.capture.records.decode_batch`` can decode generator
    records. Batch decoding: when a batch's spans are evenly spaced records of one length
    (the usual case: RingReader returns runs of equal headers), one ``Struct.iter_unpack``
    over the batch (header skipped by the format's leading pad) feeds ``map`` with no
    Python bytecode per record; otherwise one ``unpack_from`` per record.
    """
    unpack_from = _GEN_RECORD.unpack_from
    stride_struct = struct.Struct("<8x" + _GEN_RECORD.format.lstrip("<"))
    stride = stride_struct.size
    # tuple.__new__ bound to the class builds the NamedTuple in C; NamedTuple._make is a
    # Python-level classmethod and costs about 100 ns more per record here.
    make = functools.partial(tuple.__new__, GenRecord)
    second = operator.itemgetter(1)

    def decode(buf: bytes, spans: list[tuple[int, int]]) -> list[GenRecord]:
        first, length = spans[0]
        last = spans[-1][0]
        if (length == _GEN_RECORD.size and last - first == (len(spans) - 1) * stride
                and set(map(second, spans)) == {length}):
            view = memoryview(buf)[first - 8:last - 8 + stride]
            return list(map(make, stride_struct.iter_unpack(view)))
        return [make(unpack_from(buf, off)) for off, _ in spans]

    return ("one Struct.iter_unpack per drained batch of evenly spaced records "
            "(else unpack_from per record), tuple.__new__(GenRecord, ...)"), decode


class _TestRunAttr(ctypes.Structure):
    # union bpf_attr, the BPF_PROG_TEST_RUN member ("test"), include/uapi/linux/bpf.h
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def xdp_test_run(prog_fd: int, repeat: int) -> int:
    """Run an XDP program ``repeat`` times on a dummy 64-byte packet (bpf(2) command 10,
    BPF_PROG_TEST_RUN; libbcc does not export it). Returns the kernel's mean ns per run.

    Stand-in until hekitrace/capture/testrun.py lands; then use that.
    """
    packet = ctypes.create_string_buffer(64)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet.raw),
                        data_in=ctypes.addressof(packet), repeat=repeat)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(321, 10, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return int(attr.duration)


def load_generator(ring_pages: int, *extra: str) -> tuple[BPF, int]:
    """Compile gen_ringbuf.c with two mirrored rings; returns (bpf, xdp prog fd)."""
    cflags = [f"-DGEN_RING_PAGES={ring_pages}", "-DGEN_MIRROR", *extra]
    bpf = BPF(src_file=str(GEN_SOURCE).encode(), cflags=cflags)
    return bpf, bpf.load_func(b"gen", BPF.XDP).fd


def generate(prog_fd: int, records: int) -> None:
    """Produce ``records`` records in each ring (chunks keep one test run short)."""
    chunk = 100_000
    left = records
    while left:
        n = min(chunk, left)
        xdp_test_run(prog_fd, n)
        left -= n


def open_callback(bpf: BPF) -> list[int]:
    """(a): open bcc's consumer on ``mirror`` once; returns its [records, seq sum]."""
    table = bpf[b"mirror"]
    # bcc infers the event type from a typed ringbuf_output()/reserve() in the C; the
    # generator reserves untyped memory, so name the type as a bcc user would (this is
    # exactly what table.event() casts to once it has inferred it).
    table._event_class = _CGenRecord
    state = [0, 0]

    def callback(ctx, data, size):
        event = table.event(data)
        state[0] += 1
        state[1] += event.seq
        return 0

    table.open_ring_buffer(callback)
    return state


def consume_callback(bpf: BPF, state: list[int]) -> tuple[float, int, int]:
    """(a): bcc idiom on ``mirror``. Returns (seconds, records, checksum of seq)."""
    state[0] = state[1] = 0
    t0 = _CLOCK()
    bpf.ring_buffer_consume()
    elapsed = _CLOCK() - t0
    return elapsed, state[0], state[1]


def consume_reader(reader: RingReader,
                   decode: Callable[[bytes, list[tuple[int, int]]], list],
                   batch: int) -> tuple[float, int, int]:
    """(b): RingReader.drain + batch decode on ``ring``. Same return as above."""
    count = 0
    checksum = 0
    drain_s = 0.0
    clock = _CLOCK
    t0 = clock()
    while True:
        t1 = clock()
        buf, spans = reader.drain(batch)
        drain_s += clock() - t1
        if not spans:
            break
        events = decode(buf, spans)
        count += len(events)
        checksum += sum(ev.seq for ev in events)
    elapsed = clock() - t0
    consume_reader.last_drain_share = drain_s / elapsed  # type: ignore[attr-defined]
    return elapsed, count, checksum


def bench_real_records(records_per_round: int, rounds: int, batch: int) -> tuple[float, float]:
    """Part 2: hk_flood records, bcc callback vs RingReader + records.decode_batch.
    Returns the best (callback, reader) rates in records/s."""
    from hekitrace.capture import records
    from hekitrace.capture.engine import Capture
    from hekitrace.capture.loader import CaptureSettings
    from hekitrace.config.abi import DEFAULT_PROFILE

    ring_bytes = 1 << (records_per_round * 72 - 1).bit_length()
    cap = Capture(settings=CaptureSettings(telemetry_ring_bytes=ring_bytes), attach=False,
                  extra_cflags=["-DHK_WITH_FLOOD"], say=lambda _line: None).start()
    try:
        flood_fd = cap.program_fd("hk_flood")
        table = cap.bpf[b"hk_telemetry"]
        # the record type from the package's layout (tests/kernel/test_bpf_layout.py)
        table._event_class = records.c_struct("hypercall")
        state = [0, 0]

        def callback(ctx, data, size):
            event = table.event(data)
            state[0] += 1
            state[1] += event.a0
            return 0

        table.open_ring_buffer(callback)
        reader = RingReader(table.map_fd)
        numbers = records.HypercallNumbers.from_profile(DEFAULT_PROFILE)
        sent = 0

        def flood() -> int:
            nonlocal sent
            first = sent
            generate(flood_fd, records_per_round)
            sent += records_per_round
            return sum(range(first, sent))

        def by_callback() -> float:
            expect = flood()
            state[0] = state[1] = 0
            t0 = _CLOCK()
            cap.bpf.ring_buffer_consume()
            elapsed = _CLOCK() - t0
            assert (state[0], state[1]) == (records_per_round, expect), state
            return records_per_round / elapsed

        def by_reader() -> float:
            expect = flood()
            got = total = 0
            t0 = _CLOCK()
            while True:
                buf, spans = reader.drain(batch)
                if not spans:
                    break
                events = records.decode_batch(buf, spans, 0, numbers)
                got += len(events)
                total += sum(ev.a0 for ev in events)
            elapsed = _CLOCK() - t0
            assert (got, total) == (records_per_round, expect), (got, total)
            return records_per_round / elapsed

        best_a = best_b = 0.0
        for rnd in range(rounds):
            if rnd % 2:
                rate_b, rate_a = by_reader(), by_callback()
            else:
                rate_a, rate_b = by_callback(), by_reader()
            best_a, best_b = max(best_a, rate_a), max(best_b, rate_b)
            print(f"real round {rnd + 1}: callback {rate_a / 1e6:.2f} M records/s, "
                  f"reader+decode_batch {rate_b / 1e6:.2f} M records/s, "
                  f"ratio {rate_b / rate_a:.1f}x")
        reader.close()
        return best_a, best_b
    finally:
        cap.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=300_000,
                        help="records per round (default: 300000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--batch", type=int, default=4096,
                        help="max records per drain() (default: 4096)")
    parser.add_argument("--gc-threshold", type=int, metavar="N", default=None,
                        help="gc.set_threshold(N, 50, 100) before measuring, as a daemon "
                             "may (default: Python's own, 700)")
    parser.add_argument("--skip-real", action="store_true",
                        help="skip part 2 (real hekitrace records; default: run it)")
    args = parser.parse_args(argv)

    if args.gc_threshold is not None:
        # Batches allocate many small tuples at once; the default generation-0 threshold
        # (700 allocations) then runs a collection every few hundred records.
        gc.set_threshold(args.gc_threshold, 50, 100)
    ring_bytes = 1 << (args.records * RECORD_RING_BYTES - 1).bit_length()
    ring_pages = max(1, ring_bytes // 4096)
    bpf, prog_fd = load_generator(ring_pages)
    decode_label, decode = _decoder()
    reader = RingReader(bpf[b"ring"].map_fd)
    state = open_callback(bpf)
    print(f"host: {platform.node()} kernel {platform.release()}, python "
          f"{platform.python_version()}; {args.records} records/round of 40 bytes, "
          f"ring {ring_pages * 4096} bytes, batch {args.batch}, gc thresholds "
          f"{gc.get_threshold()}; rates in CPU time")
    print(f"decode (b): {decode_label}")
    rates_a, rates_b = [], []
    for rnd in range(args.rounds):
        lost_before = bpf[b"gen_lost"][0].value
        generate(prog_fd, args.records)
        lost = bpf[b"gen_lost"][0].value - lost_before
        if lost:
            print(f"generator lost {lost} records (ring full); enlarge the ring",
                  file=sys.stderr)
            return 1
        # Alternate who goes first so cache warmth favours neither.
        if rnd % 2:
            tb, nb, sb = consume_reader(reader, decode, args.batch)
            ta, na, sa = consume_callback(bpf, state)
        else:
            ta, na, sa = consume_callback(bpf, state)
            tb, nb, sb = consume_reader(reader, decode, args.batch)
        if (na, sa) != (nb, sb) or na != args.records:
            print(f"consumers disagree: callback {na} records (seq sum {sa}), reader "
                  f"{nb} (seq sum {sb}), expected {args.records}", file=sys.stderr)
            return 1
        rates_a.append(na / ta)
        rates_b.append(nb / tb)
        print(f"round {rnd + 1}: callback {na / ta / 1e6:.2f} M records/s, "
              f"reader+decode {nb / tb / 1e6:.2f} M records/s, ratio {ta / tb:.1f}x "
              f"(drain {consume_reader.last_drain_share:.0%} of the reader's time)")
    best_a, best_b = max(rates_a), max(rates_b)
    print(f"best: callback idiom {best_a / 1e6:.2f} M records/s, RingReader.drain + decode "
          f"{best_b / 1e6:.2f} M records/s, ratio {best_b / best_a:.1f}x (target >= 3x)")
    reader.close()
    bpf.cleanup()
    if not args.skip_real:
        real_a, real_b = bench_real_records(args.records, args.rounds, args.batch)
        print(f"best (real hk records, Hypercall events): callback idiom "
              f"{real_a / 1e6:.2f} M records/s, RingReader.drain + records.decode_batch "
              f"{real_b / 1e6:.2f} M records/s, ratio {real_b / real_a:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
