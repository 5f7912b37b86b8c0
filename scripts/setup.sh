#!/usr/bin/env bash
# Set up a machine to run hekitrace from this checkout. Idempotent: re-running is harmless
# and quick (nothing is reinstalled that is already in place). Non-interactive: safe as
# root in CI (CI=true, no stdin) and on a Debian or Ubuntu hypervisor host.
#  - Debian packages: python3-bpfcc (bcc; NEVER the unrelated PyPI "bcc"), promtool,
#    rsvg-convert, QEMU + debootstrap for the vm test tier, and the kernel build tools
#    plus linux-source-6.12 (pinned, from bookworm-security) for its Heki-v2-compatible
#    test host (tests/vm/hekihost.py). Packages the distribution does not have are
#    skipped with a warning, except the ones bcc itself needs.
#  - Kernel headers for the running kernel; where the distribution packages none for it,
#    its generic headers linked in with a warning (docs/kernel-support.md section 4): safe because
#    no hekitrace BPF program takes a struct layout from headers; offsets come from BTF.
#  - A venv in .venv made from /usr/bin/python3 (3.11+) with --system-site-packages (to see
#    bcc), with hekitrace installed editable plus its test dependencies.
# Environment: HEKITRACE_VENV (default: <checkout>/.venv).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv="${HEKITRACE_VENV:-$here/.venv}"
export DEBIAN_FRONTEND=noninteractive
# wait for another apt/dpkg (unattended-upgrades) instead of failing; keep old conffiles
apt_opts=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
          -o Dpkg::Options::=--force-confold)
log() { printf 'setup: %s\n' "$*" >&2; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (apt-get, /lib/modules, tracefs)"; }

need_apt() {
    command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
        || die "needs a Debian or Ubuntu system (apt-get, dpkg)"
}

# (outputs are captured before matching: "grep -q" closing a pipe early would make the
# writer die of SIGPIPE, which pipefail turns into a false "no")
installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [ "$status" = "install ok installed" ]
}
# has_candidate PKG: the configured archives offer PKG
has_candidate() {
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
    [[ "$policy" == *"Candidate: "* && "$policy" != *"Candidate: (none)"* ]]
}

apt_updated=0
# apt_update [if-empty]: refresh package lists once per run (with if-empty: only when
# there are none yet, so a re-run on a set-up machine needs no network)
apt_update() {
    if [ "${1:-}" = if-empty ] && compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        return 0
    fi
    if [ "$apt_updated" = 0 ]; then
        apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
        apt_updated=1
    fi
}

apt_install() {
    # Keep services of freshly installed packages (e.g. prometheus) from starting: the
    # tests start their own, and a production host did not ask for them. policy-rc.d is
    # Debian's documented switch (invoke-rc.d(8)); an existing one is left alone.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install "${apt_opts[@]}" --no-install-recommends "$@" </dev/null >&2
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
}

