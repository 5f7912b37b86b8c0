"""End to end: events per second through ``Pipeline`` (Host.apply + Policy.evaluate + timers).

Run: ``.venv/bin/python bench/bench_pipeline.py`` (``--help`` for sizes). Prints a markdown
table for BENCHMARKS.md ("## End to end").

Workloads, all from the simulator (``hekitrace.sim.scenarios``, seeded), fed with ``feed_many``:

- ``stress``: the simulator's busy guest (module and BPF-JIT churn, text pokes with their
  PROTECT_MEMORY pairs, other hypercalls, CR4 writes). About 70% of its events change a
  map (protect_request, attr_applied), the expensive kinds.
- ``telemetry``: the same trace without the map-changing events, i.e. what a host sees
  between protection bursts (hypercalls, CR writes); plus, once the guest is booted,
  write faults on default pages (the kernel filter normally drops those; here they
  exercise the fault rule's lookup).
- ``attack-flood``: 200k identical write faults on protected text from one VM (storm
  control: dedup path).

Baseline, measured in the same run on the same event lists: the floor cost of touching
every event in Python (a loop that dispatches on ``type(event)`` into a dict counter,
which is the least any consumer does). The ratio says how much of the budget state and
rules take beyond that floor. Nothing here is asserted: figures go to BENCHMARKS.md.

Times are CPU time of this process (``time.process_time``), as in the other sections: on
the shared build host wall-clock rates swing 2x with the other processes' load.
"""

from __future__ import annotations

import argparse
import gc
import time

from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.sim import scenarios
from hekitrace.state.events import AttrApplied, Fault, FaultAccess, ProtectRequest

_CLOCK = time.process_time


def _baseline(events: list) -> float:
    counts: dict[type, int] = {}
    start = _CLOCK()
    for event in events:
        t = type(event)
        counts[t] = counts.get(t, 0) + 1
    return _CLOCK() - start


def _pipeline(config, prefix: list, events: list) -> float:
    pipeline = Pipeline(config)
    pipeline.feed_many(prefix)
    pipeline.add_observer(lambda change, findings: None)   # the daemon always has one
    gc.collect()
    start = _CLOCK()
    pipeline.feed_many(events)
    return _CLOCK() - start


def fault_path(faults: int, rounds: int) -> dict:
    """ns per protected write fault (Host.apply + Policy.evaluate) on a VM holding 256
    write announcements none of which covers the faulting pages (storm-controlled: 512
    distinct pages, so dedup windows absorb the repeats): with the fault rule's page
    index (policy.vm_state.Announcements) and, as the same-run baseline, with the
    previous algorithm (every announcement scanned; the oracle of
    tests/unit/test_announcements.py, restated here since bench/ and tests/ stay apart)."""
    from collections import deque

    from hekitrace.config.abi import AbiProfile
    from hekitrace.config.settings import parse_config
    from hekitrace.policy import vm_state
    from hekitrace.policy.engine import Policy
    from hekitrace.state.events import Memslot, ProtectEntry, VmCreated
    from hekitrace.state.host import Host

    class Scan:
        def __init__(self) -> None:
            self.entries: deque = deque(maxlen=vm_state.MAX_RECENT_WRITABLE)

        def __bool__(self) -> bool:
            return bool(self.entries)

        def append(self, t: int, s: int, e: int) -> None:
            self.entries.append((t, s, e))

        def expire(self, horizon: int) -> None:
            while self.entries and self.entries[0][0] < horizon:
                self.entries.popleft()

        def announced(self, gfn: int, when: int, window: int) -> bool:
            for t, s, e in self.entries:
                if s <= gfn < e and when - t <= window:
                    return True
            return False

    t0 = 1_795_000_000_000_000_000
    abi = AbiProfile(name="heki-v2-mbec", lock_cr_update=13, protect_memory=14, mbec=True)

    def run() -> float:
        host = Host(abi)
        policy = Policy(parse_config("{}\n").policy, abi, clock=lambda: t0,
                        applied_hook_active=False)

        def feed(event) -> None:  # type: ignore[no-untyped-def]
            policy.evaluate(host.apply(event), host)

        feed(VmCreated(t0, 1, 1, name="v", uuid="u"))
        feed(Memslot(t0, 1, 1, 0, 0, 0, 1 << 30, 0x7F0000000000))
        feed(ProtectRequest(t0 + 1, 1, 1, 0x9000, (ProtectEntry(0x1000 << 12, 0x3000 << 12, 5),)))
        t = t0 + 2
        for i in range(256):
            g = 0x1000 + 2 * i
            feed(ProtectRequest(t, 1, 1, 0x9000, (ProtectEntry(g << 12, (g + 1) << 12, 3),)))
            feed(ProtectRequest(t + 1, 1, 1, 0x9000, (ProtectEntry(g << 12, (g + 1) << 12, 5),)))
            t += 2
        events = [Fault(t + 10 + i, 1, 1, 0, (0x2800 + i % 512) << 12, 0x182, 0,
                        int(FaultAccess.WRITE), 1, 0) for i in range(faults)]
        apply, evaluate = host.apply, policy.evaluate
        gc.collect()
        start = _CLOCK()
        for event in events:
            evaluate(apply(event), host)
        return (_CLOCK() - start) / faults * 1e9

    index_ns = min(run() for _ in range(rounds))
    real = vm_state.Announcements
    vm_state.Announcements = Scan  # type: ignore[misc,assignment]
    try:
        scan_ns = min(run() for _ in range(rounds))
    finally:
        vm_state.Announcements = real  # type: ignore[misc]
    return {"index_ns": index_ns, "scan_ns": scan_ns}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000,
                        help="events in the stress trace (default: 200000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per workload; the best is reported (default: 3)")
    args = parser.parse_args()
    config = parse_config("abi:\n  mbec: true\n")   # the simulated host has MBEC
    stress = scenarios.simulate(["stress"], seed=1, stress_events=args.events)
    boot_end = next(i for i, e in enumerate(stress) if type(e) is ProtectRequest) + 1
    boot = stress[:boot_end + 64]
    tgid = stress[0].tgid
    rest = [e for e in stress[len(boot):] if type(e) not in (ProtectRequest, AttrApplied)]
    t_last = stress[-1].time_ns
    faults = [Fault(t_last + i, tgid, tgid + 1, 0, (0x200000 + (i % 4096)) << 12, 0x182, 0,
                    FaultAccess.WRITE) for i in range(len(rest) // 4)]
    telemetry = rest + faults
    text_fault = next(e for e in scenarios.simulate(["attack-write-text"], seed=1)
                       if type(e) is Fault)
    attack = scenarios.simulate(["attack-write-text"], seed=1)
    flood = [text_fault._replace(time_ns=text_fault.time_ns + 10 + i, count=1)
             for i in range(200_000)]
    workloads = [("stress", [], stress), ("telemetry", boot, telemetry),
                 ("attack-flood", attack, flood)]
    print("| workload | events | baseline loop (events/s, CPU) | Pipeline (events/s, CPU) | "
          "Pipeline / baseline |")
    print("|---|---|---|---|---|")
    for name, prefix, events in workloads:
        base = min(_baseline(events) for _ in range(args.repeat))
        ours = min(_pipeline(config, prefix, events) for _ in range(args.repeat))
        print(f"| {name} | {len(events)} | {len(events) / base:,.0f} | "
              f"{len(events) / ours:,.0f} | {base / ours:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
