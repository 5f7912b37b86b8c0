"""Prometheus metrics: a custom Collector that reads the daemon's state at scrape time.

Why a Collector and not ``Counter``/``Gauge`` objects updated per event: the per-VM
values (protected pages per attribute class, pins, degraded flag) are facts of ``Host``,
already maintained by the state machine; recomputing them when Prometheus asks costs
one pass per scrape instead of work on every event, and the series of a VM retired by
``Host.expire`` disappear by themselves because the collector only reports what is
there (no stale-series bookkeeping, kubevirt#16773). The hot path only bumps plain
dict counters in :class:`LoopStats`.

Thread safety: prometheus_client serves scrapes from its own thread while the daemon
loop mutates ``Host``. The loop holds ``lock`` while it applies a batch; the collector
holds it while it reads. A scrape therefore waits at most one batch, and a batch waits
at most one scrape, which in the daemon reads per-VM page totals (:class:`PageCounts`),
not the maps (BENCHMARKS.md, "Daemon memory").

Names, types and labels are declared once in :data:`METRICS`; ``docs/metrics.md`` is
generated from it by ``scripts/gen_metrics_doc.py`` and a unit test fails when the two
disagree or when the collector emits a family missing from the table.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hekitrace import __version__
from hekitrace.state.events import NAME_OF


class MetricSpec(NamedTuple):
    """One metric family: full name (counters with ``_total``), type, labels, help."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


#: Every family hekitrace exports (docs/internals.md "Metrics"). Order = docs order.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("hekitrace_build_info", "gauge",
               ("version", "python_version", "bcc_version", "kernel_release"),
               "Always 1; the labels say which hekitrace, Python, bcc and kernel run."),
    MetricSpec("hekitrace_config_info", "gauge", ("sha256",),
               "Always 1; sha256 of the configuration file in force (\"defaults\" when none)."),
    MetricSpec("hekitrace_config_reload_timestamp_seconds", "gauge", (),
               "Unix time of the last configuration load attempt (start-up or SIGHUP)."),
    MetricSpec("hekitrace_config_reload_success", "gauge", (),
               "1 if the last configuration load succeeded, 0 if the new file was rejected "
               "and the previous configuration kept."),
    MetricSpec("hekitrace_ready", "gauge", (),
               "1 when every required hook is attached and start-up discovery is done "
               "(the same condition as /readyz)."),
    MetricSpec("hekitrace_hook_attached", "gauge", ("hook", "method", "required"),
               "1 if the hook is attached with that method, 0 if it could not be "
               "(method=\"none\")."),
    MetricSpec("hekitrace_vms", "gauge", (),
               "VMs currently monitored (created and not yet destroyed)."),
    MetricSpec("hekitrace_vms_degraded", "gauge", (),
               "Monitored VMs whose history may be incomplete (lost events, running before "
               "monitoring started...)."),
    MetricSpec("hekitrace_vm_info", "gauge", ("vm", "uuid", "pid", "vmm"),
               "Always 1 per known VM; join on vm to get its UUID, VMM pid and VMM kind."),
    MetricSpec("hekitrace_vm_protected_pages", "gauge", ("vm", "map", "class"),
               "Guest pages carrying an attribute class, in the requested map (what the "
               "guest asked) or the applied map (what KVM set)."),
    MetricSpec("hekitrace_vm_locked_down", "gauge", ("vm",),
               "1 once the guest locked its protections down (no further changes allowed)."),
    MetricSpec("hekitrace_vm_lockdown_timestamp_seconds", "gauge", ("vm",),
               "Unix time the guest locked down; absent while it has not."),
    MetricSpec("hekitrace_vm_degraded", "gauge", ("vm",),
               "1 if this running VM's maps may be incomplete; the reasons are in "
               "'hekitrace snapshot VM'. Absent for destroyed VMs."),
    MetricSpec("hekitrace_vm_pinned_cr_mask", "gauge", ("vm", "cr"),
               "Bit mask of the control register bits the guest pinned (only grows)."),
    MetricSpec("hekitrace_findings_total", "counter", ("vm", "rule", "severity"),
               "Findings raised, by rule and severity (counts include findings collapsed "
               "by deduplication and rate limiting)."),
    MetricSpec("hekitrace_events_total", "counter", ("kind",),
               "Events received from capture, by kind; a VM creation reported by several "
               "sources (ioctl, uevent, discovery) counts once."),
    MetricSpec("hekitrace_events_lost_total", "counter", ("stage", "reason"),
               "Events lost, by where (ring:control, ring:telemetry, queue, decode, "
               "pipeline...) "
               "and why."),
    MetricSpec("hekitrace_vm_events_lost_total", "counter", ("vm", "stage"),
               "Events lost that are known to belong to this VM."),
    MetricSpec("hekitrace_queue_depth_events", "gauge", (),
               "Events waiting between the ring-buffer reader and the state machine."),
    MetricSpec("hekitrace_queue_capacity_events", "gauge", (),
               "Capacity of that queue (capture.queue_events); beyond it events are "
               "dropped and counted with stage=\"queue\"."),
    MetricSpec("hekitrace_last_event_timestamp_seconds", "gauge", (),
               "Unix time of the last event received (0 before the first)."),
    MetricSpec("hekitrace_journal_healthy", "gauge", (),
               "1 if the state journal is being written, 0 after a write error; absent "
               "when the journal is disabled."),
    MetricSpec("hekitrace_journal_write_errors_total", "counter", ("reason",),
               "Journal writes that failed, by reason (errno name)."),
    MetricSpec("hekitrace_journal_bytes", "gauge", (),
               "Bytes the journal occupies on disk."),
    MetricSpec("hekitrace_clients_refused_total", "counter", ("server", "reason"),
               "Clients of the metrics endpoint (server=\"metrics\") or the control socket "
               "(server=\"control\") dropped without an answer: busy (every connection slot "
               "held; on the metrics port the oldest silent client is evicted), timeout (no "
               "complete request or reply within the timeout), too_large (request over the "
               "limit); with metrics.tls also not_tls (a plain-HTTP client, answered 400), "
               "tls_client_certificate (no client certificate, or one the client CA did not "
               "sign) and tls_handshake (any other failed TLS handshake)."),
)
SPEC_BY_NAME = {spec.name: spec for spec in METRICS}

