"""The one exception tree of hekitrace.

Every error a user can cause or meet derives from :class:`HekitraceError`. Each domain
has its own subclass with data fields, so callers can react to the kind of failure and
the CLI (the only place that turns exceptions into exit codes) can print one clear line.
Messages say what failed, the offending value, and what was expected.
"""

from __future__ import annotations


class HekitraceError(Exception):
    """Base of every error hekitrace raises on purpose."""


class ConfigError(HekitraceError):
    """A configuration file or value is invalid.

    ``path``, ``line`` and ``key`` locate the problem (line is 1-based, None when the
    value did not come from a file).
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.reason = message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        keypart = f"{key}: " if key else ""
        super().__init__(f"{where}{keypart}{message}")


class AttachError(HekitraceError):
    """A BPF program could not be compiled, loaded or attached.

    ``hook`` names the hook (as in docs/internals.md, Hooks), ``method`` the attach method tried.
    """

    def __init__(self, message: str, *, hook: str | None = None,
                 method: str | None = None) -> None:
        self.hook = hook
        self.method = method
        prefix = f"{hook}" + (f" ({method})" if method else "") + ": " if hook else ""
        super().__init__(prefix + message)


class BtfError(AttachError):
    """The running kernel's BTF lacks a type or member we need an offset for."""


class TraceFormatError(HekitraceError):
    """A trace or journal file is corrupt, truncated or not a trace at all.

    ``path`` and ``offset`` (bytes) or ``line`` (1-based, JSON Lines) locate it.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 line: int | None = None) -> None:
        self.path = path
        self.offset = offset
        self.line = line
        loc = path or "<trace>"
        if offset is not None:
            loc += f" at byte {offset}"
        if line is not None:
            loc += f":{line}"
        super().__init__(f"{loc}: {message}")


class ControlError(HekitraceError):
    """Talking to the daemon over its control socket failed (no daemon, denied, bad reply)."""


class NoDaemonError(ControlError):
    """No daemon listens on the control socket."""


class ControlPermissionError(ControlError):
    """The control socket refused the caller (it is for root only)."""


class DaemonBusyError(ControlError):
    """The daemon is alive but every control connection slot is held (by other clients,
    perhaps hostile ones); trying again later may work. Not "daemon gone"."""


class VmLookupError(HekitraceError):
    """A VM named by the operator is unknown or (``ambiguous``) matches several;
    ``choices`` lists candidates."""

    def __init__(self, message: str, *, choices: list[str] | None = None,
                 ambiguous: bool = False) -> None:
        self.choices = choices or []
        self.ambiguous = ambiguous
        super().__init__(message)


class UsageError(HekitraceError):
    """Command-line arguments are inconsistent in a way argparse cannot express."""
