"""The alert sink: findings as JSON Lines (or one human line each) to stdout and/or a file.

Under systemd, stdout goes to the journal, so JSON Lines on stdout is the default. The
optional file is opened in append mode and reopened by :meth:`AlertSink.reopen` (the
daemon calls it on SIGHUP, after logrotate moved the file). A sink never raises: a full
disk, a closed pipe or a vanished directory is counted in ``write_errors`` (by errno
name), remembered in ``last_error``, and the next finding tries again. Alerts are the
operator's evidence, so nothing here drops a finding silently: every failed write is
counted per destination.
"""

from __future__ import annotations

import errno as errno_mod
import json
import sys
from typing import Any, TextIO

from hekitrace.policy.findings import Finding, format_time
from hekitrace.trace.private_files import PRIVATE_FILE_MODE, open_private

FORMATS = ("json", "text")


def format_text(finding: dict) -> str:
    """One line for people: time, severity, rule, VM, message, count when > 1."""
    vm = finding.get("vm") or {}
    count = finding.get("count", 1)
    suffix = f" (x{count})" if count != 1 else ""
    when = finding.get("time") or format_time(finding.get("time_ns", 0))
    return (f"{when} {str(finding.get('severity', '?')).upper():8} "
            f"{finding.get('rule', '?')} vm={vm.get('name', '?')} pid={vm.get('pid', '?')}: "
            f"{finding.get('message', '')}{suffix}")


def format_json(finding: dict) -> str:
    """One compact JSON object (no newline); non-JSON values become strings."""
    return json.dumps(finding, separators=(",", ":"), sort_keys=False, default=str)


class AlertSink:
    """Writes findings to ``stream`` (stdout by default, None to disable) and ``path``.

    ``fmt`` is ``json`` (JSON Lines) or ``text``. Use as an observer of the pipeline:
    ``sink(change, findings)``, or call :meth:`write` directly.
    """

    def __init__(self, *, stdout: bool = True, fmt: str = "json", path: str | None = None,
                 stream: TextIO | None = None, file_mode: int = PRIVATE_FILE_MODE) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"alert format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.path = path
        #: mode of an alert file this sink creates (alerts.file_mode; findings name VMs)
        self.file_mode = file_mode
        self._stream: TextIO | None = (stream or sys.stdout) if stdout else None
        self._file: TextIO | None = None
        self._reopen_requested = False
        #: (destination, errno name) -> failed writes
        self.write_errors: dict[tuple[str, str], int] = {}
        self.written = 0
        self.last_error: str | None = None
        if path is not None:
            self._open_file()

    @classmethod
    def from_config(cls, alerts: Any, fmt: str | None = None,
                    stream: TextIO | None = None) -> AlertSink:
        """Build from ``config.alerts`` (stdout, format, file); ``fmt`` overrides (``-o``)."""
        return cls(stdout=bool(alerts.stdout), fmt=fmt or alerts.format, path=alerts.file,
                   stream=stream,
                   file_mode=int(getattr(alerts, "file_mode", PRIVATE_FILE_MODE)))

    # -- observer protocol ---------------------------------------------------------------
    def __call__(self, change: Any, findings: list[Finding]) -> None:
        for finding in findings:
            self.write(finding)

    def write(self, finding: Finding | dict) -> bool:
        """Write one finding everywhere configured; False if any destination failed."""
        if self._reopen_requested:
            self.reopen()
        data = finding.to_dict() if isinstance(finding, Finding) else finding
        try:
            line = (format_json(data) if self.fmt == "json" else format_text(data)) + "\n"
        except (TypeError, ValueError) as error:  # a finding that cannot be serialised
            self._count("format", "EINVAL", error)
            return False
        ok = True
        if self._stream is not None:
            ok &= self._write_to("stdout", self._stream, line)
        if self.path is not None:
            if self._file is None:
                self._open_file()
            if self._file is not None:
                ok &= self._write_to("file", self._file, line)
            else:
                ok = False
        if ok:
            self.written += 1
        return ok

    def request_reopen(self) -> None:
        """Safe to call from a signal handler: the next write reopens the file."""
        self._reopen_requested = True

    def reopen(self) -> None:
        """Close and reopen the file (logrotate moved it away); never raises."""
        self._reopen_requested = False
        if self.path is None:
            return
        self._close_file()
        self._open_file()

    def close(self) -> None:
        self._close_file()
        if self._stream is not None:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                pass

    @property
    def write_errors_total(self) -> int:
        return sum(self.write_errors.values())

    # -- internals -----------------------------------------------------------------------
    def _write_to(self, where: str, stream: TextIO, line: str) -> bool:
        try:
            stream.write(line)
            stream.flush()
            return True
        except (OSError, ValueError) as error:   # ValueError: write to a closed file
            self._count(where, _errno_name(error), error)
            return False

    def _open_file(self) -> None:
        assert self.path is not None
        try:
            self._file = open_private(self.path, append=True, mode=self.file_mode, text=True)
        except OSError as error:
            self._file = None
            self._count("file", _errno_name(error), error)

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as error:
                self._count("file", _errno_name(error), error)
            self._file = None

    def _count(self, where: str, name: str, error: BaseException) -> None:
        key = (where, name)
        self.write_errors[key] = self.write_errors.get(key, 0) + 1
        self.last_error = f"{where}: {error}"


def _errno_name(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if code:
        return errno_mod.errorcode.get(code, str(code))
    return "closed" if isinstance(error, ValueError) else type(error).__name__
