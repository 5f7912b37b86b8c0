"""The hook table: every kernel hook hekitrace attaches, written once.

One row per hook: its name (the key of ``hooks:`` in the config, of ``hook_status`` and of
the daemon's status), what it watches in the kernel, the ring(s) its records go to
(bpf/*.c), whether it is required when the config says nothing, and the attach methods
in the order they are tried, each with the BPF programs it attaches. The capture engine
attaches from this table; the daemon and ``check`` read names and defaults from it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the kernel function the ``attr_applied`` hook watches (fentry, else kprobe)
ATTR_FUNCTION = "kvm_arch_post_set_memory_attributes"


@dataclass(frozen=True)
class Method:
    """One way to attach a hook: ``kind`` (raw_tracepoint, tracepoint, fentry, kprobe)
    and its (attach point, BPF function) pairs, attached in order. fentry has no pair:
    bcc attaches a ``KFUNC_PROBE`` while compiling (bpf/attr.c)."""

    kind: str
    programs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hook:
    """One kernel hook (see the module docstring)."""

    name: str
    watches: str
    rings: tuple[str, ...]
    required: bool
    methods: tuple[Method, ...]


HOOKS: tuple[Hook, ...] = (
    # Heki hypercalls (and LOCK_CR_UPDATE, MAP_GPA_RANGE) to control, the rest to telemetry
    Hook("hypercall", "kvm:kvm_hypercall", ("control", "telemetry"), True, (
        Method("raw_tracepoint", (("kvm_hypercall", "hk_hypercall_raw"),)),
        Method("tracepoint", (("kvm:kvm_hypercall", "hk_hypercall_tp"),)))),
    Hook("attr_applied", ATTR_FUNCTION, ("control",), False, (
        Method("fentry"),
        Method("kprobe", ((ATTR_FUNCTION, "hk_attr_kprobe"),)))),
    Hook("ioctl", "syscalls:sys_enter_ioctl/sys_exit_ioctl", ("control",), True, (
        Method("tracepoint", (("syscalls:sys_enter_ioctl", "hk_ioctl_enter"),
                              ("syscalls:sys_exit_ioctl", "hk_ioctl_exit"))),)),
    Hook("page_fault", "kvm:kvm_page_fault", ("telemetry",), False, (
        Method("raw_tracepoint", (("kvm_page_fault", "hk_fault_raw"),)),
        Method("tracepoint", (("kvm:kvm_page_fault", "hk_fault_tp"),)))),
    Hook("cr", "kvm:kvm_cr", ("telemetry",), False, (
        Method("raw_tracepoint", (("kvm_cr", "hk_cr_raw"),)),
        Method("tracepoint", (("kvm:kvm_cr", "hk_cr_tp"),)))),
)
#: hook names in table order
NAMES: tuple[str, ...] = tuple(h.name for h in HOOKS)
BY_NAME: dict[str, Hook] = {h.name: h for h in HOOKS}
#: hook name -> required when the config does not say (``hooks.<name>`` unset)
DEFAULT_REQUIRED: dict[str, bool] = {h.name: h.required for h in HOOKS}
