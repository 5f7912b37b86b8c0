"""hekitrace.service.daemon: the queue, loss accounting and source merging, without sockets.

The daemon's loop pieces are driven directly with a real Pipeline and real events; the
process-level behaviour (signals, sd_notify, HTTP, control socket, BPF) is in tests/e2e.
"""

from __future__ import annotations

import io

from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.service.daemon import PREEXISTING_REASON, Daemon, exited_implicit_vms
from hekitrace.state.events import Hypercall, VmCreated, VmDestroyed

T0 = 1_795_000_000_000_000_000


def _daemon(queue_events: int = 8, discover=None, proc_root: str = "/proc") -> Daemon:
    config = parse_config(f"capture:\n  queue_events: {queue_events}\n"
                          "alerts:\n  stdout: false\n", "<test>")
    d = Daemon(config, None, load_config=lambda p: config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               discover=discover, log=io.StringIO(), wall_ns=lambda: T0 + 10**9,
               proc_root=proc_root)
    d.pipeline = Pipeline(config, False)
    d._add_observer()
    return d


def test_daemon_queue_overflow_is_counted_per_vm_and_degrades_the_vm():
    d = _daemon(queue_events=8)
    d._enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1")])
    d._process(100)
    events = [Hypercall(T0 + i, 50, 50, 0x99, i, 0, 0, 0) for i in range(20)]
    d._enqueue(events)
    assert len(d.queue) == 8
    assert d.stats.lost[("queue", "overflow")] == 12
    guest = d.pipeline.host.by_tgid(50)
    assert d.stats.vm_lost[(guest.key, "queue")] == 12
    assert guest.degraded and any("queue" in r for r in guest.degraded_reasons)
    d._process(100)
    assert d.stats.events_by_kind["hypercall"] == 8
    assert d.stats.queue_depth == 0


def test_daemon_process_respects_the_batch_budget():
    d = _daemon(queue_events=100)
    d._enqueue([VmCreated(T0, 50, 50, vm_fd=7)] +
               [Hypercall(T0 + i, 50, 50, 0x99, i, 0, 0, 0) for i in range(30)])
    d._process(10)
    assert len(d.queue) == 21 and d.stats.queue_depth == 21
    d._process(100)
    assert d.stats.events_by_kind["hypercall"] == 30


def test_daemon_merges_the_same_vm_reported_by_ioctl_and_uevent():
    d = _daemon(queue_events=100)
    d._enqueue([VmCreated(T0, 50, 50, vm_fd=7, stats_path="/kvm/50-7", source="ioctl"),
                Hypercall(T0 + 1, 50, 50, 0x99, 0, 0, 0, 0),
                VmCreated(T0 + 2, 50, 51, vm_fd=7, stats_path="/kvm/50-7", name="web1",
                          source="uevent")])
    d._process(100)
    assert len(d.pipeline.host.guests) == 1
    assert d.merged_creations == 1
    assert d.pipeline.host.by_tgid(50).name == "web1"  # the uevent's name fills it in
    # a second VM of the same VMM (another fd) is a new VM
    d._enqueue([VmCreated(T0 + 3, 50, 50, vm_fd=9, source="ioctl")])
    d._process(100)
    assert len(d.pipeline.host.guests) == 2
    assert d.merged_creations == 1


def test_daemon_startup_discovery_marks_running_vms_degraded():
    found = [VmCreated(T0, 60, 60, vm_fd=5, name="db", source="discovery", preexisting=True),
             VmCreated(T0, 61, 61, vm_fd=5, name="web", source="discovery")]
    d = _daemon(discover=lambda: found)
    d._run_discovery()
    for tgid in (60, 61):
        guest = d.pipeline.host.by_tgid(tgid)
        assert guest.degraded_reasons.count(PREEXISTING_REASON) == 1
    assert d.discovery_done
    assert "VMs running at start-up: 2: db(pid 60), web(pid 61)" in d._log.getvalue()


def test_daemon_discovery_of_a_vm_the_hooks_saw_created_is_not_degraded():
    found = [VmCreated(T0 + 9, 70, 70, vm_fd=4, name="fresh", source="discovery",
                       preexisting=True)]
    d = _daemon(discover=lambda: found)
    d._enqueue([VmCreated(T0, 70, 70, vm_fd=4, source="ioctl")])  # between attach and
    d._process(10)                                               # discovery
    d._run_discovery()
    guest = d.pipeline.host.by_tgid(70)
    assert not guest.degraded and len(d.pipeline.host.guests) == 1
    assert d.merged_creations == 1


