"""Build and cache the L1 image of the vm tier: a stock Debian kernel plus a minimal root.

Why a cache outside the repository: debootstrap and the kernel debs take about a minute
and 600 MB; a second run must reuse them. The cache lives in ``$HEKITRACE_VM_CACHE``
(default ``/var/cache/hekitrace-vm``) and is keyed by the kernel ABI (for example
``6.1.0-56-amd64``) and by a hash of the recipe below (package list, init scripts), so
changing the recipe rebuilds and changing the tests does not.

Layout of the cache::

    apt/                    private apt state (lists, sources): the host's apt config is
                            never touched, bookworm-backports is only known here
    debs/                   downloaded .deb files
    base-<recipe>.tar       debootstrap root (python3, python3-bpfcc, hekitrace's deps)
    <abi>-<recipe>/         vmlinuz, initrd.gz, root.img, READY  (one per kernel)
    current-<flavour>       the ABI last resolved for a flavour ("6.1", "6.12")
    .lock                   flock: two runs never build at once

Debian facts used (docs/vm-tier.md, "How the L1 machine is built"): virtio_blk and ext4
are modules, so a tiny busybox initramfs loads them and switch_roots into
``/sbin/l1init``; 6.12 backports modules are ``.ko.xz`` and are decompressed for busybox's
insmod; the headers debs are extracted, not installed (installing would pull in gcc), and
carry the ``build`` symlink.

Run by hand: ``python3 tests/vm/image.py 6.1`` (prints the image directory).
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

#: flavour -> (suite holding the kernel, version prefix expected)
FLAVOURS = {"6.1": ("bookworm", "6.1."), "6.12": ("bookworm-backports", "6.12.")}

#: Debian packages of the L1 root. hekitrace's Python deps come from Debian, so no pip in L1.
ROOT_PACKAGES = ("python3", "python3-bpfcc", "kmod", "procps", "python3-pyroute2",
                 "python3-prometheus-client", "python3-yaml", "busybox-static")

#: modules the initramfs loads to reach the root disk (dependencies resolved by modprobe -D)
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")

INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /mod/$m 2>/dev/null; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
mount -t ext4 -o rw /dev/vda /root || { echo "INITRAMFS: cannot mount /dev/vda"; ls /dev; sh; }
mount --move /dev /root/dev
umount /proc /sys
exec switch_root /root /sbin/l1init
"""

#: PID 1 of L1: mount things, mount the two 9p shares, run the share's run.sh, power off.
L1INIT = r"""#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs shm /dev/shm
hostname l1
busybox ip link set lo up
modprobe 9pnet_virtio; modprobe 9p
mkdir -p /mnt/host /mnt/src
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host0 /mnt/host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose src /mnt/src
echo "L1INIT: userspace up $(cut -d' ' -f1 /proc/uptime) kernel $(uname -r)"
if [ -x /mnt/host/run.sh ]; then
    /mnt/host/run.sh 2>&1 | tee /mnt/host/out.log
    echo "L1INIT: run.sh finished $(cut -d' ' -f1 /proc/uptime)"
elif grep -q l1shell /proc/cmdline; then
    setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
else
    echo "L1INIT: no run.sh in the share"
fi
sync
busybox poweroff -f
"""

#: bump when the build steps change in a way the texts above do not show
RECIPE_VERSION = "4"


class ImageBuildError(RuntimeError):
    """A build step failed; ``step`` names it and ``output`` holds its last output."""

    def __init__(self, step: str, output: str):
        super().__init__(f"vm image build failed at {step}:\n{output[-4000:]}")
        self.step = step
        self.output = output


@dataclass(frozen=True)
class L1Image:
    """A built, cached L1 image for one kernel."""

    flavour: str
    abi: str
    directory: Path
    vmlinuz: Path
    initrd: Path
    root: Path
    built_now: bool
    build_seconds: float


