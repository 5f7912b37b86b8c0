"""Build and cache the vm tier's third L1 kernel: a Heki-v2-compatible test host.

Why: the stock Debian kernels answer every Heki hypercall with -KVM_ENOSYS and offer no
VM type whose memory attributes change, so the *applied* side of hekitrace (the
``kvm_arch_post_set_memory_attributes`` hook, the applied map, ``protected_write`` from
real write faults) never runs on them. This kernel is Debian's ``linux-source-6.12``
with the project's own port of the Heki RFC v2 host side (``heki-host/heki-v2-host.patch``:
KVM_HC_LOCK_CR_UPDATE = 13 and KVM_HC_PROTECT_MEMORY = 14 as in the v2 mails
``20231113022326.24388-3-mic@digikod.net`` and ``-12-``) and a tinyconfig fragment
(``heki-host/config.fragment``) with everything built in, KVM_AMD and
KVM_SW_PROTECTED_VM. It is a test host, not Heki: docs/vm-tier.md lists the deviations.

The bzImage is cached in ``$HEKITRACE_VM_CACHE`` (default ``/var/cache/hekitrace-vm``)
under ``heki-kernel-<key>/``, the key hashing the source package version, the fragment,
the patch and the gcc and pahole versions; a changed input builds again. A build from
scratch took 45 minutes on the shared 2-core build host at a load average near 10;
ccache (``<cache>/ccache``, with CCACHE_BASEDIR and CCACHE_NOHASHDIR=1 so that the
per-build directory does not defeat it) is the fallback when a key changes (13 minutes
after a config change that touched half of the objects, docs/vm-tier.md).

The L1 root is the tier's debootstrap root (``image._base_tar``) plus
``/boot/config-<release>`` and ``/lib/modules/<release>/modules.builtin`` (so that
``modprobe kvm_amd`` answers "built in"); no initramfs: the kernel mounts
``root=/dev/vda`` itself and starts ``/sbin/l1init``. bcc's kernel headers are the
``CONFIG_IKHEADERS`` archive unpacked into ``/lib/modules/<release>/build`` at image build
time (the root has no xz for bcc to unpack ``/sys/kernel/kheaders.tar.xz`` itself).

Debian bumps ``linux-source-6.12`` every few weeks. ``SOURCE_VERSION`` is the version the
patch was made against and that scripts/setup.sh installs; when only another version is
installed, the tier builds that one (its own cache key) and says so. If the patch no
longer applies, refresh it against the new source and bump ``SOURCE_VERSION``.

Run by hand: ``python3 tests/vm/hekihost.py`` (prints the image directory).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.vm import image
from tests.vm.image import ImageBuildError, L1Image

HERE = Path(__file__).resolve().parent
FLAVOUR = "heki-6.12"
SOURCE_PACKAGE = "linux-source-6.12"
#: the version the patch was made against (bookworm-security, 2026-12-04)
SOURCE_VERSION = "6.12.118-1~deb12u1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
FRAGMENT = HERE / "heki-host" / "config.fragment"
PATCH = HERE / "heki-host" / "heki-v2-host.patch"
#: bump when the build steps below change in a way the inputs do not show
BUILD_VERSION = "1"
#: names modprobe resolves as built in (the fragment builds them in)
BUILTIN_MODULES = ("kernel/arch/x86/kvm/kvm.ko", "kernel/arch/x86/kvm/kvm-amd.ko",
                   "kernel/net/9p/9pnet.ko", "kernel/net/9p/9pnet_virtio.ko",
                   "kernel/fs/9p/9p.ko", "kernel/drivers/block/virtio_blk.ko",
                   "kernel/drivers/virtio/virtio_pci.ko", "kernel/fs/ext4/ext4.ko")


def _log(msg: str) -> None:
    print(f"vm-image: {msg}", file=sys.stderr, flush=True)


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True).stdout.strip()
    except OSError as e:
        return f"{cmd[0]}: {e}"


def source_version() -> str:
    """The installed linux-source-6.12 version ("" when it is not installed)."""
    out = _out(["dpkg-query", "-W", "-f=${Status} ${Version}", SOURCE_PACKAGE])
    return out.split()[-1] if out.startswith("install ok installed") else ""


def toolchain() -> str:
    return _out(["gcc", "--version"]).splitlines()[0] + " / pahole " + _out(["pahole",
                                                                            "--version"])


def build_key(version: str) -> str:
    h = hashlib.sha256()
    for part in (BUILD_VERSION.encode(), version.encode(), FRAGMENT.read_bytes(),
                 PATCH.read_bytes(), toolchain().encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:12]


def fragment_options() -> list[str]:
    """The ``CONFIG_X=y`` lines of the fragment (each must survive olddefconfig)."""
    return [line.strip() for line in FRAGMENT.read_text().splitlines()
            if line.startswith("CONFIG_") and line.strip().endswith("=y")]


def _run(step: str, cmd: list[str], log: Path, **kw) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        raise ImageBuildError(step, f"$ {' '.join(cmd)} (exit {proc.returncode}); log "
                                    f"{log}:\n{log.read_text(errors='replace')[-6000:]}")


def _build_kernel(cache: Path, version: str, dest: Path) -> None:
    build = cache / "heki-build"
    log = cache / "heki-build.log"
    log.write_text(f"building {SOURCE_PACKAGE} {version} into {dest}\n")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    _run("extract source", ["tar", "-C", str(build), "-xJf", str(SOURCE_TARBALL)], log)
    src = build / "linux-source-6.12"
    _run("apply heki-v2-host.patch", ["patch", "-p1", "--batch", "--forward", "-i",
                                      str(PATCH)], log, cwd=src)
    _run("make tinyconfig", ["make", "tinyconfig"], log, cwd=src)
    _run("merge fragment", ["scripts/kconfig/merge_config.sh", "-m", ".config",
                            str(FRAGMENT)], log, cwd=src)
    _run("make olddefconfig", ["make", "olddefconfig"], log, cwd=src)
    config = (src / ".config").read_text().splitlines()
    missing = [o for o in fragment_options() if o not in config]
    if missing:
        raise ImageBuildError("config", f"olddefconfig dropped {missing} (a dependency "
                                        "is missing from config.fragment)")
    env = dict(os.environ, CCACHE_DIR=str(cache / "ccache"), CCACHE_BASEDIR=str(src),
               CCACHE_NOHASHDIR="1", CCACHE_MAXSIZE="2G", KBUILD_BUILD_USER="hekitrace",
               KBUILD_BUILD_HOST="vm-tier", KBUILD_BUILD_TIMESTAMP="2026-01-01")
    cc = "ccache gcc" if shutil.which("ccache") else "gcc"
    jobs = os.environ.get("HEKITRACE_VM_JOBS") or str(os.cpu_count() or 2)
    _run("make bzImage", ["make", f"-j{jobs}", f"CC={cc}", "bzImage"], log, cwd=src, env=env)
    release = (src / "include/config/kernel.release").read_text().strip()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy2(src / "arch/x86/boot/bzImage", tmp / "bzImage")
    shutil.copy2(src / ".config", tmp / "config")
    # what CONFIG_IKHEADERS serves as /sys/kernel/kheaders.tar.xz
    shutil.copy2(src / "kernel/kheaders_data.tar.xz", tmp / "kheaders.tar.xz")
    (tmp / "release").write_text(release + "\n")
    (tmp / "source").write_text(f"{SOURCE_PACKAGE} {version}\n{toolchain()}\n")
    (tmp / "BUILT").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shutil.rmtree(build, ignore_errors=True)


def _build_root(cache: Path, kernel: Path, release: str, dest: Path) -> None:
    # the debootstrap root of the stock images (built here if they were not yet)
    base = image._base_tar(cache, image._Apt(cache / "apt"))
    stage = Path(tempfile.mkdtemp(prefix="stage-heki-", dir=cache))
    try:
        _run_plain = image._run
        _run_plain("untar base", ["tar", "-C", str(stage), "-xf", str(base)])
        (stage / "boot").mkdir(exist_ok=True)
        shutil.copy2(kernel / "config", stage / "boot" / f"config-{release}")
        mods = stage / "lib/modules" / release
        mods.mkdir(parents=True, exist_ok=True)
        (mods / "modules.builtin").write_text("\n".join(BUILTIN_MODULES) + "\n")
        (mods / "modules.order").write_text("")
        # bcc's kernel headers: the CONFIG_IKHEADERS archive, unpacked at build time
        # (bcc would unpack /sys/kernel/kheaders.tar.xz itself, but the root has no xz)
        headers = stage / "usr/src" / f"linux-headers-{release}"
        headers.mkdir(parents=True)
        with tarfile.open(kernel / "kheaders.tar.xz") as tar:
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(headers, filter="tar")
            else:   # a Python without extraction filters (our own build's archive)
                tar.extractall(headers)
        (mods / "build").symlink_to(f"/usr/src/linux-headers-{release}")
        _run_plain("depmod root", ["depmod", "-b", str(stage), release])
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(kernel / "bzImage", tmp / "vmlinuz")
        size = int(subprocess.check_output(["du", "-sm", str(stage)]).split()[0]) + 600
        _run_plain("mke2fs", ["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-d",
                              str(stage), "-F", str(tmp / "root.img"), f"{size}M"])
        (tmp / "abi").write_text(release + "\n")
        (tmp / "READY").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def ensure_image() -> L1Image:
    """The cached Heki-host L1 image, building the kernel and/or the root as needed."""
    version = source_version()
    if not version or not SOURCE_TARBALL.exists():
        raise ImageBuildError("source", f"{SOURCE_PACKAGE} is not installed "
                                        f"({SOURCE_TARBALL} missing): run scripts/setup.sh")
    if version != SOURCE_VERSION:
        _log(f"note: {SOURCE_PACKAGE} {version} is installed, the patch was made against "
             f"{SOURCE_VERSION}; building {version} (see tests/vm/hekihost.py)")
    cache = image.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    built = False
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = build_key(version)
        kernel = cache / f"heki-kernel-{key}"
        if not (kernel / "BUILT").exists():
            _log(f"building the Heki-v2-compatible test host kernel ({SOURCE_PACKAGE} "
                 f"{version}, key {key}): minutes with a warm ccache, up to tens of "
                 "minutes cold on a busy 2-core host")
            t0 = time.monotonic()
            _build_kernel(cache, version, kernel)
            _log(f"kernel built in {time.monotonic() - t0:.0f} s")
            built = True
        release = (kernel / "release").read_text().strip()
        dest = cache / f"{FLAVOUR}-{key}-{image.recipe_hash()}"
        if not (dest / "READY").exists():
            _log(f"assembling the L1 root for {FLAVOUR} ({release}) into {dest}")
            _build_root(cache, kernel, release, dest)
            built = True
        for old in cache.glob("heki-kernel-*"):
            if old.name != kernel.name:
                _log(f"pruning {old} (another heki-host build)")
                shutil.rmtree(old, ignore_errors=True)
        for old in cache.glob(f"{FLAVOUR}-*"):
            if old.name != dest.name:
                _log(f"pruning {old} (another heki-host image)")
                shutil.rmtree(old, ignore_errors=True)
    return L1Image(FLAVOUR, release, dest, dest / "vmlinuz", None, dest / "root.img",
                   built, time.monotonic() - start)


if __name__ == "__main__":
    img = ensure_image()
    print(f"{img.flavour} {img.abi} {img.directory} built_now={img.built_now} "
          f"{img.build_seconds:.1f}s")
