"""hekitrace.config.settings: every error names file, line and key; the default documents all keys."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hekitrace.config import abi
from hekitrace.config.settings import (
    RULE_IDS,
    Config,
    PolicyConfig,
    default_config,
    load_config,
    parse_config,
)
from hekitrace.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "hekitrace.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "config"


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml")
    return info.value


# -- the default file ------------------------------------------------------------------

def test_default_file_validates_and_equals_builtin_defaults():
    cfg = load_config(str(DEFAULT))
    assert cfg == default_config()
    assert cfg.abi_profile() == abi.HEKI_V2
    assert cfg.path == str(DEFAULT)
    assert len(cfg.sha256) == 64 and cfg.sha256 != default_config().sha256


def _dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = f"{prefix}{f.name}"
        keys.add(name)
        kind = f.metadata.get("kind")
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            keys |= _dataclass_keys(kind, name + ".")
        if kind == "rules":
            keys |= {f"{name}.{rule}" for rule in RULE_IDS}
            keys |= {f"{name}.{rule}.{k}" for rule in RULE_IDS
                     for k in ("enabled", "severity")}
    return keys


def _yaml_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(prefix + k)
            keys |= _yaml_keys(v, prefix + k + ".")
    return keys


def test_every_key_of_the_dataclasses_is_in_the_default_file():
    documented = _yaml_keys(yaml.safe_load(DEFAULT.read_text()))
    missing = _dataclass_keys(Config) - documented
    assert not missing, f"keys missing from configs/hekitrace.yaml: {sorted(missing)}"
    assert documented - _dataclass_keys(Config) == set()


def test_every_rule_has_a_default_setting():
    rules = PolicyConfig().rules
    assert tuple(rules) == RULE_IDS
    assert {r.severity for r in rules.values()} <= {"info", "warning", "critical"}


def test_empty_and_null_documents_give_defaults():
    assert parse_config("", "e.yaml") == default_config()
    assert parse_config("# only a comment\n", "e.yaml") == default_config()
    assert parse_config("~\n", "e.yaml") == default_config()


# -- the required error cases (fixtures, also used by the CLI test) ---------------------

def test_misspelt_key_names_line_and_suggests():
    with pytest.raises(ConfigError) as info:
        load_config(str(FIXTURES / "misspelt_key.yaml"))
    error = info.value
    assert (error.line, error.key) == (4, "abi.mbce")
    assert "did you mean 'mbec'?" in str(error)
    assert str(error).startswith(f"{FIXTURES / 'misspelt_key.yaml'}:4: abi.mbce: ")


def test_wrong_type_names_line_and_expected_type():
    with pytest.raises(ConfigError) as info:
        load_config(str(FIXTURES / "wrong_type.yaml"))
    assert (info.value.line, info.value.key) == (2, "capture.max_list_pages")
    assert "expected an integer, got a string 'sixteen'" in str(info.value)


def test_duplicate_hypercall_number_names_the_later_key():
    with pytest.raises(ConfigError) as info:
        load_config(str(FIXTURES / "duplicate_hypercall.yaml"))
    assert (info.value.line, info.value.key) == (5, "abi.hypercalls.protect_memory")
    assert "13 is already lock_cr_update" in str(info.value)


def test_number_colliding_with_the_profile_is_an_error():
    error = _error("abi:\n  profile: heki-v2\n  hypercalls:\n    map_gpa_range: 14\n")
    assert (error.line, error.key) == (4, "abi.hypercalls.map_gpa_range")
    assert "14 is already protect_memory" in str(error)


def test_bit_out_of_range():
    with pytest.raises(ConfigError) as info:
        load_config(str(FIXTURES / "bit_out_of_range.yaml"))
    assert (info.value.line, info.value.key) == (3, "abi.guest_bits.exec")
    assert "expected a bit position 0-63, got 64" in str(info.value)


def test_two_attribute_kinds_on_one_bit():
    error = _error("abi:\n  kvm_bits:\n    immutable: 3\n")
    assert (error.line, error.key) == (3, "abi.kvm_bits.immutable")
    assert "bit 3 is already private" in str(error)


def test_negative_size():
    with pytest.raises(ConfigError) as info:
        load_config(str(FIXTURES / "negative_size.yaml"))
    assert (info.value.line, info.value.key) == (2, "journal.segment_bytes")


@pytest.mark.parametrize("text, line, key, fragment", [
    ("capture:\n  control_ring_bytes: 5000\n", 2, "capture.control_ring_bytes",
     "power of two"),
    ("policy:\n  dedup_window_seconds: 0\n", 2, "policy.dedup_window_seconds",
     "greater than 0"),
    ("policy:\n  rules:\n    wx_request: {severity: fatal}\n", 3,
     "policy.rules.wx_request.severity", "one of info, warning, critical"),
    ("policy:\n  rules:\n    wx_requests: {}\n", 3, "policy.rules.wx_requests",
     "did you mean 'wx_request'?"),
    ("policy:\n  exceptions:\n    - rules: [no_such_rule]\n      vms: {name: a}\n", 3,
     "policy.exceptions[0].rules", "unknown rule id 'no_such_rule'"),
    ("policy:\n  exceptions:\n    - rules: [wx_request]\n      vms: {}\n", 4,
     "policy.exceptions[0].vms", "selector"),
    ("policy:\n  exceptions:\n    - rules: [wx_request]\n      vms: {uuid: nope}\n", 4,
     "policy.exceptions[0].vms.uuid", "UUID or a glob"),
    ("policy:\n  exceptions:\n    - rules: [wx_request]\n      vms: {pid: 3}\n", 4,
     "policy.exceptions[0].vms.pid", "unknown key"),
    ("hooks:\n  hypercall: mandatory\n", 2, "hooks.hypercall", "required, optional"),
    ("metrics:\n  listen: 9864\n", 2, "metrics.listen", "expected a string"),
    ("metrics:\n  listen: '127.0.0.1:99999'\n", 2, "metrics.listen", "HOST:PORT"),
    ("control:\n  socket: run/x.sock\n", 2, "control.socket", "absolute path"),
    ("alerts:\n  stdout: yes please\n", 2, "alerts.stdout", "true or false"),
    ("state:\n  max_entries_per_request: 1.5\n", 2, "state.max_entries_per_request",
     "an integer"),
    ("daemon:\n  watchdog: 1\n", 2, "daemon.watchdog", "true or false"),
    ("abi:\n  profile: heki-v9\n", 2, "abi.profile", "heki-v1, heki-v2, heki-v3, custom"),
    ("abi:\n  profile: custom\n", 2, "abi.hypercalls", "at least one Heki hypercall"),
    ("abi: [1, 2]\n", 1, "abi", "expected a mapping, got a list"),
    ("journal:\n  max_bytes: 4096\n", 2, "journal.max_bytes", "at least segment_bytes"),
    ("abi:\n  mbec: false\n  mbec: true\n", 3, "abi.mbec", "duplicate key"),
    ("capture:\n  vendor: !custom intel\n", 2, "capture.vendor", "YAML tag '!custom'"),
    ("capture:\n  vendor: 2026-01-01\n", 2, "capture.vendor", "expected a string"),
    ("1: x\n", 1, None, "keys must be names"),
    ("capture:\n  fault_report_interval_seconds: .nan\n", 2,
     "capture.fault_report_interval_seconds", "finite"),
])
def test_impossible_values(text, line, key, fragment):
    error = _error(text)
    assert (error.line, error.key) == (line, key), str(error)
    assert fragment in str(error)
    assert str(error).startswith(f"t.yaml:{line}: {key}: " if key else f"t.yaml:{line}: ")


def test_yaml_syntax_error_names_the_line():
    error = _error("abi:\n  profile: [heki-v2\n")
    assert error.path == "t.yaml" and error.line is not None
    assert "not valid YAML" in str(error)


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.yaml"))
    assert "cannot read the file" in str(info.value)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(binary))


# -- ABI profiles -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["heki-v1", "heki-v2", "heki-v3"])
def test_builtin_profiles(name):
    cfg = parse_config(f"abi:\n  profile: {name}\n", "p.yaml")
    assert cfg.abi_profile() is abi.BUILTIN_PROFILES[name]


def test_heki_v1_numbers():
    profile = parse_config("abi: {profile: heki-v1}\n").abi_profile()
    assert profile.hypercall_numbers() == {"lock_mem_page_ranges": 13, "lock_cr_update": 14,
                                           "map_gpa_range": 12}


def test_custom_profile_fixture():
    cfg = load_config(str(FIXTURES / "custom_profile.yaml"))
    profile = cfg.abi_profile()
    assert profile.name == "custom"
    assert (profile.lock_cr_update, profile.protect_memory) == (40, 41)
    assert profile.lock_mem_page_ranges is None and profile.map_gpa_range == 12
    assert profile.mbec is True
    assert cfg.policy.rules["protected_fetch"].enabled is False
    assert cfg.policy.rules["protected_fetch"].severity == "critical"   # default kept
    assert cfg.policy.rules["wx_request"].severity == "warning"
    assert cfg.policy.exceptions[0].rules == ("request_not_applied",
                                              "applied_without_request")
    assert cfg.policy.exceptions[0].vms.name == "ci-*"


def test_overriding_a_builtin_profile_renames_it_custom():
    profile = parse_config("abi:\n  kvm_bits: {immutable: 8}\n").abi_profile()
    assert profile.name == "custom" and profile.kvm_immutable == 8
    assert profile.lock_cr_update == 13
    # a value equal to the profile's is no change
    assert parse_config("abi:\n  hypercalls: {lock_cr_update: 13}\n").abi_profile() \
        is abi.HEKI_V2


def test_config_is_frozen():
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.abi = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.policy.rules["wx_request"] = None  # type: ignore[index]


def test_config_survives_asdict_deepcopy_pickle_and_hash():
    cfg = load_config(str(FIXTURES / "custom_profile.yaml"))
    assert dataclasses.asdict(cfg)["policy"]["rules"]["wx_request"]["severity"] == "warning"
    assert copy.deepcopy(cfg) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(cfg) == hash(copy.deepcopy(cfg))


# -- -O overrides -----------------------------------------------------------------------

def test_overrides_apply_and_are_validated():
    cfg = parse_config("abi: {profile: heki-v1}\n", "o.yaml",
                       ["abi.profile=heki-v3", "policy.rules.map_degraded.enabled=false",
                        "capture.queue_events=128"])
    assert cfg.abi_profile() is abi.HEKI_V3
    assert cfg.policy.rules["map_degraded"].enabled is False
    assert cfg.capture.queue_events == 128
    with pytest.raises(ConfigError, match="did you mean 'queue_events'") as info:
        parse_config("abi: {}\nhooks: {}\n", "o.yaml", ["capture.queue_event=1"])
    assert info.value.line is None and "(from -O capture.queue_event=1)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config("\n\nabi: {}\n", "o.yaml", ["abi.mbec=[1]"])
    assert str(info.value) == ("o.yaml: abi.mbec: expected true or false, got a list "
                               "(from -O abi.mbec=[1])")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_config("", "o.yaml", ["capture.queue_events"])


def test_to_dict_round_trips_through_yaml():
    cfg = load_config(str(FIXTURES / "custom_profile.yaml"))
    again = parse_config(yaml.safe_dump(cfg.to_dict()), "dump.yaml")
    assert again == cfg


# -- the command ------------------------------------------------------------------------

def _hekitrace(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "hekitrace"     # the installed console script
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_config_validate_command_exit_statuses():
    good = _hekitrace("config", "validate", str(DEFAULT), str(FIXTURES / "custom_profile.yaml"))
    assert good.returncode == 0, good.stderr
    assert good.stdout.count(": ok") == 2
    bad = _hekitrace("config", "validate", str(FIXTURES / "misspelt_key.yaml"))
    assert bad.returncode == 3
    assert "misspelt_key.yaml:4: abi.mbce: unknown key; did you mean 'mbec'?" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_config_show_prints_a_valid_config(tmp_path):
    shown = _hekitrace("config", "show", "--config", str(FIXTURES / "custom_profile.yaml"))
    assert shown.returncode == 0, shown.stderr
    out = tmp_path / "shown.yaml"
    out.write_text(shown.stdout)
    assert load_config(str(out)) == load_config(str(FIXTURES / "custom_profile.yaml"))
