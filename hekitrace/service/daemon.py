"""The daemon: one event loop wiring capture, state, rules and sinks together.

Data flow (docs/internals.md): ring buffers and KVM uevents -> bounded queue
(service/ingest.py) -> Pipeline (Host + Policy) -> findings to the alert sink; metrics,
the control socket and the probes read the state. Everything runs in one thread, a
``selectors`` loop over the ring-buffer fds, the uevent socket, the control socket, a
signal wake-up pipe and timers; only the HTTP server has its own thread (it reads state
under ``LoopStats.lock``, which the loop holds while it applies a batch).

The parts are given by the caller (commands/daemon.py, or a test) through the interfaces
of service/parts.py; a part it leaves out (no capture, no uevents, no journal) is said in
one line at start-up. The kernel tables kept in step with the state are in
service/kernel_sync.py, the VMs running at start-up and implicit VMs whose VMM exited in
service/running_vms.py, the ``status`` document in render/status.py.
"""

from __future__ import annotations

import collections
import os
import selectors
import sys
import time
from collections.abc import Callable
from typing import TextIO

from prometheus_client.registry import CollectorRegistry

from hekitrace.capture.engine import HookStatus
from hekitrace.config.abi import AbiProfile
from hekitrace.config.settings import Config
from hekitrace.errors import ConfigError, HekitraceError
from hekitrace.journal.segments import Journal
from hekitrace.pipeline import Pipeline
from hekitrace.policy.engine import Policy
from hekitrace.policy.findings import Finding
from hekitrace.render.status import status_document, status_line
from hekitrace.service import control_ops, parts
from hekitrace.service.control import ControlServer, RequestError
from hekitrace.service.follow import Filter, Subscriber
from hekitrace.service.http import Health, HttpServer, tls_context
from hekitrace.service.ingest import BATCH_EVENTS, Ingest
from hekitrace.service.kernel_sync import FaultFilterSync, seed_memslots
from hekitrace.service.metrics import HekitraceCollector, LoopStats, PageCounts, build_info
from hekitrace.service.running_vms import exited_implicit_vms, merged_creations, register_discovered
from hekitrace.service.sdnotify import Notifier
from hekitrace.service.signals import Signals, reloaded_policy, restart_needed
from hekitrace.state.changes import Change, VmKey
from hekitrace.state.events import VmCreated
from hekitrace.state.host import Host

#: findings kept per VM for snapshots (older ones are counted, not kept)
RECENT_FINDINGS = 50


