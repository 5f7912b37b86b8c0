"""Journal cost and recovery time: events/s with and without the journal, checkpoint
write and load time, and restart time (newest checkpoint + journal replay).

Run: ``.venv/bin/python bench/bench_journal.py`` (``--help`` for sizes). Prints markdown
for BENCHMARKS.md ("## Journal and recovery"). The journal directory is on the disk of
``--dir`` (default: a temporary directory under /var/tmp, i.e. the root filesystem, not
a tmpfs), so write and fsync costs are real.

1. Throughput: the simulator's ``stress`` trace fed through ``Pipeline.feed_many`` in
   4096-event batches (the daemon's batch size), once without a journal and once with
   one (encode per event as an observer, ``after_batch()`` per batch = one write(2), and
   ``tick()`` per batch so fsync runs every ``fsync_interval_seconds`` of wall time).
   The baseline is the same loop without the journal, measured in the same run on the
   same event list, alternating with it; best of ``--repeat`` runs each.
2. Checkpoint: a 100-VM state with 10k ranges in each map of each VM (bench_memory.py's
   shape), built by events: time to capture+encode+write atomically, its size, and
   time to decode+restore.
3. Recovery: what a restart does, :class:`hekitrace.journal.recovery.JournalRecovery` on a
   directory holding that checkpoint plus a journal of ``--tail`` stress events after it.
Nothing is asserted: figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

from hekitrace.config.settings import parse_config
from hekitrace.journal import checkpoint
from hekitrace.journal.recovery import JournalRecovery
from hekitrace.journal.segments import Journal
from hekitrace.pipeline import Pipeline
from hekitrace.sim import scenarios
from hekitrace.state.events import AttrApplied, Memslot, ProtectEntry, ProtectRequest, VmCreated

BATCH = 4096
T0 = 1_795_000_000_000_000_000


def _config(directory: str):
    return parse_config(f"abi:\n  mbec: true\njournal:\n  directory: {directory}\n", "<bench>")


def _feed(config, events: list, journal_dir: str | None) -> float:
    pipeline = Pipeline(config, True, clock=lambda: T0)
    journal = None
    if journal_dir is not None:
        shutil.rmtree(journal_dir, ignore_errors=True)
        journal = Journal(config.journal, lambda s, t: checkpoint.encode(
            s, t, checkpoint.capture_state(pipeline)), say=lambda m: None)
        journal.start(pipeline)
    gc.collect()
    start = time.perf_counter()
    for i in range(0, len(events), BATCH):
        pipeline.feed_many(events[i:i + BATCH])
        if journal is not None:
            journal.after_batch()
            journal.tick()
    if journal is not None:
        journal._writer.fsync()
    return time.perf_counter() - start


def _big_state(config, vms: int, ranges: int) -> Pipeline:
    """``vms`` VMs with ``ranges`` alternating ranges in both maps (built by events)."""
    p = Pipeline(config, True, clock=lambda: T0)
    t = T0
    for v in range(vms):
        tgid = 10_000 + v
        p.feed(VmCreated(t, tgid, tgid, vm_fd=3, name=f"vm{v}"))
        p.feed(Memslot(t + 1, tgid, tgid, 0, 0, 0, 1 << 34, 0x7f0000000000))
        entries = tuple(ProtectEntry(g * 0x2000, g * 0x2000 + 0x1000, 1 | (4 if g % 2 else 0))
                        for g in range(ranges))
        for i in range(0, ranges, 4096):
            p.feed(ProtectRequest(t + 2, tgid, tgid, 0x1000, entries[i:i + 4096]))
            for e in entries[i:i + 4096]:
                p.feed(AttrApplied(t + 3, tgid, tgid, e.gpa >> 12, e.end_gpa >> 12,
                                   8 | (32 if e.permissions & 4 else 0)))
        t += 10
    return p


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000,
                        help="events in the stress trace (default: 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs each (default: 3)")
    parser.add_argument("--vms", type=int, default=100, help="VMs in the checkpoint state")
    parser.add_argument("--ranges", type=int, default=10_000,
                        help="ranges per map per VM in the checkpoint state")
    parser.add_argument("--tail", type=int, default=200_000,
                        help="journal events replayed after the checkpoint (default: 200000)")
    parser.add_argument("--dir", default=None, help="where to put the journal "
                        "(default: a temporary directory under /var/tmp)")
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="hekitrace-bench-journal-", dir="/var/tmp")
    jdir = os.path.join(base, "journal")
    try:
        config = _config(jdir)
        events = scenarios.simulate(["stress"], stress_events=args.events, seed=1)
        # alternated, best of each: a noisy neighbour hits both sides alike
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeat):
            runs[False].append(_feed(config, events, None))
            runs[True].append(_feed(config, events, jdir))
        without, with_j = min(runs[False]), min(runs[True])
        seg_bytes = sum(os.path.getsize(os.path.join(jdir, n)) for n in os.listdir(jdir)
                        if n.endswith(".htrace"))
        n = len(events)
        print("### Throughput (stress trace, 4096-event batches)\n")
        print("| | events/s | per event |")
        print("|---|---:|---:|")
        print(f"| pipeline, no journal (baseline) | {n / without:,.0f} | "
              f"{without / n * 1e6:.2f} us |")
        print(f"| pipeline + journal (fsync 1 s) | {n / with_j:,.0f} | "
              f"{with_j / n * 1e6:.2f} us |")
        print(f"\njournal overhead {(with_j - without) / n * 1e6:.2f} us/event "
              f"({(with_j / without - 1) * 100:.0f} %); {seg_bytes / n:.1f} bytes/event "
              f"on disk ({n} events)\n")

        shutil.rmtree(jdir, ignore_errors=True)
        os.makedirs(jdir)
        start = time.perf_counter()
        big = _big_state(config, args.vms, args.ranges)
        built = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        data = checkpoint.encode(1, T0, checkpoint.capture_state(big))
        encoded = time.perf_counter() - start
        from hekitrace.journal.segments import checkpoint_name, segment_name, write_atomic
        start = time.perf_counter()
        write_atomic(os.path.join(jdir, checkpoint_name(1)), data)
        written = time.perf_counter() - start
        start = time.perf_counter()
        fresh = Pipeline(config, True, clock=lambda: T0)
        checkpoint.restore(fresh, checkpoint.decode(data).state)
        restored = time.perf_counter() - start
        print(f"### Checkpoint ({args.vms} VMs x {args.ranges} ranges x 2 maps; state built "
              f"by events in {built:.1f} s)\n")
        print("| step | time |")
        print("|---|---:|")
        print(f"| capture + encode ({len(data) / 1e6:.1f} MB compressed) | {encoded:.2f} s |")
        print(f"| write (temp file, fsync, rename, dir fsync) | {written * 1e3:.0f} ms |")
        print(f"| decode + restore | {restored:.2f} s |")

        tail = scenarios.simulate(["stress"], stress_events=args.tail, seed=2,
                            start_ns=T0 + 10**12)
        from hekitrace.trace.writer import TraceWriter
        with TraceWriter(os.path.join(jdir, segment_name(1))) as w:
            w.write_all(tail)
        del big, fresh
        gc.collect()
        start = time.perf_counter()
        rec = JournalRecovery(config, lambda m: None)
        rec(Pipeline(config, True, clock=lambda: T0), [])
        took = time.perf_counter() - start
        report = rec.report
        print(f"\n### Recovery (restart)\n\n| what | time |\n|---|---:|\n"
              f"| checkpoint above + {report.events} journal events, then a new "
              f"checkpoint | {took:.2f} s |")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
