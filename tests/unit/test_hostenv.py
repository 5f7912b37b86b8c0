"""hekitrace.capture.hostenv: the pure readers behind ``check`` (headers, caps, mounts).

The kernel-facing half (loading and attaching) is tested in tests/kernel/test_check.py;
these cases build the files each reader parses, so every classification is exercised.
"""

from __future__ import annotations

import os

from hekitrace.capture import hostenv

REL = "6.18.44-test"


def _tree(root, name: str, release: str):
    tree = root / name
    (tree / "include" / "generated").mkdir(parents=True)
    (tree / "include" / "generated" / "utsrelease.h").write_text(
        f'#define UTS_RELEASE "{release}"\n')
    return tree


def test_headers_matching(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    (tmp_path / "modules" / REL).mkdir(parents=True)
    os.symlink(_tree(tmp_path, "src", REL), tmp_path / "modules" / REL / "build")
    headers = hostenv.find_headers(REL, str(tmp_path / "modules"))
    assert (headers.source, headers.release) == ("matching", REL)


def test_headers_fallback_names_the_other_release(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    (tmp_path / "modules" / REL).mkdir(parents=True)
    os.symlink(_tree(tmp_path, "src", "6.1.0-56-amd64"), tmp_path / "modules" / REL / "build")
    headers = hostenv.find_headers(REL, str(tmp_path / "modules"))
    assert (headers.source, headers.release) == ("fallback", "6.1.0-56-amd64")
    assert "struct offsets come from BTF" in headers.detail


def test_headers_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    headers = hostenv.find_headers(REL, str(tmp_path))
    assert headers.source == "missing" and headers.release is None


def test_headers_from_bcc_kernel_source(tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(_tree(tmp_path, "src", REL)))
    assert hostenv.find_headers(REL, str(tmp_path / "none")).source == "matching"


def test_privileges_from_cap_eff(tmp_path):
    status = tmp_path / "status"
    # CAP_BPF (39) and CAP_PERFMON (38) only
    status.write_text(f"Name:\tx\nCapEff:\t{(1 << 39) | (1 << 38):016x}\n")
    priv = hostenv.read_privileges(str(status))
    assert priv.capabilities == {"CAP_SYS_ADMIN": False, "CAP_SYS_RESOURCE": False,
                                 "CAP_PERFMON": True, "CAP_BPF": True}
    assert priv.can_bpf
    status.write_text("CapEff:\t0000000000000000\n")
    assert not hostenv.read_privileges(str(status)).can_bpf


def test_tracefs_mounted_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n"
                    "42 23 0:13 / /sys/kernel/tracing rw,relatime - tracefs nodev rw\n")
    assert hostenv.tracefs_mounted("/sys/kernel/tracing", str(info))
    assert not hostenv.tracefs_mounted("/sys", str(info))   # mounted, but not tracefs
    assert not hostenv.tracefs_mounted("/elsewhere", str(info))


def test_lockdown_and_bpf_stats(tmp_path):
    lockdown = tmp_path / "lockdown"
    lockdown.write_text("none [integrity] confidentiality\n")
    assert hostenv.read_lockdown(str(lockdown)) == "integrity"
    assert hostenv.read_lockdown(str(tmp_path / "absent")) is None
    stats = tmp_path / "stats"
    stats.write_text("1\n")
    assert hostenv.read_bpf_stats(str(stats)) is True
    assert hostenv.read_bpf_stats(str(tmp_path / "absent")) is None


def test_kallsyms_lookup(tmp_path):
    syms = tmp_path / "kallsyms"
    syms.write_text("ffffffff81000000 T _stext\n"
                    "ffffffffc0001000 t kvm_vm_ioctl\t[kvm]\n")
    assert hostenv.kallsyms_has(("kvm_vm_ioctl", "absent_fn"), str(syms)) == {"kvm_vm_ioctl"}
