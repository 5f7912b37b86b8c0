"""hekitrace.service.daemon: the queue, loss accounting and source merging, without sockets.

The daemon's public steps (build_pipeline, the queue of service/ingest.py, run_discovery,
the expiry timer step) are driven with a real Pipeline and real events; the journal's
recovery is a fake of the ``Recovery`` interface. The process-level behaviour (signals,
sd_notify, HTTP, control socket, BPF) is in tests/e2e.
"""

from __future__ import annotations

import io

from hekitrace.capture.engine import HookStatus
from hekitrace.capture.hooks import NAMES as HOOKS
from hekitrace.config.abi import DEFAULT_PROFILE
from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.service.daemon import Daemon
from hekitrace.service.running_vms import PREEXISTING_REASON, exited_implicit_vms
from hekitrace.state.events import AttrApplied, Hypercall, VmCreated, VmDestroyed
from hekitrace.state.fault_filter import protected_ranges

T0 = 1_795_000_000_000_000_000


class FakeRecovery:
    """The journal's recovery seam (service/parts.py ``Recovery``) played by a function."""

    journal = None

    def __init__(self, rebuild):
        self.rebuild = rebuild

    def __call__(self, pipeline, discovered):
        return self.rebuild(pipeline, discovered)


def _daemon(queue_events: int = 8, discover=None, proc_root: str = "/proc",
            recovery=None, log=None) -> Daemon:
    config = parse_config(f"capture:\n  queue_events: {queue_events}\n"
                          "alerts:\n  stdout: false\n", "<test>")
    d = Daemon(config, None, load_config=lambda p: config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               discover=discover, recovery=recovery, log=log or io.StringIO(),
               wall_ns=lambda: T0 + 10**9, proc_root=proc_root)
    d.build_pipeline()        # no capture engine: the applied hook is not active
    assert not d.applied_hook_active
    return d


def test_daemon_queue_overflow_is_counted_per_vm_and_degrades_the_vm():
    d = _daemon(queue_events=8)
    d.ingest.enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1")])
    d.ingest.process(100)
    events = [Hypercall(T0 + i, 50, 50, 0x99, i, 0, 0, 0) for i in range(20)]
    d.ingest.enqueue(events)
    assert d.ingest.depth == 8
    assert d.stats.lost[("queue", "overflow")] == 12
    guest = d.pipeline.host.by_tgid(50)
    assert d.stats.vm_lost[(guest.key, "queue")] == 12
    assert guest.degraded and any("queue" in r for r in guest.degraded_reasons)
    d.ingest.process(100)
    assert d.stats.events_by_kind["hypercall"] == 8
    assert d.stats.queue_depth == 0


def test_daemon_process_respects_the_batch_budget():
    d = _daemon(queue_events=100)
    d.ingest.enqueue([VmCreated(T0, 50, 50, vm_fd=7)] +
               [Hypercall(T0 + i, 50, 50, 0x99, i, 0, 0, 0) for i in range(30)])
    d.ingest.process(10)
    assert d.ingest.depth == 21 and d.stats.queue_depth == 21
    d.ingest.process(100)
    assert d.stats.events_by_kind["hypercall"] == 30


def test_daemon_merges_the_same_vm_reported_by_ioctl_and_uevent():
    d = _daemon(queue_events=100)
    d.ingest.enqueue([VmCreated(T0, 50, 50, vm_fd=7, stats_path="/kvm/50-7", source="ioctl"),
                Hypercall(T0 + 1, 50, 50, 0x99, 0, 0, 0, 0),
                VmCreated(T0 + 2, 50, 51, vm_fd=7, stats_path="/kvm/50-7", name="web1",
                          source="uevent")])
    d.ingest.process(100)
    assert len(d.pipeline.host.guests) == 1
    assert d.merged_creations == 1
    assert d.pipeline.host.by_tgid(50).name == "web1"  # the uevent's name fills it in
    # a second VM of the same VMM (another fd) is a new VM
    d.ingest.enqueue([VmCreated(T0 + 3, 50, 50, vm_fd=9, source="ioctl")])
    d.ingest.process(100)
    assert len(d.pipeline.host.guests) == 2
    assert d.merged_creations == 1


def test_daemon_startup_discovery_marks_running_vms_degraded():
    found = [VmCreated(T0, 60, 60, vm_fd=5, name="db", source="discovery", preexisting=True),
             VmCreated(T0, 61, 61, vm_fd=5, name="web", source="discovery")]
    log = io.StringIO()
    d = _daemon(discover=lambda: found, log=log)
    d.run_discovery()
    for tgid in (60, 61):
        guest = d.pipeline.host.by_tgid(tgid)
        assert guest.degraded_reasons.count(PREEXISTING_REASON) == 1
    assert d.discovery_done
    assert "VMs running at start-up: 2: db(pid 60), web(pid 61)" in log.getvalue()


