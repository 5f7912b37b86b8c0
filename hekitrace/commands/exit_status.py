"""The exit statuses of every hekitrace command, and which error gives which.

One table so a script can tell the cases apart, the same for every subcommand, and so
the man page (EXIT STATUS) can be checked against it. Subcommands return the ones that
are not errors (findings present, not ready); ``hekitrace.cli`` maps exceptions to the
rest with :func:`for_error`.
"""

from __future__ import annotations

from hekitrace.errors import (
    ConfigError,
    ControlError,
    ControlPermissionError,
    DaemonBusyError,
    HekitraceError,
    NoDaemonError,
    TraceFormatError,
    UsageError,
    VmLookupError,
)

OK = 0
#: replay: a critical finding; check: a required hook cannot attach
FINDINGS = 1
#: bad arguments
USAGE = 2
#: invalid configuration
CONFIG = 3
#: a corrupt or unreadable trace, journal or saved snapshot
DATA = 4
#: anything else (the daemon died mid-reply, an unexpected reply, an I/O error)
FAILURE = 5
#: no daemon listens on the control socket
NO_DAEMON = 6
#: the daemon is there but every connection slot is taken: try again
DAEMON_BUSY = 7
#: the VM named is unknown, or the name matches several VMs
UNKNOWN_VM = 8
#: the control socket refused us (it is for root only)
PERMISSION_DENIED = 9
#: status: the daemon answers but is not ready (a required hook, start-up discovery)
NOT_READY = 10
INTERRUPTED = 130

ALL = (OK, FINDINGS, USAGE, CONFIG, DATA, FAILURE, NO_DAEMON, DAEMON_BUSY, UNKNOWN_VM,
       PERMISSION_DENIED, NOT_READY, INTERRUPTED)


def for_error(error: HekitraceError) -> int:
    """The exit status of a command that failed with ``error``."""
    if isinstance(error, ConfigError):
        return CONFIG
    if isinstance(error, TraceFormatError):
        return DATA
    if isinstance(error, UsageError):
        return USAGE
    if isinstance(error, VmLookupError):
        return UNKNOWN_VM
    if isinstance(error, NoDaemonError):
        return NO_DAEMON
    if isinstance(error, DaemonBusyError):
        return DAEMON_BUSY
    if isinstance(error, ControlPermissionError):
        return PERMISSION_DENIED
    if isinstance(error, ControlError):
        return FAILURE
    return FAILURE
