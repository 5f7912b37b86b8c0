"""Pipeline.feed_many's fast path (count-only kinds of known VMs) against feed() per event.

Both must leave the same state, counters, findings and observer calls; the traces mix
every kind, including faults on protected pages (storm control), CR writes against
pins, hypercalls from unknown VMMs and events that are not events at all.
"""

from __future__ import annotations

import pytest

from hekitrace.config.settings import parse_config
from hekitrace.pipeline import Pipeline
from hekitrace.sim import scenarios
from hekitrace.state.events import CrPinRequest, CrWrite, Fault, FaultAccess, Hypercall


@pytest.fixture(scope="module")
def config():
    return parse_config("abi:\n  mbec: true\n")


def _run(config, events, many: bool):
    pipeline = Pipeline(config)
    seen = []
    pipeline.add_observer(lambda change, findings: seen.append(
        (change, [f.to_dict() for f in findings])))
    if many:
        findings = []
        for i in range(0, len(events), 97):
            findings += pipeline.feed_many(events[i:i + 97])
    else:
        findings = [f for e in events for f in pipeline.feed(e)]
    findings += pipeline.flush()
    guests = {k: (dict(g.counters), list(g.degraded_reasons)) for k, g in
              pipeline.host.guests.items()}
    return ([f.to_dict() for f in findings], pipeline.stats, dict(pipeline.policy.counts),
            guests, seen)


def _attack_with_storm() -> list:
    events = scenarios.simulate(["attack-write-text", "attack-clear-smep"], seed=2)
    fault = next(e for e in events if type(e) is Fault)
    pin = next(e for e in events if type(e) is CrPinRequest)
    t = events[-1].time_ns
    storm = [fault._replace(time_ns=t + i * 1_000_000, count=1 + i % 3,
                            access=FaultAccess.WRITE | (FaultAccess.FETCH if i % 5 == 0 else 0))
             for i in range(3000)]
    storm += [CrWrite(t + 4_000_000_000 + i, pin.tgid, pin.tid, pin.cr, 0)
              for i in range(50)]
    storm += [Hypercall(t + 5_000_000_000 + i, 4242, 1, 9, 0, 0, 0, 0) for i in range(50)]
    storm += [Hypercall(t + 6_000_000_000, [1], 1, 9, 0, 0, 0, 0)]   # unhashable tgid
    return events + storm


@pytest.mark.parametrize("trace", ["stress", "attack_storm"])
def test_feed_many_equals_feed_per_event(config, trace):
    events = (scenarios.simulate(["stress"], seed=5, stress_events=5000) if trace == "stress"
              else _attack_with_storm())
    assert _run(config, events, many=True) == _run(config, events, many=False)


def test_storm_is_deduplicated_and_counted_on_the_fast_path(config):
    events = _attack_with_storm()
    findings, stats, counts, _, _ = _run(config, events, many=True)
    writes = [f for f in findings if f["rule"] == "protected_write"]
    assert writes and sum(f["count"] for f in writes) == sum(
        n for (_, rule, _), n in counts.items() if rule == "protected_write")
    assert any(f["rule"] == "cr_pin_violation" for f in findings)
    assert stats["host"]["internal_errors"] == 1   # the unhashable tgid, reported once
