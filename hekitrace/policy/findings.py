"""Findings: the records rules emit, and their JSON form (docs/internals.md "Findings").

A :class:`Finding` is one rule firing for one VM at one time, with evidence; ``count``
says how many occurrences it stands for (storm control folds repeats into summaries, see
:mod:`hekitrace.policy.storm`). Evidence embeds events through :func:`event_json`, which
summarises page lists by their length so a finding stays small whatever the guest sent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hekitrace.state.changes import VmKey
from hekitrace.state.events import Event, event_name


def format_time(time_ns: int) -> str:
    """RFC 3339 UTC with microseconds, ``2026-11-25T15:20:01.123456Z``."""
    try:
        seconds, rest = divmod(int(time_ns), 1_000_000_000)
        moment = datetime.fromtimestamp(seconds, tz=UTC).replace(
            microsecond=rest // 1000)
    except (OverflowError, OSError, ValueError, TypeError):
        return ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_json(event: Event | None) -> dict | None:
    """An event as a JSON-ready dict (``kind`` + its fields); page lists are summarised
    as their entry count so evidence stays small whatever the guest sent."""
    if event is None:
        return None
    out: dict[str, Any] = {"kind": event_name(event)}
    value: Any
    for name, value in zip(event._fields, event):
        if name == "entries":
            out["entries_count"] = len(value)
        else:
            out[name] = value
    return out


class Finding:
    """One finding: a rule fired for a VM at a time, with evidence.

    ``vm_key`` is the :class:`VmKey` (not serialised); ``vm`` the identity dict;
    ``count`` how many occurrences this object stands for (1, or a summary's number).
    """

    __slots__ = (
        "count",
        "evidence",
        "message",
        "rule",
        "severity",
        "time_ns",
        "vm",
        "vm_key",
    )

    def __init__(self, rule: str, severity: str, time_ns: int, vm: dict,
                 vm_key: VmKey | None, message: str, evidence: dict, count: int = 1) -> None:
        self.rule = rule
        self.severity = severity
        self.time_ns = time_ns
        self.vm = vm
        self.vm_key = vm_key
        self.message = message
        self.evidence = evidence
        self.count = count

    def to_dict(self) -> dict:
        """The stable JSON object (docs/internals.md "Findings", docs/findings.md)."""
        return {"rule": self.rule, "severity": self.severity,
                "time": format_time(self.time_ns), "time_ns": self.time_ns,
                "vm": dict(self.vm), "message": self.message, "count": self.count,
                "evidence": self.evidence}

    def __repr__(self) -> str:
        return f"Finding({self.rule!r}, {self.severity!r}, vm={self.vm.get('name')!r}, " \
               f"count={self.count})"



def vm_identity(guest: Any) -> dict:
    """The ``vm`` object of a finding (``guest``: a :class:`hekitrace.state.host.Guest`)."""
    return {"name": guest.name or f"pid-{guest.pid}", "uuid": guest.uuid, "pid": guest.pid,
            "created_ns": guest.created_ns}

