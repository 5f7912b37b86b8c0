"""What the control socket answers: the ``vms`` and ``snapshot`` operations over live state.

control.py is the transport (sockets, limits, framing, peer check) and knows nothing
about VMs; this module turns a request into a reply from ``Host`` and the findings, with
the views of documents.py, so it can be tested without sockets. ``status`` is answered by the
daemon itself (it describes the daemon, not the guests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hekitrace.errors import VmLookupError
from hekitrace.render import documents, vm_select
from hekitrace.service.control import RequestError
from hekitrace.service.follow import Record
from hekitrace.state.changes import Change
from hekitrace.trace.jsonl import event_to_dict

MAPS = ("requested", "applied")


def identity(guest: Any) -> dict:
    """What the resolver matches on: the fields of a ``vms`` row that name a VM."""
    return {"name": guest.name or f"pid-{guest.pid}", "uuid": guest.uuid, "pid": guest.pid,
            "state": "running" if guest.destroyed_ns is None else "destroyed"}


def find_vm(guests: Iterable[Any], selector: Any) -> Any:
    """The guest named by ``selector``, by the same rules as ``snapshot --from``
    (:func:`hekitrace.render.vm_select.resolve`): name, pid-N label, pid, UUID in any
    case, UUID prefix; errors become ``unknown_vm`` / ``ambiguous_vm`` with the choices."""
    if isinstance(selector, bool) or not isinstance(selector, (str, int)) or selector == "":
        raise RequestError("bad_request", '"vm" must be a VM name, UUID or pid')
    guests = list(guests)
    rows = [identity(g) for g in guests]
    try:
        chosen = vm_select.resolve(str(selector), rows)
    except VmLookupError as error:
        code = "ambiguous_vm" if error.ambiguous else "unknown_vm"
        raise RequestError(code, str(error), error.choices) from None
    return guests[next(i for i, row in enumerate(rows) if row is chosen)]


def findings_count(counts: Mapping[tuple[Any, str, str], int], guest: Any) -> int:
    """Findings of ``guest`` in ``counts`` ({(VmKey or name, rule, severity): n})."""
    return sum(n for (vm, _rule, _sev), n in counts.items()
               if vm == guest.key or (guest.name and vm == guest.name))


def answer(request: dict, host: Any, abi: Any, counts: Mapping[tuple[Any, str, str], int],
           recent_findings: Mapping[Any, Iterable[Any]],
           applied_unobserved: str | None = None) -> dict:
    """The ``result`` of a ``vms`` or ``snapshot`` request; RequestError otherwise.

    ``applied_unobserved``: why this host's applied maps cannot be seen (the attribute
    hook is not attached), or None."""
    op = request["op"]
    if op == "vms":
        return {"vms": [documents.vm_summary(g, abi, findings_count(counts, g))
                        for g in host.guests.values()]}
    if op == "snapshot":
        guest = find_vm(host.guests.values(), request.get("vm"))
        maps = request.get("maps", list(MAPS))
        if not isinstance(maps, list) or not maps or not set(maps) <= set(MAPS) \
                or not all(isinstance(m, str) for m in maps):
            raise RequestError("bad_request", f'"maps" must be a non-empty subset of '
                                              f'["requested", "applied"], got {maps!r}')
        findings = list(recent_findings.get(guest.key, ()))
        return documents.vm_snapshot(guest, abi, findings, maps=tuple(maps),
                                     applied_unobserved=applied_unobserved)
    raise RequestError("bad_request", f"unknown op {op!r}; expected status, vms, snapshot, recent or follow")


def recent(recent_findings: Mapping[Any, Iterable[Any]]) -> dict:
    """The ``recent`` reply: the findings the daemon keeps per VM, oldest first."""
    findings = sorted((f for per_vm in recent_findings.values() for f in per_vm),
                      key=lambda f: f.time_ns)
    return {"findings": [f.to_dict() for f in findings]}


def event_record(change: Change, host: Any) -> Record:
    """One applied event as a ``follow`` stream record: (kind, VM identity, JSON)."""
    assert change.event is not None
    guest = host.guests.get(change.vm) if change.vm is not None else None
    doc = event_to_dict(change.event)
    return doc["kind"], identity(guest) if guest is not None else None, doc
