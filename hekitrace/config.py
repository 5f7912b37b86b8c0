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
import difflib
import hashlib
import ipaddress
import os
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from hekitrace import abi
from hekitrace.abi import AbiProfile
from hekitrace.errors import ConfigError

class FrozenMap(dict):
    """A read-only dict: the frozen config's mappings (rule settings).

    A dict subclass rather than ``types.MappingProxyType`` so that ``dataclasses.asdict``,
    ``copy.deepcopy``, pickling and hashing of a Config keep working.
    """

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the configuration is read-only")

    __setitem__ = __delitem__ = __ior__ = _readonly  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple:
        return (FrozenMap, (dict(self),))

    def __deepcopy__(self, memo: dict) -> FrozenMap:
        return self


#: where the daemon and ``check`` look when no ``--config`` is given
DEFAULT_CONFIG_PATH = "/etc/hekitrace/hekitrace.yaml"

#: every policy rule id (DESIGN.md "Findings", docs/findings.md); policy.py imports this
RULE_IDS = (
    "wx_request", "immutable_change", "immutable_relaxed", "request_not_applied",
    "applied_without_request", "protected_write", "protected_fetch", "cr_pin_violation",
    "malformed_request", "protection_unsupported", "map_degraded",
    "relax_after_lockdown", "cr_pin_cleared", "privileged_hypercall_from_user",
)
SEVERITIES = ("info", "warning", "critical")
#: default severity of each rule: critical when the guest's protection is broken or
#: attacked, warning when the evidence is indirect or the monitor itself is impaired
DEFAULT_SEVERITY = FrozenMap({
    "wx_request": "critical", "immutable_change": "critical",
    "immutable_relaxed": "critical", "request_not_applied": "warning",
    "applied_without_request": "warning", "protected_write": "critical",
    "protected_fetch": "critical", "cr_pin_violation": "critical",
    "malformed_request": "warning", "protection_unsupported": "warning",
    "map_degraded": "warning", "relax_after_lockdown": "critical",
    "cr_pin_cleared": "critical", "privileged_hypercall_from_user": "warning",
})
#: sha256 of zero bytes: the digest of the built-in defaults (an empty file gives them too)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
PROFILES = tuple(abi.BUILTIN_PROFILES) + ("custom",)
HOOK_NEEDS = ("required", "optional", "disabled")


# ---------------------------------------------------------------------------------------
# value checks: each returns None when fine, else what was expected

def positive(v: Any) -> str | None:
    return None if v > 0 else "a number greater than 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a number >= 0"


def power_of_two_pages(v: Any) -> str | None:
    # BPF_MAP_TYPE_RINGBUF: max_entries must be a power of 2 and a multiple of the page
    # size (kernel/bpf/ringbuf.c ringbuf_map_alloc)
    if v >= 4096 and v & (v - 1) == 0:
        return None
    return "a power of two >= 4096 (a BPF ring buffer size)"


def bit_position(v: Any) -> str | None:
    return None if 0 <= v <= 63 else "a bit position 0-63"


def hypercall_number(v: Any) -> str | None:
    return None if 0 <= v < 2**32 else "a hypercall number 0-4294967295"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(choices)
    return check


def absolute_path(v: Any) -> str | None:
    return None if v.startswith("/") else "an absolute path"


def listen_address(v: Any) -> str | None:
    """``IP:PORT``, ``[IPv6]:PORT``, ``localhost:PORT`` or ``:PORT`` (every address);
    port 0 asks the kernel for a free one (tests). Same forms as httpserver.parse_listen."""
    expected = ("HOST:PORT with a port 0-65535 (e.g. 127.0.0.1:9864, [::1]:9864, "
                ":9864 for every address)")
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
    else:
        host, sep, port = v.rpartition(":")
        if ":" in host:
            return "an IPv6 address in brackets, e.g. [::1]:9864"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return expected
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return "an IP address, localhost or nothing before the port"
    return None


def _opt(kind: type, check: Callable[[Any], str | None] | None = None,
         nullable: bool = False) -> dict:
    return {"kind": kind, "check": check, "nullable": nullable}


def _f(default: Any, kind: type, check: Callable[[Any], str | None] | None = None,
       nullable: bool = False) -> Any:
    return field(default=default, metadata=_opt(kind, check, nullable))


