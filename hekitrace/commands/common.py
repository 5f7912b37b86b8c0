"""What several subcommands share: where the state comes from (the daemon or --from
files), asking the daemon, and writing documents as JSON or YAML or through a pager.

Subcommands never import each other; what two of them need lives here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import yaml

from hekitrace.config import settings
from hekitrace.errors import NoDaemonError, UsageError
from hekitrace.render import documents, vm_select
from hekitrace.replay import applied_unobserved, replay
from hekitrace.service.control_client import ControlClient


def _add_socket_config(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--socket", metavar="PATH",
                       help="the daemon's control socket (default: control.socket of the "
                            "config, /run/hekitrace/control.sock)")
    group.add_argument("--config", metavar="FILE",
                       help="configuration file (default: /etc/hekitrace/hekitrace.yaml if "
                            "present, else built-in defaults)")


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """--socket/--config: how to reach the running daemon."""
    _add_socket_config(parser.add_argument_group("the daemon"))


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """--from/--at/--socket/--config, for subcommands that can also read files."""
    group = parser.add_argument_group("where the state comes from")
    group.add_argument("--from", dest="from_files", action="append", metavar="FILE",
                       help="rebuild the state from a trace or journal file instead of "
                            "asking the daemon (repeat for several files, in order)")
    group.add_argument("--at", metavar="TIME",
                       help="with --from: stop at TIME, RFC 3339 (2026-11-25T15:00:03Z) or "
                            "+SECONDS after the first event (default: the end)")
    _add_socket_config(group)


# -- where the state comes from ------------------------------------------------------------

def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    return str(settings.resolve_config(args.config).control.socket)


def no_daemon(path: str, can_read_files: bool = True) -> NoDaemonError:
    """The one-line 'no daemon' error, with the ways forward."""
    return NoDaemonError(f"no daemon is running (control socket {path} not found); start it "
                         "with 'systemctl start hekitrace'"
                         + (" or use --from FILE" if can_read_files else ""))


def ask(args: argparse.Namespace, command: str, op: str, **request: Any) -> Any:
    """One control request; 'no daemon' becomes one line saying how to start it or use --from."""
    path = socket_path(args)
    try:
        return ControlClient(path).request(op, **request)
    except NoDaemonError:
        raise no_daemon(path, can_read_files=hasattr(args, "from_files")) from None


class Rebuilt:
    """State rebuilt from files: summaries, and snapshots on demand."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.socket:
            raise UsageError("--socket and --from exclude each other")
        config = settings.resolve_config(args.config)
        self.result = replay(args.from_files, config, until=args.at)
        for notice in self.result.notices:
            print(f"hekitrace: {notice}", file=sys.stderr)
        for problem in self.result.problems:
            print(f"hekitrace: trace problem: {problem}", file=sys.stderr)
        self.pipeline = self.result.pipeline
        self.abi = self.pipeline.abi
        self.findings: dict[Any, list] = {}
        for finding in self.result.findings:
            self.findings.setdefault(finding.vm_key, []).append(finding)
        self.guests = sorted(self.pipeline.host.guests.values(),
                             key=lambda g: (g.created_ns, g.pid))
        self.now_ns = self.result.last_ns

    def summaries(self) -> list[dict]:
        return [documents.vm_summary(g, self.abi, len(self.findings.get(g.key, ())))
                for g in self.guests]

    def snapshot(self, query: str, maps: tuple[str, ...]) -> dict:
        chosen = vm_select.resolve(query, self.summaries())
        index = self.summaries().index(chosen)
        guest = self.guests[index]
        return documents.vm_snapshot(guest, self.abi, self.findings.get(guest.key, []),
                                     applied_unobserved=applied_unobserved(self.pipeline),
                                 maps=maps)


# -- output ---------------------------------------------------------------------------------

def dump(doc: Any, fmt: str) -> str:
    """JSON (2-space indent, key order of views) or YAML (block style, same order)."""
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False,
                              allow_unicode=True, width=1000))


def page(lines: Iterable[str]) -> None:
    """Write ``lines`` to stdout, through $PAGER (default ``less -FRX``) on a terminal."""
    if not sys.stdout.isatty():
        for line in lines:
            sys.stdout.write(line)
        return
    pager = os.environ.get("PAGER") or ("less" if shutil.which("less") else "")
    if not pager:
        for line in lines:
            sys.stdout.write(line)
        return
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    proc = subprocess.Popen(pager, shell=True, stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    try:
        for line in lines:
            proc.stdin.write(line.encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the operator quit the pager early
    proc.wait()
