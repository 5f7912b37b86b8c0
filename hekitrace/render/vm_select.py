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

import re
from collections.abc import Sequence

from hekitrace.errors import VmLookupError

#: shortest UUID prefix accepted (what 'hekitrace vms' shows); shorter ones look like names
UUID_PREFIX_MIN = 8
#: candidates listed in an unknown/ambiguous error before "... and N more"
CHOICES_SHOWN = 10
#: the label 'vms' and the findings give a VM without a name
PID_LABEL = re.compile(r"pid-(\d+)")


def describe(vm: dict, full: bool = False) -> str:
    """``web1 (pid 4242)``; with ``full``, UUID and state too, to tell namesakes apart."""
    if not full:
        return f"{vm.get('name')} (pid {vm.get('pid')})"
    return (f"{vm.get('name')} (pid {vm.get('pid')}, uuid {vm.get('uuid') or '-'}, "
            f"{vm.get('state', 'running')})")


def _bounded(vms: Sequence[dict], full: bool = False) -> list[str]:
    """At most :data:`CHOICES_SHOWN` descriptions, then how many more there are: an
    error line must stay readable on a host with a thousand VMs."""
    shown = [describe(v, full) for v in vms[:CHOICES_SHOWN]]
    if len(vms) > CHOICES_SHOWN:
        shown.append(f"... and {len(vms) - CHOICES_SHOWN} more")
    return shown


def _matches(text: str, vms: Sequence[dict]) -> list[dict]:
    lowered = text.lower()
    by_uuid = [v for v in vms if v.get("uuid") and str(v["uuid"]).lower() == lowered]
    if by_uuid:
        return by_uuid
    label = PID_LABEL.fullmatch(text)
    if text.isdigit() or label:
        pid = int(label.group(1) if label else text)
        by_pid = [v for v in vms if v.get("pid") == pid]
        if by_pid:
            return by_pid
    by_name = [v for v in vms if v.get("name") == text]
    if by_name or len(text) < UUID_PREFIX_MIN:
        return by_name
    # the 8-character UUID column of 'hekitrace vms', in any case
    return [v for v in vms if str(v.get("uuid") or "").lower().startswith(lowered)]


def resolve(query: str, vms: Sequence[dict]) -> dict:
    """The one VM of ``vms`` that ``query`` names; raises :class:`VmLookupError`.

    ``vms`` are dicts with at least ``name``, ``uuid``, ``pid`` and ``state`` (a ``vms``
    row, or the identity the daemon builds). Several matches are an error even when only
    one of them runs (a VM recreated under its name while the old one is in its grace
    period): a snapshot of the wrong guest during an incident costs more than a second
    command naming it by pid or UUID. Unknown: ``choices`` lists known VMs; ambiguous:
    ``choices`` lists the matches by pid and UUID, which are unambiguous; both bounded.
    """
    text = query.strip()
    if not text:
        raise VmLookupError("no VM given: expected a name, pid-N label, pid or UUID",
                            choices=_bounded(vms))
    matches = _matches(text, vms)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        what = f"{len(vms)} known" if vms else "hekitrace knows no VMs"
        raise VmLookupError(f"unknown VM {query!r} (not a name, pid-N label, pid or UUID "
                            f"of a monitored VM; {what})", choices=_bounded(vms))
    raise VmLookupError(f"VM {query!r} is ambiguous: {len(matches)} VMs match; "
                        "name one by pid or UUID", choices=_bounded(matches, True),
                        ambiguous=True)
