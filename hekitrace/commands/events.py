"""``hekitrace events``: what the daemon sees as it happens, or the findings it holds.

With ``--follow`` the daemon streams every event and finding that passes the filters
over its control socket, as one line of text or one JSON object each, until Ctrl-C; in
the spirit of ``tetra getevents``. Without it, the findings the daemon keeps (the last
ones of each VM) are printed once. A subscriber that reads too slowly gets a ``lost``
line saying how many lines the daemon had to drop: the daemon never waits for it.
"""

from __future__ import annotations

import argparse
import json
import sys

from hekitrace.commands.common import add_daemon_options, no_daemon, socket_path
from hekitrace.errors import NoDaemonError
from hekitrace.policy.catalogue import RULE_IDS, SEVERITIES
from hekitrace.render.event_line import render_line
from hekitrace.service.control_client import ControlClient
from hekitrace.service.follow import KINDS, Filter

EPILOG = """examples:
  hekitrace events                                 # the findings the daemon holds
  hekitrace events --follow                        # every event and finding, live
  hekitrace events --follow --findings --severity critical
  hekitrace events --follow --vm web1 --kind protect_request --kind attr_applied
  hekitrace events --follow -o json | jq -c 'select(.kind == "vm_created")'

exit status: 0 ok (also on Ctrl-C); 6 no daemon; 7 daemon busy; 9 permission denied;
2 bad arguments; 3 bad config.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "events", help="stream events and findings live (--follow), or the recent findings",
        description="Print what the daemon sees: with --follow, every event and finding "
                    "that passes the filters as it happens; without, the findings the "
                    "daemon holds.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--follow", action="store_true",
                        help="stream until interrupted (default: print the recent findings)")
    parser.add_argument("--findings", action="store_true",
                        help="findings only (default: events and findings)")
    parser.add_argument("--vm", metavar="NAME",
                        help="one VM: name, pid-N, pid or UUID (default: all)")
    parser.add_argument("--kind", action="append", choices=KINDS, metavar="KIND",
                        help=f"event kind, repeatable (default: all): {', '.join(KINDS)}")
    parser.add_argument("--rule", action="append", choices=RULE_IDS, metavar="RULE",
                        help="findings of this rule only, repeatable (default: all)")
    parser.add_argument("--severity", action="append", choices=SEVERITIES,
                        help="findings of this severity only, repeatable (default: all)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="one line of text, or one JSON object, per record "
                             "(default: table)")
    add_daemon_options(parser)
    return parser


def _filters(args: argparse.Namespace) -> dict:
    kinds = list(args.kind or [])
    if args.findings:
        kinds = ["finding"]
    out: dict = {"kinds": kinds, "rules": list(args.rule or []),
                 "severities": list(args.severity or [])}
    if args.vm:
        out["vm"] = args.vm
    return out


def _write(record: dict, output: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(render_line(record) + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    path = socket_path(args)
    client = ControlClient(path)
    filters = _filters(args)
    try:
        if not args.follow:
            flt = Filter.from_request(filters)
            found = client.request("recent") or {}
            for finding in found.get("findings", []):
                if flt.wants("finding", finding.get("vm"), finding):
                    _write(dict(finding, kind="finding"), args.output)
            return 0
        for record in client.follow(**filters):
            _write(record, args.output)
    except NoDaemonError:
        raise no_daemon(path, can_read_files=False) from None
    except KeyboardInterrupt:
        pass
    return 0
