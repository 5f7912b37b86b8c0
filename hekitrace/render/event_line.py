"""One line of text per streamed event or finding, for ``hekitrace events``.

The stream's JSON objects are the trace's JSON Lines records (events) and the findings'
own documents, so the text form picks the fields an operator scans for: when, what,
which VM, and the few values that say what happened.
"""

from __future__ import annotations

from hekitrace.policy.findings import format_time
from hekitrace.render.table import WIDTH, cut

#: per event kind, the fields shown after the VM (the rest are in -o json)
_FIELDS = {
    "vm_created": ("name", "uuid", "vm_fd", "preexisting"),
    "vm_destroyed": ("vm_fd",),
    "memslot": ("slot", "gpa", "size", "flags"),
    "hypercall": ("nr", "a0", "a1", "ret"),
    "protect_request": ("list_gpa", "flags"),
    "cr_pin_request": ("cr", "mask", "flags"),
    "attr_applied": ("gfn_start", "gfn_end", "attributes"),
    "attr_ioctl": ("address", "size", "attributes", "result"),
    "fault": ("gpa", "error_code", "count"),
    "cr_write": ("cr", "value"),
    "lost": ("stage", "reason", "count"),
}


def _when(record: dict) -> str:
    time_ns = record.get("time_ns")
    if isinstance(time_ns, int):
        return format_time(time_ns)[11:23]
    return str(record.get("time", ""))[11:23]


def render_line(record: dict) -> str:
    """``15:00:02.250 protected_write critical web1 ...`` or ``... hypercall pid 42 nr=5``."""
    kind = record.get("kind", "?")
    if kind == "finding":
        vm = record.get("vm") or {}
        name = vm.get("name") or f"pid-{vm.get('pid', '?')}"
        text = (f"{_when(record)} {record.get('severity', '?'):<8} {record.get('rule', '?')} "
                f"{name}: {record.get('message', '')}")
        return cut(text, WIDTH)
    if kind == "lost" and "time_ns" not in record:
        return f"LOST {record.get('count')} lines: {record.get('reason', '')}"
    entries = record.get("entries")
    details = [f"{k}={record[k]}" for k in _FIELDS.get(kind, ()) if k in record]
    if isinstance(entries, list):
        details.append(f"entries={len(entries)}")
    return cut(f"{_when(record)} {kind:<15} pid {record.get('tgid', '?')} "
               + " ".join(details), WIDTH)
