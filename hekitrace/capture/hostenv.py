"""Facts about the host that decide whether BPF capture can work: privileges, tracefs,
lockdown, BPF statistics, kernel headers and kernel symbols.

Why apart from the hook probing (capture/probe.py): these are plain readers of /proc and
/sys with their paths as parameters, so unit tests feed them fixture files; the probing
loads real programs and needs root. ``hekitrace check`` reports both.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

TRACEFS = "/sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"

#: capability numbers (include/uapi/linux/capability.h)
CAPABILITIES = {"CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38,
                "CAP_BPF": 39}


@dataclass(frozen=True)
class Privileges:
    euid: int
    cap_eff: int
    capabilities: dict[str, bool]

    @property
    def can_bpf(self) -> bool:
        caps = self.capabilities
        return caps["CAP_SYS_ADMIN"] or (caps["CAP_BPF"] and caps["CAP_PERFMON"])


@dataclass(frozen=True)
class Tracefs:
    path: str
    mounted: bool
    action: str          # "already mounted", "mounted by hekitrace", "not mounted: ..."


@dataclass(frozen=True)
class Headers:
    """Where bcc takes kernel headers from: ``matching`` (built for this release),
    ``fallback`` (another release's tree; safe for hekitrace because every struct offset
    comes from BTF), or ``missing``."""
    source: str
    path: str
    release: str | None
    detail: str


def read_privileges(status_path: str = "/proc/self/status") -> Privileges:
    """Effective uid and capabilities (CapEff of ``status_path``)."""
    cap_eff = 0
    with open(status_path) as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                cap_eff = int(line.split()[1], 16)
    caps = {name: bool(cap_eff >> bit & 1) for name, bit in CAPABILITIES.items()}
    return Privileges(os.geteuid(), cap_eff, caps)


def tracefs_mounted(path: str = TRACEFS, mountinfo: str = "/proc/self/mountinfo") -> bool:
    with open(mountinfo) as fh:
        for line in fh:
            fields = line.split()
            # mountinfo(5): field 5 is the mount point; the fs type follows " - "
            if fields[4] == path and fields[fields.index("-") + 1] == "tracefs":
                return True
    return False


def ensure_tracefs(path: str = TRACEFS, may_mount: bool = True) -> Tracefs:
    """Report tracefs at ``path``; mount it there when it is not and ``may_mount``."""
    if tracefs_mounted(path):
        return Tracefs(path, True, "already mounted")
    if not may_mount:
        return Tracefs(path, False, "not mounted (mounting not allowed: --no-mount)")
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"nodev", path.encode(), b"tracefs", 0, None)
    if rc != 0:
        err = ctypes.get_errno()
        return Tracefs(path, False, f"not mounted: mount failed: {errno_text(err)}")
    return Tracefs(path, True, "mounted by hekitrace")


def read_lockdown(path: str = "/sys/kernel/security/lockdown") -> str | None:
    """The active kernel lockdown mode ("none", "integrity", ...), None if unknown."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def read_bpf_stats(path: str = "/proc/sys/kernel/bpf_stats_enabled") -> bool | None:
    try:
        with open(path) as fh:
            return fh.read().strip() == "1"
    except OSError:
        return None


def find_headers(release: str, modules_root: str = "/lib/modules") -> Headers:
    """Classify the header tree bcc will use for kernel ``release``."""
    build = os.path.join(modules_root, release, "build")
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        build = env
    if not os.path.isdir(build):
        return Headers("missing", build, None,
                       "no header tree: bcc cannot compile (run scripts/setup.sh)")
    tree_release = None
    try:
        with open(os.path.join(build, "include/generated/utsrelease.h")) as fh:
            for line in fh:
                if line.startswith("#define UTS_RELEASE"):
                    tree_release = line.split('"')[1]
    except (OSError, IndexError):
        pass
    real = os.path.realpath(build)
    if tree_release == release:
        return Headers("matching", build, tree_release, f"headers of {release}: {real}")
    return Headers("fallback", build, tree_release,
                   f"headers of {tree_release or 'an unknown release'} at {real}; "
                   "safe for hekitrace (struct offsets come from BTF)")


def kallsyms_has(names: tuple[str, ...], path: str = "/proc/kallsyms") -> set[str]:
    """Which of ``names`` are kernel text symbols (modules included)."""
    wanted, found = set(names), set()
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[2] in wanted:
                found.add(parts[2])
    return found


def errno_text(err: int) -> str:
    name = errno_mod.errorcode.get(err, f"errno {err}")
    return f"{name} ({os.strerror(err)})"


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what libbcc/libbpf print on fd 2 (verifier logs, 'create_probe_event')
    so the report stays readable; the lines are returned for the reasons."""
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())
