"""Turn decoded ring records into events: page-list assembly and loss accounting.

records.decode_batch does the per-record work; this module keeps the little state that
spans records:

* :class:`ProtectAssembler` joins the page records of one PROTECT_MEMORY hypercall (same
  ``call_id``) with its end record into one :class:`~hekitrace.state.events.ProtectRequest`.
  Pages whose end record never comes (the end was dropped in a full ring) are flushed as a
  request flagged ``LOST_PAGES`` after ``stale_batches`` batches, so nothing waits forever.
* :class:`LossTracker` reads the kernel's per-CPU drop map and turns each increase into a
  :class:`~hekitrace.state.events.Lost` event with the VM's tgid, so that VM is marked degraded.
"""

from __future__ import annotations

from hekitrace.capture.records import DROP_REASONS, HOOK_NAMES, RING_NAMES, ProtectEnd, ProtectPage
from hekitrace.state.events import Lost, ProtectFlags, ProtectRequest

LOST_PAGES = int(ProtectFlags.LOST_PAGES)


class ProtectAssembler:
    """Pages + end record of one walk -> one ProtectRequest (see module docstring)."""

    def __init__(self, stale_batches: int = 8) -> None:
        self._pending: dict[int, list] = {}   # call_id -> [batch_no, pages]
        self._batch = 0
        self._stale = stale_batches

    def feed(self, parts: list) -> list[ProtectRequest]:
        self._batch += 1
        out: list[ProtectRequest] = []
        for part in parts:
            if isinstance(part, ProtectPage):
                self._pending.setdefault(part.call_id, [self._batch, []])[1].append(part)
            elif isinstance(part, ProtectEnd):
                pages = self._pending.pop(part.call_id, [0, []])[1]
                out.append(_request(part.time_ns, part.tgid, part.tid, part.list_gpa, pages,
                                    part.pages, part.flags, part.declared_entries))
        if self._pending:
            for call_id in [c for c, (b, _) in self._pending.items()
                            if self._batch - b >= self._stale]:
                pages = self._pending.pop(call_id)[1]
                first = pages[0]
                out.append(_request(first.time_ns, first.tgid, first.tid, first.page_gpa,
                                    pages, len(pages), LOST_PAGES,
                                    sum(p.npages for p in pages)))
        return out

    def flush(self) -> list[ProtectRequest]:
        """Everything still pending, flagged LOST_PAGES (at close)."""
        self._batch += self._stale
        return self.feed([])


def _request(time_ns: int, tgid: int, tid: int, list_gpa: int, pages: list[ProtectPage],
             npages_read: int, flags: int, declared: int) -> ProtectRequest:
    pages.sort(key=lambda p: p.page_index)
    entries: tuple = ()
    page_flags = 0
    for p in pages:
        entries += p.entries
        page_flags |= p.flags
    if len(pages) != npages_read:
        flags |= LOST_PAGES
    return ProtectRequest(time_ns, tgid, tid, list_gpa, entries, npages_read,
                          flags | page_flags, declared)


class LossTracker:
    """Kernel drop counters (bpf hk_loss map) -> Lost events for the increases."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int, int, int], int] = {}

    def update(self, table, now_ns: int) -> list[Lost]:
        """``table``: bcc per-CPU hash of struct hk_loss_key -> u64[ncpus]."""
        out: list[Lost] = []
        for key, values in table.items():
            self._count(key, sum(values), now_ns, out)
        return out

    def forget(self, table, tgid: int, now_ns: int) -> list[Lost]:
        """Final read of VMM ``tgid``'s counters, then delete its keys from ``table``.

        Why: the kernel table holds 4096 keys; entries of dead VMs would fill it, and
        new losses would then be counted under tgid 0 (no VM marked degraded). The
        totals seen here go too, or a reused pid's first losses would be under-reported.
        A drop counted between the read and the delete is missed; only the (dead) VMM
        ``tgid`` could cause one.
        """
        out: list[Lost] = []
        for key in [k for k in table if k.tgid == tgid]:
            try:
                self._count(key, sum(table[key]), now_ns, out)
                del table[key]
            except KeyError:
                pass
        for k in [k for k in self._seen if k[0] == tgid]:
            del self._seen[k]
        return out

    def _count(self, key, total: int, now_ns: int, out: list[Lost]) -> None:
        k = (key.tgid, key.ring, key.hook, key.reason)
        delta = total - self._seen.get(k, 0)
        if delta > 0:
            self._seen[k] = total
            out.append(Lost(now_ns, key.tgid, 0, f"ring:{RING_NAMES.get(key.ring, key.ring)}",
                            DROP_REASONS.get(key.reason, f"reason{key.reason}"), delta,
                            HOOK_NAMES.get(key.hook, f"hook{key.hook}")))

    def totals(self) -> dict[tuple[int, int, int, int], int]:
        return dict(self._seen)
