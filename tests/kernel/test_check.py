"""``hekitrace check`` on the real kernel, run as a real process.

The facts asserted are those of the build host (docs/kernel-support.md): the kvm and
ioctl tracepoints attach as raw tracepoints and tracepoints, the memory-attribute function
is absent, kprobes are unavailable and fentry is refused with EPERM. Where a fact is a
property of a kernel rather than of hekitrace (kprobes, fentry, the function), it is
asserted for this kernel only when the kernel shows the same property by other means
(/proc/kallsyms, the kprobe PMU), so the test stays true on a real hypervisor host while
pinning this machine exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hekitrace.capture import hostenv, probe

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "hekitrace"
TRACEPOINT_HOOKS = ("kvm:kvm_hypercall", "kvm:kvm_page_fault", "kvm:kvm_cr")


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "check", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd=ROOT)


@pytest.fixture(scope="module")
def report() -> dict:
    if os.geteuid() != 0:
        pytest.skip("needs root: check loads BPF programs")
    result = _check("-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _hook(report: dict, name: str) -> dict:
    return next(h for h in report["hooks"] if h["hook"] == name or h["key"] == name)


def _kallsyms(name: str) -> bool:
    return bool(hostenv.kallsyms_has((name,)))


def test_environment_facts(report):
    assert report["kernel_release"] == os.uname().release
    assert report["privileges"]["euid"] == 0 and report["privileges"]["can_bpf"]
    assert report["btf_vmlinux"] is os.path.exists("/sys/kernel/btf/vmlinux")
    assert report["tracefs"]["mounted"] is True
    assert report["bcc"]["importable"] and report["bcc"]["compiles"]
    assert report["headers"]["source"] in ("matching", "fallback")
    with open("/proc/sys/kernel/bpf_stats_enabled") as fh:
        assert report["bpf_stats_enabled"] is (fh.read().strip() == "1")
    assert report["ok"] is True
    assert report["config"]["sha256"]


@pytest.mark.parametrize("name", TRACEPOINT_HOOKS)
def test_kvm_tracepoints_attach_both_ways(report, name):
    hook = _hook(report, name)
    assert hook["exists"] and hook["attachable"]
    assert hook["method"] == "raw_tracepoint"          # first in preference order
    methods = {m["method"]: m for m in hook["methods"]}
    assert methods["raw_tracepoint"]["attachable"] is True
    assert methods["raw_tracepoint"]["target"] == name.split(":")[1]
    assert methods["tracepoint"]["attachable"] is True
    assert methods["tracepoint"]["target"] == name


def test_ioctl_tracepoints_attach(report):
    hook = _hook(report, "ioctl")
    assert hook["required"] and hook["attachable"] and hook["method"] == "tracepoint"
    targets = {(m["method"], m["target"]): m["attachable"] for m in hook["methods"]}
    assert targets[("tracepoint", "syscalls:sys_enter_ioctl")] is True
    assert targets[("tracepoint", "syscalls:sys_exit_ioctl")] is True
    assert targets[("raw_tracepoint", "sys_enter")] is True


def test_attr_function_absent_fentry_refused_kprobes_unavailable(report):
    hook = _hook(report, probe.ATTR_FUNCTION)
    assert hook["key"] == "attr_applied" and hook["required"] is False
    methods = {m["method"]: m for m in hook["methods"]}
    assert list(methods) == ["fentry", "kprobe"]
    if _kallsyms(probe.ATTR_FUNCTION):
        pytest.fail("this kernel has kvm_arch_post_set_memory_attributes: the facts of "
                    "docs/kernel-support.md no longer hold (update this test)")
    assert hook["exists"] is False and hook["attachable"] is False
    assert hook["reason"].startswith("absent from this kernel")
    # the methods were still tried, on a stand-in function, to learn what works here
    assert all(m["stand_in"] for m in methods.values())
    assert methods["fentry"]["attachable"] is False
    assert methods["fentry"]["reason"].startswith("refused by the kernel: EPERM")
    assert not os.path.exists(probe.KPROBE_PMU)        # CONFIG_KPROBES unset here
    assert methods["kprobe"]["attachable"] is False
    assert methods["kprobe"]["reason"] == "kprobes unavailable (CONFIG_KPROBES unset?)"


def test_uevents(report):
    hook = _hook(report, "KVM uevents")
    assert hook["exists"] is os.path.isdir(probe.KVM_MISC_DEVICE)
    assert hook["attachable"] and hook["method"] == "uevent_socket"


def test_table_fits_80_columns_and_agrees_with_json(report):
    result = _check()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert result.stderr == ""     # bcc's own messages are captured, not leaked
    by_start = {line.split()[0]: line for line in lines if line and not line[0].isspace()}
    for name in TRACEPOINT_HOOKS:
        assert by_start[name].endswith("ok: raw_tracepoint")
    assert "optional  unavailable: absent from this" in by_start[probe.ATTR_FUNCTION]
    assert lines[-1] == "result: every required hook can attach"


def test_required_hook_that_cannot_attach_exits_1_with_reason_on_its_line(tmp_path):
    if _kallsyms(probe.ATTR_FUNCTION):
        pytest.fail("kvm_arch_post_set_memory_attributes exists here: pick another "
                    "unattachable hook for this test")
    config = tmp_path / "strict.yaml"
    config.write_text("hooks:\n  attr_applied: required\n")
    result = _check("--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(text for text in result.stdout.splitlines()
                if text.startswith(probe.ATTR_FUNCTION))
    assert "required  FAIL: absent from this kernel" in line
    data = json.loads(_check("--config", str(config), "-o", "json").stdout)
    assert data["ok"] is False
    assert _hook(data, "attr_applied")["required"] is True
    assert _hook(data, "attr_applied")["need"] == "required"


def test_disabled_hook_is_shown_and_never_required(tmp_path):
    config = tmp_path / "quiet.yaml"
    config.write_text("hooks:\n  page_fault: disabled\n  hypercall: disabled\n")
    result = _check("--config", str(config), "-o", "json")
    assert result.returncode == 0, result.stderr
    hook = _hook(json.loads(result.stdout), "page_fault")
    assert (hook["need"], hook["required"], hook["attachable"]) == ("disabled", False, True)


def test_invalid_config_exits_3(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("hooks:\n  hypercal: required\n")
    result = _check("--config", str(config))
    assert result.returncode == 3
    assert "bad.yaml:2: hooks.hypercal: unknown key; did you mean 'hypercall'?" in result.stderr


def _bpf_fds() -> list[str]:
    """What this process holds of BPF programs, links, maps and perf events (by fd)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue          # the fd of the listdir itself, gone by now
        if target.startswith("anon_inode:") and ("bpf" in target or "perf" in target):
            held.append(target)
    return sorted(held)