def test_daemon_discovery_of_a_vm_the_hooks_saw_created_is_not_degraded():
    found = [VmCreated(T0 + 9, 70, 70, vm_fd=4, name="fresh", source="discovery",
                       preexisting=True)]
    d = _daemon(discover=lambda: found)
    d.ingest.enqueue([VmCreated(T0, 70, 70, vm_fd=4, source="ioctl")])  # between attach and
    d.ingest.process(10)                                               # discovery
    d.run_discovery()
    guest = d.pipeline.host.by_tgid(70)
    assert not guest.degraded and len(d.pipeline.host.guests) == 1
    assert d.merged_creations == 1


def test_daemon_recovery_seam_keeps_covered_vms_clean():
    found = [VmCreated(T0 + 9, 60, 60, vm_fd=5, name="db", source="discovery"),
             VmCreated(T0 + 9, 61, 61, vm_fd=6, name="new", source="discovery")]

    def recovery(pipeline, discovered):
        # what a journal replay does: the VM's history, then "this one is covered"
        pipeline.feed(VmCreated(T0, 60, 60, vm_fd=5, name="db", source="ioctl"))
        return {pipeline.host.by_tgid(60).key}

    d = _daemon(discover=lambda: found, recovery=FakeRecovery(recovery))
    d.run_discovery()
    db, new = d.pipeline.host.by_tgid(60), d.pipeline.host.by_tgid(61)
    assert not db.degraded and db.created_ns == T0
    assert new.degraded_reasons == [PREEXISTING_REASON]
    assert len(d.pipeline.host.guests) == 2


def test_daemon_destroyed_vm_is_retired_and_its_counters_forgotten():
    d = _daemon(queue_events=100)
    d.ingest.enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1"),
                VmDestroyed(T0 + 5, 50, 50, "/kvm/50-7")])
    d.ingest.process(100)
    key = next(iter(d.pipeline.host.guests))
    d.stats.vm_lost[(key, "ring:telemetry")] = 3
    d.pipeline.host.grace_period_ns = 0
    d.expire()                # the expiry timer's step
    assert d.pipeline.host.guests == {}
    assert d.stats.vm_lost == {}