def recipe_hash() -> str:
    """Hash of everything that shapes the image (not the tests that run in it)."""
    text = "\n".join((RECIPE_VERSION, " ".join(ROOT_PACKAGES), " ".join(INITRAMFS_MODULES),
                      INITRAMFS_INIT, L1INIT, MIRROR))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("HEKITRACE_VM_CACHE", "/var/cache/hekitrace-vm"))


def _run(step: str, cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kw)
    if proc.returncode != 0:
        raise ImageBuildError(step, f"$ {' '.join(cmd)}\n(exit {proc.returncode})\n"
                                    f"{proc.stdout}")
    return proc.stdout


def _log(msg: str) -> None:
    print(f"vm-image: {msg}", file=sys.stderr, flush=True)


class _Apt:
    """apt-get/apt-cache with a private state dir: the host's sources are left alone."""

    def __init__(self, root: Path):
        self.root = root
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        sources = root / "sources.list"
        sources.write_text(
            f"deb [signed-by={KEYRING}] {MIRROR} bookworm main\n"
            f"deb [signed-by={KEYRING}] {MIRROR} bookworm-updates main\n"
            f"deb [signed-by={KEYRING}] {MIRROR} bookworm-backports main\n"
            f"deb [signed-by={KEYRING}] {SECURITY} bookworm-security main\n")
        self.opts = ["-o", f"Dir::Etc::SourceList={sources}",
                     "-o", "Dir::Etc::SourceParts=/nonexistent",
                     "-o", f"Dir::State::Lists={root / 'lists'}",
                     "-o", f"Dir::Cache={root}",
                     "-o", f"Dir::Cache::archives={root / 'archives'}",
                     "-o", "APT::Get::List-Cleanup=0"]

    def update(self) -> None:
        stamp = self.root / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < 6 * 3600:
            return
        _run("apt-get update", ["apt-get", *self.opts, "-q", "update"])
        stamp.touch()

    def madison(self, pkg: str) -> list[tuple[str, str]]:
        out = _run("apt-cache madison", ["apt-cache", *self.opts, "madison", pkg])
        rows = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3:
                rows.append((parts[1], parts[2]))
        return rows

    def depends(self, pkg: str) -> list[str]:
        out = _run("apt-cache show", ["apt-cache", *self.opts, "show", "--no-all-versions",
                                      pkg])
        m = re.search(r"^Depends: (.*)$", out, re.MULTILINE)
        if not m:
            return []
        return [d.split()[0].split(":")[0] for d in m.group(1).split(",")]

    def download(self, pkgs: list[str], dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        _run("apt-get download", ["apt-get", *self.opts, "-q", "download", *pkgs], cwd=dest)
        found = []
        for p in pkgs:
            name = p.split("=")[0]
            debs = sorted(dest.glob(f"{name}_*.deb"))
            if not debs:
                raise ImageBuildError("apt-get download", f"no .deb for {p} in {dest}")
            found.append(debs[-1])
        return found


def _version_key(v: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"[.\-+~]", v)]


def resolve_abi(apt: _Apt, flavour: str) -> str:
    """The kernel ABI (``6.1.0-56-amd64``) Debian currently ships for a flavour."""
    suite, prefix = FLAVOURS[flavour]
    candidates = []
    for version, where in apt.madison("linux-image-amd64"):
        in_backports = "backports" in where
        if version.startswith(prefix) and in_backports == (suite == "bookworm-backports"):
            candidates.append(version)
    if not candidates:
        raise ImageBuildError("resolve kernel", f"no linux-image-amd64 {prefix}* in {suite}")
    best = max(candidates, key=_version_key)
    for dep in apt.depends(f"linux-image-amd64={best}"):
        if dep.startswith("linux-image-") and dep != "linux-image-amd64":
            return dep[len("linux-image-"):]
    raise ImageBuildError("resolve kernel", f"linux-image-amd64={best} names no image")


def _extract(debs: list[Path], dest: Path) -> None:
    for deb in debs:
        _run("dpkg-deb -x", ["dpkg-deb", "-x", str(deb), str(dest)])


