"""``hekitrace record``: write the live event stream to a trace file.

The same sources as the daemon, in the same order: start-up discovery (VMs already
running, ``preexisting``), then the BPF capture (both rings, loss counters as ``lost``
events) and KVM uevents until Ctrl-C, SIGTERM or ``--duration``. Nothing is interpreted:
the file holds events, which ``hekitrace replay`` later feeds to the state and rules.
"""

from __future__ import annotations

import argparse
import collections
import platform
import selectors
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from hekitrace import __version__
from hekitrace.errors import AttachError, UsageError
from hekitrace.state.events import Event, Lost, event_name

EPILOG = """\
examples:
  hekitrace record -o /tmp/host.htrace                 # until Ctrl-C, binary trace
  hekitrace record -o /tmp/host.jsonl --format jsonl --duration 60
  hekitrace record -o - --format jsonl | jq -c 'select(.kind == "protect_request")'
  hekitrace replay /tmp/host.htrace                    # what the daemon would have said

The last line on stderr sums up: events by kind and how many were lost (ring full,
uevent overflow, ...). Needs root (BPF, /proc of other processes).
"""

#: how often (seconds) the loop wakes without ring activity: loss counters and
#: collapsed fault storms are read on these ticks, and --duration is checked
_TICK_SECONDS = 0.5


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "record", help="record the live event stream to a trace file",
        description="Attach the BPF hooks and listen for KVM uevents, and write every "
                    "event (plus the VMs found running at start) to a trace file that "
                    "'hekitrace replay' reads. Stops on Ctrl-C, SIGTERM or --duration.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--write", dest="file", required=True, metavar="FILE",
                        help="trace file to write ('-' for stdout); overwritten")
    parser.add_argument("--duration", type=float, metavar="S", default=None,
                        help="stop after S seconds (default: until Ctrl-C or SIGTERM)")
    parser.add_argument("--format", choices=("binary", "jsonl"), default="binary",
                        help="trace encoding (default: binary)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML configuration for the hooks and ABI profile (default: "
                             "/etc/hekitrace/hekitrace.yaml if it exists, else built-in "
                             "defaults)")
    parser.add_argument("--no-discovery", action="store_true",
                        help="do not record the VMs already running at start "
                             "(default: record them as preexisting vm_created events)")
    return parser


class Tally:
    """Events written by kind, and events lost (sum of ``lost`` event counts)."""

    def __init__(self) -> None:
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.lost = 0

    def add(self, events: Sequence[Event]) -> None:
        for event in events:
            self.by_kind[event_name(event)] += 1
            if isinstance(event, Lost):
                self.lost += event.count

    def summary(self, seconds: float, target: str, encoding: str) -> str:
        total = sum(self.by_kind.values())
        kinds = ", ".join(f"{name} {count}" for name, count in sorted(self.by_kind.items()))
        return (f"hekitrace record: {total} events in {seconds:.1f} s to {target} "
                f"({encoding}): {kinds or 'none'}; lost {self.lost}")


def record_loop(write: Callable[[Sequence[Event]], None], capture: Any, uevents: Any,
                stop: Callable[[], bool], *, deadline: float | None,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Move events from ``capture`` (``fds()``, ``read()``) and ``uevents``
    (``fileno()``, ``read_events()``; may be None) to ``write`` until ``stop()`` or the
    monotonic ``deadline``; a last read after stopping loses nothing already in the rings."""
    selector = selectors.DefaultSelector()
    for fd in capture.fds():
        selector.register(fd, selectors.EVENT_READ, "capture")
    if uevents is not None:
        selector.register(uevents.fileno(), selectors.EVENT_READ, "uevents")
    try:
        while not stop():
            timeout = _TICK_SECONDS
            if deadline is not None:
                timeout = min(timeout, deadline - clock())
                if timeout <= 0:
                    break
            ready = {key.data for key, _ in selector.select(timeout)}
            if "uevents" in ready:
                write(uevents.read_events())
            # read() on every tick, not only when a ring is readable: loss counters and
            # storm flushes are not ring records.
            write(capture.read())
    finally:
        selector.close()
        if uevents is not None:
            write(uevents.read_events())
        write(capture.read())


def _header(config: Any) -> Any:
    from hekitrace.trace.file import TraceHeader

    return TraceHeader(kernel_release=platform.release(), abi_profile=config.abi.profile,
                       start_time_ns=time.time_ns(), hostname=platform.node(),
                       # replay honours the recording host's MBEC (commands/replay.py)
                       extra={"recorded_by": f"hekitrace record {__version__}",
                              "mbec": bool(config.abi_profile().mbec)})


def _say(line: str) -> None:
    print(f"hekitrace record: {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and not args.duration > 0:
        raise UsageError(f"--duration {args.duration}: expected a positive number of seconds")
    from hekitrace.capture.discovery import discover_vms
    from hekitrace.capture.engine import Capture
    from hekitrace.capture.uevents import UeventSource, unavailable_message
    from hekitrace.config.settings import resolve_config
    from hekitrace.trace.writer import TraceWriter

    config = resolve_config(args.config)
    to_stdout = args.file == "-"
    target = "stdout" if to_stdout else args.file
    tally = Tally()
    stopping: list[str] = []
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append("TERM"))
    capture = uevents = writer = None
    started = time.monotonic()
    try:
        capture = Capture(config, say=_say).start()
        try:
            uevents = UeventSource()
        except AttachError as error:  # every failure to open uevents arrives as this
            _say(unavailable_message(error))
        writer = TraceWriter(sys.stdout.buffer if to_stdout else args.file,
                             _header(config), encoding=args.format)

        def write(events: Sequence[Event]) -> None:
            if events:
                writer.write_all(events)
                tally.add(events)
                if to_stdout:
                    writer.flush()

        if not args.no_discovery:
            write(discover_vms(say=_say))
        _say(f"recording to {target} ({args.format}); Ctrl-C to stop")
        started = time.monotonic()  # --duration counts from here, not from the compile
        deadline = started + args.duration if args.duration is not None else None
        try:
            record_loop(write, capture, uevents, lambda: bool(stopping), deadline=deadline)
        except KeyboardInterrupt:
            stopping.append("INT")
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if writer is not None:
            writer.close()
        if uevents is not None:
            uevents.close()
        if capture is not None:
            capture.close()
    print(tally.summary(time.monotonic() - started, target, args.format), file=sys.stderr)
    return 0
