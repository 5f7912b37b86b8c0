"""JSON Lines trace records: one event to a JSON object and back.

This is the record layer of the JSON Lines trace encoding (docs/trace-format.md, "JSON
Lines encoding"); :mod:`hekitrace.trace.file` handles the file around it (header line, comments,
blank lines, problems). It is kept apart from the binary codec because the two share
nothing but the events: this one is written for people, who read addresses and masks in hex and write
scenarios by hand, so it accepts several spellings of a time and of an integer and names
the bad field when a line does not fit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hekitrace.state.events import CLASS_BY_NAME, NAME_OF, Event, ProtectEntry

#: fields written as hex strings because people read them as addresses or bit masks
_HEX_FIELDS = frozenset({"gpa", "hva", "list_gpa", "address", "rip", "mask", "value",
                         "a0", "a1", "a2", "a3", "error_code", "attributes"})
_STR_FIELDS = frozenset({"stats_path", "name", "uuid", "vmm", "source", "stage", "reason",
                         "hook"})


def event_to_dict(event: Event) -> dict[str, Any]:
    """The JSON object of ``event`` (as in a JSON Lines trace and in finding evidence)."""
    out: dict[str, Any] = {"kind": NAME_OF[type(event)]}
    value: Any
    for name, value in zip(event._fields, event):
        if name == "entries":
            entries: tuple[ProtectEntry, ...] = value
            out[name] = [[hex(e.gpa), hex(e.end_gpa), e.permissions] for e in entries]
        elif name in _HEX_FIELDS and isinstance(value, int) and value >= 0:
            out[name] = hex(value)
        else:
            out[name] = value
    return out


def event_to_json_line(event: Event) -> str:
    return json.dumps(event_to_dict(event), separators=(",", ":"))


def parse_time(value: Any) -> int:
    """An RFC 3339 UTC time (``2026-11-25T15:00:00.5Z``) or an integer to Unix-epoch ns."""
    if isinstance(value, str) and "T" in value:
        text = value.strip()
        frac = 0
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        main, sep, rest = text.partition(".")
        if sep:
            digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
            tz = rest[len(digits):]
            frac = int((digits + "000000000")[:9])
            text = main + tz
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"bad time {value!r}; expected e.g. 2026-11-25T15:00:00Z") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp()) * 1_000_000_000 + frac
    return parse_int(value)


def parse_int(value: Any) -> int:
    """An integer from a JSON value: int, or a string in decimal or 0x hex."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")  # noqa: TRY004 - callers catch ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError(f"expected an integer (decimal or 0x hex), got {value!r}") from None
    raise ValueError(f"expected an integer, got {value!r}")


def event_from_dict(data: dict[str, Any], *, start_ns: int = 0, last_ns: int = 0) -> Event:
    """Build an event from its JSON object; raises ValueError naming the bad field.

    Time: ``time_ns`` (integer), ``time`` (RFC 3339 UTC) or ``t`` (seconds after
    ``start_ns``, the header's start); when none is given the previous event's time.
    ``tid`` defaults to ``tgid``; other fields default as in :mod:`hekitrace.state.events`.
    """
    kind = data.get("kind")
    cls: Any = CLASS_BY_NAME.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(CLASS_BY_NAME)}")
    fields = cls._fields
    unknown = set(data) - set(fields) - {"kind", "time", "t"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))} for {kind}; "
                         f"expected {', '.join(fields)}")
    values: dict[str, Any] = {}
    if "time_ns" in data:
        values["time_ns"] = parse_int(data["time_ns"])
    elif "time" in data:
        values["time_ns"] = parse_time(data["time"])
    elif "t" in data:
        t = data["t"]
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"t: expected seconds as a number, got {t!r}")
        values["time_ns"] = start_ns + round(t * 1e9)
    else:
        values["time_ns"] = last_ns
    if "tgid" not in data:
        raise ValueError("missing field tgid")
    for name in fields[1:]:
        if name not in data:
            continue
        raw = data[name]
        try:
            if name == "entries":
                values[name] = _entries(raw)
            elif name in _STR_FIELDS:
                if not isinstance(raw, str):
                    raise ValueError(f"expected a string, got {raw!r}")
                values[name] = raw
            elif name == "preexisting":
                if not isinstance(raw, bool):
                    raise ValueError(f"expected true or false, got {raw!r}")
                values[name] = raw
            else:
                values[name] = parse_int(raw)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    values.setdefault("tid", values["tgid"])
    missing = [n for n in fields if n not in values and n not in cls._field_defaults]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} for {kind}")
    return cls(**values)


def _entries(raw: Any) -> tuple[ProtectEntry, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of [gpa, end_gpa, permissions], got {raw!r}")  # noqa: TRY004 - callers catch ValueError
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError(f"entry {i}: expected [gpa, end_gpa, permissions], got {item!r}")
        out.append(ProtectEntry(parse_int(item[0]), parse_int(item[1]), parse_int(item[2])))
    return tuple(out)
