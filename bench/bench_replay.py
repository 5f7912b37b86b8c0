"""Benchmark trace decoding and ``hekitrace replay`` on a trace of at least 5 million events.

Run: ``.venv/bin/python bench/bench_replay.py`` (``--help`` for sizes). Prints a markdown
table for BENCHMARKS.md ("## Replay").

The trace is simulated (``hekitrace.sim.scenarios``'s ``stress`` scenario: busy Heki guests with
module load/unload, BPF JIT packs, text pokes, IPI/kick hypercalls and CR4 writes), made
in chunks of ``--vms-per-chunk`` VMs that run at once and are destroyed at the end of
their chunk, so state stays bounded and VMs come and go; it is written once to
``--trace`` (default /tmp/hekitrace-bench-replay.htrace) and reused when its header
says it was made with the same sizes.

Measured in the same run, on the same file:

- ``read+crc`` (baseline, the floor): read the file in 1 MiB chunks and crc32 them;
- ``decode (binary)``: every event of the binary trace, in blocks (``TraceReader.batches``);
- ``decode (jsonl)``: the first ``--jsonl-events`` events written as JSON Lines, decoded
  (the hand-written-scenario encoding, for comparison);
- ``replay``: decode + ``Pipeline.feed_many`` (exactly ``hekitrace replay``'s loop,
  ``hekitrace.replay.replay``) over the first ``--replay-events`` events
  (default: all of them).

Rates are given per wall-clock second and per CPU second of this process
(``time.process_time``): on a shared machine the wall rate mostly measures the other
processes; the CPU rate is what one idle core would do.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
import zlib

from hekitrace.replay import replay
from hekitrace.sim import scenarios
from hekitrace.state.events import VmDestroyed
from hekitrace.trace.file import TraceHeader, open_trace
from hekitrace.trace.writer import TraceWriter


def make_trace(path: str, events: int, vms_per_chunk: int, per_vm: int, seed: int) -> int:
    """Write the stress trace; returns the number of events written."""
    want = {"bench": "replay", "events": events, "vms_per_chunk": vms_per_chunk,
            "per_vm": per_vm, "seed": seed}
    if os.path.exists(path):
        try:
            reader = open_trace(path, [])
            reader.close()
            if {k: reader.header.extra.get(k) for k in want} == want:
                return events
        except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
            pass
    tmp = path + ".tmp"
    start = scenarios.DEFAULT_START_NS
    written = 0
    header = TraceHeader(kernel_release="simulated", abi_profile="heki-v2",
                         start_time_ns=start, hostname="bench",
                         extra={**want, "mbec": True})
    t0 = time.perf_counter()
    with TraceWriter(tmp, header) as writer:
        for chunk in itertools.count():
            chunk_events = scenarios.simulate(["stress"], vms=vms_per_chunk, seed=seed + chunk,
                                        start_ns=start, stress_events=per_vm)
            last = chunk_events[-1].time_ns
            for tgid in sorted({ev.tgid for ev in chunk_events}):
                last += 1_000_000
                chunk_events.append(VmDestroyed(last, tgid, tgid, ""))
            writer.write_all(chunk_events)
            written += len(chunk_events)
            start = last + 1_000_000_000
            print(f"  generated {written} events ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
            if written >= events:
                break
    os.replace(tmp, path)
    return written


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def read_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def decode_binary(path: str) -> int:
    return sum(len(batch) for batch in open_trace(path, []).batches())


def write_jsonl(path: str, source: str, limit: int) -> None:
    with TraceWriter(path, TraceHeader(extra={"mbec": True}), encoding="jsonl") as writer:
        for event in itertools.islice(open_trace(source, []), limit):
            writer.write(event)


def decode_jsonl(path: str) -> int:
    return sum(1 for _ in open_trace(path, []))


def replay_prefix(path: str, limit: int | None) -> int:
    if limit is None:
        return replay([path]).events
    prefix = path + f".first{limit}.htrace"
    if not os.path.exists(prefix):
        with TraceWriter(prefix, open_trace(path, []).header) as writer:
            writer.write_all(itertools.islice(open_trace(path, []), limit))
    return replay([prefix]).events


def write_mix_trace(path: str, kind: str, events: int, seed: int = 0) -> int:
    """A trace for the replay targets (bench/run_all.py); returns its event count.

    ``fault``: 8 Heki guests boot (kernel, 3 modules), then reported write and fetch
    faults (the kernel's collapsed storms, count 1-50) on their protected text and
    rodata, on module pages a text_poke announced, and on unprotected pages, with one
    text_poke per 200 faults. ``protection``: the stress guest (module and BPF-JIT churn,
    text pokes; about 70% map changes) on 8 VMs.
    """
    import random

    from hekitrace.sim.guest import SimVm
    from hekitrace.state.events import FaultAccess

    header = TraceHeader(kernel_release="simulated", abi_profile="heki-v2",
                         start_time_ns=scenarios.DEFAULT_START_NS, hostname="bench",
                         extra={"bench": f"replay-{kind}", "events": events, "mbec": True})
    if kind == "protection":
        made = scenarios.simulate(["stress"], vms=8, seed=seed,
                                  stress_events=events // 8 + 1)[:events]
    else:
        rng = random.Random(seed)
        vms = []
        for i in range(8):
            vm = SimVm(random.Random(rng.getrandbits(64)), name=f"f{i}",
                       start_ns=scenarios.DEFAULT_START_NS + i * 1000, mbec=True)
            vm.create()
            vm.boot()
            vm.modules = [vm.load_module(6, 2, 2) for _ in range(3)]
            vms.append(vm)
        per_vm = events // 8 + 1
        for vm in vms:
            text, rodata = vm.layout.text, vm.layout.rodata
            n = 0
            while len(vm.events) < per_vm:
                n += 1
                roll = rng.random()
                if n % 200 == 0:
                    vm.text_poke(rng.choice(vm.modules[-1]["text"]))
                elif roll < 0.5:
                    vm.fault(rng.randrange(*text), FaultAccess.WRITE, 0xFFFFFFFF81000000,
                             rng.randint(1, 50))
                elif roll < 0.7:
                    vm.fault(rng.randrange(*rodata), FaultAccess.WRITE, 0xFFFFFFFF81000000, 1)
                elif roll < 0.85:
                    vm.fault(rng.choice(vm.modules[-1]["text"]), FaultAccess.WRITE,
                             0xFFFFFFFFC0000000, 1)
                else:
                    vm.fault(0x300000 + rng.randrange(1 << 16), FaultAccess.FETCH,
                             0xFFFFFFFF81000000, 1)
        import heapq
        made = list(heapq.merge(*(vm.events for vm in vms), key=lambda e: e.time_ns))
    with TraceWriter(path, header) as writer:
        writer.write_all(made)
    return len(made)


def floor_and_replay(path: str, rounds: int = 1) -> dict:
    """Decode-only floor (every event of the binary trace, ``TraceReader.batches``) and
    the full replay (``hekitrace.replay.replay``: decode + Pipeline.feed_many), best of
    ``rounds`` each, in CPU time of this process."""
    best_floor = best_replay = float("inf")
    events = 0
    for _ in range(rounds):
        events, _wall, cpu = timed(lambda: decode_binary(path))
        best_floor = min(best_floor, cpu)
        got, _wall, cpu = timed(lambda: replay([path]).events)
        assert got == events, (got, events)
        best_replay = min(best_replay, cpu)
    return {"events": events, "floor_cpu_s": best_floor, "replay_cpu_s": best_replay,
            "floor_events_per_s": events / best_floor,
            "replay_events_per_s": events / best_replay,
            "replay_over_floor": best_replay / best_floor}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000,
                        help="minimum events in the trace (default: 5000000)")
    parser.add_argument("--vms-per-chunk", type=int, default=8,
                        help="VMs running at once (default: 8)")
    parser.add_argument("--per-vm", type=int, default=125_000,
                        help="events per VM (default: 125000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", default="/tmp/hekitrace-bench-replay.htrace")
    parser.add_argument("--jsonl-events", type=int, default=500_000)
    parser.add_argument("--replay-events", type=int, default=None,
                        help="replay only this many first events (default: all)")
    args = parser.parse_args(argv)

    print(f"trace: {args.trace}", file=sys.stderr)
    make_trace(args.trace, args.events, args.vms_per_chunk, args.per_vm, args.seed)
    size = os.path.getsize(args.trace)
    rows: list[tuple[str, int | None, float, float, int | None]] = []
    _, wall, cpu = timed(lambda: read_crc(args.trace))
    rows.append(("read+crc (baseline)", None, wall, cpu, size))
    total, wall, cpu = timed(lambda: decode_binary(args.trace))
    rows.append(("decode (binary)", total, wall, cpu, size))
    jsonl = args.trace + ".jsonl"
    if not os.path.exists(jsonl):
        write_jsonl(jsonl, args.trace, args.jsonl_events)
    n, wall, cpu = timed(lambda: decode_jsonl(jsonl))
    rows.append(("decode (jsonl)", n, wall, cpu, os.path.getsize(jsonl)))
    n, wall, cpu = timed(lambda: replay_prefix(args.trace, args.replay_events))
    rows.append(("replay (decode + Pipeline)", n, wall, cpu, None))

    print(f"\n{total} events, {size / 2**20:.0f} MiB binary ({size / total:.0f} bytes/event); "
          f"python {platform.python_version()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| what | events | wall s | events/s (wall) | CPU s | events/s (CPU) | MiB/s (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, wall, cpu, nbytes in rows:
        count = f"{n:,}" if n else "-"
        rate_wall = f"{n / wall:,.0f}" if n else "-"
        rate_cpu = f"{n / cpu:,.0f}" if n else "-"
        mib = f"{nbytes / 2**20 / cpu:,.0f}" if nbytes else "-"
        print(f"| {name} | {count} | {wall:.1f} | {rate_wall} | {cpu:.1f} | {rate_cpu} "
              f"| {mib} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
