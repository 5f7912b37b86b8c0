#!/usr/bin/env python3
"""End to end: ring buffer -> events -> state, rules and metrics, in the daemon's code path.

Records are produced in the kernel by the capture's flood generator (bpf/flood.c, an XDP
program run with BPF_PROG_TEST_RUN ``repeat``: 64-byte hypercall records in the telemetry
ring, docs/kernel-support.md section 5). Two consumers take turns on the same ring, each
timed alone after the generator has filled it (alternating order per round):

(a) baseline, bcc's callback idiom: ``open_ring_buffer(cb)`` + ``ring_buffer_consume()``,
    the callback doing ``table.event(data)``, building the ``Hypercall`` event and calling
    ``Pipeline.feed(event)`` (same state and rules);
(b) hekitrace: the real :class:`hekitrace.service.daemon.Daemon` (started with that capture, its
    HTTP server and control socket on loopback/tmp): ``_on_capture`` (RingReader drain +
    batch decode + loss counters, into the bounded queue) then ``_process`` batches
    (``Pipeline.feed_many`` + findings + metric counters), exactly what its loop runs.
    Each round ends with one ``/metrics`` rendering (the collector over the state), timed
    and included.

The generator's records are hypercalls with a non-Heki number from tgid 0: the cheapest
event kind for the state machine, so this measures the transport + dispatch ceiling;
bench/bench_pipeline.py measures the state and rules on heavier event mixes.

The daemon runs under the bundled default config with the journal ON (in a temporary
directory; bench/daemon_mixes.py ``default_config``), as ``hekitrace daemon`` runs.

``--mixes`` instead runs the realistic mixes of bench/daemon_mixes.py (telemetry-heavy,
protection-heavy, boot storm, hostile flood) through the same daemon.

Usage (root): .venv/bin/python bench/bench_e2e.py [--records 300000] [--rounds 3] [--mixes]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

# HEKITRACE_TREE: measure another revision's hekitrace/ (a `git archive` of it), with
# HEKITRACE_BPF_DIR pointing at BPF sources it can load
sys.path.insert(0, os.environ.get("HEKITRACE_TREE") or
                os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CLOCK = time.process_time  # CPU time of this process: the generator runs in the kernel
                            # from our syscall, but is outside the timed sections anyway


def ring_path(n: int, rounds: int, say=print) -> dict:  # type: ignore[no-untyped-def]
    """The ring path: best rates (events/s, CPU time) of the bcc callback baseline and of
    the daemon, and the events the daemon lost; see the module docstring."""
    from prometheus_client import generate_latest

    from hekitrace.capture import records
    from hekitrace.capture.engine import Capture
    from hekitrace.capture.loader import CaptureSettings
    from hekitrace.capture.testrun import run_xdp
    from hekitrace.journal.recovery import JournalRecovery
    from hekitrace.pipeline import Pipeline
    from hekitrace.service.alerts import AlertSink
    from hekitrace.service.daemon import Daemon
    from hekitrace.state.events import Hypercall

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from daemon_mixes import default_config

    tmp = tempfile.mkdtemp(prefix="hekitrace-bench-")
    config = default_config(tmp, journal=True)
    ring_bytes = 1 << (n * 72 - 1).bit_length()
    cap = Capture(config, settings=CaptureSettings(telemetry_ring_bytes=ring_bytes),
                  attach=False, extra_cflags=["-DHK_WITH_FLOOD"], say=lambda _l: None).start()
    devnull = open(os.devnull, "w")
    daemon = Daemon(config, None, load_config=lambda p: config,
                    pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
                    capture_factory=lambda cfg, say: cap, log=devnull,
                    recovery=JournalRecovery(config),
                    alert_sink=AlertSink(stdout=True, fmt=config.alerts.format,
                                         stream=devnull))
    daemon.start()
    flood_fd = cap.program_fd("hk_flood")
    table = cap.bpf[b"hk_telemetry"]
    table._event_class = records.c_struct("hypercall")   # the package's checked layout
    # Only one consumer may own the ring at a time: the daemon's RingReader is created by
    # Capture; the bcc callback consumer is opened on the same map.
    base_pipeline = Pipeline(config, False)
    feed = base_pipeline.feed

    def callback(ctx, data, size):
        r = table.event(data)
        h = r.hdr
        feed(Hypercall(h.time_ns, h.tgid, h.tid, r.nr, r.a0, r.a1, r.a2, r.a3))
        return 0

    table.open_ring_buffer(callback)

    def flood() -> None:
        left = n
        while left:
            chunk = min(100_000, left)
            run_xdp(flood_fd, chunk)
            left -= chunk

    def by_callback() -> float:
        flood()
        before = sum(base_pipeline.events_by_kind.values())
        t0 = _CLOCK()
        cap.bpf.ring_buffer_consume()
        elapsed = _CLOCK() - t0
        got = sum(base_pipeline.events_by_kind.values()) - before
        assert got == n, (got, n)
        return n / elapsed

    def by_daemon() -> tuple[float, float]:
        flood()
        before = daemon.stats.events_by_kind.get("hypercall", 0)
        t0 = _CLOCK()
        while True:   # the loop: read what fits in the queue, apply it, again
            daemon.poll_capture()
            if not daemon.ingest.depth:
                break
            while daemon.ingest.depth:
                daemon.ingest.process(4096)
        t1 = _CLOCK()
        body = generate_latest(daemon.registry)
        elapsed = _CLOCK() - t0
        got = daemon.stats.events_by_kind["hypercall"] - before
        assert got == n, (got, n)
        assert b"hekitrace_events_total" in body
        return n / elapsed, (_CLOCK() - t1)

    gc.collect()
    best_a = best_b = 0.0
    try:
        for rnd in range(rounds):
            if rnd % 2:
                (rate_b, scrape), rate_a = by_daemon(), by_callback()
            else:
                rate_a, (rate_b, scrape) = by_callback(), by_daemon()
            best_a, best_b = max(best_a, rate_a), max(best_b, rate_b)
            say(f"round {rnd + 1}: bcc callback + Pipeline.feed {rate_a / 1e3:,.0f}k events/s; "
                  f"daemon path {rate_b / 1e3:,.0f}k events/s (incl. one /metrics render of "
                  f"{scrape * 1e3:.1f} ms); ratio {rate_b / rate_a:.1f}x")
        lost = sum(v for k, v in daemon.stats.lost.items())
    finally:
        daemon.close()
        devnull.close()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return {"baseline_events_per_s": best_a, "events_per_s": best_b, "lost": lost,
            "records": n, "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300_000,
                        help="records per round (default: 300000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixes", action="store_true",
                        help="the realistic mixes (bench/daemon_mixes.py) instead")
    args = parser.parse_args()
    if args.mixes:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import daemon_mixes as m
        prefix, a = m.mix_telemetry(8, args.records)
        hostile, bad_tgid = m.mix_hostile()
        for name, pre, events, kw in (
                ("a telemetry-heavy", prefix, a, {}),
                ("b protection-heavy", [], m.mix_protection(20, args.records), {"check_maps": True}),
                ("c boot storm", [], m.mix_boot_storm(200), {"check_maps": True}),
                ("d hostile flood", [], hostile,
                 {"check_maps": True, "skip": frozenset({bad_tgid})})):
            got = m.run_mix(name, pre, events, args.rounds, **kw)
            print(f"{name}: {got['events_per_s'] / 1e3:,.0f}k events/s "
                  f"({got['cpu_us_per_event']:.2f} us CPU/event), lost {got['lost']}, "
                  f"maps {got.get('maps', '-')}")
        return 0
    got = ring_path(args.records, args.rounds)
    best_a, best_b = got["baseline_events_per_s"], got["events_per_s"]
    print(f"best: baseline {best_a / 1e3:,.0f}k/s, daemon {best_b / 1e3:,.0f}k/s "
          f"({best_b / best_a:.1f}x); target 500k/s end to end: "
          f"{'met' if best_b >= 500e3 else 'NOT met'}; events lost: {got['lost']}; "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
