"""Live streams of events and findings to ``hekitrace events --follow`` subscribers.

A subscriber sends ``{"op": "follow", ...filters}`` on the control socket and keeps the
connection open; after the ok reply, the daemon writes one JSON line per event or
finding that passes the filters. The daemon never waits for a subscriber: each has a
bounded buffer (:data:`MAX_BUFFER_BYTES`); lines that do not fit are dropped and
counted, the subscriber is told how many in a ``lost`` line as soon as there is room
again, and one that reads nothing for :data:`STALL_SECONDS` is disconnected (counted in
``hekitrace_clients_refused_total{server="control",reason="slow_subscriber"}``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hekitrace.policy.catalogue import RULE_IDS, SEVERITIES
from hekitrace.state.events import NAME_OF

#: what one subscriber may have waiting in the daemon before its lines are dropped
MAX_BUFFER_BYTES = 1 << 20
#: a subscriber whose buffer stays full this long is disconnected
STALL_SECONDS = 30.0
#: the kinds a subscriber may ask for: every event kind, and findings
KINDS = (*sorted(NAME_OF.values()), "finding")

#: (kind, the VM's identity or None, the JSON object) of one event or finding
Record = tuple[str, dict | None, dict]


@dataclass(frozen=True)
class Filter:
    """What one subscriber wants; an empty field means everything."""

    kinds: frozenset[str] = frozenset()
    vm: str | None = None
    rules: frozenset[str] = frozenset()
    severities: frozenset[str] = frozenset()

    @classmethod
    def from_request(cls, request: dict) -> Filter:
        """The filter of a ``follow`` request; ValueError says what is wrong with it."""
        def names(key: str, allowed: Sequence[str]) -> frozenset[str]:
            value = request.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f'"{key}" must be a list of strings')
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise ValueError(f'unknown {key} {", ".join(unknown)}; '
                                 f'expected some of {", ".join(allowed)}')
            return frozenset(value)

        vm = request.get("vm")
        if vm is not None and (not isinstance(vm, str) or not vm):
            raise ValueError('"vm" must be a VM name, pid-N, pid or UUID')
        return cls(names("kinds", KINDS), vm, names("rules", RULE_IDS),
                   names("severities", SEVERITIES))

    def wants(self, kind: str, vm: dict | None, doc: dict) -> bool:
        if self.kinds and kind not in self.kinds:
            return False
        if (self.rules or self.severities) and kind != "finding":
            return False
        if kind == "finding":
            if self.rules and doc.get("rule") not in self.rules:
                return False
            if self.severities and doc.get("severity") not in self.severities:
                return False
        return self.vm is None or (vm is not None and _names_vm(self.vm, vm))


def _names_vm(query: str, vm: dict) -> bool:
    pid = vm.get("pid")
    uuid = str(vm.get("uuid") or "").lower()
    return query in (vm.get("name"), str(pid), f"pid-{pid}") or (
        bool(uuid) and (query.lower() == uuid or (len(query) >= 8
                                                  and uuid.startswith(query.lower()))))


class Subscriber:
    """One open ``follow`` connection's filter and the lines it has not read yet."""

    __slots__ = ("filter", "lost", "pending", "stalled_since")

    def __init__(self, flt: Filter) -> None:
        self.filter = flt
        self.pending = bytearray()
        self.lost = 0                       # lines dropped since the last 'lost' line
        self.stalled_since: float | None = None

    def offer(self, records: Iterable[Record], now: float) -> int:
        """Queue the lines this subscriber wants; returns how many were dropped."""
        dropped = 0
        for kind, vm, doc in records:
            if not self.filter.wants(kind, vm, doc):
                continue
            if self.lost and len(self.pending) < MAX_BUFFER_BYTES // 2:
                self.pending += _line({"kind": "lost", "count": self.lost,
                                       "reason": "this subscriber read too slowly; the "
                                                 "daemon's buffer for it was full"})
                self.lost = 0
            line = _line(dict(doc, kind=kind) if kind == "finding" else doc)
            if len(self.pending) + len(line) > MAX_BUFFER_BYTES:
                self.lost += 1
                dropped += 1
                if self.stalled_since is None:
                    self.stalled_since = now
                continue
            self.pending += line
        return dropped

    def sent(self, count: int) -> None:
        """``count`` bytes reached the socket: the subscriber reads again."""
        del self.pending[:count]
        if count:
            self.stalled_since = None

    def stalled(self, now: float) -> bool:
        return self.stalled_since is not None and now - self.stalled_since > STALL_SECONDS


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode() + b"\n"
