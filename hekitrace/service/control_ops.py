"""What the control socket answers: the ``vms`` and ``snapshot`` operations over live state.

control.py is the transport (sockets, limits, framing, peer check) and knows nothing
about VMs; this module turns a request into a reply from ``Host`` and the findings, with
the views of documents.py, so it can be tested without sockets. ``status`` is answered by the
daemon itself (it describes the daemon, not the guests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hekitrace.render import documents
from hekitrace.service.control import RequestError

MAPS = ("requested", "applied")


def find_vm(guests: Iterable[Any], selector: Any) -> Any:
    """The guest named by ``selector`` (name, UUID or pid, as given by the operator).

    Several guests may match: a VM recreated under its name while the old one is in
    its grace period; the single live one wins. Otherwise ``ambiguous_vm`` lists the
    matches, ``unknown_vm`` lists every known VM (``choices`` of the protocol).
    """
    if isinstance(selector, bool) or not isinstance(selector, (str, int)) or selector == "":
        raise RequestError("bad_request", '"vm" must be a VM name, UUID or pid')
    text = str(selector)
    guests = list(guests)
    matches = [g for g in guests if text in (g.name, g.uuid, str(g.pid))]
    live = [g for g in matches if g.destroyed_ns is None]
    if len(live) == 1:
        return live[0]
    if len(matches) == 1:
        return matches[0]
    describe = [f"{g.name or '?'} (pid {g.pid}, uuid {g.uuid or '-'})"
                for g in (matches or guests)]
    if not matches:
        raise RequestError("unknown_vm", f"no VM named {text!r}", describe)
    raise RequestError("ambiguous_vm", f"{len(matches)} VMs match {text!r}; "
                       "name one by UUID or pid", describe)


def findings_count(counts: Mapping[tuple[Any, str, str], int], guest: Any) -> int:
    """Findings of ``guest`` in ``counts`` ({(VmKey or name, rule, severity): n})."""
    return sum(n for (vm, _rule, _sev), n in counts.items()
               if vm == guest.key or (guest.name and vm == guest.name))


def answer(request: dict, host: Any, abi: Any, counts: Mapping[tuple[Any, str, str], int],
           recent_findings: Mapping[Any, Iterable[Any]]) -> dict:
    """The ``result`` of a ``vms`` or ``snapshot`` request; RequestError otherwise."""
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
        return documents.vm_snapshot(guest, abi, findings, maps=tuple(maps))
    raise RequestError("bad_request", f"unknown op {op!r}; expected status, vms or snapshot")