install_packages() {
    local pkgs=(python3-bpfcc bpfcc-tools python3-venv python3-pip
                prometheus librsvg2-bin bpftool qemu-system-x86 debootstrap e2fsprogs
                cpio zstd kmod systemd openssl
                dwarves flex bison libelf-dev bc ccache xz-utils patch make gcc)
    # without these there is no hekitrace at all; the rest serve tests and tools
    local essential=" python3-bpfcc python3-venv python3-pip "
    local missing=() wanted=()
    for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -gt 0 ] || return 0
    apt_update
    for p in "${missing[@]}"; do
        if has_candidate "$p"; then
            wanted+=("$p")
        elif [[ "$essential" == *" $p "* ]]; then
            die "package $p is not available from the configured archives"
        else
            warn "package $p is not available here; skipping it (tests needing it will fail)"
        fi
    done
    [ ${#wanted[@]} -gt 0 ] || return 0
    log "installing Debian packages: ${wanted[*]}"
    apt_install "${wanted[@]}"
}

# Debian's 6.12 kernel source for the vm tier's Heki host, at the version
# tests/vm/hekihost.py pins (SOURCE_VERSION) while the archive still has it; otherwise
# the current one (the tier then builds that and says so; see docs/vm-tier.md)
install_heki_source() {
    local pkg=linux-source-6.12 pin madison
    installed "$pkg" && return 0
    pin=$(sed -n 's/^SOURCE_VERSION = "\(.*\)"$/\1/p' "$here/tests/vm/hekihost.py")
    apt_update
    madison=$(apt-cache madison "$pkg" 2>/dev/null || true)
    if [ -n "$pin" ] && [[ "$madison" == *"| $pin |"* ]]; then
        log "installing $pkg=$pin"
        apt_install "$pkg=$pin"
    elif has_candidate "$pkg"; then
        warn "$pkg $pin is no longer in the archive; installing the current version"
        apt_install "$pkg"
    else
        warn "$pkg is not available (bookworm-security); the vm tier's Heki host cannot be built"
    fi
}

# tree_release DIR: the release a kernel header tree was built for
tree_release() {
    sed -n 's/^#define UTS_RELEASE "\(.*\)"$/\1/p' "$1/include/generated/utsrelease.h" \
        2>/dev/null | head -1
}

install_headers() {
    local rel build arch flavour generic tree src
    rel=$(uname -r)
    build="/lib/modules/$rel/build"
    if [ -d "$build" ] && [ "$(tree_release "$build")" = "$rel" ]; then
        return 0                                   # matching headers: nothing to do
    fi
    # refresh stale package lists before settling for a fallback, unless an earlier run
    # already did (the fallback link is in place): re-runs then need no network
    if [ -L "$build" ] && [ -d "$build" ]; then apt_update if-empty; else apt_update; fi
    if has_candidate "linux-headers-$rel"; then
        log "installing linux-headers-$rel"
        apt_install "linux-headers-$rel"
        [ "$(tree_release "$build")" = "$rel" ] && return 0
        warn "linux-headers-$rel installed but $build is not its tree"
    fi
    if [ -d "$build" ] && [ ! -L "$build" ]; then
        warn "$build is a real directory for release '$(tree_release "$build")', not $rel;"
        warn "leaving it alone; bcc will compile against it"
        return 0
    fi
    # Fallback: the distribution's generic headers. Debian: linux-headers-<arch> gives
    # /usr/src/linux-headers-<ver>-<arch> + -common; Ubuntu: linux-headers-generic gives
    # /usr/src/linux-headers-<ver>-generic + linux-headers-<ver>.
    arch=$(dpkg --print-architecture)
    if has_candidate "linux-headers-$arch"; then
        generic="linux-headers-$arch"; flavour="$arch"
    elif has_candidate linux-headers-generic; then
        generic=linux-headers-generic; flavour=generic
    else
        die "no kernel headers for $rel and no generic headers package; bcc cannot compile"
    fi
    installed "$generic" || apt_install "$generic"
    tree=$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$tree" ] || die "$generic installed no /usr/src/linux-headers-*-$flavour"
    src="${tree%-"$flavour"}-common"
    [ -d "$src" ] || src="${tree%-"$flavour"}"
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$tree" "$build"
    [ -d "$src" ] && ln -sfn "$src" "/lib/modules/$rel/source"
    warn "no headers packaged for kernel $rel; using $(basename "$tree") instead."
    warn "safe for hekitrace (struct offsets come from BTF), not for other bcc tools."
}

mount_tracefs() {
    if ! grep -qs ' /sys/kernel/tracing tracefs ' /proc/mounts; then
        if mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; then
            log "mounted tracefs on /sys/kernel/tracing"
        else
            warn "could not mount tracefs on /sys/kernel/tracing; tracepoints cannot attach"
        fi
    fi
}

make_venv() {
    local py=/usr/bin/python3 stamp want
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$py is $("$py" -V 2>&1); hekitrace needs Python 3.11 or newer"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
        log "creating the venv $venv"
        rm -rf "$venv"
        "$py" -m venv --system-site-packages "$venv"
    fi
    # reinstall only when the dependencies (pyproject.toml) changed since the last run
    stamp="$venv/.hekitrace-setup"
    want=$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
            || ! "$venv/bin/python" -c 'import hekitrace, pytest' 2>/dev/null; then
        "$venv/bin/python" -m pip install -q --upgrade pip </dev/null >&2
        "$venv/bin/python" -m pip install -q -e "$here[test]" </dev/null >&2
        echo "$want" >"$stamp"
    fi
    # The venv also sees the system dist-packages, and setuptools' editable finder runs
    # after them: a hekitrace installed from the .deb would shadow this checkout. A path
    # line of our own puts the checkout on sys.path ahead of dist-packages.
    "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        | { read -r site; echo "$here" >"$site/hekitrace-checkout.pth"; }
    "$venv/bin/python" -c 'import bcc, hekitrace' \
        || die "the venv cannot import bcc or hekitrace"
    "$venv/bin/python" -c 'import hekitrace, sys; sys.exit(not hekitrace.__file__.startswith(sys.argv[1]))' \
        "$here/hekitrace/" \
        || die "the venv imports hekitrace from $("$venv/bin/python" -c 'import hekitrace; print(hekitrace.__file__)'), not from $here"
    "$venv/bin/python" -c 'import bcc, sys; sys.exit(not hasattr(bcc, "BPF"))' \
        || die "'import bcc' in the venv is not Debian's python3-bpfcc (PyPI 'bcc'?)"
}

need_root
need_apt
install_packages
install_heki_source
install_headers
mount_tracefs
make_venv
log "ready: $venv/bin/hekitrace"
