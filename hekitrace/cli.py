"""The ``hekitrace`` command line: argument parsing, output formats, exit codes only.

Each subcommand lives in ``hekitrace/commands/<name>.py`` with two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. This
module is the one place that turns exceptions into an exit status and a stderr line
(tracebacks only with ``--debug``), so every subcommand fails the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hekitrace import __version__
from hekitrace.errors import (
    ConfigError,
    ControlError,
    HekitraceError,
    TraceFormatError,
    UsageError,
    VmLookupError,
)

# Named exit statuses (documented in the man page and the README).
EXIT_OK = 0
EXIT_FINDINGS = 1        # replay: a critical finding; check: a required hook cannot attach
EXIT_USAGE = 2           # bad arguments, unknown/ambiguous VM, no daemon
EXIT_CONFIG = 3          # invalid configuration
EXIT_DATA = 4            # corrupt or unreadable trace/journal
EXIT_FAILURE = 5         # anything else that went wrong
EXIT_INTERRUPTED = 130

#: subcommand name -> module under hekitrace.commands, in --help order
COMMANDS = ("daemon", "snapshot", "vms", "check", "record", "replay", "simulate",
            "config", "version")


def build_parser() -> argparse.ArgumentParser:
    """The full parser; subcommand modules are imported here, not at import time."""
    parser = argparse.ArgumentParser(
        prog="hekitrace",
        description="Watch KVM guests that protect their kernel through the hypervisor "
                    "(Heki): rebuild each guest's memory-permission map, flag violations, "
                    "export Prometheus metrics.",
        epilog="Run 'hekitrace COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"hekitrace {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks on errors (default: off)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"hekitrace.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _exit_status_for(error: HekitraceError) -> int:
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, TraceFormatError):
        return EXIT_DATA
    if isinstance(error, (UsageError, VmLookupError, ControlError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `hekitrace ... | head`: the reader went away; not an error worth a message.
        sys.stderr.close()
        return EXIT_OK
    except HekitraceError as error:
        if args.debug:
            raise
        print(f"hekitrace {args.command}: error: {error}", file=sys.stderr)
        if isinstance(error, VmLookupError) and error.choices:
            print("  known: " + ", ".join(error.choices), file=sys.stderr)
        return _exit_status_for(error)
    except OSError as error:
        if args.debug:
            raise
        print(f"hekitrace {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
