"""The hekitrace configuration: one YAML file, validated, as frozen dataclasses.

Why so strict: an operator who misspells ``protect_memroy`` must not get a daemon that
silently decodes the wrong hypercall. Every key is known, every value typed and bounded,
and every error names the file, the line and the key, says what was expected, and suggests
the closest known key ("did you mean ..."). Line numbers come from PyYAML's node tree
(``compose``), so every mapping key keeps its mark.

``configs/hekitrace.yaml`` is the commented default and the documentation of every key;
``docs/config.md`` explains the rules. Sections and keys are fixed by docs/internals.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from hekitrace.config import abi, limits, tls
from hekitrace.config import schema as yamlschema
from hekitrace.config.abi import AbiProfile
from hekitrace.config.metrics_endpoint import MetricsConfig
from hekitrace.config.schema import (
    FrozenMap,
    NodeWalker,
    absolute_path,
    apply_override,
    compose,
    describe,
    non_negative,
    one_of,
    plain,
    positive,
    setting,
    subsection,
    suggestion,
)
from hekitrace.errors import ConfigError
from hekitrace.policy.catalogue import DEFAULT_SEVERITY, RULE_IDS, SEVERITIES

#: where the daemon and ``check`` look when no ``--config`` is given
DEFAULT_CONFIG_PATH = "/etc/hekitrace/hekitrace.yaml"

#: sha256 of zero bytes: the digest of the built-in defaults (an empty file gives them too)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
PROFILES = tuple(abi.BUILTIN_PROFILES) + ("custom",)
HOOK_NEEDS = ("required", "optional", "disabled")


# ---------------------------------------------------------------------------------------
# value checks: each returns None when fine, else what was expected

def power_of_two_pages(v: Any) -> str | None:
    # BPF_MAP_TYPE_RINGBUF: max_entries must be a power of 2 and a multiple of the page
    # size (kernel/bpf/ringbuf.c ringbuf_map_alloc)
    if v >= 4096 and v & (v - 1) == 0:
        return None
    return "a power of two >= 4096 (a BPF ring buffer size)"


def permission_bits(v: Any) -> str | None:
    return None if 0 <= v <= 0o777 else "permission bits 0000-0777 (octal, e.g. 0600)"


def bit_position(v: Any) -> str | None:
    return None if 0 <= v <= 63 else "a bit position 0-63"


def hypercall_number(v: Any) -> str | None:
    return None if 0 <= v < 2**32 else "a hypercall number 0-4294967295"


# ---------------------------------------------------------------------------------------
# sections (keys exactly as docs/internals.md "Config")

@dataclass(frozen=True)
class Hypercalls:
    """Hypercall numbers; None means "as the profile says" (custom: not decoded)."""
    lock_cr_update: int | None = setting(None, int, hypercall_number, True)
    protect_memory: int | None = setting(None, int, hypercall_number, True)
    lock_mem_page_ranges: int | None = setting(None, int, hypercall_number, True)
    map_gpa_range: int | None = setting(None, int, hypercall_number, True)


@dataclass(frozen=True)
class GuestBits:
    """Bit positions of the guest's MEM_ATTR_* permissions; None = the profile's."""
    read: int | None = setting(None, int, bit_position, True)
    write: int | None = setting(None, int, bit_position, True)
    exec: int | None = setting(None, int, bit_position, True)
    immutable: int | None = setting(None, int, bit_position, True)


@dataclass(frozen=True)
class KvmBits:
    """Bit positions of KVM's memory attributes (HEKI_*, PRIVATE); None = the profile's."""
    private: int | None = setting(None, int, bit_position, True)
    read: int | None = setting(None, int, bit_position, True)
    write: int | None = setting(None, int, bit_position, True)
    exec: int | None = setting(None, int, bit_position, True)
    immutable: int | None = setting(None, int, bit_position, True)


@dataclass(frozen=True)
class AbiConfig:
    profile: str = setting("heki-v2", str, one_of(*PROFILES))
    hypercalls: Hypercalls = subsection(Hypercalls)
    guest_bits: GuestBits = subsection(GuestBits)
    kvm_bits: KvmBits = subsection(KvmBits)
    mbec: bool = setting(False, bool)


@dataclass(frozen=True)
class HooksConfig:
    """required: the daemon is not ready without it; optional: attached when possible,
    reported when not; disabled: never attached (e.g. to save the cost of fault events)."""
    hypercall: str = setting("required", str, one_of(*HOOK_NEEDS))
    attr_applied: str = setting("optional", str, one_of(*HOOK_NEEDS))
    ioctl: str = setting("required", str, one_of(*HOOK_NEEDS))
    page_fault: str = setting("optional", str, one_of(*HOOK_NEEDS))
    cr: str = setting("optional", str, one_of(*HOOK_NEEDS))


@dataclass(frozen=True)
class CaptureConfig:
    max_list_pages: int = setting(16, int, positive)
    control_ring_bytes: int = setting(4194304, int, power_of_two_pages)
    telemetry_ring_bytes: int = setting(4194304, int, power_of_two_pages)
    fault_report_interval_seconds: float = setting(1.0, float, positive)
    vendor: str = setting("auto", str, one_of("auto", "intel", "amd"))
    queue_events: int = setting(65536, int, positive)


@dataclass(frozen=True)
class StateConfig:
    grace_period_seconds: float = setting(300.0, float, non_negative)
    max_entries_per_request: int = setting(4096, int, positive)


@dataclass(frozen=True)
class RateLimit:
    findings: int = setting(100, int, positive)
    per_seconds: float = setting(60.0, float, positive)


@dataclass(frozen=True)
class RuleConfig:
    enabled: bool = setting(True, bool)
    severity: str = setting("critical", str, one_of(*SEVERITIES))


@dataclass(frozen=True)
class VmSelector:
    """Which VMs an exception covers: shell globs on the name and/or the UUID."""
    name: str | None = setting(None, str, None, True)
    uuid: str | None = setting(None, str, None, True)


@dataclass(frozen=True)
class PolicyException:
    """Rules (ids) that do not fire for the VMs the selector matches."""
    rules: tuple[str, ...] = ()
    vms: VmSelector = field(default_factory=VmSelector)


def _default_rules() -> Mapping[str, RuleConfig]:
    return FrozenMap({rule: RuleConfig(True, DEFAULT_SEVERITY[rule]) for rule in RULE_IDS})


@dataclass(frozen=True)
class PolicyConfig:
    pairing_window_seconds: float = setting(2.0, float, positive)
    dedup_window_seconds: float = setting(60.0, float, positive)
    rate_limit: RateLimit = subsection(RateLimit)
    #: every rule id -> its effective setting (defaults filled in)
    rules: Mapping[str, RuleConfig] = field(default_factory=_default_rules,
                                            metadata={"kind": "rules"})
    exceptions: tuple[PolicyException, ...] = field(default=(),
                                                    metadata={"kind": "exceptions"})


@dataclass(frozen=True)
class AlertsConfig:
    stdout: bool = setting(True, bool)
    format: str = setting("json", str, one_of("json", "text"))
    file: str | None = setting(None, str, absolute_path, True)
    #: mode of the alert file when hekitrace creates it (findings name VMs)
    file_mode: int = setting(0o600, int, permission_bits)


@dataclass(frozen=True)
class ControlConfig:
    socket: str = setting("/run/hekitrace/control.sock", str, absolute_path)


@dataclass(frozen=True)
class JournalConfig:
    enabled: bool = setting(True, bool)
    directory: str = setting("/var/lib/hekitrace", str, absolute_path)
    segment_bytes: int = setting(67108864, int, positive)
    fsync_interval_seconds: float = setting(1.0, float, positive)
    checkpoint_interval_seconds: float = setting(300.0, float, positive)
    retention_seconds: float = setting(2592000.0, float, positive)
    max_bytes: int = setting(1073741824, int, positive)
    #: modes of the segments and checkpoints, and of the directories, hekitrace creates
    #: (VM names, pids and memory maps: owner only unless said otherwise)
    file_mode: int = setting(0o600, int, permission_bits)
    directory_mode: int = setting(0o700, int, permission_bits)


@dataclass(frozen=True)
class DaemonConfig:
    status_interval_seconds: float = setting(60.0, float, positive)
    watchdog: bool = setting(True, bool)


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``path`` is where it came from (None: built-in defaults);
    ``sha256`` is the hex digest of the file's bytes (of the empty text for defaults, which
    an empty file also yields), exported as ``hekitrace_config_info{sha256}``."""
    abi: AbiConfig = subsection(AbiConfig)
    hooks: HooksConfig = subsection(HooksConfig)
    capture: CaptureConfig = subsection(CaptureConfig)
    state: StateConfig = subsection(StateConfig)
    policy: PolicyConfig = subsection(PolicyConfig)
    alerts: AlertsConfig = subsection(AlertsConfig)
    metrics: MetricsConfig = subsection(MetricsConfig)
    control: ControlConfig = subsection(ControlConfig)
    journal: JournalConfig = subsection(JournalConfig)
    daemon: DaemonConfig = subsection(DaemonConfig)
    path: str | None = field(default=None, compare=False, metadata={"internal": True})
    sha256: str = field(default=EMPTY_SHA256, compare=False,
                        metadata={"internal": True})

    @property
    def digest_label(self) -> str:
        """What ``hekitrace_config_info{sha256}`` and ``status`` show: the file's digest,
        or ``defaults`` when no file is in force (an empty file has the same digest as
        the defaults, but it is a file the operator chose)."""
        return self.sha256 if self.path is not None else "defaults"

    def abi_profile(self) -> AbiProfile:
        """The effective ABI profile: the named built-in one with any numbers or bits
        given in ``abi`` replacing its own (then named ``custom``)."""
        return _build_profile(self.abi)

    def hook_required(self, key: str) -> bool:
        """Whether hook ``key`` (a field of ``hooks``) is required."""
        return getattr(self.hooks, key) == "required"

    def to_dict(self) -> dict:
        """The effective configuration as plain data (``config show``)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("internal"):
                out[f.name] = plain(getattr(self, f.name))
        return out


def default_config() -> Config:
    """The built-in defaults (what an empty or absent config file gives)."""
    return Config()


def load_config(path: str) -> Config:
    """Read and validate ``path``; ConfigError names the file when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limits.MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read the file: {error.strerror}", path=path) from None
    if len(data) > limits.MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {limits.MAX_CONFIG_BYTES} bytes: not a configuration "
                          "file (the full example is under 8 KiB)", path=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text (byte {error.start})", path=path) from None
    return parse_config(text, path)


