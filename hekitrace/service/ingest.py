"""The bounded queue between the event sources and the pipeline, and how it is applied.

The loop drains the rings whenever they are readable (the kernel keeps producing and the
control ring must not overflow) into this queue, but applies at most a batch per
iteration so the control socket, timers and the watchdog are served in between. Events
that would overflow ``capture.queue_events`` are dropped, counted (stage "queue", reason
"overflow", per VM) and fed to the pipeline as ``Lost`` events so the VM is marked
degraded: nothing is lost silently. A bug in the state machine costs the events of one
batch, counted and logged, never the daemon.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Callable

from hekitrace.pipeline import Pipeline
from hekitrace.policy.findings import Finding
from hekitrace.service.metrics import LoopStats
from hekitrace.state.events import Event, Lost, VmCreated

#: events applied per loop iteration before the loop looks at sockets and timers again;
#: at ~2 us per event this keeps control-socket and watchdog latency under ~10 ms.
BATCH_EVENTS = 4096
#: at most one traceback of an internal error per this many seconds in the log
ERROR_LOG_INTERVAL_SECONDS = 60.0


class Ingest:
    """Queue events, apply them in order to ``pipeline``, keep ``stats`` current.

    ``emit`` receives the findings of every application (each finding exactly once);
    ``after_batch`` runs after each applied batch, under the state lock (kernel filter
    sync, journal flush). ``say`` logs one-line messages.
    """

    def __init__(self, pipeline: Pipeline, stats: LoopStats, *,
                 emit: Callable[[list[Finding]], None], after_batch: Callable[[], None],
                 say: Callable[[str], None], wall_ns: Callable[[], int],
                 monotonic: Callable[[], float]) -> None:
        self.pipeline = pipeline
        self.stats = stats
        self._emit = emit
        self._after_batch = after_batch
        self._say = say
        self._wall_ns = wall_ns
        self._mono = monotonic
        self._queue: collections.deque[Event] = collections.deque()
        #: batches (or single events) a bug in the state machine made fail
        self.internal_errors = 0
        self._last_error_log = float("-inf")

    @property
    def depth(self) -> int:
        """Events waiting in the queue."""
        return len(self._queue)

    @property
    def room(self) -> int:
        """Events the queue can take before it overflows."""
        return self.stats.queue_capacity - len(self._queue)

    def enqueue(self, events: list[Event]) -> None:
        """Queue ``events``; what does not fit is counted lost per VM (see the module)."""
        room = self.room
        if len(events) <= room:
            self._queue.extend(events)
        else:
            self._queue.extend(events[:max(room, 0)])
            self._count_overflow(events[max(room, 0):])
        self.stats.queue_depth = len(self._queue)

    def _count_overflow(self, dropped: list[Event]) -> None:
        per_tgid: dict[int, int] = {}
        for event in dropped:
            per_tgid[event.tgid] = per_tgid.get(event.tgid, 0) + 1
        now = self._wall_ns()
        # Fed straight to the pipeline (not queued): they must not be dropped themselves.
        with self.stats.lock:
            for tgid, count in per_tgid.items():
                self.feed(Lost(now, tgid, 0, "queue", "overflow", count))
            self.publish_counts()

    def process(self, budget: int = BATCH_EVENTS) -> None:
        """Apply up to ``budget`` queued events, in order, under the state lock.

        Runs of ordinary events go through ``Pipeline.feed_many`` (the fast path); the
        rare ``VmCreated`` and ``Lost`` events are handled one by one in between because
        the daemon needs to see them in order (duplicate creations, per-VM losses).
        """
        queue = self._queue
        n = min(budget, len(queue))
        batch = [queue.popleft() for _ in range(n)]
        special = (VmCreated, Lost)
        with self.stats.lock:
            start = 0
            for i, event in enumerate(batch):
                if type(event) in special:
                    if start < i:
                        self._guarded(batch[start:i])
                    self._guarded([event], one=True)
                    start = i + 1
            if start < n:
                self._guarded(batch[start:] if start else batch)
            self.stats.queue_depth = len(queue)
            self.publish_counts()
            self._after_batch()

    def _guarded(self, events: list[Event], one: bool = False) -> None:
        """Apply ``events``; a bug in the state machine costs these events, not the daemon.

        Guest input is never supposed to raise; if it does anyway, a guest that found the
        bug must not be able to stop the monitoring of every VM (a crash, then systemd's
        start limit). The events are counted lost (stage "pipeline", reason
        "internal_error"; some may have been applied before the error), their VMs marked
        degraded, and the traceback logged (at most once a minute; ``internal_errors`` in
        ``status`` counts them all).
        """
        try:
            if one:
                self.feed(events[0])
            else:
                self._emit(self.pipeline.feed_many(events))
        except Exception:  # noqa: BLE001 - see the docstring
            self.internal_errors += 1
            now = self._mono()
            if now - self._last_error_log >= ERROR_LOG_INTERVAL_SECONDS:
                self._last_error_log = now
                self._say("ERROR: internal error while applying events (please report):\n"
                          + traceback.format_exc().rstrip())
            per_tgid: dict[int, int] = {}
            for event in events:
                per_tgid[event.tgid] = per_tgid.get(event.tgid, 0) + 1
            for tgid, count in per_tgid.items():
                try:
                    self.feed(Lost(self._wall_ns(), tgid, 0, "pipeline", "internal_error",
                                   count))
                except Exception:  # noqa: BLE001 - already reported above
                    self.internal_errors += 1

    def apply(self, event: Event) -> None:
        """Apply one event outside a batch (start-up discovery); caller holds the lock."""
        self.feed(event)
        self.publish_counts()

    def feed(self, event: Event) -> None:
        """Apply one event now, bypassing the queue; caller holds the lock. A loss of a
        known VM is also counted on that VM (``hekitrace_vm_events_lost_total``)."""
        if type(event) is Lost and event.tgid:
            owner = self.pipeline.host.loss_owner(event.tgid)
            if owner is not None:
                key = (owner.key, event.stage)
                self.stats.vm_lost[key] = self.stats.vm_lost.get(key, 0) + max(event.count, 0)
        self._emit(self.pipeline.feed(event))

    def publish_counts(self) -> None:
        """Copy the pipeline's event and loss counters where the collector reads them."""
        pipeline = self.pipeline
        self.stats.events_by_kind = pipeline.events_by_kind
        lost = {("queue", "overflow"): 0}
        lost.update(pipeline.lost)
        self.stats.lost = lost
        self.stats.last_event_ns = max(self.stats.last_event_ns, pipeline.last_event_ns)