_CR_LABEL = {0: "cr0", 3: "cr3", 4: "cr4"}


class ClientCounts:
    """Clients refused or timed out, by (server, reason): what
    ``hekitrace_clients_refused_total`` reports.

    The servers bump it from their own threads (the HTTP thread, the daemon loop), so it
    has its own lock. One process-wide instance, :data:`CLIENT_COUNTS`, is what the
    servers use by default and what :class:`ClientCountsCollector` reports: a process runs
    one daemon, and the HTTP server registers the collector on the daemon's registry.
    """

    SERVERS = ("metrics", "control")
    REASONS = ("busy", "timeout", "too_large")
    #: the metrics port's own reasons (service/http.py), there from the start like the rest
    #: so that increase() sees the first refusal
    TLS_REASONS = ("not_tls", "tls_client_certificate", "tls_handshake")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {
            (server, reason): 0 for server in self.SERVERS for reason in self.REASONS}
        self.counts.update({("metrics", reason): 0 for reason in self.TLS_REASONS})

    def count(self, server: str, reason: str, n: int = 1) -> None:
        with self._lock:
            self.counts[(server, reason)] = self.counts.get((server, reason), 0) + n

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)


CLIENT_COUNTS = ClientCounts()


class ClientCountsCollector(Collector):
    """Yields ``hekitrace_clients_refused_total`` from a :class:`ClientCounts`."""

    def __init__(self, counts: ClientCounts) -> None:
        self._counts = counts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        spec = SPEC_BY_NAME["hekitrace_clients_refused_total"]
        family = CounterMetricFamily(spec.name[:-len("_total")], spec.help,
                                     labels=spec.labels)
        for (server, reason), n in sorted(self._counts.snapshot().items()):
            family.add_metric([server, reason], n)
        yield family


