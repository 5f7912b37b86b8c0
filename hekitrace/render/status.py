"""The daemon's status: the ``status`` document of the control socket and the one-line
summary for logs and ``systemctl status`` (STATUS=).

Built from what the daemon hands over (its hook report, loop counters, the host state),
never by reaching into the daemon, so the shape is defined in one place; scripts and the
e2e tests read the document: add keys, never rename or remove them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from hekitrace import __version__
from hekitrace.state.host import Host


class HookRow(Protocol):
    """One hook of the daemon's hook report (hekitrace.capture.engine.HookStatus)."""

    hook: str
    method: str
    required: bool
    attached: bool
    reason: str


class LoopCounters(Protocol):
    """The loop's counters (hekitrace.service.metrics.LoopStats)."""

    events_by_kind: dict[str, int]
    lost: dict[tuple[str, str], int]
    queue_capacity: int
    last_event_ns: int
    config_sha256: str
    config_reload_success: bool
    config_reload_ns: int


def status_line(*, ready: bool, host: Host | None, hooks: Sequence[HookRow],
                counters: LoopCounters, queue_depth: int) -> str:
    """``ready; 2 VMs (0 degraded); hooks 5/5; 1234 events, 0 lost; queue 0/65536``."""
    live = _live(host) if host is not None else []
    attached = sum(1 for h in hooks if h.attached)
    events = sum(counters.events_by_kind.values())
    lost = sum(counters.lost.values())
    state = "ready" if ready else "NOT READY"
    return (f"{state}; {len(live)} VMs ({sum(1 for g in live if g.degraded)} degraded); "
            f"hooks {attached}/{len(hooks)}; {events} events, {lost} lost; "
            f"queue {queue_depth}/{counters.queue_capacity}")


def status_document(*, pid: int, uptime_seconds: float, ready: bool,
                    not_ready_reasons: Sequence[str], hooks: Sequence[HookRow], host: Host,
                    counters: LoopCounters, queue_depth: int, config_path: str | None,
                    control_stats: Mapping[str, int], filter_errors: int,
                    internal_errors: int, journal: dict | None, policy: dict) -> dict:
    """The ``status`` reply: version, readiness and why, hooks, VMs, event and loss
    counts, queue, config, control socket, error counters, the journal's status and the
    policy's (which rules run, and why the others do not)."""
    return {
        "version": __version__, "pid": pid,
        "uptime_seconds": round(uptime_seconds, 3),
        "ready": ready, "not_ready_reasons": list(not_ready_reasons),
        "hooks": [{"hook": h.hook, "method": h.method, "required": h.required,
                   "attached": h.attached, "reason": h.reason} for h in hooks],
        "vms": len(_live(host)),
        "events_total": dict(counters.events_by_kind),
        "events_lost_total": [{"stage": st, "reason": rs, "count": n}
                              for (st, rs), n in sorted(counters.lost.items())],
        "queue_depth_events": queue_depth, "queue_capacity_events": counters.queue_capacity,
        "last_event_time_ns": counters.last_event_ns,
        "config": {"path": config_path, "sha256": counters.config_sha256,
                   "reload_success": counters.config_reload_success,
                   "reload_time_ns": counters.config_reload_ns},
        "control": dict(control_stats),
        "filter_errors": filter_errors,
        "merged_creations": host.counters.get("merged_creations", 0),
        "internal_errors": internal_errors,
        "journal": journal,
        "policy": policy,
    }


def _live(host: Host) -> list:
    """Guests not destroyed (a destroyed one stays in ``guests`` for its grace period)."""
    return [g for g in host.guests.values() if g.destroyed_ns is None]