def _sub(cls: type) -> Any:
    return field(default_factory=cls, metadata={"kind": cls})


# ---------------------------------------------------------------------------------------
# sections (keys exactly as docs/internals.md "Config")

@dataclass(frozen=True)
class Hypercalls:
    """Hypercall numbers; None means "as the profile says" (custom: not decoded)."""
    lock_cr_update: int | None = _f(None, int, hypercall_number, True)
    protect_memory: int | None = _f(None, int, hypercall_number, True)
    lock_mem_page_ranges: int | None = _f(None, int, hypercall_number, True)
    map_gpa_range: int | None = _f(None, int, hypercall_number, True)


@dataclass(frozen=True)
class GuestBits:
    """Bit positions of the guest's MEM_ATTR_* permissions; None = the profile's."""
    read: int | None = _f(None, int, bit_position, True)
    write: int | None = _f(None, int, bit_position, True)
    exec: int | None = _f(None, int, bit_position, True)
    immutable: int | None = _f(None, int, bit_position, True)


@dataclass(frozen=True)
class KvmBits:
    """Bit positions of KVM's memory attributes (HEKI_*, PRIVATE); None = the profile's."""
    private: int | None = _f(None, int, bit_position, True)
    read: int | None = _f(None, int, bit_position, True)
    write: int | None = _f(None, int, bit_position, True)
    exec: int | None = _f(None, int, bit_position, True)
    immutable: int | None = _f(None, int, bit_position, True)


@dataclass(frozen=True)
class AbiConfig:
    profile: str = _f("heki-v2", str, one_of(*PROFILES))
    hypercalls: Hypercalls = _sub(Hypercalls)
    guest_bits: GuestBits = _sub(GuestBits)
    kvm_bits: KvmBits = _sub(KvmBits)
    mbec: bool = _f(False, bool)


@dataclass(frozen=True)
class HooksConfig:
    """required: the daemon is not ready without it; optional: attached when possible,
    reported when not; disabled: never attached (e.g. to save the cost of fault events)."""
    hypercall: str = _f("required", str, one_of(*HOOK_NEEDS))
    attr_applied: str = _f("optional", str, one_of(*HOOK_NEEDS))
    ioctl: str = _f("required", str, one_of(*HOOK_NEEDS))
    page_fault: str = _f("optional", str, one_of(*HOOK_NEEDS))
    cr: str = _f("optional", str, one_of(*HOOK_NEEDS))


@dataclass(frozen=True)
class CaptureConfig:
    max_list_pages: int = _f(16, int, positive)
    control_ring_bytes: int = _f(4194304, int, power_of_two_pages)
    telemetry_ring_bytes: int = _f(4194304, int, power_of_two_pages)
    fault_report_interval_seconds: float = _f(1.0, float, positive)
    vendor: str = _f("auto", str, one_of("auto", "intel", "amd"))
    queue_events: int = _f(65536, int, positive)


@dataclass(frozen=True)
class StateConfig:
    grace_period_seconds: float = _f(300.0, float, non_negative)
    max_entries_per_request: int = _f(4096, int, positive)


@dataclass(frozen=True)
class RateLimit:
    findings: int = _f(100, int, positive)
    per_seconds: float = _f(60.0, float, positive)


@dataclass(frozen=True)
class RuleConfig:
    enabled: bool = _f(True, bool)
    severity: str = _f("critical", str, one_of(*SEVERITIES))


@dataclass(frozen=True)
class VmSelector:
    """Which VMs an exception covers: shell globs on the name and/or the UUID."""
    name: str | None = _f(None, str, None, True)
    uuid: str | None = _f(None, str, None, True)


@dataclass(frozen=True)
class PolicyException:
    """Rules (ids) that do not fire for the VMs the selector matches."""
    rules: tuple[str, ...] = ()
    vms: VmSelector = field(default_factory=VmSelector)


def _default_rules() -> Mapping[str, RuleConfig]:
    return FrozenMap({rule: RuleConfig(True, DEFAULT_SEVERITY[rule]) for rule in RULE_IDS})