class LoopStats:
    """Counters and facts the daemon loop maintains for the collector.

    Plain attributes and dicts: bumping ``events_by_kind[name] += 1`` is the whole
    per-event cost. ``lock`` is the state lock (see the module docstring). ``vm_lost``
    and ``findings`` are keyed by ``VmKey`` (None for a finding about no VM); entries
    of retired VMs are pruned by the collector's caller through :meth:`forget_vm`.
    """

    def __init__(self, queue_capacity: int = 0) -> None:
        self.lock = threading.Lock()
        self.events_by_kind: dict[str, int] = {name: 0 for name in NAME_OF.values()}
        self.lost: dict[tuple[str, str], int] = {("queue", "overflow"): 0}
        self.vm_lost: dict[tuple[Any, str], int] = {}
        self.findings: dict[tuple[Any, str, str], int] = {}
        self.last_event_ns = 0
        self.queue_depth = 0
        self.queue_capacity = queue_capacity
        self.ready = False
        #: (hook, method, required, attached); method "none" when not attached
        self.hooks: list[tuple[str, str, bool, bool]] = []
        self.config_sha256 = "defaults"
        self.config_reload_ns = 0
        self.config_reload_success = True
        #: None when there is no journal; else a callable returning
        #: (healthy: bool, write_errors: dict[reason, int], bytes: int)
        self.journal: Callable[[], tuple[bool, dict[str, int], int]] | None = None

    def count_lost(self, stage: str, reason: str, count: int, vm: Any = None) -> None:
        """Add ``count`` lost events at ``stage`` for ``reason`` (and to ``vm`` if known)."""
        key = (stage, reason)
        self.lost[key] = self.lost.get(key, 0) + count
        if vm is not None:
            vkey = (vm, stage)
            self.vm_lost[vkey] = self.vm_lost.get(vkey, 0) + count

    def count_finding(self, vm: Any, rule: str, severity: str, count: int = 1) -> None:
        key = (vm, rule, severity)
        self.findings[key] = self.findings.get(key, 0) + count

    def forget_vm(self, vm: Any) -> None:
        """Drop the per-VM counters of a retired VM (its series disappear)."""
        for lost_key in [k for k in self.vm_lost if k[0] == vm]:
            del self.vm_lost[lost_key]
        for finding_key in [k for k in self.findings if k[0] == vm]:
            del self.findings[finding_key]


class PageCounts:
    """Pages per attribute value of each VM's maps, kept current from change records.

    Why: summing a map at scrape time costs a pass over every stored range of every VM
    (about a second for 100 VMs x 10k ranges, with the state lock held, so the event loop
    would stall that long per scrape). Each ``MapChange`` says exactly which pages moved
    from one value to another, so the daemon feeds them here (:meth:`observe`, a pipeline
    observer) and a scrape reads a few numbers per VM. :meth:`check` compares against a
    full recount (tests call it; the daemon never does).
    """

    def __init__(self) -> None:
        #: VmKey -> {"requested"|"applied": {value: pages}}
        self.by_vm: dict[Any, dict[str, dict[int, int]]] = {}

    def observe(self, change: Any, findings: Any = None) -> None:
        if change.map_changes:
            maps = self.by_vm.get(change.vm)
            if maps is None:
                maps = self.by_vm[change.vm] = {"requested": {}, "applied": {}}
            for mc in change.map_changes:
                counts = maps[mc.which]
                pages = mc.gfn_end - mc.gfn_start
                if mc.old:
                    left = counts.get(mc.old, 0) - pages
                    if left:
                        counts[mc.old] = left
                    else:
                        counts.pop(mc.old, None)
                if mc.new:
                    counts[mc.new] = counts.get(mc.new, 0) + pages
        elif change.lifecycle == "retired":
            self.by_vm.pop(change.vm, None)

    def pages(self, guest: Any, which: str) -> dict[int, int]:
        return self.by_vm.get(guest.key, {}).get(which, {})

    def check(self, host: Any) -> None:
        """Raise AssertionError naming the VM and map where counts and maps disagree."""
        for key, guest in host.guests.items():
            for which in ("requested", "applied"):
                truth = {v: n for v, n in getattr(guest, which).pages_by_value().items() if v}
                mine = {v: n for v, n in self.pages(guest, which).items() if n}
                if truth != mine:
                    raise AssertionError(f"page counts of {key} {which}: {mine} != {truth}")


