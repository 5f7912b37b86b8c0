"""The ``hekitrace`` command line: argument parsing, output formats, exit codes only.

Each subcommand lives in ``hekitrace/commands/<name>.py`` with two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. This
module is the one place that turns exceptions into an exit status and a stderr line
(tracebacks only with ``--debug``), so every subcommand fails the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from hekitrace import __version__
from hekitrace.errors import (
    ConfigError,
    ControlError,
    DaemonBusyError,
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
EXIT_BUSY = 6            # the daemon is alive but all its control connections are in use
EXIT_INTERRUPTED = 130

#: subcommand names, in --help order (each is a module under hekitrace.commands)
COMMANDS = ("daemon", "snapshot", "vms", "check", "record", "replay", "simulate",
            "config", "version")

#: one-line help of each subcommand, shown by 'hekitrace --help' without importing any
SUMMARIES = {
    "daemon": "run the monitoring daemon (metrics, control socket, alerts)",
    "snapshot": "one VM's memory-protection map, pins, lockdown and findings",
    "vms": "list the VMs the daemon (or a trace) knows",
    "check": "which hooks attach on this kernel, and how",
    "record": "write the events of the running host to a trace file",
    "replay": "replay trace files through the daemon's state and rules",
    "simulate": "write a trace of simulated Heki guests",
    "config": "validate or show the configuration",
    "version": "print the version",
}


def _command_module(name: str) -> Any:
    """The module of subcommand ``name``, imported only now: 'hekitrace --version' and
    every other subcommand never pay for its imports (bcc, prometheus_client, ...)."""
    if name == "daemon":
        from hekitrace.commands import daemon
        return daemon
    if name == "snapshot":
        from hekitrace.commands import snapshot
        return snapshot
    if name == "vms":
        from hekitrace.commands import vms
        return vms
    if name == "check":
        from hekitrace.commands import check
        return check
    if name == "record":
        from hekitrace.commands import record
        return record
    if name == "replay":
        from hekitrace.commands import replay
        return replay
    if name == "simulate":
        from hekitrace.commands import simulate
        return simulate
    if name == "config":
        from hekitrace.commands import config
        return config
    from hekitrace.commands import version
    return version


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the global
    options, --debug, --version and --help, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the real options of ``command`` only: the other subcommands are
    one-line stubs, so their modules are never imported."""
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
        if name == command:
            module = _command_module(name)
            module.add_parser(subparsers).set_defaults(_run=module.run)
        else:
            subparsers.add_parser(name, help=SUMMARIES[name])
    return parser


def _exit_status_for(error: HekitraceError) -> int:
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, TraceFormatError):
        return EXIT_DATA
    if isinstance(error, DaemonBusyError):
        return EXIT_BUSY
    if isinstance(error, (UsageError, VmLookupError, ControlError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen_command(words))
    args = parser.parse_args(words)
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
