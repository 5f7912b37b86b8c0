"""Pipeline: Host + Policy over whole simulated traces, timers on event time, observers."""

from __future__ import annotations

import pytest

from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.sim import scenarios
from hekitrace.state.changes import NO_CHANGE
from hekitrace.state.events import (
    AttrApplied,
    Fault,
    FaultAccess,
    Hypercall,
    Lost,
    ProtectEntry,
    ProtectRequest,
    VmCreated,
    VmDestroyed,
)

S = 1_000_000_000
T0 = scenarios.DEFAULT_START_NS


@pytest.fixture(scope="module")
def config():
    # the simulated host has MBEC (scenarios.SimVm default); the monitor must be told the same
    return parse_config("abi:\n  mbec: true\n")


@pytest.mark.parametrize("scenario", [n for n in scenarios.SCENARIO_NAMES if n != "stress"])
def test_scenario_raises_exactly_the_expected_rules(config, scenario):
    events = scenarios.simulate([scenario], seed=3)
    pipeline = Pipeline(config, applied_hook_active=True)
    findings = pipeline.feed_many(events) + pipeline.flush()
    assert {f.rule for f in findings} == set(scenarios.expected_findings([scenario]))
    assert pipeline.host.counters["internal_errors"] == 0


def test_stress_trace_is_clean_and_counted(config):
    events = scenarios.simulate(["stress"], seed=1, stress_events=20_000)
    pipeline = Pipeline(config)
    findings = pipeline.feed_many(events) + pipeline.flush()
    assert findings == []
    stats = pipeline.stats
    assert stats["events_total"] == len(events)
    assert stats["events"]["attr_applied"] == sum(type(e) is AttrApplied for e in events)


def test_feed_and_feed_many_agree(config):
    events = scenarios.simulate(["all-attacks"], seed=5)
    one, many = Pipeline(config), Pipeline(config)
    by_one = [f.to_dict() for e in events for f in one.feed(e)] + \
        [f.to_dict() for f in one.flush()]
    by_many = [f.to_dict() for f in many.feed_many(events) + many.flush()]
    assert by_one == by_many and by_one


def test_mbec_mismatch_between_profile_and_host_is_visible():
    # monitor told "no MBEC" while the host enforces exec: requested and applied differ
    events = scenarios.simulate(["clean-boot"], seed=3)
    pipeline = Pipeline(parse_config("abi:\n  mbec: false\n"))
    rules = {f.rule for f in pipeline.feed_many(events) + pipeline.flush()}
    assert rules & {"request_not_applied", "applied_without_request"}


def test_pairing_timer_runs_on_event_time(config):
    pipeline = Pipeline(config)
    pipeline.feed(VmCreated(T0, 9, 9, name="vm9"))
    pipeline.feed(AttrApplied(T0, 9, 9, 0x10, 0x11, 1 << 4))          # host does apply Heki
    pipeline.feed(ProtectRequest(T0 + 10, 9, 9, 0x9000,
                                 (ProtectEntry(0x100000, 0x101000, 3),)))
    assert pipeline.feed(Hypercall(T0 + S, 9, 9, 12, 0, 0, 0, 0)) == []
    late = pipeline.feed(Hypercall(T0 + 3 * S, 9, 9, 12, 0, 0, 0, 0))
    assert sorted(f.rule for f in late) == ["applied_without_request", "request_not_applied"]


def test_losses_counted_by_stage_and_reason(config):
    pipeline = Pipeline(config)
    pipeline.feed(Lost(T0, 0, 0, "ring:telemetry", "full", 7))
    pipeline.feed(Lost(T0, 0, 0, "ring:telemetry", "full", 3))
    pipeline.feed(Lost(T0, 0, 0, "queue", "overflow", 1))
    assert pipeline.lost == {("ring:telemetry", "full"): 10, ("queue", "overflow"): 1}
    assert pipeline.stats["lost_total"] == 11


def test_observers_see_every_change_and_timer_findings(config):
    pipeline = Pipeline(config)
    seen = []
    pipeline.add_observer(lambda change, findings: seen.append((change, list(findings))))
    events = scenarios.simulate(["attack-wx-request"], seed=2)
    pipeline.feed_many(events)
    assert len(seen) == len(events)
    assert [c.event for c, _ in seen] == events
    assert any(f.rule == "wx_request" for _, fs in seen for f in fs)
    pipeline.tick(events[-1].time_ns + 100 * S)
    assert seen[-1][0] is NO_CHANGE


def test_expire_drops_policy_state_of_retired_vms(config):
    pipeline = Pipeline(parse_config("state: {grace_period_seconds: 1}\nabi: {mbec: true}\n"))
    events = scenarios.simulate(["attack-write-text"], seed=2)
    pipeline.feed_many(events)
    key = next(iter(pipeline.host.guests))
    pipeline.feed(VmDestroyed(events[-1].time_ns + 1, key.tgid, key.tgid))
    changes, findings = pipeline.expire(events[-1].time_ns + 2 * S)
    assert [c.lifecycle for c in changes] == ["retired"]
    assert key not in pipeline.host.guests and key not in pipeline.policy.vm_states
    # a daemon that expires on the host directly is covered by tick's prune
    pipeline.feed_many(scenarios.simulate(["attack-write-text"], seed=4))
    key2 = next(iter(pipeline.host.guests))
    pipeline.feed(VmDestroyed(T0 + 100 * S, key2.tgid, key2.tgid))
    pipeline.host.expire(T0 + 200 * S)
    pipeline.tick(T0 + 200 * S)
    assert pipeline.policy.vm_states == {}


def test_hostile_fault_storm_from_one_vm_does_not_delay_another(config):
    pipeline = Pipeline(config)
    events = scenarios.simulate(["attack-write-text"], seed=2)
    pipeline.feed_many(events)
    victim = next(iter(pipeline.host.guests))
    text_gpa = next(f for f in events if type(f) is Fault).gpa
    t = events[-1].time_ns
    flood = [Fault(t + i, victim.tgid, victim.tgid, 0, text_gpa, 0x1AA, 0, FaultAccess.WRITE)
             for i in range(10_000)]
    findings = pipeline.feed_many(flood)
    assert sum(f.count for f in findings) <= 1    # first one was already reported earlier
    other = pipeline.feed(Fault(t + 20_000, 77, 77, 0, 0x1000, 0x1AA, 0, FaultAccess.WRITE))
    assert other == [] or all(f.vm["pid"] == 77 for f in other)
    summary = pipeline.flush()
    total = sum(n for (vm, rule, _), n in pipeline.policy.counts.items()
                if vm == victim and rule == "protected_write")
    assert total == 4000 + 10_000                 # the scenario's storm plus the flood
    assert sum(f.count for f in summary if f.rule == "protected_write") == 10_000
