"""hekitrace.capture.probe: the report ``check`` prints (what "ok" means, its JSON form).

The kernel-facing half (loading and attaching) is tested in tests/kernel/test_check.py;
the readers of /proc and /sys it uses are tested in test_hostenv.py.
"""

from __future__ import annotations

from hekitrace.capture import hostenv, probe

REL = "6.18.44-test"


def test_report_ok_means_every_required_hook_attaches():
    def hook(key, required, attachable):
        return probe.HookReport(key, key, required, True, attachable,
                                "tracepoint" if attachable else None,
                                None if attachable else "no")
    base = dict(kernel_release=REL, privileges=hostenv.Privileges(0, 0, {
        "CAP_SYS_ADMIN": True, "CAP_SYS_RESOURCE": True, "CAP_PERFMON": True,
        "CAP_BPF": True}), btf_vmlinux=True, lockdown=None,
        tracefs=hostenv.Tracefs("/t", True, "already mounted"),
        bcc=probe.Bcc(True, "0.26.0", True, 0.1, None),
        headers=hostenv.Headers("matching", "/b", REL, ""), bpf_stats_enabled=False)
    ok = probe.EnvironmentReport(**base, hooks=(hook("a", True, True), hook("b", False, False)))
    assert ok.ok and ok.to_dict()["ok"] is True
    assert ok.to_dict()["privileges"]["cap_eff"] == "0x0"
    bad = probe.EnvironmentReport(**base, hooks=(hook("a", True, False),))
    assert not bad.ok