def test_daemon_reload_swaps_the_policy_and_keeps_counts(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("alerts:\n  stdout: false\n")
    from hekitrace.config.settings import load_config
    config = load_config(str(path))
    log = io.StringIO()
    d = Daemon(config, str(path), load_config=load_config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               log=log, wall_ns=lambda: T0)
    d.build_pipeline()
    d.pipeline.policy.counts[(None, "wx_request", "critical")] = 4
    old = d.pipeline.policy
    path.write_text("alerts:\n  stdout: false\npolicy:\n  rules:\n    wx_request:\n"
                    "      severity: warning\n")
    assert d.reload() is True
    assert d.pipeline.policy is not old
    assert d.pipeline.policy.counts[(None, "wx_request", "critical")] == 4
    assert d.stats.config_reload_success and d.stats.config_sha256 == d.config.sha256
    assert "policy reloaded" in log.getvalue()
    path.write_text("policy: [not, a, mapping]\n")
    assert d.reload() is False
    assert d.stats.config_reload_success is False
    assert d.config.policy.rules["wx_request"].severity == "warning"
    assert "config reload rejected" in log.getvalue()


def test_daemon_survives_a_state_machine_bug_and_counts_the_events():
    log = io.StringIO()
    d = _daemon(queue_events=100, log=log)
    d.ingest.enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1")])
    d.ingest.process(10)
    real_feed_many = d.pipeline.feed_many

    def broken(events):
        raise RuntimeError("bug triggered by a guest")

    d.pipeline.feed_many = broken
    d.ingest.enqueue([Hypercall(T0 + i, 50, 50, 0x99, i, 0, 0, 0) for i in range(5)])
    d.ingest.process(10)
    assert d.internal_errors == 1
    assert d.stats.lost[("pipeline", "internal_error")] == 5
    guest = d.pipeline.host.by_tgid(50)
    assert guest.degraded
    assert "bug triggered by a guest" in log.getvalue()
    d.pipeline.feed_many = real_feed_many
    d.ingest.enqueue([Hypercall(T0 + 9, 50, 50, 0x99, 9, 0, 0, 0)])
    d.ingest.process(10)
    assert d.stats.events_by_kind["hypercall"] == 1


def test_exited_implicit_vms_names_only_implicit_vms_whose_vmm_is_gone(tmp_path):
    d = _daemon(queue_events=100)
    d.ingest.enqueue([Hypercall(T0, 70, 70, 0x99, 0, 0, 0, 0),        # implicit, VMM exited
                Hypercall(T0, 71, 71, 0x99, 0, 0, 0, 0),        # implicit, VMM running
                VmCreated(T0, 72, 72, vm_fd=5, source="discovery", preexisting=True)])
    d.ingest.process(100)
    (tmp_path / "71").mkdir()
    gone = exited_implicit_vms(d.pipeline.host, T0 + 9, str(tmp_path))
    assert gone == [VmDestroyed(T0 + 9, 70, 0, "")]


def test_daemon_expiry_timer_retires_an_implicit_vm_whose_vmm_exited(tmp_path):
    log = io.StringIO()
    d = _daemon(queue_events=100, proc_root=str(tmp_path), log=log)
    d.ingest.enqueue([Hypercall(T0, 70, 70, 0x99, 0, 0, 0, 0)])
    d.ingest.process(100)
    d.pipeline.host.grace_period_ns = 0
    d.expire()                # the expiry timer's step
    assert d.pipeline.host.guests == {}
    assert "pid 70 retired" in log.getvalue()


class FakeCapture:
    """A capture engine (service/parts.py ``CaptureEngine``) that records what it is told."""

    def __init__(self, attached):
        self.attached = attached
        self.filters = []
        self.seeded = []
        self.closed = False

    def fds(self):
        return []

    def read(self, max_records=None):
        return []

    def hook_status(self):
        return {hook: HookStatus(hook, False, hook in self.attached,
                                 "raw_tracepoint" if hook in self.attached else "none",
                                 "" if hook in self.attached else "not in this kernel")
                for hook in HOOKS}

    def protect_filter_update(self, tgid, ranges):
        self.filters.append((tgid, list(ranges)))
        return 1

    def seed_memslots(self, tgid, slots):
        self.seeded.append((tgid, list(slots)))
        return len(slots)

    def forget_vm(self, tgid):
        return []

    def close(self):
        self.closed = True


def test_daemon_hook_report_takes_required_from_the_config_and_syncs_the_fault_filter():
    config = parse_config("hooks:\n  cr: required\nalerts:\n  stdout: false\n", "<test>")
    capture = FakeCapture(attached={"hypercall", "ioctl", "attr_applied"})
    log = io.StringIO()
    d = Daemon(config, None, load_config=lambda p: config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               capture_factory=lambda cfg, say: capture, log=log, wall_ns=lambda: T0)
    d.start_capture()
    d.build_pipeline()
    report = {h.hook: (h.method, h.required, h.attached) for h in d.hook_report}
    assert report == {"hypercall": ("raw_tracepoint", True, True),
                      "attr_applied": ("raw_tracepoint", False, True),
                      "ioctl": ("raw_tracepoint", True, True),
                      "page_fault": ("none", False, False),
                      "cr": ("none", True, False)}
    assert d.applied_hook_active and d.pipeline.policy.applied_hook_active
    assert "hook cr                   required  NOT attached: not in this kernel" \
        in log.getvalue()
    d.ingest.enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1"),
                      AttrApplied(T0 + 1, 50, 50, 0x1000, 0x1800,
                                  DEFAULT_PROFILE.guest_to_kvm(0b1101))])
    d.ingest.process(10)
    guest = d.pipeline.host.by_tgid(50)
    expected = protected_ranges(guest.applied, config.abi_profile())
    assert expected and capture.filters == [(50, expected)]
    d.run_discovery()
    status = d.status()
    assert status["hooks"][4] == {"hook": "cr", "method": "none", "required": True,
                                  "attached": False, "reason": "not in this kernel"}
    assert status["vms"] == 1 and status["filter_errors"] == 0 and status["journal"] is None
    assert d.discovery_done and "journal: disabled" in log.getvalue()


def test_daemon_without_a_capture_engine_reports_every_hook_unattached():
    d = _daemon()
    d.start_capture()
    assert [(h.hook, h.attached, h.reason) for h in d.hook_report] == \
        [(hook, False, "no capture engine") for hook in HOOKS]
    assert d.status_line() == "NOT READY; 0 VMs (0 degraded); hooks 0/5; 0 events, 0 lost; " \
        "queue 0/8"


def test_release_freed_heap_is_harmless():
    """The daemon trims the C heap after bcc's compile (parts.start_capture); the call
    is safe at any time and says whether glibc was there to do it."""
    from hekitrace.service import parts

    assert parts.release_freed_heap() in (True, False)
