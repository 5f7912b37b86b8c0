"""The ``hekitrace`` command line: argument parsing, output formats, exit codes only.

Each subcommand lives in ``hekitrace/commands/<name>.py`` with two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. This
module is the one place that turns exceptions into an exit status and a stderr line
(tracebacks only with ``--debug``), so every subcommand fails the same way.
"""

from __future__ import annotations

import sys

from hekitrace import __version__
from hekitrace.commands import exit_status
from hekitrace.errors import HekitraceError, VmLookupError

#: typing.TYPE_CHECKING without importing typing (7 ms of 'hekitrace --version');
#: mypy treats any constant of this name as true
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from types import ModuleType

#: subcommand names, in --help order (each is a module under hekitrace.commands)
COMMANDS = ("daemon", "status", "top", "events", "snapshot", "vms", "check", "record",
            "replay", "simulate", "config", "version")

#: one-line help of each subcommand, shown by 'hekitrace --help' without importing any
SUMMARIES = {
    "daemon": "run the monitoring daemon (metrics, control socket, alerts)",
    "status": "the daemon's health: hooks, rules, losses, journal, readiness",
    "top": "a live view of the VMs: hypercalls, protection, faults, findings",
    "events": "stream events and findings live (--follow), or the recent findings",
    "snapshot": "one VM's memory-protection map, pins, lockdown and findings",
    "vms": "list the VMs the daemon (or a trace) knows",
    "check": "which hooks attach on this kernel, and how",
    "record": "write the events of the running host to a trace file",
    "replay": "replay trace files through the daemon's state and rules",
    "simulate": "write a trace of simulated Heki guests",
    "config": "validate or show the configuration",
    "version": "print the version",
}


def _command_module(name: str) -> ModuleType:
    """The module of subcommand ``name``, imported only now: 'hekitrace --version' and
    every other subcommand never pay for its imports (bcc, prometheus_client, ...)."""
    if name == "daemon":
        from hekitrace.commands import daemon
        return daemon
    if name == "status":
        from hekitrace.commands import status
        return status
    if name == "events":
        from hekitrace.commands import events
        return events
    if name == "top":
        from hekitrace.commands import top
        return top
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
    import argparse  # here, not at the top: 'hekitrace --version' never needs it

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words == ["--version"]:
        # answered before argparse is even imported: scripts call this in loops, and it
        # must cost no more than starting Python
        print(f"hekitrace {__version__}")
        return exit_status.OK
    parser = build_parser(_chosen_command(words))
    args = parser.parse_args(words)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return exit_status.INTERRUPTED
    except BrokenPipeError:
        # `hekitrace ... | head`: the reader went away; not an error worth a message.
        sys.stderr.close()
        return exit_status.OK
    except HekitraceError as error:
        if args.debug:
            raise
        print(f"hekitrace {args.command}: error: {error}", file=sys.stderr)
        if isinstance(error, VmLookupError) and error.choices:
            print("  known: " + ", ".join(error.choices), file=sys.stderr)
        return exit_status.for_error(error)
    except OSError as error:
        if args.debug:
            raise
        print(f"hekitrace {args.command}: error: {error}", file=sys.stderr)
        return exit_status.FAILURE


if __name__ == "__main__":
    sys.exit(main())
