"""Kernel cost per run of the capture programs (``kernel.bpf_stats_enabled`` figures).

Each program is driven with BPF_PROG_TEST_RUN (the KVM tracepoints never fire on the build
host) while run-time stats are enabled (BPF_ENABLE_STATS, scoped to this process's fd);
the figure is the kernel's own run_time_ns / run_cnt for the program, so the test-run
syscall overhead is not included. Baseline, measured in the same run: an empty raw
tracepoint program (the floor any BPF program pays). Target: the fault program under
150 ns per run (docs/internals.md, Performance budget). Usage (root)::

    .venv/bin/python bench/bench_bpf_cost.py [--runs 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bcc import BPF
from vmm import Vmm

from hekitrace.capture import loader, testrun
from hekitrace.capture.engine import Capture

EMPTY = b"int hk_empty(struct bpf_raw_tracepoint_args *ctx) { return 0; }"


def measure(fd: int, args_of, runs: int, drain=None, drain_every: int = 1000) -> float:
    """Kernel ns per run over ``runs`` test runs; ``drain`` empties the rings every
    ``drain_every`` runs so reserves never fail (a full ring would measure the drop path)."""
    before = testrun.prog_stats(fd)
    for i in range(runs):
        testrun.run_raw_tracepoint(fd, args_of(i))
        if drain is not None and i % drain_every == drain_every - 1:
            drain()
    after = testrun.prog_stats(fd)
    cnt = after.run_cnt - before.run_cnt
    return (after.run_time_ns - before.run_time_ns) / cnt if cnt else float("nan")


#: results' names of the cases bench/run_all.py reports as targets, by key
KEYS = {
    "baseline: empty raw tracepoint program": "empty",
    "fault: write, page not in the filter (bucket miss)": "unprotected_page",
    "fault: write, not in the filter, new bucket each run": "cold_bucket",
    "fault: write, protected page, storm counted in kernel": "storm",
    "fault: storm on 2 pages in 2 buckets, alternating": "storm_two_buckets",
    "fault: write, protected page, first fault (record sent)": "first_fault",
    "fault: read access (dropped before any map)": "read",
}


def measure_all(runs: int) -> list[tuple[str, float]]:
    """(case, kernel ns per run) for every case; see the module docstring."""
    cap = Capture(settings=loader.CaptureSettings(fault_report_interval_seconds=60.0),
                  required={"hypercall": False, "ioctl": False}, attach=False,
                  say=lambda m: None).start()
    empty = BPF(text=EMPTY)
    stats_fd = testrun.enable_stats()
    drain = cap.read
    pid = os.getpid()
    results = []
    try:
        e = empty.load_func(b"hk_empty", BPF.RAW_TRACEPOINT).fd
        fault = cap.program_fd("hk_fault_raw")
        cr = cap.program_fd("hk_cr_raw")
        hc = cap.program_fd("hk_hypercall_raw")
        cap.protect_filter_update(pid, [(0x100000, 0x100000 + 60000)])
        results.append(("baseline: empty raw tracepoint program", measure(e, lambda i: [0], runs)))
        results.append(("fault: read access (dropped before any map)",
                        measure(fault, lambda i: [0, 0x100000 << 12, 0x181], runs)))
        results.append(("fault: write, page not in the filter (bucket miss)",
                        measure(fault, lambda i: [0, 0x10 << 12, 0x1AA], runs)))
        # bpf/fault.c caches the last filter word per CPU: the cases above repeat one
        # bucket (cache hit); these change bucket every run (cache miss, hash lookup)
        results.append(("fault: write, not in the filter, new bucket each run",
                        measure(fault, lambda i: [0, (0x10 + 512 * (i % 512)) << 12, 0x1AA],
                                runs)))
        testrun.run_raw_tracepoint(fault, [0, 0x100000 << 12, 0x1AA])
        testrun.run_raw_tracepoint(fault, [0, 0x100200 << 12, 0x1AA])
        results.append(("fault: write, protected page, storm counted in kernel",
                        measure(fault, lambda i: [0, 0x100000 << 12, 0x1AA], runs, drain)))
        results.append(("fault: storm on 2 pages in 2 buckets, alternating",
                        measure(fault, lambda i: [0, (0x100000 + 512 * (i & 1)) << 12, 0x1AA],
                                runs, drain)))
        n = min(runs, 50000)
        results.append(("fault: write, protected page, first fault (record sent)",
                        measure(fault, lambda i: [0, (0x100001 + i) << 12, 0x1AA], n, drain)))
        results.append(("cr: CR4 write (record sent)",
                        measure(cr, lambda i: [1, 4, 0x3406E0], runs, drain)))
        results.append(("cr: CR3 write (filtered)", measure(cr, lambda i: [1, 3, 0], runs)))
        results.append(("hypercall: other nr (telemetry record)",
                        measure(hc, lambda i: [0x77, 1, 2, 3, 4], runs, drain)))
        with Vmm() as vm:
            vm.add_memslot(0x100000, 1 << 20)
            entries = [(0x200000 + i * 0x2000, 0x201000 + i * 0x2000, 5) for i in range(200)]
            head = vm.write_heki_list([0x101000, 0x105000], entries)
            results.append(("hypercall: PROTECT_MEMORY, 2-page list, 200 entries",
                            measure(hc, lambda i: [14, head, 0, 0, 0], max(runs // 10, 100),
                                    drain, drain_every=100)))
            losses = sum(v for v in cap.loss_totals().values())
            if losses:
                print(f"WARNING: {losses} records lost during the run: figures include "
                      "drop paths", file=sys.stderr)
            cap.forget_vm(pid)
    finally:
        os.close(stats_fd)
        cap.close()
        empty.cleanup()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20000)
    args = ap.parse_args()
    runs = args.runs
    results = measure_all(runs)
    print(f"# bpf program cost, {runs} runs each, kernel {platform.release()}, "
          f"{os.cpu_count()} cpus")
    print(f"{'program / case':<58} {'ns/run':>8}")
    for name, ns in results:
        print(f"{name:<58} {ns:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
