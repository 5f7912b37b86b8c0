"""Feature probing: which hooks exist on the running kernel and how each would attach.

Why probe instead of reading version numbers: the facts that matter vary
independently of the release. On the build host a 6.18 kernel has the kvm tracepoints but
no kprobes (CONFIG_KPROBES unset), refuses fentry with EPERM even as root although bcc's
``support_kfunc()`` says yes, and lacks ``kvm_arch_post_set_memory_attributes``
(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES unset). So for every hook (docs/internals.md, Hooks) this
module compiles tiny do-nothing programs (``bpf/probe_*.c``), loads and attaches them by
each method in preference order, records what happened, and detaches.

The result objects are plain frozen dataclasses, so ``hekitrace check`` prints them and the
daemon's loader can reuse ``HookReport.method`` as its attach choice.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hekitrace.capture.btf import KernelBtf
from hekitrace.capture.hooks import ATTR_FUNCTION
from hekitrace.capture.hostenv import (
    BTF_VMLINUX,
    TRACEFS,
    Headers,
    Privileges,
    Tracefs,
    captured_stderr,
    ensure_tracefs,
    errno_text,
    find_headers,
    kallsyms_has,
    read_bpf_stats,
    read_lockdown,
    read_privileges,
)
from hekitrace.capture.loader import ATTR_ABSENT, BPF_DIR_ENV, attr_hook_blocker, bpf_dir
from hekitrace.config.settings import Config

#: the KVM misc device in sysfs: its uevents announce VM creation and destruction
#: (virt/kvm/kvm_main.c kvm_uevent_notify_change)
KVM_MISC_DEVICE = "/sys/devices/virtual/misc/kvm"
#: kprobes need the kprobe PMU (perf_event_open) or tracefs kprobe_events; both are
#: missing when CONFIG_KPROBES is unset
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
#: functions that stand in for an absent kernel function when probing fentry and kprobe
#: support itself: kvm_vm_ioctl lives where KVM lives (vmlinux or kvm.ko, so module-BTF
#: limits show too); vfs_read exists on every kernel
STAND_IN_FUNCTIONS = ("kvm_vm_ioctl", "vfs_read")


@dataclass(frozen=True)
class MethodResult:
    """One attach method tried at one hook. ``target`` is what was attached to
    (``stand_in`` when the hook's own function is absent and another one was used to
    learn whether the method works at all)."""
    method: str
    target: str
    attachable: bool
    reason: str | None = None
    stand_in: bool = False


@dataclass(frozen=True)
class HookReport:
    """Whether hook ``hook`` (named as in docs/internals.md, Hooks; ``key`` is its
    ``hooks:`` config key, None for the unconfigurable uevents) exists here and by which
    method it attaches.

    ``method`` is the first attachable method in preference order, None when none is;
    ``reason`` says why the hook is unusable (None when attachable).
    """
    hook: str
    key: str | None
    required: bool
    exists: bool
    attachable: bool
    method: str | None
    reason: str | None
    methods: tuple[MethodResult, ...] = ()
    need: str = "optional"       # the config setting: required | optional | disabled


@dataclass(frozen=True)
class Bcc:
    importable: bool
    version: str | None
    compiles: bool
    compile_seconds: float | None
    error: str | None


@dataclass(frozen=True)
class EnvironmentReport:
    kernel_release: str
    privileges: Privileges
    btf_vmlinux: bool
    lockdown: str | None
    tracefs: Tracefs
    bcc: Bcc
    headers: Headers
    bpf_stats_enabled: bool | None
    hooks: tuple[HookReport, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every required hook can attach (``hekitrace check`` exit 0)."""
        return all(h.attachable for h in self.hooks if h.required)

    def hook(self, key_or_name: str) -> HookReport:
        for h in self.hooks:
            if key_or_name in (h.key, h.hook):
                return h
        raise KeyError(key_or_name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form documented in docs/check.md."""
        data = asdict(self)
        data["privileges"]["cap_eff"] = f"{self.privileges.cap_eff:#x}"
        data["privileges"]["can_bpf"] = self.privileges.can_bpf
        data["ok"] = self.ok
        return data


# ---------------------------------------------------------------------------------------
# hooks

@dataclass(frozen=True)
class _HookSpec:
    hook: str
    key: str | None
    kind: str                       # tracepoint | syscall | function | uevent
    tracepoints: tuple[str, ...] = ()


HOOK_SPECS = (
    _HookSpec("kvm:kvm_hypercall", "hypercall", "tracepoint", ("kvm:kvm_hypercall",)),
    _HookSpec(ATTR_FUNCTION, "attr_applied", "function"),
    _HookSpec("syscalls:sys_enter_ioctl/sys_exit_ioctl", "ioctl", "syscall",
              ("syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl")),
    _HookSpec("kvm:kvm_page_fault", "page_fault", "tracepoint", ("kvm:kvm_page_fault",)),
    _HookSpec("kvm:kvm_cr", "cr", "tracepoint", ("kvm:kvm_cr",)),
    _HookSpec("KVM uevents", None, "uevent"),
)


class _Prober:
    """Holds one compiled probe module and tries each method; detaches everything."""

    def __init__(self, tracefs: Tracefs, bpf_module: Any, bcc_error: str | None) -> None:
        self.tracefs = tracefs
        self.bpf = bpf_module          # bcc.BPF of probe_hooks.c, or None
        self.bcc_error = bcc_error

    def tracepoint_exists(self, tp: str) -> bool | None:
        events = os.path.join(self.tracefs.path, "events")
        if not self.tracefs.mounted or not os.access(events, os.R_OK | os.X_OK):
            return None           # unknown (tracefs is root-only): the attach will tell
        category, event = tp.split(":")
        return os.path.isdir(os.path.join(self.tracefs.path, "events", category, event))

    def _attempt(self, method: str, target: str, action: Callable[[], None],
                 explain: Callable[[int, list[str]], str] | None = None,
                 stand_in: bool = False) -> MethodResult:
        if self.bpf is None:
            return MethodResult(method, target, False, f"bcc unusable: {self.bcc_error}",
                                stand_in)
        ctypes.set_errno(0)
        with captured_stderr() as lines:
            try:
                action()
                error = None
            except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
                error = exc
            err = ctypes.get_errno()
        if error is None:
            return MethodResult(method, target, True, None, stand_in)
        if explain is not None:
            reason = explain(err, lines)
        elif err:
            reason = f"attach failed: {errno_text(err)}"
        else:
            reason = f"attach failed: {error}"
        return MethodResult(method, target, False, reason, stand_in)

    def raw_tracepoint(self, name: str) -> MethodResult:
        def go() -> None:
            self.bpf.attach_raw_tracepoint(tp=name.encode(), fn_name=b"hk_probe_raw_tracepoint")
            self.bpf.detach_raw_tracepoint(tp=name.encode())
        return self._attempt("raw_tracepoint", name, go)

    def tracepoint(self, tp: str) -> MethodResult:
        def go() -> None:
            self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=b"hk_probe_tracepoint")
            self.bpf.detach_tracepoint(tp=tp.encode())
        return self._attempt("tracepoint", tp, go)

    def kprobe(self, function: str, stand_in: bool) -> MethodResult:
        def go() -> None:
            self.bpf.attach_kprobe(event=function.encode(), fn_name=b"hk_probe_kprobe")
            self.bpf.detach_kprobe(event=function.encode(), fn_name=b"hk_probe_kprobe")

        def explain(err: int, lines: list[str]) -> str:
            if not os.path.exists(KPROBE_PMU) and not (
                    self.tracefs.mounted
                    and os.path.exists(os.path.join(self.tracefs.path, "kprobe_events"))):
                return "kprobes unavailable (CONFIG_KPROBES unset?)"
            return f"attach failed: {errno_text(err) if err else 'not traceable'}"
        return self._attempt("kprobe", function, go, explain, stand_in)

    def fentry(self, function: str, stand_in: bool) -> MethodResult:
        from bcc import BPF  # only here: importing bcc is slow and may be absent

        holder: list[Any] = []

        def go() -> None:
            # bcc loads and attaches KFUNC_PROBE programs while building the module
            module = BPF(src_file=str(bpf_dir() / "probe_fentry.c").encode(),
                         cflags=[f"-DHK_PROBE_FN={function}"])
            holder.append(module)

        def explain(err: int, lines: list[str]) -> str:
            if any("not found in vmlinux BTF" in line for line in lines):
                return f"{function} is not in vmlinux BTF (module functions need module BTF)"
            if err:
                return f"refused by the kernel: {errno_text(err)}"
            return "load failed: " + (lines[-1] if lines else "unknown error")
        result = self._attempt("fentry", function, go, explain, stand_in)
        for module in holder:
            module.cleanup()
        return result

    def probe(self, spec: _HookSpec, required: bool) -> HookReport:
        methods: list[MethodResult] = []
        if spec.kind == "tracepoint":
            tp = spec.tracepoints[0]
            exists = self.tracepoint_exists(tp)
            if exists is False:
                return HookReport(spec.hook, spec.key, required, False, False, None,
                                  f"no tracepoint {tp} on this kernel")
            methods.append(self.raw_tracepoint(tp.split(":")[1]))
            methods.append(self.tracepoint(tp))
        elif spec.kind == "syscall":
            missing = [tp for tp in spec.tracepoints if self.tracepoint_exists(tp) is False]
            if missing:
                return HookReport(spec.hook, spec.key, required, False, False, None,
                                  f"no tracepoint {', '.join(missing)} on this kernel "
                                  "(CONFIG_FTRACE_SYSCALLS unset?)")
            exists = None
            for tp in spec.tracepoints:
                methods.append(self.tracepoint(tp))
            # the raw syscall tracepoints see every syscall: a costlier fallback
            for raw in ("sys_enter", "sys_exit"):
                methods.append(self.raw_tracepoint(raw))
        elif spec.kind == "function":
            return self.probe_function(spec, required)
        else:
            return self.probe_uevents(spec, required)
        return self._summarise(spec, required, exists, methods)

    def _summarise(self, spec: _HookSpec, required: bool, exists: bool | None,
                   methods: list[MethodResult]) -> HookReport:
        # a method may need several targets (ioctl: enter and exit); it is usable only if
        # all of its targets attached
        order: list[str] = []
        for m in methods:
            if m.method not in order:
                order.append(m.method)
        chosen = next((name for name in order
                       if all(m.attachable for m in methods if m.method == name)), None)
        if exists is None:
            exists = any(m.attachable for m in methods)
        reason = None
        if chosen is None:
            failures = [m for m in methods if not m.attachable]
            if len({m.reason for m in failures}) == 1:
                reason = f"cannot attach: {failures[0].reason}"
            else:
                reason = "cannot attach: " + "; ".join(
                    f"{m.method} {m.target}: {m.reason}" for m in failures)
        return HookReport(spec.hook, spec.key, required, exists, chosen is not None,
                          chosen, reason, tuple(methods))

    def probe_function(self, spec: _HookSpec, required: bool) -> HookReport:
        found = kallsyms_has((spec.hook,) + STAND_IN_FUNCTIONS)
        exists = spec.hook in found
        if exists:
            target, stand_in = spec.hook, False
        else:
            target = next((f for f in STAND_IN_FUNCTIONS if f in found), STAND_IN_FUNCTIONS[-1])
            stand_in = True
        methods = [self.fentry(target, stand_in), self.kprobe(target, stand_in)]
        if not exists:
            return HookReport(spec.hook, spec.key, required, False, False, None,
                              ATTR_ABSENT, tuple(methods))
        blocker = attr_hook_blocker(KernelBtf.load()) if spec.hook == ATTR_FUNCTION else ""
        if blocker:   # the daemon would refuse it for this reason: say the same
            return HookReport(spec.hook, spec.key, required, True, False, None,
                              f"cannot attach: {blocker}", tuple(methods))
        return self._summarise(spec, required, True, methods)

    def probe_uevents(self, spec: _HookSpec, required: bool) -> HookReport:
        exists = os.path.isdir(KVM_MISC_DEVICE)
        from pyroute2 import UeventSocket  # a dependency; imported here only to keep
        from pyroute2.netlink.exceptions import NetlinkError  # module import cheap
        try:
            sock = UeventSocket()
            try:
                sock.bind()
            finally:
                sock.close()
            result = MethodResult("uevent_socket", "NETLINK_KOBJECT_UEVENT", True)
        except (OSError, NetlinkError) as exc:
            result = MethodResult("uevent_socket", "NETLINK_KOBJECT_UEVENT", False,
                                  f"cannot open the uevent socket: {exc}")
        reason = None if result.attachable else result.reason
        if not exists:
            reason = f"no KVM device ({KVM_MISC_DEVICE}): is kvm loaded?"
        return HookReport(spec.hook, spec.key, required, exists,
                          exists and result.attachable,
                          "uevent_socket" if exists and result.attachable else None,
                          reason, (result,))


def _compile_probe_module() -> tuple[Any, Bcc]:
    """Compile bpf/probe_hooks.c once; (BPF module or None, what happened)."""
    try:
        import bcc
        from bcc import BPF
    except ImportError as exc:
        return None, Bcc(False, None, False, None,
                         f"cannot import bcc ({exc}): install python3-bpfcc "
                         "(never the PyPI 'bcc')")
    version = getattr(bcc, "__version__", None)
    source = bpf_dir() / "probe_hooks.c"
    if not source.is_file():
        return None, Bcc(True, version, False, None,
                         f"BPF sources not found ({source}): set ${BPF_DIR_ENV}")
    start = time.monotonic()
    with captured_stderr() as lines:
        try:
            module = BPF(src_file=str(source).encode())
            error = None
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception on compile failure
            module, error = None, exc
    seconds = round(time.monotonic() - start, 3)
    if module is None:
        detail = next((line for line in lines if "error" in line.lower()),
                      lines[-1] if lines else "")
        return None, Bcc(True, version, False, seconds, f"{error}: {detail}".strip(": "))
    try:
        # load the three programs now so a verifier refusal is reported once, here
        with captured_stderr():
            module.load_func(b"hk_probe_raw_tracepoint", BPF.RAW_TRACEPOINT)
            module.load_func(b"hk_probe_tracepoint", BPF.TRACEPOINT)
            module.load_func(b"hk_probe_kprobe", BPF.KPROBE)
    except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception on load failure
        module.cleanup()
        return None, Bcc(True, version, True, seconds, f"cannot load probes: {exc}")
    return module, Bcc(True, version, True, seconds, None)


def probe_environment(config: Config, may_mount: bool = True) -> EnvironmentReport:
    """Probe everything ``hekitrace check`` reports; attaches and detaches real programs.

    Needs root (CAP_BPF + CAP_PERFMON or CAP_SYS_ADMIN) for meaningful answers; without,
    every method reports the kernel's refusal. Takes about a second (two compilations).
    """
    release = os.uname().release
    privileges = read_privileges()
    tracefs = ensure_tracefs(TRACEFS, may_mount=may_mount)
    module, bcc_info = _compile_probe_module()
    prober = _Prober(tracefs, module, bcc_info.error)
    try:
        hooks = []
        for spec in HOOK_SPECS:
            need = getattr(config.hooks, spec.key) if spec.key else "optional"
            report = prober.probe(spec, need == "required")
            hooks.append(dataclasses.replace(report, need=need))
    finally:
        if module is not None:
            module.cleanup()
    return EnvironmentReport(
        kernel_release=release, privileges=privileges,
        btf_vmlinux=os.path.exists(BTF_VMLINUX), lockdown=read_lockdown(),
        tracefs=tracefs, bcc=bcc_info, headers=find_headers(release),
        bpf_stats_enabled=read_bpf_stats(), hooks=tuple(hooks))
