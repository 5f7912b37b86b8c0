"""``hekitrace status``: the running daemon's health at a glance.

Readiness and why not, the hooks attached (how, or why not), the rules in force (or why
inactive), events received and lost by stage and reason, queue depth, journal health, VM
count, config digest and uptime: what the daemon answers to ``{"op": "status"}`` on its
control socket, as a table or as the document itself.
"""

from __future__ import annotations

import argparse
import sys

from hekitrace.commands import exit_status
from hekitrace.commands.common import add_daemon_options, ask, dump
from hekitrace.render.status_text import render_status

EPILOG = """examples:
  hekitrace status
  hekitrace status -o json | jq '.hooks[] | select(.attached | not)'
  hekitrace status -o json | jq '.policy.rules'

exit status: 0 the daemon is ready; 10 it answers but is not ready (the reasons are
printed); 6 no daemon; 7 daemon busy; 9 permission denied; 2 bad arguments; 3 bad config.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status", help="the daemon's health: hooks, rules, losses, journal, readiness",
        description="Show the running daemon's health: readiness, hooks attached and how "
                    "(or why not), rules in force (or why inactive), events received and "
                    "lost, queue depth, journal health, VM count, config digest, uptime.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format (default: table)")
    add_daemon_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    status = ask(args, "status", "status")
    if args.output == "table":
        sys.stdout.write(render_status(status))
    else:
        sys.stdout.write(dump(status, args.output))
    return exit_status.OK if status.get("ready") else exit_status.NOT_READY