def build_info(bcc_version: str | None = None) -> dict[str, str]:
    """Labels of ``hekitrace_build_info`` for this process (bcc imported only if asked)."""
    if bcc_version is None:
        try:
            import bcc

            bcc_version = str(getattr(bcc, "__version__", "unknown"))
        except ImportError:
            bcc_version = "absent"
    return {"version": __version__, "python_version": platform.python_version(),
            "bcc_version": bcc_version, "kernel_release": platform.release()}


def vm_labels(guests: Iterable[Any], label: str = "name") -> dict[Any, str]:
    """The ``vm`` label value of each guest, unique among ``guests``.

    ``label`` is ``metrics.vm_label``: ``name``, ``uuid`` or ``pid``. A guest without a
    name (or uuid) falls back to ``pid-<pid>``. When several guests share a value (a VM
    recreated under its name while the old one is in its grace period), a single live
    one keeps the plain value (dashboards follow the running VM) and the others get
    ``@<pid>``, then ``@<created_ns>`` if that is still not unique.
    """
    guests = list(guests)
    groups: dict[str, list[Any]] = {}
    for guest in guests:
        value = str(guest.pid) if label == "pid" else str(getattr(guest, label, "") or "")
        groups.setdefault(value or f"pid-{guest.pid}", []).append(guest)
    out: dict[Any, str] = {}
    for value, members in groups.items():
        if len(members) == 1:
            out[members[0].key] = value
            continue
        live = [g for g in members if getattr(g, "destroyed_ns", None) is None]
        keeper = live[0] if len(live) == 1 else None
        for guest in members:
            out[guest.key] = value if guest is keeper else f"{value}@{guest.pid}"
    taken: dict[str, int] = {}
    for value in out.values():
        taken[value] = taken.get(value, 0) + 1
    for guest in guests:
        value = out[guest.key]
        if taken[value] > 1 and value.endswith(f"@{guest.pid}"):
            out[guest.key] = f"{value}@{guest.created_ns}"
    return out