def resolve_config(path: str | None) -> Config:
    """``--config PATH`` if given, else DEFAULT_CONFIG_PATH if it exists, else defaults."""
    if path is not None:
        return load_config(path)
    try:
        return load_config(DEFAULT_CONFIG_PATH)
    except ConfigError as error:
        if error.line is None and not os.path.exists(DEFAULT_CONFIG_PATH):
            return default_config()
        raise


def parse_config(text: str, path: str = "<config>",
                 overrides: Sequence[str] = ()) -> Config:
    """Validate YAML ``text`` (``path`` only names it in errors).

    ``overrides`` are ``key.path=value`` strings (``-O policy.rules.wx_request.severity=
    warning``) applied on top of the file, the value parsed as YAML; errors in them name
    ``-O`` instead of a line.
    """
    root = compose(text, path, max_depth=limits.MAX_YAML_DEPTH)
    for override in overrides:
        root = apply_override(root, override, limits.MAX_YAML_DEPTH)
    walker = _ConfigWalker(path)
    config = walker.section(root, Config, "")
    config = dataclasses.replace(config, path=path,
                                 sha256=hashlib.sha256(text.encode()).hexdigest())
    walker.cross_checks(config, root)
    return config


class _ConfigWalker(NodeWalker):
    """NodeWalker plus the schema's own kinds (rule settings, exceptions) and the
    cross-field checks."""

    def value(self, node: yaml.Node, f: dataclasses.Field, key: str) -> Any:
        kind = f.metadata.get("kind")
        if kind == "rules":
            return self.rules(node, key)
        if kind == "exceptions":
            return self.exceptions(node, key)
        bound = limits.SETTING_BOUNDS.get(key)
        try:
            value = super().value(node, f, key)
        except ConfigError as error:
            if bound is None or not error.reason.startswith("expected "):
                raise
            # a wrong type of a bounded key: say the range too ("1e33" is a string in YAML)
            raise self.fail(node, key, f"{error.reason}; allowed: "
                                       f"{bound.describe()}") from None
        if bound is not None and value is not None:
            problem = bound.problem(value)
            if problem:
                raise self.fail(node, key, f"expected {problem}, got {value!r}")
        return value

    def rules(self, node: yaml.Node, key: str) -> Mapping[str, RuleConfig]:
        rules = dict(_default_rules())
        for name, (_, value_node) in self.mapping(node, key, RULE_IDS).items():
            full = f"{key}.{name}"
            fields = {f.name: f for f in dataclasses.fields(RuleConfig)}
            given = self.mapping(value_node, full, list(fields))
            current = rules[name]
            for fname, (_, vnode) in given.items():
                current = dataclasses.replace(
                    current, **{fname: self.value(vnode, fields[fname], f"{full}.{fname}")})
            rules[name] = current
        return FrozenMap(rules)

    def exceptions(self, node: yaml.Node, key: str) -> tuple[PolicyException, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, f"expected a list of exceptions, got {describe(node)}")
        out = []
        for index, item in enumerate(node.value):
            full = f"{key}[{index}]"
            given = self.mapping(item, full, ["rules", "vms"])
            if "rules" not in given or "vms" not in given:
                raise self.fail(item, full, "expected both 'rules' (a list of rule ids) "
                                            "and 'vms' (a selector)")
            rules_node = given["rules"][1]
            if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
                raise self.fail(rules_node, f"{full}.rules",
                                f"expected a non-empty list of rule ids, got "
                                f"{describe(rules_node)}")
            rules = []
            for rnode in rules_node.value:
                rule = self.scalar(rnode, f"{full}.rules", str, None, False)
                if rule not in RULE_IDS:
                    raise self.fail(rnode, f"{full}.rules", f"unknown rule id {rule!r}"
                                                            f"{suggestion(rule, RULE_IDS)}")
                rules.append(rule)
            vms_node = given["vms"][1]
            selector = self.section(vms_node, VmSelector, f"{full}.vms")
            if selector.name is None and selector.uuid is None:
                raise self.fail(vms_node, f"{full}.vms",
                                "expected a selector with 'name' and/or 'uuid' globs")
            for fname in ("name", "uuid"):
                glob = getattr(selector, fname)
                if glob is not None and not glob:
                    raise self.fail(vms_node, f"{full}.vms.{fname}", "expected a non-empty glob")
            if selector.uuid is not None and not any(c in selector.uuid for c in "*?["):
                try:
                    uuid.UUID(selector.uuid)
                except ValueError:
                    raise self.fail(vms_node, f"{full}.vms.uuid",
                                    f"expected a UUID or a glob, got {selector.uuid!r}") from None
            out.append(PolicyException(tuple(rules), selector))
        return tuple(out)

    def cross_checks(self, config: Config, root: yaml.Node) -> None:
        """Impossible combinations: checked on the effective profile, blamed on a key."""
        def locate(*keys: str) -> tuple[yaml.Node | None, str]:
            return yamlschema.locate(root, *keys), ".".join(keys)

        cfg = config.abi
        if cfg.profile == "custom":
            hc = cfg.hypercalls
            if hc.lock_cr_update is None and hc.protect_memory is None \
                    and hc.lock_mem_page_ranges is None:
                node, _ = locate("abi", "profile")
                raise self.fail(node, "abi.hypercalls",
                                "the custom profile needs at least one Heki hypercall "
                                "number (lock_cr_update, protect_memory or "
                                "lock_mem_page_ranges)")
        profile = _build_profile(cfg)
        for group, pairs in (
                ("hypercalls", list(profile.hypercall_numbers().items())),
                ("guest_bits", [("read", profile.guest_read), ("write", profile.guest_write),
                                ("exec", profile.guest_exec),
                                ("immutable", profile.guest_immutable)]),
                ("kvm_bits", [("private", profile.kvm_private), ("read", profile.kvm_read),
                              ("write", profile.kvm_write), ("exec", profile.kvm_exec),
                              ("immutable", profile.kvm_immutable)])):
            seen: dict[int, str] = {}
            for name, number in pairs:
                if number in seen:
                    node, _ = locate("abi", group, name)
                    other = seen[number]
                    if node is None:
                        node, _ = locate("abi", group, other)
                    what = "hypercall number" if group == "hypercalls" else "bit"
                    raise self.fail(node, f"abi.{group}.{name}",
                                    f"{what} {number} is already {other} in the effective "
                                    f"profile ({profile.name}); each needs its own")
                seen[number] = name
        if config.journal.max_bytes < config.journal.segment_bytes:
            node, _ = locate("journal", "max_bytes")
            raise self.fail(node, "journal.max_bytes",
                            f"expected at least segment_bytes "
                            f"({config.journal.segment_bytes}), got {config.journal.max_bytes}")
        self.check_tls(config, root)

    def check_tls(self, config: Config, root: yaml.Node) -> None:
        """``metrics.tls``: a workable combination of keys, and files that load."""
        settings = config.metrics.tls
        problem = settings.problem()
        if problem is not None:
            key = f"metrics.tls.{problem[0]}"
            node = yamlschema.locate(root, *key.split(".")) or \
                yamlschema.locate(root, "metrics", "tls")
            raise self.fail(node, key, f"expected {problem[1]}")
        if settings.enabled:
            try:
                tls.server_context(settings)
            except ConfigError as error:
                key = error.key or "metrics.tls"
                raise self.fail(yamlschema.locate(root, *key.split(".")), key,
                                error.reason) from None


def _build_profile(cfg: AbiConfig) -> AbiProfile:
    if cfg.profile == "custom":
        base = AbiProfile(name="custom", lock_cr_update=None, protect_memory=None)
    else:
        base = abi.BUILTIN_PROFILES[cfg.profile]
    changes: dict[str, Any] = {}
    for name in ("lock_cr_update", "protect_memory", "lock_mem_page_ranges",
                 "map_gpa_range"):
        value = getattr(cfg.hypercalls, name)
        if value is not None and value != getattr(base, name):
            changes[name] = value
    for prefix, bits in (("guest_", cfg.guest_bits), ("kvm_", cfg.kvm_bits)):
        for f in dataclasses.fields(bits):
            value = getattr(bits, f.name)
            if value is not None and value != getattr(base, prefix + f.name):
                changes[prefix + f.name] = value
    if cfg.mbec != base.mbec:
        changes["mbec"] = cfg.mbec
    if changes and base.name != "custom" and set(changes) != {"mbec"}:
        changes["name"] = "custom"
    return dataclasses.replace(base, **changes) if changes else base