def _merge_into(src: Path, stage: Path) -> None:
    """Copy a tree into a merged-/usr root, keeping its ``lib -> usr/lib`` symlinks."""
    tar = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
    _run("merge tree", ["tar", "-C", str(stage), "--keep-directory-symlink", "-xf", "-"],
         stdin=tar.stdout)
    if tar.wait() != 0:
        raise ImageBuildError("merge tree", f"tar of {src} failed")


def _module_base(kroot: Path, abi: str) -> Path:
    """The -b/-d base under which lib/modules/<abi> sits (``/`` or ``/usr`` layouts)."""
    for base in (kroot, kroot / "usr"):
        if (base / "lib/modules" / abi).is_dir():
            return base
    raise ImageBuildError("kernel deb", f"no lib/modules/{abi} in {kroot}")


def _base_tar(cache: Path, apt: _Apt) -> Path:
    """debootstrap minbase with the root packages, as a tar (merged-/usr safe copy)."""
    tar = cache / f"base-{recipe_hash()}.tar"
    if tar.exists():
        return tar
    work = Path(tempfile.mkdtemp(prefix="base-", dir=cache))
    try:
        _log(f"debootstrap bookworm into {work} (about 40-60 s)")
        _run("debootstrap", ["debootstrap", "--variant=minbase",
                             f"--include={','.join(ROOT_PACKAGES)}", "bookworm", str(work),
                             MIRROR])
        shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
        (work / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        (work / "sbin/l1init").write_text(L1INIT)
        os.chmod(work / "sbin/l1init", 0o755)
        (work / "etc/hostname").write_text("l1\n")
        partial = tar.with_suffix(".tar.partial")
        _run("tar base", ["tar", "-C", str(work), "-cf", str(partial), "."])
        partial.rename(tar)
        return tar
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _show_depends(kroot: Path, abi: str, module: str) -> list[str]:
    """Module files (relative to lib/modules/<abi>) to insmod, in order, for ``module``."""
    out = _run("modprobe --show-depends",
               ["modprobe", "-d", str(kroot), "-S", abi, "--show-depends", module])
    files = []
    base = f"/lib/modules/{abi}/"
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["insmod"]:
            path = parts[1]
            idx = path.find(base)
            files.append(path[idx + len(base):] if idx >= 0 else path)
    return files


def _initramfs(kroot: Path, abi: str, busybox: Path, out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="initrd-", dir=out.parent))
    try:
        for d in ("bin", "proc", "sys", "dev", "root", "mod"):
            (work / d).mkdir()
        shutil.copy2(busybox, work / "bin/busybox")
        order: list[str] = []
        for module in INITRAMFS_MODULES:
            for rel in _show_depends(kroot, abi, module):
                src = kroot / "lib/modules" / abi / rel
                name = Path(rel).name
                if name.endswith(".xz"):
                    name = name[:-3]
                    data = lzma.decompress(src.read_bytes())
                else:
                    data = src.read_bytes()
                if name not in order:
                    (work / "mod" / name).write_bytes(data)
                    order.append(name)
        (work / "modules.order").write_text("\n".join(order) + "\n")
        (work / "init").write_text(INITRAMFS_INIT)
        os.chmod(work / "init", 0o755)
        files = _run("find", ["find", "."], cwd=work)
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files.encode(),
                              cwd=work, stdout=subprocess.PIPE, check=True).stdout
        import gzip
        out.write_bytes(gzip.compress(cpio, compresslevel=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_kernel_image(cache: Path, apt: _Apt, flavour: str, abi: str, dest: Path) -> None:
    debs_dir = cache / "debs"
    image_pkg = f"linux-image-{abi}"
    headers_pkg = f"linux-headers-{abi}"
    _log(f"downloading {image_pkg}, {headers_pkg} and their headers/kbuild debs")
    deps = apt.depends(headers_pkg)
    extra = [d for d in deps if d.startswith(("linux-headers-", "linux-kbuild-"))]
    debs = apt.download([image_pkg, headers_pkg, *extra, "busybox-static"], debs_dir)
    base = _base_tar(cache, apt)
    stage = Path(tempfile.mkdtemp(prefix=f"stage-{abi}-", dir=cache))
    kroot = Path(tempfile.mkdtemp(prefix=f"kernel-{abi}-", dir=cache))
    try:
        _extract(debs[:1], kroot)
        busybox_root = Path(tempfile.mkdtemp(prefix="busybox-", dir=cache))
        _extract(debs[-1:], busybox_root)
        mbase = _module_base(kroot, abi)
        _run("depmod kernel", ["depmod", "-b", str(mbase), abi])
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(next((kroot / "boot").glob("vmlinuz-*")), tmp / "vmlinuz")
        bb = next(p for p in (busybox_root / "bin/busybox", busybox_root / "usr/bin/busybox")
                  if p.exists())
        _initramfs(mbase, abi, bb, tmp / "initrd.gz")
        shutil.rmtree(busybox_root, ignore_errors=True)
        _log(f"assembling root for {abi}")
        _run("untar base", ["tar", "-C", str(stage), "-xf", str(base)])
        # keep /boot/config-<abi> as a real host has it (hekitrace reads CONFIG_HZ there)
        for f in (kroot / "boot").iterdir():
            if not f.name.startswith("config-"):
                f.unlink()
        _merge_into(kroot, stage)
        headers = Path(tempfile.mkdtemp(prefix="headers-", dir=cache))
        try:
            _extract(debs[1:-1], headers)
            _merge_into(headers, stage)
        finally:
            shutil.rmtree(headers, ignore_errors=True)
        _run("depmod root", ["depmod", "-b", str(stage), abi])
        size = int(subprocess.check_output(["du", "-sm", str(stage)]).split()[0]) + 600
        _run("mke2fs", ["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-d", str(stage),
                        "-F", str(tmp / "root.img"), f"{size}M"])
        (tmp / "abi").write_text(abi + "\n")
        (tmp / "READY").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(kroot, ignore_errors=True)


def _prune(cache: Path) -> None:
    """Delete images and base roots of other recipes (each image is about 1.6 GB)."""
    keep = recipe_hash()
    for entry in cache.iterdir():
        m = re.fullmatch(r"(?:base-)?.*?-?([0-9a-f]{12})(?:\.tar)?", entry.name)
        if m and m.group(1) != keep and (entry.name.startswith("base-")
                                         or (entry / "READY").exists()):
            _log(f"pruning {entry} (another recipe)")
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def ensure_image(flavour: str, *, refresh: bool = False) -> L1Image:
    """Return the cached image for ``flavour`` ("6.1" or "6.12"), building it if needed.

    Without ``refresh``, a flavour already resolved once reuses its ABI without asking
    the mirror (a cached run needs no network). Holds the cache lock throughout.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown kernel flavour {flavour!r}; expected one of "
                         f"{sorted(FLAVOURS)}")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        apt = _Apt(cache / "apt")
        current = cache / f"current-{flavour}"
        abi = current.read_text().strip() if current.exists() and not refresh else ""
        built = False
        if not abi or not (cache / f"{abi}-{recipe_hash()}" / "READY").exists():
            apt.update()
            abi = resolve_abi(apt, flavour)
            dest = cache / f"{abi}-{recipe_hash()}"
            if not (dest / "READY").exists():
                _log(f"building L1 image for {flavour}: {abi} into {dest}")
                _build_kernel_image(cache, apt, flavour, abi, dest)
                built = True
            current.write_text(abi + "\n")
            _prune(cache)
        dest = cache / f"{abi}-{recipe_hash()}"
        return L1Image(flavour, abi, dest, dest / "vmlinuz", dest / "initrd.gz",
                       dest / "root.img", built, time.monotonic() - start)


if __name__ == "__main__":
    for fl in sys.argv[1:] or ["6.1"]:
        img = ensure_image(fl)
        print(f"{fl} {img.abi} {img.directory} built_now={img.built_now} "
              f"{img.build_seconds:.1f}s")
