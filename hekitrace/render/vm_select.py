"""Resolve a VM named on the command line against a list of ``vm_summary`` dicts.

Operators name guests the way they know them: the libvirt/QEMU name, the UUID from the
management plane, or the QEMU pid from ``ps``. One string is tried as all three, in
the order least likely to collide: UUID (unique by construction), pid (unique among
live processes), name (two guests may share one, e.g. a destroyed guest still in its
grace period and its restarted successor), then a UUID prefix of at least 8
characters (the UUID column of ``hekitrace vms``). A name that matches several VMs is an
error listing them, never a guess: a snapshot of the wrong guest during an incident is
worse than a second command.
"""

from __future__ import annotations

from collections.abc import Sequence

from hekitrace.errors import VmLookupError

#: shortest UUID prefix accepted (what 'hekitrace vms' shows); shorter ones look like names
UUID_PREFIX_MIN = 8


def describe(vm: dict, full: bool = False) -> str:
    """``web1 (pid 4242)``; with ``full``, UUID and state too, to tell namesakes apart."""
    if not full:
        return f"{vm.get('name')} (pid {vm.get('pid')})"
    return (f"{vm.get('name')} (pid {vm.get('pid')}, uuid {vm.get('uuid') or '-'}, "
            f"{vm.get('state', 'running')})")


def resolve(query: str, vms: Sequence[dict]) -> dict:
    """The one VM of ``vms`` that ``query`` names; raises :class:`VmLookupError`.

    Unknown: the message says so and ``choices`` lists every known VM. Ambiguous: the
    message says how many match and ``choices`` lists them (by pid and UUID, which are
    unambiguous, so the operator can re-run with one of those).
    """
    text = query.strip()
    if not text:
        raise VmLookupError("no VM given: expected a name, UUID or pid",
                            choices=[describe(v) for v in vms])
    lowered = text.lower()
    by_uuid = [v for v in vms if v.get("uuid") and str(v["uuid"]).lower() == lowered]
    if by_uuid:
        matches = by_uuid
    else:
        matches = []
        if text.isdigit():
            matches = [v for v in vms if v.get("pid") == int(text)]
        if not matches:
            matches = [v for v in vms if v.get("name") == text]
        if not matches and len(text) >= UUID_PREFIX_MIN:
            # the 8-character UUID column of 'hekitrace vms'
            matches = [v for v in vms if str(v.get("uuid") or "").lower().startswith(lowered)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = [describe(v) for v in vms]
        what = f"{len(known)} known" if known else "the daemon knows no VMs"
        raise VmLookupError(f"unknown VM {query!r} (not a name, UUID or pid of a "
                            f"monitored VM; {what})", choices=known)
    raise VmLookupError(f"VM {query!r} is ambiguous: {len(matches)} VMs match; "
                        "name one by pid or UUID", choices=[describe(v, True) for v in matches])
