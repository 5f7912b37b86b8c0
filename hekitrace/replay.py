"""The replay engine: trace files through the daemon's own state and rules, offline.

The events go through :class:`hekitrace.pipeline.Pipeline`, the same object the daemon
feeds, with the policy's timers driven by event time; so a replay reports what the daemon
would have reported live, at the times it would have. ``hekitrace replay``,
``snapshot --from``, ``vms --from`` and the differential tests all call :func:`replay`.
Trace problems (a corrupt block, a bad line) never stop a replay: they are collected in
the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.registry import CollectorRegistry

from hekitrace.config import settings
from hekitrace.errors import UsageError
from hekitrace.journal.segments import expand_paths
from hekitrace.pipeline import Pipeline
from hekitrace.policy.findings import Finding, format_time
from hekitrace.render import documents
from hekitrace.service.http import Health
from hekitrace.service.metrics import HekitraceCollector, LoopStats, build_info
from hekitrace.trace.file import TraceHeader, TraceProblem, TraceReader, open_trace
from hekitrace.trace.jsonl import parse_time

#: events handed to the pipeline at once (the daemon's batches are of this order too)
BATCH = 4096


@dataclasses.dataclass
class ReplayResult:
    """What a replay produced: the pipeline (state), findings in order, trace problems."""

    pipeline: Pipeline
    findings: list[Finding]
    problems: list[TraceProblem]
    headers: list[TraceHeader]
    events: int
    first_ns: int | None
    last_ns: int | None
    notices: list[str]


def _until_ns(spec: str, first_ns: int) -> int:
    """The --until limit: RFC 3339, or +SECONDS after ``first_ns``."""
    if spec.startswith("+"):
        return first_ns + round(float(spec[1:]) * 1e9)
    return parse_time(spec)


def configure_for(headers: list[TraceHeader], config: Any) -> tuple[Any, list[str]]:
    """Adopt the recording host's MBEC setting, announced in one line.

    Without MBEC a Heki host re-adds EXEC to every request (docs/heki-abi.md section 5, step 4), so
    replaying an MBEC host's trace with ``mbec: false`` (or the reverse) would invent
    mismatches. ``abi.mbec`` in the config describes the live host; the header records
    how the traced host behaved, which is the fact a replay needs, so it wins.
    """
    notices = []
    recorded = next((h.extra["mbec"] for h in headers
                     if isinstance(h.extra.get("mbec"), bool)), None)
    if recorded is not None and recorded != config.abi.mbec:
        config = dataclasses.replace(config, abi=dataclasses.replace(config.abi, mbec=recorded))
        notices.append(f"note: using abi.mbec={str(recorded).lower()} as recorded in the "
                       "trace header (the config says otherwise)")
    names = {h.abi_profile for h in headers if h.abi_profile}
    if names and config.abi.profile not in names:
        notices.append(f"note: the trace was recorded with ABI profile "
                       f"{', '.join(sorted(names))}; replaying with {config.abi.profile}")
    return config, notices


#: called after each batch with (bytes read of all files so far, events so far)
Progress = Callable[[int, int], None]


def replay(paths: Iterable[str], config: Any = None, *, until: str | None = None,
           progress: Progress | None = None) -> ReplayResult:
    """Replay ``paths`` in order through one :class:`Pipeline`.

    A file that is not a trace raises :class:`~hekitrace.errors.TraceFormatError` before
    anything is replayed; problems inside traces are collected, never raised.
    """
    problems: list[TraceProblem] = []
    readers: list[TraceReader] = []
    try:
        # a journal directory (the daemon's state dir) stands for its segments, in order
        for path in expand_paths(list(paths)):
            readers.append(open_trace(path, problems))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    if until is not None:
        try:
            if until.startswith("+"):
                float(until[1:])
            else:
                parse_time(until)
        except ValueError:
            raise UsageError(f"--until {until!r}: expected RFC 3339 "
                             "(2026-11-25T15:00:03Z) or +SECONDS") from None
    headers = [r.header for r in readers]
    config, notices = configure_for(headers, config or settings.default_config())
    last = [0]
    pipeline = Pipeline(config, clock=lambda: last[0])
    findings: list[Finding] = []
    first_ns: int | None = None
    limit: int | None = None
    feed_many = pipeline.feed_many
    done = False
    bytes_before = 0          # of the files already replayed
    events_read = 0
    for reader in readers:
        for batch in reader.batches(BATCH):
            events_read += len(batch)
            if progress is not None:
                progress(bytes_before + reader.position(), events_read)
            if not batch:
                continue
            if first_ns is None:
                first_ns = batch[0].time_ns
                if until is not None:
                    limit = _until_ns(until, first_ns)
            if limit is not None and batch[-1].time_ns > limit:
                cut = 0
                while batch[cut].time_ns <= limit:
                    cut += 1
                batch = batch[:cut]
                done = True
            findings += feed_many(batch)
            last[0] = pipeline.last_event_ns
            if done:
                break
        if done:
            break
        bytes_before += reader.position()
    for reader in readers:
        reader.close()
    findings += pipeline.flush(pipeline.last_event_ns or None)
    events = sum(pipeline.events_by_kind.values())
    return ReplayResult(pipeline, findings, problems, headers, events, first_ns,
                        pipeline.last_event_ns or None, notices)


def _by_vm(findings: list[Finding]) -> dict[Any, list[Finding]]:
    out: dict[Any, list[Finding]] = {}
    for finding in findings:
        out.setdefault(finding.vm_key, []).append(finding)
    return out


def applied_unobserved(pipeline: Pipeline) -> str | None:
    """Why the replayed host's applied maps say nothing (no attribute hook), or None."""
    if pipeline.policy.applied_hook_active:
        return None
    return "the attribute hook (kvm_arch_post_set_memory_attributes) was not attached"


def to_document(result: ReplayResult) -> dict:
    """The ``-o json`` document: vms (documents.vm_snapshot), findings, lost, problems."""
    pipeline = result.pipeline
    per_vm = _by_vm(result.findings)
    guests = sorted(pipeline.host.guests.values(), key=lambda g: (g.created_ns, g.pid))
    return {
        "vms": [documents.vm_snapshot(g, pipeline.abi, per_vm.get(g.key, []), max_findings=0,
                                      applied_unobserved=applied_unobserved(pipeline))
                for g in guests],
        "findings": [f.to_dict() for f in result.findings],
        "lost": [{"stage": stage, "reason": reason, "count": count}
                 for (stage, reason), count in sorted(pipeline.lost.items())],
        "problems": [p.to_dict() for p in result.problems],
        "trace": {"events": result.events,
                  "first": format_time(result.first_ns) if result.first_ns else None,
                  "last": format_time(result.last_ns) if result.last_ns else None,
                  "headers": [h.to_dict() for h in result.headers]},
    }


def metrics_registry(result: ReplayResult) -> tuple[Any, Any]:
    """A registry exposing the replayed state exactly as the daemon's /metrics would,
    and the health object the HTTP server reports."""
    pipeline = result.pipeline
    stats = LoopStats()
    stats.events_by_kind.update(pipeline.events_by_kind)
    stats.lost.update(pipeline.lost)
    stats.last_event_ns = pipeline.last_event_ns
    stats.ready = True
    stats.config_sha256 = pipeline.config.digest_label
    health = Health()
    health.ready = True
    health.not_ready_reasons = ()
    registry = CollectorRegistry(auto_describe=False)

    def state() -> Any:
        return pipeline.host, pipeline.abi, pipeline.policy

    registry.register(HekitraceCollector(state, stats, build_info(),
                                         vm_label=pipeline.config.metrics.vm_label))
    return registry, health
