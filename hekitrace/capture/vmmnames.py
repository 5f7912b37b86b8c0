"""Name, UUID and VMM kind of a VM, from its VMM's command line and cgroup.

KVM knows a VM only by the VMM's pid; operators know it by name. The name a VMM was given
is read from ``/proc/<pid>/cmdline`` (NUL-separated argv) and, for libvirt, from the
systemd scope in ``/proc/<pid>/cgroup``. Which argument names a VM, per VMM:

``qemu`` (argv[0] ``qemu-system-*``, ``qemu-kvm``, or ``/proc/<pid>/comm`` starting ``qemu``)
    ``-name guest=NAME,...`` (the keyval form libvirt and KubeVirt use) or
    ``-name NAME[,process=...]``; ``,,`` is QEMU's escaped comma. ``-uuid UUID``. Both
    also with ``--`` and as ``-name=...``.
``libvirt`` cgroup scope (when the command line names nothing)
    ``machine-qemu\\x2d<id>\\x2d<name>.scope`` (systemd escapes ``-`` as ``\\x2d``); the
    name may be truncated by libvirt, so the command line wins when it has one.
``firecracker`` (also under ``jailer``)
    ``--id ID`` (Firecracker's own default, ``anonymous-instance``, is kept verbatim).
``cloud-hypervisor``
    Cloud Hypervisor has no VM name option. What identifies a VM to its operator is its
    API socket (``--api-socket path=/run/ch/NAME.sock`` or ``--api-socket /run/ch/NAME.sock``):
    the socket file's stem becomes the name. ``--platform ...,uuid=UUID`` gives the UUID.
``crosvm``
    No name option either; the control socket ``crosvm run --socket PATH`` (or ``-s``)
    identifies it: its stem becomes the name.

Anything else, or a process whose files cannot be read (it exited, or a hostile VMM
rewrote its argv), gets ``name=""``: the pid is the name of last resort and views show it
as ``pid-<pid>`` (:meth:`VmIdentity.label`). The command line is untrusted text: names
are cut to :data:`MAX_NAME_CHARS` printable characters and nothing here raises on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

#: bound on names and uuids taken from a VMM's argv (a label value, not a document)
MAX_NAME_CHARS = 128
_SCOPE = re.compile(r"machine-qemu\\x2d\d+\\x2d(?P<name>.+?)\.scope")
_UNESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


class VmIdentity(NamedTuple):
    """Who a VM is: ``name`` and ``uuid`` ("" when unknown), ``vmm`` (``qemu``,
    ``firecracker``, ``cloud-hypervisor``, ``crosvm`` or ""), ``source`` (``cmdline``,
    ``cgroup`` or ``pid``) and the VMM ``pid`` (tgid)."""

    name: str
    uuid: str
    vmm: str
    source: str
    pid: int

    def label(self) -> str:
        """The name, or ``pid-<pid>`` when the VMM named nothing (as views.py shows it)."""
        return self.name or f"pid-{self.pid}"


def _clean(value: str) -> str:
    """Printable characters only, at most MAX_NAME_CHARS (argv is the VMM's, untrusted)."""
    return "".join(ch for ch in value if ch.isprintable())[:MAX_NAME_CHARS]


def _option(argv: list[str], *names: str) -> str | None:
    """Value of the last ``NAME VALUE`` or ``NAME=VALUE`` among ``names`` in argv."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg[len(name) + 1:]
    return found


def _qemu_split(value: str) -> list[str]:
    """Split a QEMU option string on single commas (``,,`` is a literal comma)."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def _qemu_name(value: str) -> str:
    parts = _qemu_split(value)
    for part in parts:
        if part.startswith("guest="):
            return part[len("guest="):]
    first = parts[0]
    # "-name process=foo" alone names no guest
    return "" if "=" in first and first.split("=", 1)[0] in ("process", "debug-threads") \
        else first


def _keyval(value: str, key: str) -> str:
    """``key=`` of a comma-separated ``k=v,...`` option (Cloud Hypervisor style)."""
    for part in value.split(","):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return ""


def _socket_stem(value: str) -> str:
    path = _keyval(value, "path") or ("" if "=" in value else value)
    base = os.path.basename(path)
    return base.removesuffix(".sock")


def vmm_kind(argv: list[str], comm: str = "") -> str:
    """Which VMM a process is, from argv[0] (then ``comm``); "" for an unknown one."""
    base = os.path.basename(argv[0]) if argv else ""
    for candidate in (base, comm):
        if candidate.startswith("qemu"):
            return "qemu"
        if candidate in ("firecracker", "jailer"):
            return "firecracker"
        if candidate.startswith("cloud-hyperviso"):  # comm is cut at 15 characters
            return "cloud-hypervisor"
        if candidate == "crosvm":
            return "crosvm"
    return ""


def identity_from(pid: int, cmdline: bytes, comm: str = "", cgroup: str = "") -> VmIdentity:
    """The identity of VMM ``pid`` from the raw contents of its /proc files.

    ``cmdline`` is ``/proc/<pid>/cmdline`` as read (NUL-separated, maybe empty for a
    zombie); ``comm`` and ``cgroup`` the text of ``/proc/<pid>/comm`` and ``cgroup``.
    Never raises on their contents.
    """
    argv = [arg.decode("utf-8", "replace") for arg in cmdline.split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    vmm = vmm_kind(argv, comm.strip())
    name = uuid = ""
    if vmm == "qemu":
        raw = _option(argv, "-name", "--name")
        name = _qemu_name(raw) if raw is not None else ""
        uuid = _option(argv, "-uuid", "--uuid") or ""
    elif vmm == "firecracker":
        name = _option(argv, "--id") or ""
    elif vmm == "cloud-hypervisor":
        api = _option(argv, "--api-socket")
        name = _socket_stem(api) if api else ""
        platform = _option(argv, "--platform")
        uuid = _keyval(platform, "uuid") if platform else ""
    elif vmm == "crosvm":
        sock = _option(argv, "--socket", "-s")
        name = _socket_stem(sock) if sock else ""
    name, uuid = _clean(name), _clean(uuid)
    if name:
        return VmIdentity(name, uuid, vmm, "cmdline", pid)
    match = _SCOPE.search(cgroup)
    if match:
        scoped = _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), match.group("name"))
        return VmIdentity(_clean(scoped), uuid, vmm or "qemu", "cgroup", pid)
    return VmIdentity("", uuid, vmm, "pid", pid)


def _read(path: Path, limit: int = 1 << 16) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(limit)
    except OSError:
        return b""


def identify(pid: int, proc_root: str | os.PathLike = "/proc") -> VmIdentity:
    """The identity of the VMM with tgid ``pid``, reading ``<proc_root>/<pid>/...``.

    A process that vanished or whose files are unreadable gives ``source="pid"`` and
    empty names rather than an error: naming is best effort, the pid always identifies.
    """
    base = Path(proc_root) / str(pid)
    return identity_from(pid, _read(base / "cmdline"),
                         _read(base / "comm").decode("utf-8", "replace"),
                         _read(base / "cgroup").decode("utf-8", "replace"))
