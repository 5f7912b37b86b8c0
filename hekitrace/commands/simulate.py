"""``hekitrace simulate``: write the trace a simulated Heki v2 guest would produce.

The events come from :mod:`hekitrace.sim.scenarios` (a real Debian kernel's layout, page lists
built as the guest builds them, the host's applied attributes); the file is a normal
trace that ``hekitrace replay`` reads like a recording from a real host.
"""

from __future__ import annotations

import argparse
import os
import sys

from hekitrace.config.abi import HEKI_V2
from hekitrace.errors import UsageError
from hekitrace.sim import page_lists
from hekitrace.sim import scenarios as sim
from hekitrace.trace.file import TraceHeader
from hekitrace.trace.jsonl import parse_time
from hekitrace.trace.writer import TraceWriter

EPILOG = """scenarios:
  clean-boot, module-load-unload, bpf-jit, text-poke, confidential-vm, multi-vm:
      legitimate guests (the default policy reports nothing)
  attack-write-text, attack-exec-data, attack-clear-smep, attack-reprotect-immutable,
  attack-wx-request, attack-malformed-lists: one attack each; all-attacks: every one,
      each in its own VM
  stress: a busy guest for benchmarks (--events sets its size per VM)

examples:
  hekitrace simulate --scenario attack-write-text -o attack.jsonl --format jsonl
  hekitrace simulate --scenario clean-boot --scenario all-attacks -o mix.htrace
  hekitrace simulate --scenario stress --vms 20 --events 250000 -o /tmp/big.htrace
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate", help="write the trace of a simulated Heki guest (no KVM needed)",
        description="Write a trace of simulated Heki v2 guests and the events a Heki host "
                    "would report for them. Deterministic for a given --seed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="scenario to simulate; repeat for several (default: clean-boot)")
    parser.add_argument("--vms", type=int, default=1, metavar="N",
                        help="run each scenario on N VMs at once (default: 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed (default: 0)")
    parser.add_argument("--events", type=int, default=200_000, metavar="N",
                        help="events per VM of the stress scenario (default: 200000)")
    parser.add_argument("--start", default=None, metavar="TIME",
                        help="time of the first event, RFC 3339 (default: "
                             "2026-11-25T15:00:00Z)")
    parser.add_argument("-w", "--write", dest="file", required=True, metavar="FILE",
                        help="trace file to write ('-' for standard output, JSON Lines)")
    parser.add_argument("--format", choices=("binary", "jsonl"), default=None,
                        help="encoding (default: jsonl for *.jsonl and '-', else binary)")
    return parser


def run(args: argparse.Namespace) -> int:
    names = args.scenario or ["clean-boot"]
    unknown = [n for n in names if n not in sim.SCENARIO_NAMES]
    if unknown:
        raise UsageError(f"unknown scenario {unknown[0]!r}; expected one of "
                         f"{', '.join(sim.SCENARIO_NAMES)}")
    if args.vms < 1 or args.events < 1:
        raise UsageError("--vms and --events must be at least 1")
    try:
        start = parse_time(args.start) if args.start else sim.DEFAULT_START_NS
    except ValueError as error:
        raise UsageError(f"--start: {error}") from None
    encoding = args.format or ("jsonl" if args.file == "-" or args.file.endswith(".jsonl")
                               else "binary")
    events = sim.simulate(names, vms=args.vms, seed=args.seed, start_ns=start,
                          stress_events=args.events)
    header = TraceHeader(
        kernel_release="simulated", abi_profile=HEKI_V2.name, start_time_ns=start,
        hostname="simulated",
        # no creation date or real hostname: the same arguments give the same bytes
        extra={"mbec": True, "producer": "hekitrace simulate",
               "scenarios": names, "vms": args.vms, "seed": args.seed,
               "kernel_layout": page_lists.load_layout().provenance})
    if args.file == "-":
        if encoding != "jsonl":
            raise UsageError("standard output takes --format jsonl only")
        writer = TraceWriter(sys.stdout.buffer, header, encoding="jsonl")
    else:
        writer = TraceWriter(args.file, header, encoding=encoding)
    with writer:
        writer.write_all(events)
    if args.file != "-":
        size = os.path.getsize(args.file)
        print(f"wrote {len(events)} events ({size} bytes, {encoding}) to {args.file}: "
              f"{', '.join(names)}", file=sys.stderr)
    return 0