def test_probing_in_process_releases_every_program_and_attachment():
    """probe_environment() as the daemon would call it: afterwards this process holds no
    more BPF programs, links or perf events than before (everything was detached)."""
    from hekitrace.config.settings import default_config
    before = _bpf_fds()
    report = probe.probe_environment(default_config())
    assert report.hook("hypercall").attachable      # it did attach things
    assert _bpf_fds() == before


def test_ensure_tracefs_mounts_when_not_mounted(tmp_path):
    """The mount path of check, on a scratch mount point (the real one stays mounted)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount tracefs")
    target = tmp_path / "tracing"
    target.mkdir()
    assert hostenv.ensure_tracefs(str(target), may_mount=False).mounted is False
    try:
        state = hostenv.ensure_tracefs(str(target))
        assert (state.mounted, state.action) == (True, "mounted by hekitrace")
        assert (target / "events" / "kvm" / "kvm_hypercall").is_dir()
        assert hostenv.ensure_tracefs(str(target)).action == "already mounted"
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_unprivileged_check_fails_with_the_reason_on_the_hook_line():
    """As nobody without capabilities the kernel refuses every load: exit 1, and each
    required hook's line says why (not "no such tracepoint": tracefs is only unreadable)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         str(SCRIPT), "check"], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, cwd="/")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "cannot load BPF" in result.stdout
    for name in ("kvm:kvm_hypercall", "syscalls:sys_enter_ioctl/sys_exit_ioctl"):
        line = next(text for text in lines if text.startswith(name))
        assert "required  FAIL: cannot attach: bcc" in line
    assert lines[-1].startswith("result: required hook(s) cannot attach: kvm:kvm_hypercall")
