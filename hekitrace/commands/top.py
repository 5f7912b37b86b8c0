"""``hekitrace top``: a live, per-VM view of what the daemon sees, in the spirit of kvm_stat.

Every interval it asks the daemon for its VMs and status and shows, per VM, hypercalls,
protection requests and applications, faults and CR writes per second, findings, lost
events and the degraded marker. ``--once`` takes two samples one interval apart and
prints that frame (table, JSON or YAML) for scripts.
"""

from __future__ import annotations

import argparse
import curses
import os
import sys
import time
from typing import Any

from hekitrace.commands.common import add_daemon_options, ask, dump
from hekitrace.errors import UsageError
from hekitrace.render.top import SORT_KEYS, frame, render_frame

EPILOG = """examples:
  hekitrace top                      # full screen; q quits, s changes the sort column
  hekitrace top -d 5 --sort fault    # every 5 s, busiest faulting VM first
  hekitrace top --vm 'web*'          # only VMs whose name matches
  hekitrace top --once -o json       # one frame (two samples 1 s apart) for scripts

columns: per second over the last interval: HC hypercalls, PROT protection requests,
APPL applied attribute changes, FLT fault reports (storms arrive collapsed), CR control
register writes; FIND findings and LOST events lost, since the VM was created;
DEG '!' degraded (picture may be incomplete), 'x' destroyed (in its grace period).
exit status: 0 ok; 6 no daemon; 7 daemon busy; 9 permission denied; 2 bad arguments;
3 bad config.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "top", help="a live view of the VMs: hypercalls, protection, faults, findings",
        description="Show, per VM, what the daemon sees right now: rates of hypercalls, "
                    "protection requests and applications, faults and CR writes, findings, "
                    "losses and degraded state. Full screen until q or Ctrl-C; --once "
                    "prints one frame.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--interval", type=float, default=2.0, metavar="SECONDS",
                        help="time between samples (default: 2)")
    parser.add_argument("-s", "--sort", choices=SORT_KEYS, default="hc",
                        help="sort column (default: hc, hypercalls per second)")
    parser.add_argument("--vm", metavar="NAME",
                        help="only VMs whose name matches this glob, or with this pid "
                             "(default: all)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame and exit (default: full screen)")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format of --once (default: table)")
    add_daemon_options(parser)
    return parser


def _sample(args: argparse.Namespace) -> tuple[list[dict], dict, float]:
    rows = list((ask(args, "top", "vms") or {}).get("vms", []))
    status = ask(args, "top", "status") or {}
    return rows, status, time.monotonic()


def _once(args: argparse.Namespace) -> int:
    before, _status, t0 = _sample(args)
    time.sleep(args.interval)
    after, status, t1 = _sample(args)
    doc = frame(before, after, t1 - t0, status, sort=args.sort, vm=args.vm)
    if args.output == "table":
        sys.stdout.write("\n".join(render_frame(doc)) + "\n")
    else:
        sys.stdout.write(dump(doc, args.output))
    return 0


def _follow_terminal_size(stdscr: Any) -> None:
    """Resize curses to the terminal's size when it changed. Asked of the terminal each
    frame rather than left to curses' SIGWINCH handler, which a resize can miss (the
    signal may arrive while another handler is installed, or before curses starts)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return
    if (size.lines, size.columns) != stdscr.getmaxyx():
        curses.resizeterm(size.lines, size.columns)
        stdscr.clear()


def _screen(stdscr: Any, args: argparse.Namespace) -> None:
    """The full-screen loop: redraw every interval, on a key, and on a resize."""
    curses.curs_set(0)
    stdscr.timeout(100)
    sort = args.sort
    rows, status, t_prev = _sample(args)
    last = (rows, rows, 0.0, status)          # the two samples the frame shows
    next_sample = t_prev + args.interval
    while True:
        doc = frame(*last, sort=sort, vm=args.vm)
        _follow_terminal_size(stdscr)
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, line in enumerate(render_frame(doc, max(20, width - 1), height - 1)):
            stdscr.addnstr(y, 0, line, max(1, width - 1))
        stdscr.addnstr(height - 1, 0, "q quit  s sort", max(1, width - 1), curses.A_REVERSE)
        stdscr.refresh()
        key = stdscr.getch()      # waits at most 100 ms; KEY_RESIZE just redraws
        if key in (ord("q"), ord("Q")):
            return
        if key in (ord("s"), ord("S")):
            sort = SORT_KEYS[(SORT_KEYS.index(sort) + 1) % len(SORT_KEYS)]
        if time.monotonic() >= next_sample:
            new_rows, status, t_now = _sample(args)
            last = (last[1], new_rows, t_now - t_prev, status)
            t_prev, next_sample = t_now, t_now + args.interval


def run(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise UsageError(f"--interval {args.interval}: expected a positive number of seconds")
    if args.once:
        return _once(args)
    if args.output != "table":
        raise UsageError("-o json/yaml needs --once (the full screen is a table)")
    if not sys.stdout.isatty():
        raise UsageError("not a terminal: use --once for a single frame")
    try:
        curses.wrapper(_screen, args)
    except KeyboardInterrupt:
        pass
    return 0