class HekitraceCollector(Collector):
    """Yields every family of :data:`METRICS` from ``host``, ``abi`` and ``stats``.

    Findings counts come from ``policy.counts`` ({(vm, rule, severity): n}, vm a VmKey or
    a name) when the policy keeps them (they include collapsed findings), else from
    ``stats.findings``.

    ``host_ref`` is a callable returning the current ``(host, abi, policy)`` so a config reload
    that rebuilds the pipeline is seen by the next scrape. ``build`` is
    :func:`build_info`'s dict. ``vm_label`` is ``metrics.vm_label``. ``page_counts``
    (the daemon's :class:`PageCounts`) makes per-VM page totals O(1) per VM; without it
    they are summed from the maps at each scrape (fine for replay and tests).
    """

    def __init__(self, host_ref: Callable[[], tuple[Any, Any, Any]], stats: LoopStats,
                 build: dict[str, str], vm_label: str = "name",
                 page_counts: PageCounts | None = None) -> None:
        self._host_ref = host_ref
        self._stats = stats
        self._build = build
        self.vm_label = vm_label
        self._page_counts = page_counts

    def describe(self) -> Iterable[Metric]:
        # Returning nothing tells the registry not to call collect() at registration
        # (no work at import or start-up); names are unique by construction.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._stats.lock:
            families = self._collect_locked()
        return iter(families)

    def _family(self, name: str) -> Metric:
        spec = SPEC_BY_NAME[name]
        cls = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
        base = name[:-len("_total")] if spec.type == "counter" else name
        return cls(base, spec.help, labels=spec.labels)

    def _collect_locked(self) -> list[Metric]:
        s = self._stats
        host, abi, policy = self._host_ref()
        # Any: Counter/GaugeMetricFamily have add_metric, their base type Metric does not
        fams: dict[str, Any] = {spec.name: self._family(spec.name) for spec in METRICS}

        b = self._build
        fams["hekitrace_build_info"].add_metric(
            [b["version"], b["python_version"], b["bcc_version"], b["kernel_release"]], 1)
        fams["hekitrace_config_info"].add_metric([s.config_sha256], 1)
        fams["hekitrace_config_reload_timestamp_seconds"].add_metric(
            [], s.config_reload_ns / 1e9)
        fams["hekitrace_config_reload_success"].add_metric(
            [], 1 if s.config_reload_success else 0)
        fams["hekitrace_ready"].add_metric([], 1 if s.ready else 0)
        for hook, method, required, attached in s.hooks:
            fams["hekitrace_hook_attached"].add_metric(
                [hook, method, "true" if required else "false"], 1 if attached else 0)

        guests = list(host.guests.values()) if host is not None else []
        labels = vm_labels(guests, self.vm_label)
        live = [g for g in guests if g.destroyed_ns is None]
        fams["hekitrace_vms"].add_metric([], len(live))
        fams["hekitrace_vms_degraded"].add_metric([], sum(1 for g in live if g.degraded))
        for g in guests:
            vm = labels[g.key]
            fams["hekitrace_vm_info"].add_metric(
                [vm, str(g.uuid or ""), str(g.pid), str(g.vmm or "")], 1)
            for which in ("requested", "applied"):
                by_class: dict[str, int] = {}
                pages_of = (self._page_counts.pages(g, which) if self._page_counts is not None
                            else getattr(g, which).pages_by_value())
                for value, pages in pages_of.items():
                    if value:
                        cls = abi.attr_class(value)
                        by_class[cls] = by_class.get(cls, 0) + pages
                for cls in sorted(by_class):
                    fams["hekitrace_vm_protected_pages"].add_metric(
                        [vm, which, cls], by_class[cls])
            fams["hekitrace_vm_locked_down"].add_metric(
                [vm], 0 if g.lockdown_ns is None else 1)
            if g.lockdown_ns is not None:
                fams["hekitrace_vm_lockdown_timestamp_seconds"].add_metric(
                    [vm], g.lockdown_ns / 1e9)
            if g.destroyed_ns is None:   # a destroyed VM in its grace period: nothing to fix
                fams["hekitrace_vm_degraded"].add_metric([vm], 1 if g.degraded else 0)
            for cr, mask in sorted(g.pinned_cr.items()):
                fams["hekitrace_vm_pinned_cr_mask"].add_metric(
                    [vm, _CR_LABEL.get(cr, f"cr{cr}")], mask)

        counts = getattr(policy, "counts", None)
        findings = counts if counts is not None else s.findings
        by_name = {g.name: g.key for g in guests if g.name}
        for (key, rule, severity), count in sorted(
                findings.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
            key = by_name.get(key, key) if isinstance(key, str) else key
            if key is not None and key not in labels:
                continue  # the VM was retired; its series go with it
            vm = labels[key] if key is not None else ""
            fams["hekitrace_findings_total"].add_metric([vm, rule, severity], count)
        merged = host.counters.get("merged_creations", 0) if host is not None else 0
        for kind in sorted(s.events_by_kind):
            count = s.events_by_kind[kind]
            if kind == "vm_created":
                count = max(0, count - merged)   # the same creation from another source
            fams["hekitrace_events_total"].add_metric([kind], count)
        for (stage, reason) in sorted(s.lost):
            fams["hekitrace_events_lost_total"].add_metric([stage, reason],
                                                           s.lost[(stage, reason)])
        for (key, stage), count in sorted(s.vm_lost.items(),
                                          key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if key in labels:
                fams["hekitrace_vm_events_lost_total"].add_metric([labels[key], stage], count)
        fams["hekitrace_queue_depth_events"].add_metric([], s.queue_depth)
        fams["hekitrace_queue_capacity_events"].add_metric([], s.queue_capacity)
        fams["hekitrace_last_event_timestamp_seconds"].add_metric([], s.last_event_ns / 1e9)
        if s.journal is not None:
            healthy, errors, nbytes = s.journal()
            fams["hekitrace_journal_healthy"].add_metric([], 1 if healthy else 0)
            for reason in sorted(errors):
                fams["hekitrace_journal_write_errors_total"].add_metric([reason],
                                                                        errors[reason])
            fams["hekitrace_journal_bytes"].add_metric([], nbytes)
        return [fam for fam in fams.values() if fam.samples]
