"""``hekitrace snapshot VM``: one guest's protection map, for people and for programs.

The state comes from the running daemon (control socket) or, with ``--from``, from a
trace or journal file replayed through the same :class:`~hekitrace.pipeline.Pipeline`
the daemon feeds (``--at`` stops the replay at a moment: "what did it look like before
the incident?"). Output: a summary (default), every range (``--ranges``, paged on a
terminal), JSON/YAML (the views dicts of docs/snapshot.md, complete and stable), an SVG
picture (``--image``) or a comparison with a saved snapshot (``--diff``).

Exit status: 0 ok; 2 bad arguments, no daemon, unknown or ambiguous VM, socket denied,
daemon died mid-reply; 3 bad config; 4 unreadable trace or saved snapshot.
"""

from __future__ import annotations

import argparse
import json
import sys

from hekitrace.commands.common import Rebuilt, add_source_options, ask, dump, page
from hekitrace.errors import TraceFormatError, UsageError

EPILOG = """examples:
  hekitrace snapshot web1                    # summary: classes, pins, lockdown, findings
  hekitrace snapshot 4242 --ranges           # every range (paged on a terminal)
  hekitrace snapshot 7f0c2a1e-... -o json > web1.json
  hekitrace snapshot web1 --diff web1.json   # what changed since web1.json was saved
  hekitrace snapshot web1 --image web1.svg   # a picture of guest-physical memory
  hekitrace snapshot victim-wt --from examples/attack.jsonl
  hekitrace snapshot web1 --from /var/lib/hekitrace/journal-000042.htrace \\
      --at 2026-11-25T15:00:02Z              # the map as it was at that moment

VM: a name, a UUID or a pid (see 'hekitrace vms').
exit status: 0 ok; 2 bad arguments; 3 bad config; 4 unreadable trace or saved file;
5 the daemon died mid-reply; 6 no daemon; 7 daemon busy; 8 unknown or ambiguous VM;
9 control socket permission denied.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "snapshot", help="one VM's memory-protection map, pins, lockdown and findings",
        description="Show one guest's protection state: memory per attribute class, "
                    "pinned CR bits, lockdown, degraded reasons and recent findings "
                    "(default), every range (--ranges), JSON/YAML for scripts, an SVG "
                    "picture, or the changes since a saved snapshot.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vm", metavar="VM", help="name, UUID or pid of the VM")
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                     help="output format (default: table)")
    out.add_argument("--map", choices=("requested", "applied", "both"), default="both",
                     help="which map: what the guest asked for, what the host applied, or "
                          "both side by side with differences marked (default: both)")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--summary", dest="ranges", action="store_false",
                      help="classes, pins, lockdown, differences, findings (the default)")
    mode.add_argument("--ranges", dest="ranges", action="store_true",
                      help="every merged range with its attributes (paged with $PAGER on a "
                           "terminal)")
    out.add_argument("--image", metavar="FILE.svg",
                     help="also write an SVG picture of guest-physical memory to FILE.svg")
    out.add_argument("--diff", metavar="OTHER.json",
                     help="compare with a snapshot saved with -o json and show what changed")
    add_source_options(parser)
    parser.set_defaults(ranges=False)
    return parser


def read_saved(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as error:
        raise TraceFormatError(f"cannot read the saved snapshot: {error.strerror}",
                               path=path) from None
    except ValueError as error:
        raise TraceFormatError(f"not a JSON snapshot ({error}); save one with "
                               "'hekitrace snapshot VM -o json > FILE'", path=path) from None
    if not isinstance(doc, dict) or "vm" not in doc or "ranges" not in doc:
        raise TraceFormatError("not a snapshot document (no 'vm' and 'ranges' keys); save "
                               "one with 'hekitrace snapshot VM -o json > FILE'", path=path)
    return doc


def run(args: argparse.Namespace) -> int:
    from hekitrace.render import diff as diff_mod
    from hekitrace.render import snapshot_text, svg

    maps = ("requested", "applied") if args.map == "both" else (args.map,)
    if args.at and not args.from_files:
        raise UsageError("--at needs --from FILE (the daemon only has the present state)")
    saved = read_saved(args.diff) if args.diff else None
    if args.from_files:
        snap = Rebuilt(args).snapshot(args.vm, maps)
    else:
        snap = ask(args, "snapshot", "snapshot", vm=args.vm, maps=list(maps))
    if args.image:
        try:
            with open(args.image, "w", encoding="utf-8") as fh:
                fh.write(svg.render_svg(snap, maps))
        except OSError as error:
            raise UsageError(f"--image {args.image}: cannot write: {error.strerror}") from None
        print(f"hekitrace snapshot: wrote {args.image}", file=sys.stderr)
    if saved is not None:
        if args.output == "table":
            sys.stdout.write(diff_mod.render_diff(saved, snap))
        else:
            sys.stdout.write(dump(diff_mod.diff(saved, snap), args.output))
        return 0
    if args.output != "table":
        sys.stdout.write(dump(snap, args.output))
    elif args.ranges:
        page(snapshot_text.render_ranges(snap))
    else:
        sys.stdout.write(snapshot_text.render_summary(snap))
    return 0
