"""``hekitrace replay``: run trace files through the daemon's state and rules, offline.

The events go through :class:`hekitrace.pipeline.Pipeline`, the same object the daemon
feeds, with the policy's timers driven by event time; so a replay reports what the daemon
would have reported live, at the times it would have. Trace problems (a corrupt block, a
bad line) never stop the replay: they are listed and change the exit status.

Exit status: 1 when any finding of severity ``critical`` was produced (it takes
precedence: it is the answer scripts wait for), else 4 when a trace had problems, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from prometheus_client.exposition import generate_latest

from hekitrace.commands import exit_status
from hekitrace.commands.common import dump
from hekitrace.config import settings
from hekitrace.errors import UsageError
from hekitrace.render.replay_text import render_text
from hekitrace.replay import Progress, ReplayResult, metrics_registry, replay, to_document
from hekitrace.service.http import HttpServer

EPILOG = """examples:
  hekitrace replay examples/attack.jsonl
  hekitrace replay -o json examples/multi-vm.htrace | jq '.findings[].rule'
  hekitrace replay --until +2.5 examples/clean-guest.htrace
  hekitrace replay --metrics-port 9865 examples/attack.jsonl   # then curl :9865/metrics
  hekitrace replay --metrics-file - examples/attack.jsonl      # summary, then /metrics text

exit status: 1 a critical finding (wins), 4 the trace had problems, 0 otherwise;
2 bad arguments, 3 bad config, 4 also when a file is not a trace at all.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "replay", help="replay trace files through the daemon's state and rules",
        description="Feed recorded or simulated traces (binary or JSON Lines, detected "
                    "automatically) through the daemon's state and rules; print each VM's "
                    "map summary and every finding.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="trace files, replayed one after the other in this order")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format (default: table)")
    parser.add_argument("--until", metavar="TIME",
                        help="stop before the first event after TIME: RFC 3339 "
                             "(2026-11-25T15:00:03Z) or +SECONDS after the first event "
                             "(default: replay everything)")
    parser.add_argument("--metrics-file", metavar="FILE",
                        help="after the replay, write the /metrics text of the replayed state "
                             "to FILE ('-': stdout, after the summary) (default: off)")
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help="after the replay, serve /metrics for the replayed state on "
                             "127.0.0.1:N until interrupted (default: off)")
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file (default: /etc/hekitrace/hekitrace.yaml "
                             "if present, else built-in defaults)")
    return parser


def _status_of(result: ReplayResult) -> int:
    if any(f.severity == "critical" for f in result.findings):
        return exit_status.FINDINGS
    if result.problems:
        return exit_status.DATA
    return 0


def write_metrics(result: ReplayResult, destination: str) -> None:
    """Write the /metrics text of the replayed state once, to a file or ``-`` (stdout)."""
    registry, _ = metrics_registry(result)
    text = generate_latest(registry).decode()
    if destination == "-":
        sys.stdout.write("\n# /metrics of the replayed state\n")
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(destination, "w", encoding="utf-8") as out:
            out.write(text)


def serve_metrics(result: ReplayResult, port: int) -> None:
    """Serve /metrics for the replayed state on 127.0.0.1:``port`` until interrupted."""
    registry, health = metrics_registry(result)
    server = HttpServer(f"127.0.0.1:{port}", registry, health)
    server.start()
    print(f"serving the replayed state on http://127.0.0.1:{server.port}/metrics "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    stop = threading.Event()
    try:
        while not stop.wait(1.0):
            health.beat()
    finally:
        server.close()


@contextlib.contextmanager
def progress_bar(paths: list[str]) -> Iterator[Progress | None]:
    """Events, bytes, rate and time left on stderr while a replay runs, when stderr is a
    terminal (silent otherwise: logs and pipes get only the result)."""
    if not sys.stderr.isatty():
        yield None
        return
    sizes = []
    for path in paths:
        try:
            sizes.append(os.path.getsize(path) if os.path.isfile(path) else None)
        except OSError:
            sizes.append(None)
    total = sum(sizes) if all(size is not None for size in sizes) else None   # type: ignore[arg-type]
    # imported here: only a terminal gets a bar, and scripts that replay in a loop (and
    # the VM tier's L1, which has no terminal) never load it
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              desc="replay", leave=False, mininterval=0.5) as bar:
        def update(done_bytes: int, events: int) -> None:
            bar.update(done_bytes - bar.n)
            bar.set_postfix_str(f"{events} events", refresh=False)
        yield update


def run(args: argparse.Namespace) -> int:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port {args.metrics_port}: expected 0-65535")
    config = settings.resolve_config(args.config)
    with progress_bar(args.files) as progress:
        result = replay(args.files, config, until=args.until, progress=progress)
    for notice in result.notices:
        print(f"hekitrace replay: {notice}", file=sys.stderr)
    for problem in result.problems:
        print(f"hekitrace replay: trace problem: {problem}", file=sys.stderr)
    if args.output == "table":
        sys.stdout.write(render_text(to_document(result)))
    else:
        sys.stdout.write(dump(to_document(result), args.output))
    sys.stdout.flush()
    status = _status_of(result)
    if args.metrics_file is not None:
        write_metrics(result, args.metrics_file)
    if args.metrics_port is not None:
        try:
            serve_metrics(result, args.metrics_port)
        except KeyboardInterrupt:
            pass
    return status
