#!/usr/bin/env python3
"""Write BENCHMARKS.md from bench/results.json (``make bench`` runs it after run_all.py).

BENCHMARKS.md shows today's figures only; its history is in git.

Usage: .venv/bin/python bench/report.py [--results bench/results.json] [--output BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: per entry: the section it goes in and how it is measured (beyond its "what")
HOW = {
    "consumer_real_decoder": (
        "Ring-buffer consumer",
        "`bench/bench_consumer.py` part 2 (`bench_real_records`). The capture's own flood "
        "generator (bpf/flood.c, an XDP program run with BPF_PROG_TEST_RUN `repeat`) fills "
        "the telemetry ring with 64-byte hypercall records; the two consumers take turns on "
        "it (order alternating per round), each timed alone in CPU time: bcc's idiom "
        "(`open_ring_buffer(cb)` + `ring_buffer_consume()`, the callback doing "
        "`table.event(data)`) against `RingReader.drain()` + the daemon's decoder "
        "`records.decode_batch` (Hypercall events). Best of the rounds."),
    "e2e_ring_flood": (
        "Daemon end to end",
        "`bench/bench_e2e.py` (`ring_path`). The real `Daemon` (default config, journal on "
        "in a temporary directory) reads the telemetry ring the flood generator filled "
        "(`poll_capture` + `Ingest.process`, one /metrics render per round). Only one "
        "record kind from tgid 0 (an unknown VMM): the transport ceiling, not a mix."),
    "e2e_mix_a_telemetry": (
        "Daemon end to end",
        "`bench/daemon_mixes.py`, run by `bench/bench_e2e.py --mixes` and run_all.py. The "
        "real `Daemon` built as `hekitrace daemon` builds it from configs/hekitrace.yaml "
        "(paths moved to a temporary directory, `abi.mbec: true`), journal ON (every "
        "event journaled, fsync each second), JSON alerts to /dev/null, no capture engine. "
        "The rings cannot carry a mix of many known VMs (the flood generator writes one "
        "kind from tgid 0; the real hooks under BPF_PROG_TEST_RUN stamp every record with "
        "the bench's own tgid), so the events are fed into the daemon's bounded queue at "
        "most `room` at a time, exactly as `poll_capture` reads the rings, and "
        "`Ingest.process` applies them; `Daemon.tick` and a /metrics render every CPU "
        "second (15x Prometheus' default scrape rate). The booted VMs' history is fed "
        "first, untimed. CPU time of the process; best of the rounds, each on a fresh "
        "daemon with an empty journal."),
    "e2e_mix_b_protection": ("Daemon end to end", "As mix (a); the whole trace is timed."),
    "e2e_boot_storm": (
        "Daemon end to end",
        "As mix (a). All the storm's events are there at once (the harshest arrival); "
        "'complete' means each guest's requested and applied maps in the daemon equal "
        "those of a `Host` fed the same events alone, and the daemon counted no loss; "
        "the time to every map complete is the CPU time to apply the backlog."),
    "e2e_hostile_flood": (
        "Daemon end to end",
        "As mix (c); the hostile VM is left out of the completeness check (its requests "
        "are malformed on purpose)."),
    "replay_fault_heavy": (
        "Replay",
        "`bench/bench_replay.py` (`write_mix_trace`, `floor_and_replay`). A simulated binary "
        "trace (8 Heki guests: boot, modules, then reported faults on protected text, "
        "rodata, announced module pages and unprotected pages, a text_poke every 200 "
        "faults); the floor decodes every event (`TraceReader.batches`), the figure is "
        "`hekitrace.replay.replay` (decode + Pipeline). CPU time, best of the rounds."),
    "replay_protection_heavy": (
        "Replay",
        "As above on the stress guest (module and BPF-JIT churn, text pokes: about 70% "
        "map changes) on 8 VMs."),
    "memory_daemon_rss": (
        "Daemon memory",
        "`bench/bench_memory.py --with-bcc --json`, in a fresh process: the daemon's own "
        "start-up step `service.parts.start_capture` (bcc compiles and loads every "
        "program; hooks not attached; then the C heap the compile freed is handed back), "
        "then 100 VMs with 10k ranges in each map (requested and applied) built through "
        "`Host.apply`, as the daemon builds them. RSS, owned (Private_*) and shared "
        "(Shared_*) from /proc/self/smaps_rollup. 'Shared' counts pages another process "
        "maps too (on this host other engineers' processes map libbcc/LLVM): on a host "
        "where only the daemon uses bcc those ~100 MiB of library pages are owned."),
    "bpf_fault_storm": (
        "BPF fault program",
        "`bench/bench_bpf_cost.py` (`measure_all`). Each program run with "
        "BPF_PROG_TEST_RUN while run-time stats are on (BPF_ENABLE_STATS); the figure is "
        "the kernel's run_time_ns / run_cnt, so the syscall is not included. Baseline: an "
        "empty raw tracepoint program in the same run."),
    "bpf_fault_cold_bucket": ("BPF fault program", "As above."),
    "bpf_fault_unprotected_page": ("BPF fault program", "As above."),
    "bpf_fault_first_fault": ("BPF fault program", "As above; no target, reported."),
    "policy_fault_path": (
        "Fault rule",
        "`bench/bench_pipeline.py` (`fault_path`): Host.apply + Policy.evaluate per "
        "protected write fault, the VM holding 256 write announcements; baseline: the "
        "same run with the previous algorithm (a scan of every announcement), swapped in."),
}
ORDER = ["Ring-buffer consumer", "Daemon end to end", "Replay", "Daemon memory",
         "BPF fault program", "Fault rule"]


def fmt(x: object, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000 or unit.startswith("ns"):
            return f"{x:,.0f}"
        return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return str(x)


def render(doc: dict) -> str:
    out = ["# hekitrace benchmarks", "",
           f"Today's figures, from `bench/results.json` (written by `make bench` on "
           f"{doc['generated']}; {doc['sizes']} sizes; kernel {doc['host']['kernel']}, "
           f"python {doc['host']['python']}, {doc['host']['cpus']} cores). The history of "
           "earlier attempts is in git (`git log -p BENCHMARKS.md`).", "",
           f"The run took {doc['duration_seconds']:.0f} s. The host is shared (2 cores; "
           "other engineers' builds and VM boots): load average (1, 5, 15 min) "
           f"{doc['load_average_start']} at the start, {doc['load_average_end']} at the end, "
           "and per entry below. Rates are per CPU second of the measuring process; what "
           "counts is each figure's ratio to its baseline measured in the same run. "
           "Nothing here is asserted by the tests.", "",
           "## Summary", "",
           "| target | figure | baseline (same run) | ratio | goal | verdict |",
           "|---|---:|---|---:|---|---|"]
    entries = doc["entries"]
    for e in entries:
        b = e["baseline"]
        out.append(f"| `{e['name']}` | {fmt(e['figure'], e['unit'])} {e['unit']} | "
                   f"{b['name']}: {fmt(b['figure'], e['unit'])} | {fmt(e['ratio'])} | {e['goal']} | "
                   f"{'met' if e['met'] else '**MISSED**'} |")
    missed = [e["name"] for e in entries if not e["met"]]
    out += ["", "Missed: " + (", ".join(f"`{m}`" for m in missed) if missed else "none") + ".",
            ""]
    if doc.get("failed_parts"):
        out += [f"Parts that failed to run: {doc['failed_parts']}.", ""]
    for section in ORDER:
        mine = [e for e in entries if HOW.get(e["name"], ("Other",))[0] == section]
        if not mine:
            continue
        out += [f"## {section}", ""]
        for e in mine:
            c, d = e["conditions"], e["details"]
            out += [f"### `{e['name']}`: {'met' if e['met'] else 'MISSED'}", "",
                    f"What: {e['what']}.", "", f"How: {HOW.get(e['name'], ('', '-'))[1]}", "",
                    f"- figure: **{fmt(e['figure'], e['unit'])} {e['unit']}**; baseline "
                    f"({e['baseline']['name']}): {fmt(e['baseline']['figure'], e['unit'])}; ratio "
                    f"{fmt(e['ratio'])}" + (f" ({d['ratio_is']})" if "ratio_is" in d else ""),
                    f"- goal: {e['goal']}: {'met' if e['met'] else '**MISSED**'}",
                    f"- conditions: load average {c.get('load_before')} -> "
                    f"{c.get('load_after')}; events {fmt(c.get('events'))}; rounds "
                    f"{c.get('rounds')}"
                    + (f"; {c['prefix_events_not_timed']:,} history events fed first, untimed"
                       if c.get("prefix_events_not_timed") else "")]
            extra = {k: v for k, v in d.items() if k not in ("ratio_is", "all_cases_ns")}
            if extra:
                out.append("- details: " + "; ".join(f"{k.replace('_', ' ')} {fmt(v)}"
                                                     for k, v in extra.items()))
            out.append("")
            if "all_cases_ns" in d:
                out += ["Every case of the run (kernel ns per run):", "",
                        "| case | ns/run |", "|---|---:|"]
                out += [f"| {k} | {v:.0f} |" for k, v in d["all_cases_ns"].items()]
                out.append("")
    others = doc.get("other_benchmarks") or {}
    if others:
        out += ["## Other benchmarks (no target here)", "",
                "Run by `make bench` too; their own output, as printed."]
        titles = {"bench_attrmap.py": "AttrMap", "bench_journal.py": "Journal and recovery"}
        for name, text in others.items():
            title = titles.get(name.split()[0], name)
            text = "\n".join("#" + line if line.startswith("### ") else line
                             for line in text.strip().splitlines())
            out += ["", f"### {title} (`bench/{name}`)", "", text]
        out.append("")
    out += ["## Reproduce", "",
            "As root, from a checkout: `make bench` (runs scripts/setup.sh, then "
            "`bench/run_all.py`, at most 20 minutes, then this report). One part: "
            "`.venv/bin/python bench/run_all.py --only e2e --output /tmp/r.json`; small "
            "sizes for development: `--quick`. Each script also runs alone "
            "(`bench/bench_e2e.py [--mixes]`, `bench_consumer.py`, `bench_replay.py`, "
            "`bench_memory.py [--with-bcc] [--json]`, `bench_bpf_cost.py`, "
            "`bench_pipeline.py`, `bench_attrmap.py`, `bench_journal.py`; "
            "`bench_decode_ab.py` is an A/B tool against another revision's tree and is "
            "not part of the run).", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    Path(args.output).write_text(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