class Daemon:
    """The long-running service. ``start()``, then ``run()`` until a signal, then ``close()``.

    ``log`` receives one-line human messages (stderr by default; journald adds the time).
    ``start()`` runs, in order, :meth:`start_capture`, :meth:`build_pipeline` and
    :meth:`run_discovery` (public so tests drive them without sockets); the loop's timer
    steps are :meth:`tick` and :meth:`expire`.
    """

    def __init__(self, config: Config, config_path: str | None, *,
                 load_config: parts.ConfigLoader,
                 pipeline_factory: parts.PipelineFactory,
                 capture_factory: parts.CaptureFactory | None = None,
                 uevents_factory: parts.EventSourceFactory | None = None,
                 discover: parts.Discover | None = None,
                 recovery: parts.Recovery | None = None,
                 alert_sink: parts.AlertWriter | None = None,
                 notifier: Notifier | None = None,
                 log: TextIO = sys.stderr,
                 foreground_status: bool = False,
                 wall_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic,
                 proc_root: str = "/proc") -> None:
        self.config = config
        self.config_path = config_path
        self._load_config = load_config
        self._pipeline_factory = pipeline_factory
        self._capture_factory = capture_factory
        self._uevents_factory = uevents_factory
        self._discover = discover
        self._recovery = recovery
        self.alert_sink = alert_sink
        self.notifier = notifier or Notifier()
        self._log = log
        self._foreground_status = foreground_status
        self._wall_ns = wall_ns
        self._mono = monotonic
        #: where VMM processes are looked up (implicit VMs whose VMM exited)
        self._proc_root = proc_root
        self.started_mono = monotonic()
        self.stats = LoopStats(queue_capacity=int(config.capture.queue_events))
        self.health = Health(clock=monotonic)
        self.recent_findings: dict[VmKey | None, collections.deque[Finding]] = {}
        self._pipeline: Pipeline | None = None
        self._ingest: Ingest | None = None
        self.capture: parts.CaptureEngine | None = None
        self._filter_sync: FaultFilterSync | None = None
        self.uevents: parts.EventSource | None = None
        self.control: ControlServer | None = None
        self.http: HttpServer | None = None
        self.registry: CollectorRegistry | None = None
        self.selector = selectors.DefaultSelector()
        self._signals = Signals()
        self._timers: dict[str, float] = {}
        self.hook_report: list[HookStatus] = []
        self.discovery_done = False
        self.page_counts = PageCounts()
        #: the state journal, given by the recovery (None: no journal)
        self.journal: Journal | None = None

    # -- output -----------------------------------------------------------------------
    def say(self, message: str) -> None:
        print(f"hekitrace: {message}", file=self._log, flush=True)

    # -- the parts built at start-up ----------------------------------------------------
    @property
    def pipeline(self) -> Pipeline:
        """The state and rules; built by :meth:`build_pipeline`."""
        if self._pipeline is None:
            raise RuntimeError("the daemon's pipeline is built by start()")
        return self._pipeline

    @property
    def ingest(self) -> Ingest:
        """The bounded queue in front of the pipeline; built with it."""
        if self._ingest is None:
            raise RuntimeError("the daemon's queue is built by start()")
        return self._ingest

    @property
    def applied_hook_active(self) -> bool:
        """Whether the ``attr_applied`` hook is attached (pairing rules need it)."""
        return any(h.hook == "attr_applied" and h.attached for h in self.hook_report)

    @property
    def merged_creations(self) -> int:
        """Creation reports of a VM already known from another source, merged by Host."""
        return merged_creations(self.pipeline.host)

    @property
    def internal_errors(self) -> int:
        """Batches a bug in the state machine made fail (their events counted lost)."""
        return self._ingest.internal_errors if self._ingest is not None else 0

    @property
    def filter_errors(self) -> int:
        """Fault-filter updates the kernel refused."""
        return self._filter_sync.errors if self._filter_sync is not None else 0

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> None:
        """Open sinks, attach hooks, register running VMs, then report READY.

        Order matters: the HTTP server first so /healthz answers during a slow compile;
        capture before discovery so a VM created in between is seen by the hooks rather
        than missed (it may then be reported twice; ``Host`` merges the reports).
        """
        cfg = self.config
        self._signals.install(self.selector)
        self.stats.config_sha256 = cfg.digest_label
        self.stats.config_reload_ns = self._wall_ns()
        self.notifier.status("starting: metrics and control socket")
        registry = self.registry = CollectorRegistry(auto_describe=False)
        registry.register(HekitraceCollector(self._state_ref, self.stats, build_info(),
                                             vm_label=cfg.metrics.vm_label,
                                             page_counts=self.page_counts))
        self.http = HttpServer(cfg.metrics.listen, registry, self.health,
                               tls=tls_context(cfg.metrics.tls))
        self.http.start()
        self.say(f"metrics on {self.http.url}/metrics (/healthz, /readyz)")
        self.control = ControlServer(str(cfg.control.socket), self._handle_request)
        self.control.open(self.selector)
        self.say(f"control socket {cfg.control.socket}")

        self.notifier.status("compiling and attaching BPF programs")
        self.start_capture()
        self.build_pipeline()

        self.notifier.status("discovering running VMs")
        self.uevents = parts.open_uevents(self._uevents_factory, self.say)
        if self.uevents is not None:
            self.selector.register(self.uevents.fileno(), selectors.EVENT_READ,
                                   self._on_uevents)
        self.run_discovery()
        self._arm_timers()
        self._update_ready()
        summary = self.status_line()
        self.say("started: " + summary)
        if self.health.ready:
            self.notifier.ready(summary)
        else:
            # READY=1 anyway: systemd must not kill a daemon that is up but lacks a hook;
            # /readyz, hekitrace_ready and STATUS= say it is not ready, and why.
            self.notifier.ready("NOT READY: " + "; ".join(self.health.not_ready_reasons))

    def start_capture(self) -> None:
        """Start the capture engine (if any), record the hook report, poll its rings."""
        self.capture, self.hook_report = parts.start_capture(self._capture_factory,
                                                             self.config, self.say)
        self.stats.hooks = [(h.hook, h.method, h.required, h.attached)
                            for h in self.hook_report]
        if self.capture is not None:
            self._filter_sync = FaultFilterSync(self.capture, self.say)
            for fd in self.capture.fds():
                self.selector.register(fd, selectors.EVENT_READ, self._on_capture)

    def build_pipeline(self) -> None:
        """Build the pipeline (pairing rules on when the applied hook attached) and its
        queue, and observe its changes: per-VM page counts for metrics, and the VMs whose
        maps changed, to refresh their kernel fault filters once per batch.

        Findings are taken from ``feed()``/``tick()`` return values (see :meth:`_emit`),
        not from observers, so each goes to the alert sink exactly once.
        """
        pipeline = self._pipeline_factory(self.config, self.applied_hook_active)
        pages = self.page_counts
        filter_sync = self._filter_sync

        def observe(change: Change, findings: list[Finding]) -> None:
            if self.control is not None and self.control.followers and change.event is not None:
                self.control.publish([control_ops.event_record(change, self.pipeline.host)])
            if change.map_changes:
                pages.observe(change)
                if filter_sync is not None and change.vm is not None:
                    filter_sync.mark(change.vm)
            elif change.lifecycle == "retired":
                pages.observe(change)

        pipeline.add_observer(observe)
        self._pipeline = pipeline
        self._ingest = Ingest(pipeline, self.stats, emit=self._emit,
                              after_batch=self._after_batch, say=self.say,
                              wall_ns=self._wall_ns, monotonic=self._mono)

    def run_discovery(self) -> None:
        """Recover the journal's state, then register the VMs running now."""
        found: list[VmCreated] = []
        if self._discover is not None:
            try:
                found = list(self._discover())
            except (OSError, HekitraceError) as error:
                self.say(f"WARNING: start-up discovery failed: {error}; running VMs are "
                         "unknown until they act")
        covered: set[VmKey] = set()
        if self._recovery is None:
            self.say("journal: disabled; the state starts empty and is not kept across "
                     "restarts")
        else:
            covered = set(self._recovery(self.pipeline, found))
            self.journal = self._recovery.journal
            if self.journal is not None:
                self.stats.journal = self.journal.health
        host = self.pipeline.host
        with self.stats.lock:
            register_discovered(host, found, covered, self.ingest.apply)
            if self.capture is not None:
                seed_memslots(self.capture, host, self.say)
            if self.journal is not None:
                self.journal.after_batch()  # discovery's creations reach the journal file
        self.discovery_done = True
        names = ", ".join(f"{e.name or '?'}(pid {e.tgid})" for e in found) or "none"
        self.say(f"VMs running at start-up: {len(found)}: {names}")

    def _arm_timers(self) -> None:
        now = self._mono()
        self._timers = {"tick": now + 1.0, "expire": now + 10.0, "control": now + 1.0,
                        "status": now + float(self.config.daemon.status_interval_seconds)}

    # -- readiness --------------------------------------------------------------------
    def _update_ready(self) -> None:
        reasons = [f"required hook {h.hook} not attached: {h.reason}"
                   for h in self.hook_report if h.required and not h.attached]
        if not self.discovery_done:
            reasons.append("start-up discovery not done")
        self.health.not_ready_reasons = tuple(reasons)
        self.health.ready = not reasons
        self.stats.ready = not reasons

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> str:
        """Serve until SIGTERM/SIGINT; returns the signal name that stopped it."""
        ingest = self.ingest
        signals = self._signals
        while signals.stop_reason is None:
            timeout = 0.0 if ingest.depth else max(0.0, min(self._timers.values()) - self._mono())
            for key, mask in self.selector.select(min(timeout, 1.0)):
                key.data(key.fileobj, mask)
            if ingest.depth:
                ingest.process(BATCH_EVENTS)
            self._run_timers()
            if signals.take_reload():
                self.reload()
            self.health.beat()
            if self.config.daemon.watchdog:
                self.notifier.watchdog()
        return signals.stop_reason

    def poll_capture(self) -> None:
        """Read what the rings hold, at most what fits in the queue.

        What does not fit stays in the kernel's rings, where the control ring is kept
        apart from the telemetry ring, rather than being dropped here indiscriminately;
        the queue's own overflow accounting still covers the rest.
        """
        room = self.ingest.room
        if self.capture is not None and room > 0:
            self.ingest.enqueue(self.capture.read(room))

    def _on_capture(self, fileobj: object, mask: int) -> None:
        self.poll_capture()

    def _on_uevents(self, fileobj: object, mask: int) -> None:
        if self.uevents is not None:
            self.ingest.enqueue(self.uevents.read_events())

    def _after_batch(self) -> None:
        """After each applied batch (state lock held): the changed VMs' kernel fault
        filters, then the journal handed to the OS (a kill -9 then loses nothing applied)."""
        if self._filter_sync is not None and self._filter_sync.pending:
            self._filter_sync.sync(self.pipeline.host, self.config.abi_profile(),
                                   self.applied_hook_active)
        if self.journal is not None:
            self.journal.after_batch()

    def _emit(self, findings: list[Finding]) -> None:
        if findings and self.control is not None and self.control.followers:
            self.control.publish([("finding", f.vm, f.to_dict()) for f in findings])
        for finding in findings:
            self.recent_findings.setdefault(
                finding.vm_key, collections.deque(maxlen=RECENT_FINDINGS)).append(finding)
            if self.alert_sink is not None:
                self.alert_sink.write(finding)

    def _run_timers(self) -> None:
        now = self._mono()
        timers = self._timers
        if now >= timers["tick"]:
            timers["tick"] = now + 1.0
            self.tick()
        if now >= timers["control"]:
            timers["control"] = now + 1.0
            if self.control is not None:
                self.control.expire(now)
        if now >= timers["expire"]:
            timers["expire"] = now + 10.0
            self.expire()
        if now >= timers["status"]:
            timers["status"] = now + float(self.config.daemon.status_interval_seconds)
            line = self.status_line()
            self.notifier.status(line)
            if self._foreground_status:
                self.say(line)

    def tick(self) -> None:
        """Every second: the policy's timers (pairing checks, storm summaries), then a
        read of the rings, which also polls the kernel's loss counters (reported as Lost
        events), so drops are reported even while no record arrives."""
        with self.stats.lock:
            findings = self.pipeline.tick(self._wall_ns())
            if findings:
                self._emit(findings)
        self.poll_capture()

    def expire(self) -> None:
        """Every 10 s: retire implicit VMs whose VMM exited, then destroyed VMs past
        their grace period, with their counters and kernel state."""
        host = self.pipeline.host
        with self.stats.lock:
            for event in exited_implicit_vms(host, self._wall_ns(), self._proc_root):
                self.say(f"implicit VM of pid {event.tgid} retired: its VMM process has "
                         "exited and no destroy event came")
                self.ingest.feed(event)
            changes, findings = self.pipeline.expire(self._wall_ns())
            self._emit(findings)
            for change in changes:
                self.stats.forget_vm(change.vm)
                self.recent_findings.pop(change.vm, None)
                if self.capture is not None and change.vm is not None \
                        and host.by_tgid(change.vm.tgid) is None:
                    # its final loss read: the VM is retired, so these count on the host
                    # (unattributed), never lost unreported
                    for lost in self.capture.forget_vm(change.vm.tgid):
                        self.ingest.feed(lost)
            self.ingest.publish_counts()

    # -- status and control requests ---------------------------------------------------
    def _state_ref(self) -> tuple[Host | None, AbiProfile, Policy | None]:
        pipeline = self._pipeline
        if pipeline is None:
            return None, self.config.abi_profile(), None
        return pipeline.host, self.config.abi_profile(), pipeline.policy

    def status_line(self) -> str:
        """One line for logs and ``systemctl status``."""
        return status_line(ready=self.health.ready,
                           host=self._pipeline.host if self._pipeline is not None else None,
                           hooks=self.hook_report, counters=self.stats,
                           queue_depth=self._ingest.depth if self._ingest is not None else 0)

    def status(self) -> dict:
        """The ``status`` reply of the control socket."""
        return status_document(
            pid=os.getpid(), uptime_seconds=self._mono() - self.started_mono,
            ready=self.health.ready, not_ready_reasons=self.health.not_ready_reasons,
            hooks=self.hook_report, host=self.pipeline.host, counters=self.stats,
            queue_depth=self.ingest.depth, config_path=self.config_path,
            control_stats=self.control.stats if self.control is not None else {},
            filter_errors=self.filter_errors, internal_errors=self.internal_errors,
            journal=self.journal.status() if self.journal is not None else None,
            policy=self.pipeline.policy.status())

    def _handle_request(self, request: dict) -> dict | Subscriber:
        """Answer one control request (in the loop thread, under the state lock)."""
        with self.stats.lock:
            if request["op"] == "status":
                return self.status()
            if request["op"] == "follow":
                try:
                    return Subscriber(Filter.from_request(request))
                except ValueError as error:
                    raise RequestError("bad_request", str(error)) from None
            if request["op"] == "recent":
                return control_ops.recent(self.recent_findings)
            return control_ops.answer(request, self.pipeline.host, self.config.abi_profile(),
                                      self.pipeline.policy.counts, self.recent_findings,
                                      applied_unobserved=parts.applied_unobserved(self.hook_report))

    # -- reload and shutdown -----------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP: load the config file again; a bad one is rejected, the old kept."""
        self.notifier.reloading()
        self.stats.config_reload_ns = self._wall_ns()
        if self.alert_sink is not None:
            # logrotate convention: SIGHUP reopens the alert file, good config or not
            self.alert_sink.reopen()
        try:
            new = self._load_config(self.config_path)
            tls = tls_context(new.metrics.tls)  # every time: a renewed certificate
        except (ConfigError, OSError) as error:
            self.stats.config_reload_success = False
            self.say(f"ERROR: config reload rejected, keeping the previous configuration: {error}")
            self.notifier.ready(f"config reload FAILED: {error}; {self.status_line()}")
            return False
        restart = restart_needed(self.config, new)
        if new.policy != self.config.policy:
            self._swap_policy(new)
        if self.http is not None and self.http.set_tls(tls):
            self.say(f"metrics endpoint: new connections use {self.http.describe_tls()}")
        self.config = new
        self.stats.config_sha256 = new.digest_label
        self.stats.config_reload_success = True
        note = (f"; changes to {', '.join(restart)} take effect after a restart"
                if restart else "")
        self.say(f"config reloaded from {self.config_path or 'defaults'}{note}")
        self.notifier.ready(self.status_line())
        return True

    def _swap_policy(self, new: Config) -> None:
        """Install the Policy of the new ``policy`` section (service/signals.py)."""
        policy = reloaded_policy(self.pipeline, new)
        with self.stats.lock:
            self.pipeline.policy = policy
        self.say("policy reloaded: new rules, severities and exceptions apply from now; "
                 "pairing checks and storm summaries in flight were restarted")

    def close(self) -> None:
        """Stop: detach every BPF program, flush sinks, remove the socket. Idempotent."""
        self.notifier.stopping()
        self.notifier.status("stopping: detaching BPF programs")
        if self._ingest is not None and self._ingest.depth:
            self._ingest.process(self._ingest.depth)  # what was read is applied, not dropped
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.journal is not None:
            steps.append(("journal", self.journal.close))  # last checkpoint: nothing to replay
        if self.capture is not None:
            steps.append(("capture", self.capture.close))
        if self.uevents is not None:
            steps.append(("uevents", self.uevents.close))
        if self.control is not None:
            steps.append(("control socket", self.control.close))
        if self.alert_sink is not None:
            steps.append(("alerts", self.alert_sink.close))
        if self.http is not None:
            steps.append(("http", self.http.close))
        for what, step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - keep closing the rest
                self.say(f"WARNING: closing {what} failed: {error}")
        self.capture = self.uevents = self.control = self.http = None
        self._signals.restore()
        self.selector.close()
        self.notifier.close()
        self.say("stopped: " + (f"{sum(self.stats.events_by_kind.values())} events, "
                                f"{sum(self.stats.lost.values())} lost"))