@dataclass(frozen=True)
class PolicyConfig:
    pairing_window_seconds: float = _f(2.0, float, positive)
    dedup_window_seconds: float = _f(60.0, float, positive)
    rate_limit: RateLimit = _sub(RateLimit)
    #: every rule id -> its effective setting (defaults filled in)
    rules: Mapping[str, RuleConfig] = field(default_factory=_default_rules,
                                            metadata={"kind": "rules"})
    exceptions: tuple[PolicyException, ...] = field(default=(),
                                                    metadata={"kind": "exceptions"})


@dataclass(frozen=True)
class AlertsConfig:
    stdout: bool = _f(True, bool)
    format: str = _f("json", str, one_of("json", "text"))
    file: str | None = _f(None, str, absolute_path, True)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = _f("127.0.0.1:9864", str, listen_address)
    vm_label: str = _f("name", str, one_of("name", "uuid", "pid"))


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _f("/run/hekitrace/control.sock", str, absolute_path)


@dataclass(frozen=True)
class JournalConfig:
    enabled: bool = _f(True, bool)
    directory: str = _f("/var/lib/hekitrace", str, absolute_path)
    segment_bytes: int = _f(67108864, int, positive)
    fsync_interval_seconds: float = _f(1.0, float, positive)
    checkpoint_interval_seconds: float = _f(300.0, float, positive)
    retention_seconds: float = _f(2592000.0, float, positive)
    max_bytes: int = _f(1073741824, int, positive)


@dataclass(frozen=True)
class DaemonConfig:
    status_interval_seconds: float = _f(60.0, float, positive)
    watchdog: bool = _f(True, bool)


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``path`` is where it came from (None: built-in defaults);
    ``sha256`` is the hex digest of the file's bytes (of the empty text for defaults, which
    an empty file also yields), exported as ``hekitrace_config_info{sha256}``."""
    abi: AbiConfig = _sub(AbiConfig)
    hooks: HooksConfig = _sub(HooksConfig)
    capture: CaptureConfig = _sub(CaptureConfig)
    state: StateConfig = _sub(StateConfig)
    policy: PolicyConfig = _sub(PolicyConfig)
    alerts: AlertsConfig = _sub(AlertsConfig)
    metrics: MetricsConfig = _sub(MetricsConfig)
    control: ControlConfig = _sub(ControlConfig)
    journal: JournalConfig = _sub(JournalConfig)
    daemon: DaemonConfig = _sub(DaemonConfig)
    path: str | None = field(default=None, compare=False, metadata={"internal": True})
    sha256: str = field(default=EMPTY_SHA256, compare=False,
                        metadata={"internal": True})

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
                out[f.name] = _plain(getattr(self, f.name))
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def default_config() -> Config:
    """The built-in defaults (what an empty or absent config file gives)."""
    return Config()


def load_config(path: str) -> Config:
    """Read and validate ``path``; ConfigError names the file when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as error:
        raise ConfigError(f"cannot read the file: {error.strerror}", path=path) from None
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
    try:
        # the constructor already scans for non-printable characters (ReaderError)
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}", path=path) from None
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(f"not valid YAML: {error.problem or error.context}",
                          path=path, line=line) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}", path=path) from None
    finally:
        loader.dispose()
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
    for override in overrides:
        root = _apply_override(root, override)
    walker = _Walker(path)
    config = walker.section(root, Config, "")
    config = dataclasses.replace(config, path=path,
                                 sha256=hashlib.sha256(text.encode()).hexdigest())
    walker.cross_checks(config, root)
    return config


def _apply_override(root: yaml.Node, override: str) -> yaml.Node:
    keypath, sep, value = override.partition("=")
    if not sep or not keypath:
        raise ConfigError(f"-O {override!r}: expected KEY.PATH=VALUE")
    try:
        value_node = yaml.compose(value or "null", Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        raise ConfigError(f"-O {override!r}: the value is not valid YAML") from None
    # errors in what the override brought name the override, not a line of the file
    stack = [value_node] if value_node is not None else []
    while stack:
        item = stack.pop()
        item.start_mark = None
        item.hk_override = override  # type: ignore[attr-defined]
        if isinstance(item, yaml.MappingNode):
            stack.extend(n for pair in item.value for n in pair)
        elif isinstance(item, yaml.SequenceNode):
            stack.extend(item.value)
    node = root
    parts = keypath.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"-O {override!r}: {'.'.join(parts[:i])} is not a mapping")
        for key_node, child in node.value:
            if key_node.value == part:
                if i == len(parts) - 1:
                    node.value.remove((key_node, child))
                    break
                node = child
                break
        else:
            if i < len(parts) - 1:
                child = yaml.MappingNode("tag:yaml.org,2002:map", [])
                node.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", part), child))
                node = child
                continue
        if i == len(parts) - 1:
            key = yaml.ScalarNode("tag:yaml.org,2002:str", part)
            key.hk_override = override  # type: ignore[attr-defined]
            node.value.append((key, value_node))
    return root


