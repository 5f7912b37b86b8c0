"""What one event changed: the records ``Host.apply`` returns.

Rules, metrics and the journal consume these instead of rescanning whole maps per event
(docs/internals.md, principle 2). They are plain NamedTuples so the hot path stays cheap; the
shared :data:`NO_CHANGE` stands for events that changed nothing.
"""

from __future__ import annotations

from typing import NamedTuple

from hekitrace.state.events import Event, ProtectEntry


class VmKey(NamedTuple):
    """Identity of one VM: the VMM's tgid plus the VM's creation time, so a reused pid
    can never merge two VMs."""

    tgid: int
    created_ns: int


class MapChange(NamedTuple):
    """In map ``which`` (``"requested"`` or ``"applied"``), gfns [gfn_start, gfn_end)
    went from KVM attribute value ``old`` to ``new`` (both uniform over the range)."""

    which: str
    gfn_start: int
    gfn_end: int
    old: int
    new: int


class Rejection(NamedTuple):
    """A protect-request entry the (modelled) Heki host refused, with the errno it would
    return (``EINVAL``, ``EPERM``...) and a human ``reason``."""

    entry: ProtectEntry
    errno: str
    reason: str


class Anomaly(NamedTuple):
    """Something odd about guest input that did not raise: ``kind`` is a stable id
    (``list_loop``, ``list_truncated``, ``entry_misaligned``, ``unknown_bits``,
    ``outside_memslots``, ``too_many_entries``, ``end_before_start``...), ``detail``
    holds the raw values as evidence."""

    kind: str
    message: str
    detail: dict


class PinChange(NamedTuple):
    """Pinned bits of control register ``cr`` grew from ``old`` to ``new``."""

    cr: int
    old: int
    new: int


class Change(NamedTuple):
    """Everything one applied event changed (empty tuples when nothing did).

    ``lifecycle`` is ``"created"``, ``"destroyed"``, ``"retired"`` (dropped after its grace
    period) or None. ``degraded`` lists degraded reasons newly added by this event.
    """

    event: Event | None
    vm: VmKey | None
    map_changes: tuple[MapChange, ...] = ()
    pin_change: PinChange | None = None
    rejections: tuple[Rejection, ...] = ()
    anomalies: tuple[Anomaly, ...] = ()
    lifecycle: str | None = None
    degraded: tuple[str, ...] = ()


NO_CHANGE = Change(event=None, vm=None)
