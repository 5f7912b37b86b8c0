"""The policy's regression suite: every simulated scenario, written to a trace and replayed
through the daemon's pipeline, yields exactly its expected finding ids (none when clean).

The expectations live beside the scenarios (``hekitrace.sim.scenarios.SCENARIOS``) so that
``simulate``'s help, the examples' README and this suite cannot drift apart. A failure
here means the policy, the state model or the simulated host changed behaviour.
"""

from __future__ import annotations

import pytest

from hekitrace.config.settings import default_config
from hekitrace.replay import replay
from hekitrace.sim import scenarios as sim
from hekitrace.trace.file import TraceHeader
from hekitrace.trace.writer import write_events

HEADER = TraceHeader(abi_profile="heki-v2", extra={"mbec": True})
NAMES = [n for n in sim.SCENARIO_NAMES if n != "stress"]


def _replay(tmp_path, names, encoding="binary", seed=0):
    path = tmp_path / f"t.{encoding}"
    write_events(path, sim.simulate(names, seed=seed), HEADER, encoding=encoding)
    result = replay([str(path)], default_config())
    assert result.problems == []
    return result


@pytest.mark.parametrize("name", NAMES)
def test_scenario_yields_exactly_its_findings(tmp_path, name):
    result = _replay(tmp_path, [name])
    assert {f.rule for f in result.findings} == sim.expected_findings([name])


@pytest.mark.parametrize("name", sim.ATTACKS)
def test_attack_findings_name_the_attacked_vm(tmp_path, name):
    result = _replay(tmp_path, ["clean-boot", name], encoding="jsonl")
    victim = sim.SCENARIOS[name][1]
    assert result.findings
    assert {f.vm["name"] for f in result.findings} == {victim}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_other_seeds_keep_clean_scenarios_clean(tmp_path, seed):
    clean = ["clean-boot", "module-load-unload", "bpf-jit", "text-poke", "confidential-vm"]
    result = _replay(tmp_path, clean, seed=seed)
    assert [f.to_dict() for f in result.findings] == []


def test_both_encodings_replay_the_same(tmp_path):
    binary = _replay(tmp_path, ["all-attacks", "multi-vm"])
    jsonl = _replay(tmp_path, ["all-attacks", "multi-vm"], encoding="jsonl")
    assert [f.to_dict() for f in binary.findings] == [f.to_dict() for f in jsonl.findings]


def test_maps_match_between_requested_and_applied_after_clean_boot(tmp_path):
    result = _replay(tmp_path, ["multi-vm"])
    for guest in result.pipeline.host.guests.values():
        assert list(guest.requested.diff(guest.applied)) == []
        assert guest.lockdown_ns is not None and not guest.degraded