def test_daemon_recovery_seam_keeps_covered_vms_clean():
    found = [VmCreated(T0 + 9, 60, 60, vm_fd=5, name="db", source="discovery"),
             VmCreated(T0 + 9, 61, 61, vm_fd=6, name="new", source="discovery")]
    d = _daemon(discover=lambda: found)

    def recovery(pipeline, discovered):
        # what a journal replay does: the VM's history, then "this one is covered"
        pipeline.feed(VmCreated(T0, 60, 60, vm_fd=5, name="db", source="ioctl"))
        return {pipeline.host.by_tgid(60).key}

    d._recovery = recovery
    d._run_discovery()
    db, new = d.pipeline.host.by_tgid(60), d.pipeline.host.by_tgid(61)
    assert not db.degraded and db.created_ns == T0
    assert new.degraded_reasons == [PREEXISTING_REASON]
    assert len(d.pipeline.host.guests) == 2


def test_daemon_destroyed_vm_is_retired_and_its_counters_forgotten():
    d = _daemon(queue_events=100)
    d._enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1"),
                VmDestroyed(T0 + 5, 50, 50, "/kvm/50-7")])
    d._process(100)
    key = next(iter(d.pipeline.host.guests))
    d.stats.vm_lost[(key, "ring:telemetry")] = 3
    d._timers = {"tick": float("inf"), "control": float("inf"), "status": float("inf"),
                 "expire": 0.0}
    d.pipeline.host.grace_period_ns = 0
    d._run_timers()
    assert d.pipeline.host.guests == {}
    assert d.stats.vm_lost == {}


def test_daemon_reload_swaps_the_policy_and_keeps_counts(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("alerts:\n  stdout: false\n")
    from hekitrace.config.settings import load_config
    config = load_config(str(path))
    d = Daemon(config, str(path), load_config=load_config,
               pipeline_factory=lambda cfg, applied: Pipeline(cfg, applied),
               log=io.StringIO(), wall_ns=lambda: T0)
    d.pipeline = Pipeline(config, False)
    d.pipeline.policy.counts[(None, "wx_request", "critical")] = 4
    old = d.pipeline.policy
    path.write_text("alerts:\n  stdout: false\npolicy:\n  rules:\n    wx_request:\n"
                    "      severity: warning\n")
    assert d.reload() is True
    assert d.pipeline.policy is not old
    assert d.pipeline.policy.counts[(None, "wx_request", "critical")] == 4
    assert d.stats.config_reload_success and d.stats.config_sha256 == d.config.sha256
    assert "policy reloaded" in d._log.getvalue()
    path.write_text("policy: [not, a, mapping]\n")
    assert d.reload() is False
    assert d.stats.config_reload_success is False
    assert d.config.policy.rules["wx_request"].severity == "warning"
    assert "config reload rejected" in d._log.getvalue()


def test_daemon_survives_a_state_machine_bug_and_counts_the_events():
    d = _daemon(queue_events=100)
    d._enqueue([VmCreated(T0, 50, 50, vm_fd=7, name="web1")])
    d._process(10)
    real_feed_many = d.pipeline.feed_many

    def broken(events):
        raise RuntimeError("bug triggered by a guest")

    d.pipeline.feed_many = broken
    d._enqueue([Hypercall(T0 + i, 50, 50, 0x99, i, 0, 0, 0) for i in range(5)])
    d._process(10)
    assert d.internal_errors == 1
    assert d.stats.lost[("pipeline", "internal_error")] == 5
    guest = d.pipeline.host.by_tgid(50)
    assert guest.degraded
    assert "bug triggered by a guest" in d._log.getvalue()
    d.pipeline.feed_many = real_feed_many
    d._enqueue([Hypercall(T0 + 9, 50, 50, 0x99, 9, 0, 0, 0)])
    d._process(10)
    assert d.stats.events_by_kind["hypercall"] == 1


def test_exited_implicit_vms_names_only_implicit_vms_whose_vmm_is_gone(tmp_path):
    d = _daemon(queue_events=100)
    d._enqueue([Hypercall(T0, 70, 70, 0x99, 0, 0, 0, 0),        # implicit, VMM exited
                Hypercall(T0, 71, 71, 0x99, 0, 0, 0, 0),        # implicit, VMM running
                VmCreated(T0, 72, 72, vm_fd=5, source="discovery", preexisting=True)])
    d._process(100)
    (tmp_path / "71").mkdir()
    gone = exited_implicit_vms(d.pipeline.host, T0 + 9, str(tmp_path))
    assert gone == [VmDestroyed(T0 + 9, 70, 0, "")]


def test_daemon_expiry_timer_retires_an_implicit_vm_whose_vmm_exited(tmp_path):
    d = _daemon(queue_events=100, proc_root=str(tmp_path))
    d._enqueue([Hypercall(T0, 70, 70, 0x99, 0, 0, 0, 0)])
    d._process(100)
    d.pipeline.host.grace_period_ns = 0
    d._timers = {"tick": float("inf"), "control": float("inf"), "status": float("inf"),
                 "expire": 0.0}
    d._run_timers()
    assert d.pipeline.host.guests == {}
    assert "pid 70 retired" in d._log.getvalue()
