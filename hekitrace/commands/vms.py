"""``hekitrace vms``: the VMs the daemon knows, one line each.

Identity (name, pid, UUID), uptime, lockdown, protected memory requested/applied,
findings and a degraded marker: the first command during an incident, to find the guest
to ``hekitrace snapshot``. ``--from`` rebuilds the list from a trace or journal file.

Exit status: see the epilog (the statuses of hekitrace.commands.exit_status).
"""

from __future__ import annotations

import argparse
import sys
import time

from hekitrace.commands.common import Rebuilt, add_source_options, ask, dump
from hekitrace.errors import UsageError
from hekitrace.render.table import Column, Table, human_duration, human_size

EPILOG = """examples:
  hekitrace vms                              # VMs of the running daemon
  hekitrace vms -o json | jq '.[] | select(.degraded) | .name'
  hekitrace vms --from examples/multi-vm.htrace
  hekitrace vms --from journal.htrace --at +30   # as they were 30 s into the file

columns: LOCKDOWN is the time from VM creation to lockdown ('no' if not locked down);
PROT REQ/APP is memory with a Heki attribute, requested/applied; '!' in DEG marks a VM whose
state may be incomplete (see 'hekitrace snapshot VM' for the reasons).
exit status: 0 ok; 2 bad arguments; 3 bad config; 4 unreadable trace; 5 the daemon
died mid-reply; 6 no daemon; 7 daemon busy; 9 control socket permission denied.
"""



def _table() -> Table:
    return Table([Column("NAME", 14), Column("PID", 7, ">"), Column("UUID", 8),
                  Column("UPTIME", 6, ">"), Column("LOCKDOWN", 8, ">"),
                  Column("PROT REQ/APP", 15, ">"), Column("FIND", 4, ">"), Column("DEG", 3)])


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "vms", help="list the VMs the daemon monitors",
        description="List the VMs hekitrace knows: name, pid, UUID, uptime, lockdown, "
                    "protected memory (requested/applied), findings, degraded marker.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format (default: table)")
    add_source_options(parser)
    return parser


def _protected(vm: dict, name: str) -> int:
    return sum(c["bytes"] for c in vm["memory"].get(name, {}).values())


def short_size(size: int) -> str:
    """``4.0 GiB`` -> ``4.0G``: the column has 15 characters for two sizes."""
    text = human_size(size)
    return text.replace(" B", "B").replace(" KiB", "K").replace(" MiB", "M") \
        .replace(" GiB", "G").replace(" TiB", "T").replace(" PiB", "P")


def render_table(vms: list[dict], now_ns: int) -> str:
    table = _table()
    lines = [table.header()]
    for vm in vms:
        end = vm.get("destroyed_ns") or now_ns
        uptime = human_duration((end - vm["created_ns"]) / 1e9)
        if vm.get("destroyed_ns"):
            uptime = "dead"
        lock = (human_duration((vm["lockdown_ns"] - vm["created_ns"]) / 1e9)
                if vm.get("locked_down") and vm.get("lockdown_ns") is not None else "no")
        prot = f"{short_size(_protected(vm, 'requested'))}/{short_size(_protected(vm, 'applied'))}"
        lines.append(table.line([vm["name"], vm["pid"], (vm.get("uuid") or "-")[:8], uptime,
                                 lock, prot, vm.get("findings", 0),
                                 "!" if vm.get("degraded") else ""]))
    if not vms:
        lines.append("(no VMs)")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.at and not args.from_files:
        raise UsageError("--at needs --from FILE (the daemon only has the present state)")
    if args.from_files:
        rebuilt = Rebuilt(args)
        rows = rebuilt.summaries()
        now_ns = rebuilt.now_ns or 0
    else:
        rows = list((ask(args, "vms", "vms") or {}).get("vms", []))
        now_ns = time.time_ns()
    rows.sort(key=lambda v: (v.get("name") or "", v.get("created_ns") or 0))
    if args.output == "table":
        sys.stdout.write(render_table(rows, now_ns))
    else:
        sys.stdout.write(dump(rows, args.output))
    return 0
