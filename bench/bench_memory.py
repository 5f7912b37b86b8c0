#!/usr/bin/env python3
"""Daemon-state memory: 100 VMs with 10k ranges in each map (target: < 200 MB RSS).

Builds the state the way the daemon does (events through ``Host.apply``), in a fresh
process, and reports the process RSS (VmRSS and VmHWM from /proc/self/status) before
and after, plus the time one ``/metrics`` scrape takes over that state (the collector
holds the state lock that long, so it bounds how long a scrape can delay a batch).

With ``--with-bcc`` (what bench/run_all.py runs) the capture engine is started first in
the same process (bcc compiles and loads every program, as the daemon does; nothing is
attached), so the figure is the whole daemon process's; owned (private) and shared
memory are then read from /proc/self/smaps_rollup. ``--json`` prints the figures as one
JSON object.

Usage: .venv/bin/python bench/bench_memory.py [--vms 100] [--ranges 10000] [--with-bcc] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def smaps_rollup_kib() -> dict[str, int]:
    """/proc/self/smaps_rollup's kB fields (Rss, Pss, Shared_*, Private_*, Anonymous...)."""
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def memory_split() -> dict[str, float]:
    """RSS, owned (private) and shared MiB of this process."""
    r = smaps_rollup_kib()
    private = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
    shared = r.get("Shared_Clean", 0) + r.get("Shared_Dirty", 0)
    return {"rss_mib": r.get("Rss", 0) / 1024, "private_mib": private / 1024,
            "shared_mib": shared / 1024, "pss_mib": r.get("Pss", 0) / 1024,
            "anonymous_mib": r.get("Anonymous", 0) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--ranges", type=int, default=10_000,
                        help="distinct ranges per map per VM (default: 10000)")
    parser.add_argument("--with-bcc", action="store_true",
                        help="start the capture engine (bcc) in this process first")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    start_kib = rss_kib()
    capture = None
    bcc_seconds = 0.0
    if args.with_bcc:
        from hekitrace.capture.engine import Capture

        t = time.perf_counter()
        from hekitrace.config.settings import parse_config
        from hekitrace.service import parts

        # the daemon's own start-up step (service/parts.py start_capture: the engine,
        # then the C heap bcc's compile freed handed back), hooks not attached
        capture, _report = parts.start_capture(
            lambda cfg, say: Capture(cfg, attach=False, say=say).start(),
            parse_config("{}\n", "<bench>"), lambda _line: None)
        bcc_seconds = time.perf_counter() - t
    bcc_split = memory_split()

    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from hekitrace.config.abi import DEFAULT_PROFILE
    from hekitrace.service.metrics import HekitraceCollector, LoopStats, PageCounts, build_info
    from hekitrace.state.events import AttrApplied, Memslot, ProtectEntry, ProtectRequest, VmCreated
    from hekitrace.state.host import Host

    abi = DEFAULT_PROFILE
    base_kib = rss_kib()
    host = Host(abi)
    pages = PageCounts()  # the daemon keeps these from change records
    apply = host.apply
    observe = pages.observe
    t0 = time.time_ns()
    kvm_bits = [abi.guest_to_kvm(p) for p in (0b0101, 0b0011, 0b0001)]  # r-x, rw-, r--
    guest_perms = (0b0101, 0b0011, 0b0001)
    started = time.perf_counter()
    for vm in range(args.vms):
        tgid = 1000 + vm
        observe(apply(VmCreated(t0, tgid, tgid, name=f"vm{vm}", uuid=f"uuid-{vm}",
                                vmm="qemu")))
        observe(apply(Memslot(t0, tgid, tgid, 0, 0, 0, 64 << 30, 0x7f0000000000)))
        # requested: ranges of 1 page separated by 1-page gaps, alternating permissions,
        # in requests of at most 4096 entries (state.max_entries_per_request)
        entries = [ProtectEntry((2 * i) << 12, (2 * i + 1) << 12, guest_perms[i % 3])
                   for i in range(args.ranges)]
        for start in range(0, len(entries), 4000):
            observe(apply(ProtectRequest(t0, tgid, tgid, 0x1000,
                                      tuple(entries[start:start + 4000]),
                                      declared_entries=len(entries[start:start + 4000]))))
        for i in range(args.ranges):
            observe(apply(AttrApplied(t0, tgid, tgid, 2 * i, 2 * i + 1, kvm_bits[i % 3])))
    build_seconds = time.perf_counter() - started
    state_kib = rss_kib()
    sizes = [(len(g.requested), len(g.applied)) for g in host.guests.values()]
    pages.check(host)

    stats = LoopStats(65536)

    def scrape_seconds(page_counts: PageCounts | None) -> tuple[float, int]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(HekitraceCollector(lambda: (host, abi, None), stats,
                                             build_info("n/a"), page_counts=page_counts))
        times = []
        for _ in range(5):
            s = time.perf_counter()
            body = generate_latest(registry)
            times.append(time.perf_counter() - s)
        return sorted(times)[2], len(body)

    daemon_scrape, size = scrape_seconds(pages)
    recount_scrape, _ = scrape_seconds(None)
    final = memory_split()
    if args.json:
        import json

        print(json.dumps({
            "vms": args.vms, "ranges": args.ranges, "with_bcc": args.with_bcc,
            "interpreter_mib": start_kib / 1024,
            "before_state": bcc_split, "bcc_start_seconds": bcc_seconds,
            "with_state": final, "peak_rss_mib": rss_kib("VmHWM") / 1024,
            "rss_mb": state_kib * 1024 / 1e6, "build_seconds": build_seconds,
            "scrape_ms": daemon_scrape * 1000, "stored_ranges": sum(r + a for r, a in sizes)}))
        if capture is not None:
            capture.close()
        return 0
    print(f"VMs: {args.vms}; stored ranges per VM requested/applied: "
          f"{sizes[0][0]}/{sizes[0][1]}")
    print(f"RSS before state: {base_kib / 1024:.1f} MiB (python + hekitrace + prometheus_client)")
    print(f"RSS with state:   {state_kib / 1024:.1f} MiB (peak {rss_kib('VmHWM') / 1024:.1f} MiB)"
          f"; state alone {(state_kib - base_kib) / 1024:.1f} MiB; target < 200 MB")
    stored = sum(r + a for r, a in sizes)
    verdict = "meets" if state_kib * 1024 < 200e6 else "MISSES"
    print(f"                  = {state_kib * 1024 / 1e6:.1f} MB ({verdict} the 200 MB target); "
          f"state per stored range {(state_kib - base_kib) * 1024 / stored:.1f} bytes "
          f"({stored:,} ranges)")
    print(f"built in {build_seconds:.1f} s ({2 * args.vms * args.ranges / build_seconds:,.0f} "
          f"ranges/s through Host.apply)")
    print(f"/metrics render ({size} bytes), median of 5: {daemon_scrape * 1000:.1f} ms with the "
          f"daemon's incremental page counts, {recount_scrape * 1000:.1f} ms summing the maps "
          "(the state lock is held that long)")
    print(f"owned (private) {final['private_mib']:.1f} MiB, shared {final['shared_mib']:.1f} MiB "
          f"(smaps_rollup); before the state: RSS {bcc_split['rss_mib']:.1f} MiB"
          + (f" with bcc loaded in {bcc_seconds:.1f} s" if args.with_bcc else ""))
    if capture is not None:
        capture.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
