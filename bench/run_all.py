#!/usr/bin/env python3
"""``make bench``: every benchmark once, each target against a baseline measured in the
same run, written to bench/results.json (BENCHMARKS.md explains each entry).

Each entry: name, what, unit, baseline {name, figure}, figure, ratio (figure over
baseline, or as the goal states it), goal, met (true/false), conditions (load average
before and after, events, rounds) and details. Rates are per CPU second of this process
(``time.process_time``) unless the entry says otherwise: the host is shared, wall-clock
rates there mostly measure the other processes.

Usage (root): .venv/bin/python bench/run_all.py [--quick] [--output bench/results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def entry(name: str, what: str, unit: str, baseline_name: str, baseline: float | None,
          figure: float, ratio: float | None, goal: str, met: bool, conditions: dict,
          **details: object) -> dict:
    return {"name": name, "what": what, "unit": unit,
            "baseline": {"name": baseline_name, "figure": baseline},
            "figure": figure, "ratio": None if ratio is None else round(ratio, 3),
            "goal": goal, "met": bool(met), "conditions": conditions, "details": details}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- each part returns its entries ------------------------------------------------------
def part_consumer(q: dict) -> list[dict]:
    import bench_consumer

    la = load()
    cb, reader = bench_consumer.bench_real_records(q["records"], q["rounds"], 4096)
    return [entry("consumer_real_decoder",
                  "ring consumer: RingReader.drain + records.decode_batch -> Hypercall "
                  "events, on the capture's own flood records (bpf/flood.c)",
                  "records/s", "bcc callback idiom (open_ring_buffer + table.event)", cb,
                  reader, reader / cb, ">= 3x baseline", reader / cb >= 3.0,
                  {"load_before": la, "load_after": load(), "events": q["records"],
                   "rounds": q["rounds"], "best_of": q["rounds"]})]


def part_e2e(q: dict) -> list[dict]:
    import bench_e2e
    import daemon_mixes as m

    out = []
    la = load()
    ring = bench_e2e.ring_path(q["records"], q["rounds"], say=say)
    out.append(entry(
        "e2e_ring_flood", "real Daemon, default config, journal on, fed through the "
        "telemetry ring by the kernel flood generator (non-Heki hypercalls from an unknown "
        "VMM: the cheapest kind; transport ceiling, not a mix)", "events/s",
        "bcc callback + Pipeline.feed (no queue, no journal)", ring["baseline_events_per_s"],
        ring["events_per_s"], ring["events_per_s"] / ring["baseline_events_per_s"],
        ">= 500k events/s (informative: not mix (a))", ring["events_per_s"] >= 500e3,
        {"load_before": la, "load_after": load(), "events": q["records"],
         "rounds": q["rounds"]}, lost=ring["lost"]))

    mixes = []
    prefix, a = m.mix_telemetry(8, q["mix_events"])
    mixes.append(("e2e_mix_a_telemetry", "(a) telemetry-heavy: 8 known, booted VMs: "
                  "non-Heki hypercalls, CR4 writes, write faults", prefix, a, {},
                  500e3, ">= 500k events/s"))
    b = m.mix_protection(20, q["mix_events"] // 2)
    mixes.append(("e2e_mix_b_protection", "(b) protection-heavy: 20 VMs booting, loading "
                  "and unloading modules, BPF JIT packs, text pokes", [], b,
                  {"check_maps": True}, 200e3, ">= 200k events/s"))
    c = m.mix_boot_storm(200)
    mixes.append(("e2e_boot_storm", "(c) boot storm: 200 Heki guests created within 1 ms, "
                  "each protecting its kernel and 3 modules, all events at once", [], c,
                  {"check_maps": True}, None, "every map complete, zero control loss"))
    d, bad = m.mix_hostile(50, q["hostile_flood"])
    mixes.append(("e2e_hostile_flood", "(d) one VM floods write faults on distinct "
                  "protected pages and malformed/wx protect requests while 50 guests boot",
                  [], d, {"check_maps": True, "skip": frozenset({bad})}, None,
                  "report; other guests' maps complete, zero control loss"))
    for name, what, pre, events, kw, rate_goal, goal in mixes:
        say(f"{name}: {len(events)} events")
        la = load()
        got = m.run_mix(name, pre, events, q["rounds"], **kw)
        pipe = m.pipeline_only(pre, events, q["rounds"])
        maps = got.get("maps")
        if rate_goal is not None:
            met = got["events_per_s"] >= rate_goal
        else:
            met = maps is not None and maps["incomplete"] == 0 and got["lost"] == 0
        out.append(entry(
            name, what + "; real Daemon (default config, journal on), events fed through "
            "its bounded queue as poll_capture reads the rings", "events/s",
            "Pipeline.feed_many alone on the same events (no queue, journal, alerts, "
            "metrics)", pipe, got["events_per_s"], got["events_per_s"] / pipe, goal, met,
            {"load_before": la, "load_after": load(), "events": len(events),
             "prefix_events_not_timed": len(pre), "rounds": q["rounds"], "best_of": q["rounds"]},
            cpu_us_per_event=round(got["cpu_us_per_event"], 3),
            sustained_events_per_s_before_first_loss=round(got["events_per_s"]),
            lost=got["lost"], maps=maps,
            time_to_all_maps_complete_s=got.get("time_to_all_maps_complete_s"),
            scrapes=got["scrapes"], journal_bytes=got["journal_bytes"],
            findings_emitted=got["findings_emitted"],
            type_dispatch_floor_events_per_s=round(got["baseline_events_per_s"])))
    return out


def part_replay(q: dict) -> list[dict]:
    import bench_replay

    out = []
    for kind, events, ratio_goal, rate_goal in (("fault", q["replay_fault"], 3.0, 1e6),
                                                 ("protection", q["replay_prot"], 6.0, 300e3)):
        path = f"/tmp/hekitrace-bench-replay-{kind}.htrace"
        n = bench_replay.write_mix_trace(path, kind, events)
        la = load()
        got = bench_replay.floor_and_replay(path, q["rounds"])
        os.unlink(path)
        ratio = got["replay_over_floor"]
        out.append(entry(
            f"replay_{kind}_heavy", f"hekitrace replay (decode + Pipeline) of a {kind}-heavy "
            "simulated binary trace", "events/s",
            "decode-only floor (TraceReader.batches over the same file)",
            got["floor_events_per_s"], got["replay_events_per_s"], ratio,
            f"replay time <= {ratio_goal:g}x the floor's and >= {rate_goal / 1e3:,.0f}k events/s",
            ratio <= ratio_goal and got["replay_events_per_s"] >= rate_goal,
            {"load_before": la, "load_after": load(), "events": n, "rounds": q["rounds"],
             "best_of": q["rounds"]}, ratio_is="replay CPU time / floor CPU time"))
    return out


def part_memory(q: dict) -> list[dict]:
    la = load()
    proc = subprocess.run([sys.executable, str(HERE / "bench_memory.py"), "--with-bcc",
                           "--json", "--vms", str(q["vms"]), "--ranges", str(q["ranges"])],
                          capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rss_mb = got["with_state"]["rss_mib"] * 2**20 / 1e6
    base_mb = got["before_state"]["rss_mib"] * 2**20 / 1e6
    return [entry(
        "memory_daemon_rss", f"whole process: bcc capture engine started (all programs "
        f"compiled and loaded) and the state of {q['vms']} VMs x {q['ranges']} ranges "
        "(requested and applied) built through Host.apply", "MB RSS",
        "the same process before the state (python + hekitrace + bcc loaded)", round(base_mb, 1),
        round(rss_mb, 1), rss_mb / base_mb, "< 200 MB RSS", rss_mb < 200,
        {"load_before": la, "load_after": load(), "events": 2 * q["vms"] * q["ranges"],
         "rounds": 1},
        owned_private_mib=round(got["with_state"]["private_mib"], 1),
        shared_mib=round(got["with_state"]["shared_mib"], 1),
        anonymous_mib=round(got["with_state"]["anonymous_mib"], 1),
        before_state=got["before_state"], peak_rss_mib=round(got["peak_rss_mib"], 1),
        bcc_start_seconds=round(got["bcc_start_seconds"], 1),
        interpreter_rss_mib=round(got["interpreter_mib"], 1),
        scrape_ms=round(got["scrape_ms"], 1), source="/proc/self/smaps_rollup")]


def part_bpf(q: dict) -> list[dict]:
    import bench_bpf_cost

    la = load()
    res = {bench_bpf_cost.KEYS.get(name, name): ns
           for name, ns in bench_bpf_cost.measure_all(q["bpf_runs"])}
    cond = {"load_before": la, "load_after": load(), "events": q["bpf_runs"], "rounds": 1}
    empty = res["empty"]
    out = []
    for key, what in (("storm", "write on a protected page, storm counted in kernel"),
                      ("cold_bucket", "write on an unprotected page, new bucket each run "
                       "(per-CPU cache miss, hash lookup)"),
                      ("unprotected_page", "write on an unprotected page, bucket miss "
                       "(cached bucket)")):
        out.append(entry(f"bpf_fault_{key}", f"BPF fault program (hk_fault_raw), {what}: "
                         "kernel run_time_ns / run_cnt over BPF_PROG_TEST_RUN runs",
                         "ns/run", "empty raw tracepoint program", round(empty, 1),
                         round(res[key], 1), res[key] / empty, "<= 150 ns per run",
                         res[key] <= 150, cond))
    out.append(entry("bpf_fault_first_fault", "BPF fault program, first fault on a protected "
                     "page (a record reserved and sent)", "ns/run",
                     "empty raw tracepoint program", round(empty, 1),
                     round(res["first_fault"], 1), res["first_fault"] / empty,
                     "reported (no target)", True, cond))
    out[0]["details"]["all_cases_ns"] = {k: round(v, 1) for k, v in res.items()}
    return out


def part_fault_path(q: dict) -> list[dict]:
    import bench_pipeline

    la = load()
    got = bench_pipeline.fault_path(q["faults"], q["rounds"])
    return [entry("policy_fault_path", "Host.apply + Policy.evaluate per protected write "
                  "fault (storm-controlled, 512 pages) with 256 write announcements kept "
                  "(none covering)", "ns/fault",
                  "the same with the previous algorithm (a scan of every announcement)",
                  round(got["scan_ns"], 1), round(got["index_ns"], 1),
                  got["scan_ns"] / got["index_ns"],
                  "no linear scan: faster than the scan (ratio = scan / index > 1)",
                  got["scan_ns"] > got["index_ns"],
                  {"load_before": la, "load_after": load(), "events": q["faults"],
                   "rounds": q["rounds"], "best_of": q["rounds"]})]


def run_others(q: dict) -> dict[str, str]:
    out = {}
    for script, args in (("bench_attrmap.py", q["attrmap_args"]),
                         ("bench_journal.py", q["journal_args"])):
        say(f"{script} {' '.join(args)}")
        t = time.time()
        la = load()
        proc = subprocess.run([sys.executable, str(HERE / script), *args],
                              capture_output=True, text=True, check=False)
        text = proc.stdout if proc.returncode == 0 else \
            f"FAILED (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-2000:]}"
        out[f"{script} {' '.join(args)}".strip()] = (
            f"(load average {la} -> {load()}; {time.time() - t:.0f} s)\n\n{text}")
    return out


PARTS = {"consumer": part_consumer, "e2e": part_e2e, "replay": part_replay,
         "memory": part_memory, "bpf": part_bpf, "fault_path": part_fault_path}
FULL = {"records": 300_000, "rounds": 3, "mix_events": 300_000, "hostile_flood": 200_000,
        "replay_fault": 1_000_000, "replay_prot": 300_000, "vms": 100, "ranges": 10_000,
        "bpf_runs": 20_000, "faults": 50_000, "attrmap_args": [], "journal_args": []}
QUICK = {"records": 50_000, "rounds": 1, "mix_events": 40_000, "hostile_flood": 20_000,
         "replay_fault": 60_000, "replay_prot": 30_000, "vms": 10, "ranges": 10_000,
         "bpf_runs": 5_000, "faults": 10_000,
         "attrmap_args": ["--ranges", "10000", "--updates", "20000", "--queries", "20000",
                          "--repeat", "1"],
         "journal_args": ["--events", "20000", "--repeat", "1", "--vms", "10",
                          "--tail", "20000"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(HERE / "results.json"))
    parser.add_argument("--quick", action="store_true", help="small sizes (development)")
    parser.add_argument("--only", action="append", choices=sorted(PARTS),
                        help="run only these parts (repeatable)")
    parser.add_argument("--no-others", action="store_true",
                        help="skip bench_attrmap.py and bench_journal.py (no targets)")
    args = parser.parse_args(argv)
    q = QUICK if args.quick else FULL
    started = time.time()
    la = load()
    entries: list[dict] = []
    failures: dict[str, str] = {}
    for part in args.only or list(PARTS):
        say(f"part {part}")
        t = time.time()
        try:
            entries += PARTS[part](q)
        except Exception as error:  # noqa: BLE001 - one broken part must not hide the rest
            import traceback
            traceback.print_exc()
            failures[part] = f"{type(error).__name__}: {error}"
        say(f"part {part}: {time.time() - t:.0f} s")
    others = {} if args.no_others or args.only else run_others(q)
    doc = {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count()},
        "sizes": "quick" if args.quick else "full", "parameters": q,
        "load_average_start": la, "load_average_end": load(),
        "duration_seconds": round(time.time() - started, 1),
        "failed_parts": failures, "entries": entries, "other_benchmarks": others}
    Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
    for e in entries:
        ratio = "-" if e["ratio"] is None else f"{e['ratio']:.2f}"
        print(f"{e['name']:<28} {e['figure']:>14,.1f} {e['unit']:<10} baseline "
              f"{e['baseline']['figure'] if e['baseline']['figure'] is not None else '-':>14} "
              f"ratio {ratio:>7}  {'met' if e['met'] else 'MISSED'}  ({e['goal']})")
    print(f"{len(entries)} entries in {args.output}; {doc['duration_seconds']:.0f} s; load "
          f"{la} -> {doc['load_average_end']}" + (f"; FAILED parts: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
