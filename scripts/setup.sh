#!/usr/bin/env bash
# Set up a machine to run hekitrace from this checkout (idempotent: re-running is harmless).
#  - Debian packages: python3-bpfcc (bcc; NEVER the unrelated PyPI "bcc"), kernel headers,
#    promtool, rsvg-convert, QEMU + debootstrap for the vm test tier.
#  - Kernel headers for the running kernel, or Debian's generic ones linked in with a
#    warning (reference/build-host.md): safe because no BPF program takes a struct layout
#    from headers; offsets come from BTF.
#  - A venv in .venv made from /usr/bin/python3 with --system-site-packages (to see bcc),
#    with hekitrace installed editable plus its test dependencies.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv="${HEKITRACE_VENV:-$here/.venv}"
log() { printf 'setup: %s\n' "$*" >&2; }

need_root() { if [ "$(id -u)" != 0 ]; then log "must run as root (apt-get, /lib/modules)"; exit 1; fi; }

install_packages() {
    local pkgs=(python3-bpfcc bpfcc-tools python3-venv python3-pip linux-headers-amd64
                prometheus librsvg2-bin bpftool qemu-system-x86 debootstrap e2fsprogs
                cpio zstd kmod)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
    # The prometheus package starts a server we do not want; tests start their own.
    systemctl disable --now prometheus >/dev/null 2>&1 || true
    pkill -x prometheus 2>/dev/null || true
}

install_headers() {
    local rel build
    rel=$(uname -r)
    build="/lib/modules/$rel/build"
    if [ -e "$build/include/linux/kconfig.h" ] || [ -e "$build/include/generated/autoconf.h" ]; then
        return
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$rel" >/dev/null 2>&1; then
        log "installed linux-headers-$rel"
        return
    fi
    local amd64 common
    amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    if [ -z "$amd64" ]; then log "no kernel headers available; bcc cannot compile"; exit 1; fi
    common="${amd64%-amd64}-common"
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$amd64" "/lib/modules/$rel/build"
    ln -sfn "$common" "/lib/modules/$rel/source"
    log "WARNING: no headers packaged for kernel $rel; using $(basename "$amd64") instead."
    log "WARNING: safe for hekitrace (struct offsets come from BTF), not for other bcc tools."
}

make_venv() {
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
        rm -rf "$venv"
        /usr/bin/python3 -m venv --system-site-packages "$venv"
    fi
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -e "$here[test]" >&2
    "$venv/bin/python" -c 'import bcc, hekitrace' || { log "venv cannot import bcc"; exit 1; }
}

mount_tracefs() {
    if [ ! -e /sys/kernel/tracing/events ]; then
        mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
    fi
}

need_root
install_packages
install_headers
mount_tracefs
make_venv
log "ready: $venv/bin/hekitrace"