class _Walker:
    """Turns a YAML node tree into dataclasses, raising ConfigError at the first problem."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, key: str, message: str) -> ConfigError:
        origin = getattr(node, "hk_override", None)
        if origin is not None:
            return ConfigError(f"{message} (from -O {origin})", path=self.path, key=key or None)
        line = node.start_mark.line + 1 if node is not None and node.start_mark else None
        return ConfigError(message, path=self.path, line=line, key=key or None)

    def mapping(self, node: yaml.Node, key: str, known: Sequence[str]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, f"expected a mapping, got {_describe(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or key_node.tag != "tag:yaml.org,2002:str":
                raise self.fail(key_node, key, f"keys must be names, got {_describe(key_node)}")
            if name in out:
                first = out[name][0].start_mark.line + 1
                raise self.fail(key_node, full, f"duplicate key (first set on line {first})")
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                choices = ", ".join(known)
                raise self.fail(key_node, full,
                                f"unknown key{suggestion} (known here: {choices})")
            out[name] = (key_node, value_node)
        return out

    def section(self, node: yaml.Node, cls: type, key: str) -> Any:
        fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
        given = self.mapping(node, key, [f.name for f in fields])
        values = {}
        for f in fields:
            if f.name not in given:
                continue
            _, value_node = given[f.name]
            full = f"{key}.{f.name}" if key else f.name
            values[f.name] = self.value(value_node, f, full)
        return cls(**values)

    def value(self, node: yaml.Node, f: dataclasses.Field, key: str) -> Any:
        kind = f.metadata.get("kind")
        if kind == "rules":
            return self.rules(node, key)
        if kind == "exceptions":
            return self.exceptions(node, key)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            return self.section(node, kind, key)
        return self.scalar(node, key, kind, f.metadata.get("check"),
                           f.metadata.get("nullable", False))

    def scalar(self, node: yaml.Node, key: str, kind: Any,
               check: Callable[[Any], str | None] | None, nullable: bool) -> Any:
        expected = {int: "an integer", float: "a number", bool: "true or false",
                    str: "a string"}[kind]
        if nullable:
            expected += " or null"
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"expected {expected}, got {_describe(node)}")
        try:
            value = yaml.SafeLoader("").construct_object(node)
        except yaml.YAMLError:
            raise self.fail(node, key, f"expected {expected}, got a value with the YAML "
                                       f"tag {node.tag!r}") from None
        if value is None and nullable:
            return None
        ok = (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
              or (kind is float and isinstance(value, int) and not isinstance(value, bool)))
        if not ok:
            raise self.fail(node, key, f"expected {expected}, got {_describe(node)}")
        if kind is float:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise self.fail(node, key, "expected a finite number")
        if check is not None:
            problem = check(value)
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
            raise self.fail(node, key, f"expected a list of exceptions, got {_describe(node)}")
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
                                f"{_describe(rules_node)}")
            rules = []
            for rnode in rules_node.value:
                rule = self.scalar(rnode, f"{full}.rules", str, None, False)
                if rule not in RULE_IDS:
                    hint = difflib.get_close_matches(rule, RULE_IDS, n=1, cutoff=0.6)
                    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                    raise self.fail(rnode, f"{full}.rules",
                                    f"unknown rule id {rule!r}{suggestion}")
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
            node: yaml.Node | None = root
            for k in keys:
                if not isinstance(node, yaml.MappingNode):
                    return None, ".".join(keys)
                match = [kn for kn, vn in node.value if kn.value == k]
                if not match:
                    return None, ".".join(keys)
                node = dict((kn.value, vn) for kn, vn in node.value)[k]
                last = match[0]
            return last, ".".join(keys)

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


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    names = {"int": "an integer", "float": "a number", "bool": "a boolean",
             "null": "null", "str": "a string"}
    return f"{names.get(tag, tag)} {node.value!r}"


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
