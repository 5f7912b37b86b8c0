"""The daemon: one event loop wiring capture, state, rules and sinks together.

Data flow (docs/internals.md): ring buffers and KVM uevents -> bounded queue -> Pipeline (Host +
Policy) -> findings to the alert sink; metrics, the control socket and the probes read the
state. Everything runs in one thread, a ``selectors`` loop over the ring-buffer fds, the
uevent socket, the control socket, a signal wake-up pipe and timers; only the HTTP server
has its own thread (it reads state under ``LoopStats.lock``, which the loop holds while it
applies a batch).

The queue: the loop drains the rings whenever they are readable (the kernel keeps
producing and the control ring must not overflow), but processes at most
``_BATCH_EVENTS`` per iteration so the control socket, timers and the watchdog are served
between batches. Events that would overflow ``capture.queue_events`` are dropped,
counted (stage "queue", reason "overflow", per VM) and fed to the pipeline as ``Lost``
events so the VM is marked degraded: nothing is lost silently.

Seams for parts written elsewhere: ``capture_factory``, ``uevents_factory``,
``discover`` and ``recovery`` (the journal: ``recovery(pipeline, discovered)`` rebuilds
what it can into the pipeline and returns the VmKeys of running VMs it covers; those are
neither re-created nor marked "running before monitoring started").
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from hekitrace import __version__
from hekitrace.errors import ConfigError, HekitraceError
from hekitrace.service import control_ops
from hekitrace.service.control import ControlServer
from hekitrace.service.http import Health, HttpServer
from hekitrace.service.metrics import HekitraceCollector, LoopStats, PageCounts, build_info
from hekitrace.service.sdnotify import Notifier
from hekitrace.state.events import Lost, VmCreated, VmDestroyed
from hekitrace.state.fault_filter import protected_ranges

#: events applied per loop iteration before the loop looks at sockets and timers again;
#: at ~2 us per event this keeps control-socket and watchdog latency under ~10 ms.
_BATCH_EVENTS = 4096
#: findings kept per VM for snapshots (older ones are counted, not kept)
_RECENT_FINDINGS = 50
PREEXISTING_REASON = "running before monitoring started"


class Daemon:
    """The long-running service. ``start()``, then ``run()`` until a signal, then ``close()``.

    ``log`` receives one-line human messages (stderr by default; journald adds the time).
    """

    def __init__(self, config: Any, config_path: str | None, *,
                 load_config: Callable[[str | None], Any],
                 pipeline_factory: Callable[[Any, bool], Any],
                 capture_factory: Callable[[Any, Callable[[str], None]], Any] | None = None,
                 uevents_factory: Callable[[], Any] | None = None,
                 discover: Callable[[], Iterable[VmCreated]] | None = None,
                 recovery: Callable[[Any, list[VmCreated]], set] | None = None,
                 alert_sink: Any = None,
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
        #: where VMM processes are looked up (exited_implicit_vms)
        self._proc_root = proc_root
        self.started_mono = monotonic()
        self.stats = LoopStats(queue_capacity=int(config.capture.queue_events))
        self.health = Health(clock=monotonic)
        self.queue: collections.deque = collections.deque()
        self.recent_findings: dict[Any, collections.deque] = {}
        self.pipeline: Any = None
        self.capture: Any = None
        self.uevents: Any = None
        self.control: ControlServer | None = None
        self.http: HttpServer | None = None
        self.registry: Any = None
        self.selector = selectors.DefaultSelector()
        self._stop_reason: str | None = None
        self._reload_requested = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._timers: dict[str, float] = {}
        self._old_handlers: dict[int, Any] = {}
        self.hook_report: list[tuple[str, str, bool, bool, str]] = []
        self.discovery_done = False
        self._dirty_vms: set = set()
        self.filter_errors = 0
        self.internal_errors = 0
        self._last_error_log = float("-inf")
        self.page_counts = PageCounts()
        #: the state journal (hekitrace/journal/segments.py), set by a journal-backed recovery
        self.journal: Any = None

    # -- output -----------------------------------------------------------------------
    def say(self, message: str) -> None:
        print(f"hekitrace: {message}", file=self._log, flush=True)

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> None:
        """Open sinks, attach hooks, register running VMs, then report READY.

        Order matters: the HTTP server first so /healthz answers during a slow compile;
        capture before discovery so a VM created in between is seen by the hooks rather
        than missed (it may then be reported twice; ``Host`` merges the reports).
        """
        cfg = self.config
        self._install_signals()
        self.stats.config_sha256 = cfg.sha256
        self.stats.config_reload_ns = self._wall_ns()
        self.notifier.status("starting: metrics and control socket")
        from prometheus_client.registry import CollectorRegistry
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HekitraceCollector(self._state_ref, self.stats, build_info(),
                                                  vm_label=cfg.metrics.vm_label,
                                                  page_counts=self.page_counts))
        self.http = HttpServer(cfg.metrics.listen, self.registry, self.health)
        self.http.start()
        self.say(f"metrics on http://{self.http.host}:{self.http.port}/metrics "
                 "(/healthz, /readyz)")
        self.control = ControlServer(str(cfg.control.socket), self._handle_request)
        self.control.open(self.selector)
        self.say(f"control socket {cfg.control.socket}")

        self.notifier.status("compiling and attaching BPF programs")
        self._start_capture()
        self.pipeline = self._pipeline_factory(cfg, self._applied_hook_active())
        self._add_observer()

        self.notifier.status("discovering running VMs")
        self._start_uevents()
        self._run_discovery()
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

    def _start_capture(self) -> None:
        hooks_cfg = getattr(self.config, "hooks", None)
        if self._capture_factory is None:
            self.say("WARNING: no capture engine available; no BPF hooks attached, "
                     "the daemon sees only KVM uevents")
            for hook, req in _hook_requirements(hooks_cfg):
                self.hook_report.append((hook, "none", req, False, "no capture engine"))
            self._publish_hooks()
            return
        try:
            self.capture = self._capture_factory(self.config, self.say)
        except Exception as error:  # noqa: BLE001 - bcc raises bare Exception too
            # e.g. the BPF programs do not compile on this kernel: keep serving metrics,
            # the control socket and uevents, and say loudly that nothing is attached.
            self.say(f"ERROR: BPF capture failed to start ({type(error).__name__}): {error}")
            for hook, req in _hook_requirements(hooks_cfg):
                self.hook_report.append((hook, "none", req, False,
                                         f"capture failed: {str(error)[:200]}"))
            self._publish_hooks()
            return
        status = self.capture.hook_status() if hasattr(self.capture, "hook_status") else {}
        for hook, info in _normalise_hook_status(status, hooks_cfg):
            self.hook_report.append(info)
        self._publish_hooks()
        for fd in self.capture.fds():
            self.selector.register(fd, selectors.EVENT_READ, self._on_capture)
        for hook, method, required, attached, reason in self.hook_report:
            state = f"attached ({method})" if attached else f"NOT attached: {reason}"
            self.say(f"hook {hook:<20} {'required' if required else 'optional'}  {state}")

    def _publish_hooks(self) -> None:
        self.stats.hooks = [(h, m, r, a) for h, m, r, a, _ in self.hook_report]

    def _applied_hook_active(self) -> bool:
        return any(h == "attr_applied" and a for h, _m, _r, a, _ in self.hook_report)

    def _add_observer(self) -> None:
        """Keep per-VM page counts (for metrics) and the set of VMs whose maps changed
        (to refresh the kernel's fault filter once per batch).

        Findings are taken from ``feed()``/``tick()`` return values (see :meth:`_emit`),
        not from observers, so each goes to the alert sink exactly once.
        """
        pages = self.page_counts
        dirty = self._dirty_vms
        track_filter = self.capture is not None and hasattr(self.capture,
                                                            "protect_filter_update")

        def observe(change: Any, findings: Any) -> None:
            if change.map_changes:
                pages.observe(change)
                if track_filter and change.vm is not None:
                    dirty.add(change.vm)
            elif change.lifecycle == "retired":
                pages.observe(change)

        self.pipeline.add_observer(observe)

    def _sync_fault_filter(self) -> None:
        """Tell the kernel which pages of each changed VM are write/fetch protected.

        Only faults on those pages reach userspace (docs/internals.md, Hooks); the map used is
        the applied one when the applied hook runs, else the requested one.
        """
        dirty = list(self._dirty_vms)
        self._dirty_vms.clear()  # the observer holds this set object: clear, never rebind
        abi = self.config.abi_profile()
        use_applied = self._applied_hook_active()
        for key in dirty:
            guest = self.pipeline.host.guests.get(key)
            if guest is None or guest.destroyed_ns is not None:
                continue
            ranges = protected_ranges(guest.applied if use_applied else guest.requested, abi)
            try:
                self.capture.protect_filter_update(key.tgid, ranges)
            except (OSError, KeyError, HekitraceError) as error:
                self.filter_errors += 1
                if self.filter_errors == 1:
                    self.say(f"WARNING: cannot update the kernel fault filter for pid "
                             f"{key.tgid}: {error}; faults on its protected pages may be "
                             "missed (counted in status filter_errors)")

    def _start_uevents(self) -> None:
        if self._uevents_factory is None:
            self.say("WARNING: no KVM uevent source; VM creation/destruction comes only "
                     "from the ioctl hooks")
            return
        try:
            self.uevents = self._uevents_factory()
        except Exception as error:  # noqa: BLE001 - an optional source must not stop us
            # the same line as `record` (capture/uevents.py unavailable_message)
            self.say(f"WARNING: uevents unavailable: {error}; VM lifecycle from ioctls and "
                     "/proc only")
            return
        self.selector.register(self.uevents.fileno(), selectors.EVENT_READ, self._on_uevents)

    def _run_discovery(self) -> None:
        found: list[VmCreated] = []
        if self._discover is not None:
            try:
                found = list(self._discover())
            except (OSError, HekitraceError) as error:
                self.say(f"WARNING: start-up discovery failed: {error}; running VMs are "
                         "unknown until they act")
        covered: set = set()
        if self._recovery is not None:
            # The journal's seam: it rebuilds the state it has for the VMs still running
            # and returns their keys; those keep their maps and are not "running before
            # monitoring started" (the recovery marks its own gaps).
            covered = set(self._recovery(self.pipeline, found))
            # journal wiring (issue 9): a journal-backed recovery leaves its Journal here
            self.journal = getattr(self._recovery, "journal", None)
            if self.journal is not None:
                self.stats.journal = self.journal.health
        with self.stats.lock:
            for event in found:
                guest = self.pipeline.host.by_tgid(event.tgid)
                if guest is not None and guest.key in covered:
                    if guest.vm_fd < 0:  # a checkpoint does not keep it: Host merges by it
                        guest.vm_fd = event.vm_fd
                    continue
                merged = self.merged_creations
                self._apply(event)
                if self.merged_creations != merged:
                    # Host merged it: the hooks saw this VM being created after capture
                    # started; monitored since birth, not "running before monitoring"
                    continue
                guest = self.pipeline.host.by_tgid(event.tgid)
                if guest is not None and PREEXISTING_REASON not in guest.degraded_reasons:
                    self.pipeline.host.mark_degraded(guest.key, PREEXISTING_REASON)
            self._seed_memslots()
            if self.journal is not None:
                self.journal.after_batch()  # discovery's creations reach the journal file
        self.discovery_done = True
        names = ", ".join(f"{e.name or '?'}(pid {e.tgid})" for e in found) or "none"
        self.say(f"VMs running at start-up: {len(found)}: {names}")

    def _seed_memslots(self) -> None:
        """Teach the kernel's page-list walk the memslots of VMs known before capture
        started (restored by the journal's recovery): without them their PROTECT_MEMORY
        page lists could not be read until the VMM changed a memslot again."""
        seed = getattr(self.capture, "seed_memslots", None)
        if seed is None:
            return
        for guest in self.pipeline.host.guests.values():
            if guest.destroyed_ns is None and guest.memslots:
                slots = [(slot, m.gpa, m.size_bytes, m.hva)
                         for slot, m in sorted(guest.memslots.items())]
                try:
                    seed(guest.pid, slots)
                except Exception as error:  # noqa: BLE001 - one VM's table, not the daemon
                    self.say(f"WARNING: cannot seed the memslots of pid {guest.pid} into the "
                             f"kernel ({error}); its page lists are unreadable until its "
                             "VMM changes a memslot")

    def _arm_timers(self) -> None:
        now = self._mono()
        self._timers = {"tick": now + 1.0, "expire": now + 10.0, "control": now + 1.0,
                        "status": now + float(self.config.daemon.status_interval_seconds)}

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_reason = signal.Signals(signum).name

    def _on_wake(self, sock: socket.socket, mask: int) -> None:
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass

    # -- readiness --------------------------------------------------------------------
    def _update_ready(self) -> None:
        reasons = [f"required hook {h} not attached: {why}"
                   for h, _m, req, att, why in self.hook_report if req and not att]
        if not self.discovery_done:
            reasons.append("start-up discovery not done")
        self.health.not_ready_reasons = tuple(reasons)
        self.health.ready = not reasons
        self.stats.ready = not reasons

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> str:
        """Serve until SIGTERM/SIGINT; returns the signal name that stopped it."""
        while self._stop_reason is None:
            timeout = 0.0 if self.queue else max(0.0, min(self._timers.values()) - self._mono())
            for key, mask in self.selector.select(min(timeout, 1.0)):
                key.data(key.fileobj, mask)
            if self.queue:
                self._process(_BATCH_EVENTS)
            self._run_timers()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self.health.beat()
            if self.config.daemon.watchdog:
                self.notifier.watchdog()
        return self._stop_reason

    def _on_capture(self, fileobj: Any, mask: int) -> None:
        """A ring is readable: read what fits in the queue (at most that much per ring).

        What does not fit stays in the kernel's rings, where the control ring is kept
        apart from the telemetry ring, rather than being dropped here indiscriminately;
        the queue's own overflow accounting still covers the rest.
        """
        room = self.stats.queue_capacity - len(self.queue)
        if room > 0:
            self._enqueue(self.capture.read(room))

    def _on_uevents(self, fileobj: Any, mask: int) -> None:
        self._enqueue(self.uevents.read_events())

    def _enqueue(self, events: list) -> None:
        room = self.stats.queue_capacity - len(self.queue)
        if len(events) <= room:
            self.queue.extend(events)
        else:
            self.queue.extend(events[:max(room, 0)])
            self._count_overflow(events[max(room, 0):])
        self.stats.queue_depth = len(self.queue)

    def _count_overflow(self, dropped: list) -> None:
        per_tgid: dict[int, int] = {}
        for event in dropped:
            per_tgid[event.tgid] = per_tgid.get(event.tgid, 0) + 1
        now = self._wall_ns()
        # Fed straight to the pipeline (not queued): they must not be dropped themselves.
        with self.stats.lock:
            for tgid, count in per_tgid.items():
                self._apply_one(Lost(now, tgid, 0, "queue", "overflow", count))
            self._publish_counts()

    def _process(self, budget: int) -> None:
        """Apply up to ``budget`` queued events, in order, under the state lock.

        Runs of ordinary events go through ``Pipeline.feed_many`` (the fast path); the
        rare ``VmCreated`` and ``Lost`` events are handled one by one in between because
        the daemon needs to see them in order (duplicate creations, per-VM losses).
        """
        queue = self.queue
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
            self._publish_counts()
            if self._dirty_vms:
                self._sync_fault_filter()
            if self.journal is not None:
                # hand the batch to the OS: a kill -9 then loses nothing applied
                self.journal.after_batch()

    def _guarded(self, events: list, one: bool = False) -> None:
        """Apply ``events``; a bug in the state machine costs these events, not the daemon.

        Guest input is never supposed to raise (docs/internals.md, principle 5); if it does
        anyway, a guest that found the bug must not be able to stop the monitoring of
        every VM (a crash, then systemd's start limit). The events are counted lost
        (stage "pipeline", reason "internal_error"; some may have been applied before the
        error), their VMs marked degraded, and the traceback logged (at most once a
        minute; ``internal_errors`` in ``status`` counts them all).
        """
        try:
            if one:
                self._apply_one(events[0])
            else:
                self._emit(self.pipeline.feed_many(events))
        except Exception:  # noqa: BLE001 - see the docstring
            self.internal_errors += 1
            now = self._mono()
            if now - self._last_error_log >= 60.0:
                self._last_error_log = now
                self.say("ERROR: internal error while applying events (please report):\n"
                         + traceback.format_exc().rstrip())
            per_tgid: dict[int, int] = {}
            for event in events:
                per_tgid[event.tgid] = per_tgid.get(event.tgid, 0) + 1
            for tgid, count in per_tgid.items():
                try:
                    self._apply_one(Lost(self._wall_ns(), tgid, 0, "pipeline",
                                         "internal_error", count))
                except Exception:  # noqa: BLE001 - already reported above
                    self.internal_errors += 1

    def _apply(self, event: Any) -> None:
        """Apply one event outside a batch (start-up discovery); caller holds the lock."""
        self._apply_one(event)
        self._publish_counts()

    def _apply_one(self, event: Any) -> None:
        if type(event) is Lost and event.tgid:
            owner = self.pipeline.host.loss_owner(event.tgid)
            vm = owner.key if owner is not None else None
            if vm is not None:
                key = (vm, event.stage)
                self.stats.vm_lost[key] = self.stats.vm_lost.get(key, 0) + max(event.count, 0)
        self._emit(self.pipeline.feed(event))

    @property
    def merged_creations(self) -> int:
        """Creation reports of a VM already known from another source (ioctl hook,
        uevent, discovery), merged by ``Host`` (host.py ``_same_vm``), so a replay of a
        recording merges them exactly as the daemon did."""
        return self.pipeline.host.counters.get("merged_creations", 0)

    def _publish_counts(self) -> None:
        """Copy the pipeline's event and loss counters where the collector reads them."""
        pipeline = self.pipeline
        self.stats.events_by_kind = pipeline.events_by_kind
        lost = {("queue", "overflow"): 0}
        lost.update(pipeline.lost)
        self.stats.lost = lost
        self.stats.last_event_ns = max(self.stats.last_event_ns, pipeline.last_event_ns)

    def _emit(self, findings: list) -> None:
        for finding in findings:
            key = finding.vm_key
            self.recent_findings.setdefault(
                key, collections.deque(maxlen=_RECENT_FINDINGS)).append(finding)
            if not hasattr(self.pipeline.policy, "counts"):
                self.stats.count_finding(key, finding.rule, finding.severity,
                                         getattr(finding, "count", 1))
            if self.alert_sink is not None:
                self.alert_sink.write(finding)

    def _run_timers(self) -> None:
        now = self._mono()
        timers = self._timers
        if now >= timers["tick"]:
            timers["tick"] = now + 1.0
            with self.stats.lock:
                findings = self.pipeline.tick(self._wall_ns())
                if findings:
                    self._emit(findings)
            if self.capture is not None:
                # Also polls the kernel's loss counters (Capture.read reports them as
                # Lost events), so drops are reported even while no record arrives.
                self._on_capture(None, 0)
        if now >= timers["control"]:
            timers["control"] = now + 1.0
            if self.control is not None:
                self.control.expire(now)
        if now >= timers["expire"]:
            timers["expire"] = now + 10.0
            with self.stats.lock:
                self._retire_exited_implicit_vms()
                changes, findings = self.pipeline.expire(self._wall_ns())
                self._emit(findings)
                for change in changes:
                    self.stats.forget_vm(change.vm)
                    self.recent_findings.pop(change.vm, None)
                    if self.capture is not None and change.vm is not None \
                            and self.pipeline.host.by_tgid(change.vm.tgid) is None:
                        # its final loss read: the VM is retired, so these count on
                        # the host (unattributed), never lost unreported
                        for event in self.capture.forget_vm(change.vm.tgid) or ():
                            self._apply_one(event)
                self._publish_counts()
        if now >= timers["status"]:
            timers["status"] = now + float(self.config.daemon.status_interval_seconds)
            line = self.status_line()
            self.notifier.status(line)
            if self._foreground_status:
                self.say(line)

    def _retire_exited_implicit_vms(self) -> None:
        """Destroy implicit VMs whose VMM process has exited (caller holds the lock)."""
        for event in exited_implicit_vms(self.pipeline.host, self._wall_ns(), self._proc_root):
            self.say(f"implicit VM of pid {event.tgid} retired: its VMM process has exited "
                     "and no destroy event came")
            self._apply_one(event)

    # -- status and control requests ---------------------------------------------------
    def _state_ref(self) -> tuple[Any, Any, Any]:
        pipeline = self.pipeline
        if pipeline is None:
            return None, self.config.abi_profile(), None
        return pipeline.host, self.config.abi_profile(), getattr(pipeline, "policy", None)

    def status_line(self) -> str:
        """One line for logs and ``systemctl status``."""
        host = self.pipeline.host if self.pipeline is not None else None
        guests = list(host.guests.values()) if host is not None else []
        live = [g for g in guests if g.destroyed_ns is None]
        hooks = sum(1 for r in self.hook_report if r[3])
        events = sum(self.stats.events_by_kind.values())
        lost = sum(self.stats.lost.values())
        state = "ready" if self.health.ready else "NOT READY"
        return (f"{state}; {len(live)} VMs ({sum(1 for g in live if g.degraded)} degraded); "
                f"hooks {hooks}/{len(self.hook_report)}; {events} events, {lost} lost; "
                f"queue {len(self.queue)}/{self.stats.queue_capacity}")

    def status(self) -> dict:
        """The ``status`` reply of the control socket."""
        s = self.stats
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime_seconds": round(self._mono() - self.started_mono, 3),
            "ready": self.health.ready, "not_ready_reasons": list(self.health.not_ready_reasons),
            "hooks": [{"hook": h, "method": m, "required": r, "attached": a, "reason": why}
                      for h, m, r, a, why in self.hook_report],
            "vms": sum(1 for g in self.pipeline.host.guests.values() if g.destroyed_ns is None),
            "events_total": dict(s.events_by_kind),
            "events_lost_total": [{"stage": st, "reason": rs, "count": n}
                                  for (st, rs), n in sorted(s.lost.items())],
            "queue_depth_events": len(self.queue), "queue_capacity_events": s.queue_capacity,
            "last_event_time_ns": s.last_event_ns,
            "config": {"path": self.config_path, "sha256": s.config_sha256,
                       "reload_success": s.config_reload_success,
                       "reload_time_ns": s.config_reload_ns},
            "control": dict(self.control.stats) if self.control is not None else {},
            "filter_errors": self.filter_errors,
            "merged_creations": self.merged_creations,
            "internal_errors": self.internal_errors,
            "journal": self.journal.status() if self.journal is not None else None,
            "policy": self.pipeline.policy.status(),
        }

    def _handle_request(self, request: dict) -> Any:
        """Answer one control request (in the loop thread, under the state lock)."""
        with self.stats.lock:
            if request["op"] == "status":
                return self.status()
            policy = getattr(self.pipeline, "policy", None)
            counts = getattr(policy, "counts", None)
            return control_ops.answer(request, self.pipeline.host, self.config.abi_profile(),
                                     counts if counts is not None else self.stats.findings,
                                     self.recent_findings)

    # -- reload and shutdown -----------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP: load the config file again; a bad one is rejected, the old kept."""
        self.notifier.reloading()
        self.stats.config_reload_ns = self._wall_ns()
        reopen = getattr(self.alert_sink, "reopen", None)
        if reopen is not None:
            reopen()  # logrotate convention: SIGHUP reopens the alert file, good config or not
        try:
            new = self._load_config(self.config_path)
        except (ConfigError, OSError) as error:
            self.stats.config_reload_success = False
            self.say(f"ERROR: config reload rejected, keeping the previous configuration: "
                     f"{error}")
            self.notifier.ready(f"config reload FAILED: {error}; {self.status_line()}")
            return False
        restart_needed = [section for section in ("abi", "hooks", "capture", "control",
                                                  "metrics", "journal", "state", "alerts")
                          if getattr(new, section, None) != getattr(self.config, section, None)]
        reconfigure = getattr(self.pipeline, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(new)
        elif new.policy != self.config.policy:
            self._swap_policy(new)
        self.config = new
        self.stats.config_sha256 = new.sha256
        self.stats.config_reload_success = True
        note = (f"; changes to {', '.join(restart_needed)} take effect after a restart"
                if restart_needed else "")
        self.say(f"config reloaded from {self.config_path or 'defaults'}{note}")
        self.notifier.ready(self.status_line())
        return True

    def _swap_policy(self, new: Any) -> None:
        """Install a Policy built from the new ``policy`` section (rules, severities,
        exceptions, windows), keeping the findings counts so ``hekitrace_findings_total``
        stays monotonic. Pairing checks and storm summaries in flight start over: said
        in the log, never silently."""
        from hekitrace.policy.engine import Policy
        old = self.pipeline.policy
        policy = Policy(new.policy, self.pipeline.abi, self.pipeline.clock,
                        applied_hook_active=old.applied_hook_active,
                        max_entries_inspected=int(new.state.max_entries_per_request))
        policy.counts = old.counts
        with self.stats.lock:
            self.pipeline.policy = policy
        self.say("policy reloaded: new rules, severities and exceptions apply from now; "
                 "pairing checks and storm summaries in flight were restarted")

    def close(self) -> None:
        """Stop: detach every BPF program, flush sinks, remove the socket. Idempotent."""
        self.notifier.stopping()
        self.notifier.status("stopping: detaching BPF programs")
        if self.queue and self.pipeline is not None:
            self._process(len(self.queue))  # what was read is applied, not dropped
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.journal is not None:
            steps.append(("journal", self.journal.close))  # last checkpoint: nothing to replay
        if self.capture is not None:
            steps.append(("capture", self.capture.close))
        if self.uevents is not None and hasattr(self.uevents, "close"):
            steps.append(("uevents", self.uevents.close))
        if self.control is not None:
            steps.append(("control socket", self.control.close))
        if self.alert_sink is not None and hasattr(self.alert_sink, "close"):
            steps.append(("alerts", self.alert_sink.close))
        if self.http is not None:
            steps.append(("http", self.http.close))
        for what, step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - keep closing the rest
                self.say(f"WARNING: closing {what} failed: {error}")
        self.capture = self.uevents = self.control = self.http = None
        signal.set_wakeup_fd(-1)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # embedding processes (tests, benches) get theirs back
        self._old_handlers.clear()
        self.selector.close()
        self.notifier.close()
        self.say("stopped: " + (f"{sum(self.stats.events_by_kind.values())} events, "
                                f"{sum(self.stats.lost.values())} lost"))


_HOOKS = ("hypercall", "attr_applied", "ioctl", "page_fault", "cr")


def exited_implicit_vms(host: Any, now_ns: int, proc_root: str = "/proc") -> list[VmDestroyed]:
    """A ``VmDestroyed`` for each implicit live VM whose VMM process is gone.

    Why: an implicit VM (its events came, its creation was never seen) is destroyed only
    by a destroy event; when its VMM has exited and none came (missed uevent), it would
    stay in state, /metrics and ``vms`` forever, and so would its kernel map entries.
    Only implicit VMs are checked: a created VM's destroy is reported by KVM itself.
    """
    out = []
    for guest in host.live_guests():
        if guest.preexisting and not guest.counters.get("vm_created") \
                and not os.path.exists(os.path.join(proc_root, str(guest.pid))):
            out.append(VmDestroyed(now_ns, guest.pid, 0, ""))
    return out


def _hook_requirements(hooks_cfg: Any) -> list[tuple[str, bool]]:
    out = []
    for hook in _HOOKS:
        setting = getattr(hooks_cfg, hook, "required" if hook in ("hypercall", "ioctl")
                          else "optional") if hooks_cfg is not None else "optional"
        out.append((hook, str(setting) == "required"))
    return out


def _normalise_hook_status(status: Any, hooks_cfg: Any) -> list[tuple[str, tuple]]:
    """Capture.hook_status() -> [(hook, (hook, method, required, attached, reason))].

    Accepts a mapping hook -> object/dict with ``method``/``attached``/``reason`` (or
    ``error``) fields, so small shape differences in the capture engine do not break
    the daemon.
    """
    required = dict(_hook_requirements(hooks_cfg))
    items = status.items() if hasattr(status, "items") else \
        [(getattr(s, "hook", str(i)), s) for i, s in enumerate(status)]
    out = []
    for hook, info in items:
        get = (info.get if isinstance(info, dict)
               else lambda k, d=None, o=info: getattr(o, k, d))
        method = get("method") or "none"
        attached = bool(get("attached", method != "none"))
        reason = str(get("reason") or get("error") or "")
        req = required.get(hook, bool(get("required", False)))
        out.append((hook, (hook, method if attached else "none", req, attached, reason)))
    return out
