"""Ring decode, this tree against another revision's, on the same drained records.

Fills the telemetry ring with the capture's flood generator (bpf/flood.c: 64-byte
hypercall records), drains it once with ``RingReader`` (4096 records per batch, as the
daemon), then times ``records.decode_batch`` of this tree and of ``--ref-tree`` on those
very buffers, alternating which goes first, keeping every event (the daemon queues them,
so the garbage collector sees them pile up). CPU time of this process.

Make a reference tree of an older revision with::

    mkdir /tmp/ref && git archive <commit> hekitrace | tar -x -C /tmp/ref

Usage (root): .venv/bin/python bench/bench_decode_ab.py --ref-tree /tmp/ref [--records N]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
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
    args = parser.parse_args()

    from bench_consumer import generate  # noqa: PLC0415

    from hekitrace.capture import records  # noqa: PLC0415
    from hekitrace.capture.engine import Capture  # noqa: PLC0415
    from hekitrace.capture.loader import CaptureSettings  # noqa: PLC0415
    from hekitrace.capture.ringbuf import RingReader  # noqa: PLC0415
    from hekitrace.config.abi import DEFAULT_PROFILE  # noqa: PLC0415

    path = os.path.join(args.ref_tree, "hekitrace", "capture", "records.py")
    spec = importlib.util.spec_from_file_location("ref_records", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    n = args.records
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
    best = {"this tree": 0.0, "reference": 0.0}
    for rnd in range(args.rounds):
        order = [("this tree", records), ("reference", ref)]
        for name, mod in order if rnd % 2 == 0 else order[::-1]:
            numbers = mod.HypercallNumbers.from_profile(DEFAULT_PROFILE)
            gc.collect()
            kept: list = []
            t0 = _CLOCK()
            for buf, spans in batches:
                kept += mod.decode_batch(buf, spans, 0, numbers)
            _after = [None] * 1000   # a collection the decoder deferred runs in the timing
            elapsed = _CLOCK() - t0
            assert len(kept) == n
            best[name] = max(best[name], n / elapsed)
            print(f"round {rnd + 1}: {name}: {n / elapsed / 1e6:.2f} M records/s "
                  f"({elapsed / n * 1e9:.0f} ns/record)")
            del kept
    print(f"best: this tree {best['this tree'] / 1e6:.2f} M/s, reference "
          f"{best['reference'] / 1e6:.2f} M/s ({best['this tree'] / best['reference']:.1f}x); "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
