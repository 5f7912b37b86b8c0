"""Ring decode, this tree against another revision's, on the same drained records.

Fills the telemetry ring with the capture's flood generator (bpf/flood.c: 64-byte
hypercall records), drains it once with ``RingReader`` (4096 records per batch, as the
daemon), then times ``records.decode_batch`` of this tree and of ``--ref-tree`` on those
very buffers, alternating which goes first, keeping every event (the daemon queues them,
so the garbage collector sees them pile up). CPU time of this process.

Make a reference tree of an older revision with::

    mkdir /tmp/ref && git archive <commit> hekitrace | tar -x -C /tmp/ref

Usage (root): .venv/bin/python bench/bench_decode_ab.py --ref-tree /tmp/ref [--records N]

``--mixed`` (no BPF, no root) times hand-packed batches instead: records of every run
kind plus ioctls in random order (the one-record path) and runs of hypercalls, packed with
``records.STRUCTS`` and spaced as the ring lays them out (8-byte header, 8-byte aligned).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_CLOCK = time.process_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-tree", required=True,
                        help="directory holding the reference revision's hekitrace/")
    parser.add_argument("--records", type=int, default=300_000,
                        help="records (default: 300000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default: 4)")
    parser.add_argument("--mixed", action="store_true",
                        help="hand-packed mixed and run batches instead of the BPF flood")
    args = parser.parse_args()

    from hekitrace.capture import records
    from hekitrace.config.abi import DEFAULT_PROFILE

    path = os.path.join(args.ref_tree, "hekitrace", "capture", "records.py")
    spec = importlib.util.spec_from_file_location("ref_records", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    if args.mixed:
        for name in ("mixed", "runs"):
            batches = _packed(records, name, args.records)
            compare(records, ref, batches, args.rounds, DEFAULT_PROFILE, name)
        return 0
    compare(records, ref, _flood(records, args.records), args.rounds, DEFAULT_PROFILE,
            "hk_flood")
    return 0


def _flood(records, n: int) -> list:
    """hk_flood records drained from the telemetry ring, 4096 per batch."""
    from bench_consumer import generate

    from hekitrace.capture.engine import Capture
    from hekitrace.capture.loader import CaptureSettings
    from hekitrace.capture.ringbuf import RingReader

    cap = Capture(settings=CaptureSettings(telemetry_ring_bytes=1 << (n * 72 - 1).bit_length()),
                  attach=False, extra_cflags=["-DHK_WITH_FLOOD"], say=lambda _l: None).start()
    try:
        reader = RingReader(cap.bpf[b"hk_telemetry"].map_fd)
        generate(cap.program_fd("hk_flood"), n)
        batches = []
        while True:
            buf, spans = reader.drain(4096)
            if not spans:
                break
            batches.append((buf, spans))
        reader.close()
    finally:
        cap.close()
    assert sum(len(s) for _, s in batches) == n
    return batches


def _packed(records, kind: str, n: int) -> list:
    """``n`` records in batches of 4096: ``mixed`` (random kinds) or ``runs``."""
    rng = random.Random(1)
    st = records.STRUCTS

    def one(rtype: int, i: int) -> bytes:
        hdr = (rtype, 1, 0, 100, 101, 0, 1000 + i)
        if rtype == records.REC_FAULT:
            return st["fault"].pack(*hdr, 1, 2, 0x1000 * i, 0x182, 0xFFFF0000, 1, 5)
        if rtype == records.REC_HYPERCALL:
            return st["hypercall"].pack(*hdr, 12, i, 2, 3, 4)
        if rtype == records.REC_CR:
            return st["cr"].pack(*hdr, 4, 0, 0x3000)
        if rtype == records.REC_ATTR:
            return st["attr"].pack(*hdr, i, i + 1, 0x8)
        return st["ioctl"].pack(*hdr, 0x4020AE46, 5, 0, 1 | (2 << 32), 0x1000, 0x2000, 0x3000)

    kinds = (records.REC_FAULT, records.REC_HYPERCALL, records.REC_CR, records.REC_ATTR,
             records.REC_IOCTL)
    batches = []
    for first in range(0, n, 4096):
        parts, spans, pos = [], [], 0
        for i in range(first, min(n, first + 4096)):
            rec = one(rng.choice(kinds) if kind == "mixed" else records.REC_HYPERCALL, i)
            pad = -(8 + len(rec)) % 8
            spans.append((pos + 8, len(rec)))
            parts.append(bytes(8) + rec + bytes(pad))
            pos += 8 + len(rec) + pad
        batches.append((b"".join(parts), spans))
    return batches


def compare(records, ref, batches: list, rounds: int, profile, label: str) -> None:
    """Time both decoders on ``batches``, alternating which goes first; print the best."""
    n = sum(len(s) for _, s in batches)
    best = {"this tree": 0.0, "reference": 0.0}
    for rnd in range(rounds):
        order = [("this tree", records), ("reference", ref)]
        for name, mod in order if rnd % 2 == 0 else order[::-1]:
            numbers = mod.HypercallNumbers.from_profile(profile)
            gc.collect()
            kept: list = []
            t0 = _CLOCK()
            for buf, spans in batches:
                kept += mod.decode_batch(buf, spans, 0, numbers, [])
            _after = [None] * 1000   # a collection the decoder deferred runs in the timing
            elapsed = _CLOCK() - t0
            assert len(kept) == n
            best[name] = max(best[name], n / elapsed)
            print(f"{label} round {rnd + 1}: {name}: {n / elapsed / 1e6:.2f} M records/s "
                  f"({elapsed / n * 1e9:.0f} ns/record)")
            del kept
    print(f"{label} best: this tree {best['this tree'] / 1e6:.2f} M/s "
          f"({1e9 / best['this tree']:.0f} ns/record), reference "
          f"{best['reference'] / 1e6:.2f} M/s ({1e9 / best['reference']:.0f} ns/record), "
          f"{best['this tree'] / best['reference']:.2f}x; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
