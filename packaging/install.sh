#!/bin/bash
# Install hekitrace on a real Debian/Ubuntu hypervisor host (docs/install.md).
#
#   sudo packaging/install.sh                # packages, program, config, unit; start it
#   sudo packaging/install.sh --no-start     # install, enable nothing
#   packaging/install.sh --root /tmp/stage --no-packages --no-python --no-start
#                                            # stage the file layout only (packaging, tests)
#
# What goes where:
#   /opt/hekitrace/                  venv (--system-site-packages: Debian's bcc) + hekitrace
#   /usr/local/bin/hekitrace         symlink to the venv's console script
#   /usr/share/hekitrace/bpf/        BPF C sources bcc compiles at start (HEKITRACE_BPF_DIR)
#   /usr/share/hekitrace/{prometheus,grafana}/   alert rules and dashboard to copy
#   /etc/hekitrace/hekitrace.yaml    configuration (never overwritten: .dist written beside)
#   /var/lib/hekitrace/              state journal (0700)
#   /etc/systemd/system/hekitrace.service (+ .d/install.conf for HEKITRACE_BPF_DIR)
#   /usr/local/share/man/man8/hekitrace.8, /usr/share/doc/hekitrace/*.md
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
PACKAGES=1
PYTHON=1
START=1

log() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --no-packages) PACKAGES=0; shift ;;
        --no-python) PYTHON=0; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
if [ -n "$ROOT" ]; then
    START=0
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
elif [ "$(id -u)" != 0 ]; then
    die "must run as root (or stage with --root DIR)"
fi

install_packages() {
    command -v apt-get >/dev/null || die "needs apt-get (Debian or Ubuntu); see docs/install.md"
    local pkgs=(python3-bpfcc bpfcc-tools python3-venv python3-pip)
    local headers="linux-headers-$(uname -r)"
    apt-get update -q
    if apt-cache show "$headers" >/dev/null 2>&1; then
        pkgs+=("$headers")
    else
        log "warning: no package $headers: install headers for the running kernel by hand" \
            "(hekitrace check reports what is missing; struct offsets come from BTF)"
    fi
    # never 'pip install bcc': the PyPI project of that name is unrelated
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}"
}

install_python() {
    local venv="$ROOT/opt/hekitrace"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --upgrade "$SRC"
    mkdir -p "$ROOT/usr/local/bin"
    ln -sfn /opt/hekitrace/bin/hekitrace "$ROOT/usr/local/bin/hekitrace"
}

install_files() {
    install -d -m 0755 "$ROOT/usr/share/hekitrace/bpf" "$ROOT/usr/share/hekitrace/prometheus" \
        "$ROOT/usr/share/hekitrace/grafana" "$ROOT/usr/share/doc/hekitrace" \
        "$ROOT/usr/local/share/man/man8" "$ROOT/etc/systemd/system/hekitrace.service.d"
    install -m 0644 "$SRC"/bpf/*.c "$SRC"/bpf/*.h "$ROOT/usr/share/hekitrace/bpf/"
    install -m 0644 "$SRC"/packaging/prometheus/*.yml "$ROOT/usr/share/hekitrace/prometheus/"
    install -m 0644 "$SRC/packaging/grafana/hekitrace.json" "$ROOT/usr/share/hekitrace/grafana/"
    install -m 0644 "$SRC"/docs/*.md "$ROOT/usr/share/doc/hekitrace/"
    install -m 0644 "$SRC/docs/man/hekitrace.8" "$ROOT/usr/local/share/man/man8/"

    install -d -m 0755 "$ROOT/etc/hekitrace"
    if [ -e "$ROOT/etc/hekitrace/hekitrace.yaml" ]; then
        install -m 0644 "$SRC/configs/hekitrace.yaml" "$ROOT/etc/hekitrace/hekitrace.yaml.dist"
        log "kept /etc/hekitrace/hekitrace.yaml; the shipped one is hekitrace.yaml.dist"
    else
        install -m 0644 "$SRC/configs/hekitrace.yaml" "$ROOT/etc/hekitrace/hekitrace.yaml"
    fi
    install -d -m 0700 "$ROOT/var/lib/hekitrace"

    install -m 0644 "$SRC/packaging/systemd/hekitrace.service" "$ROOT/etc/systemd/system/"
    cat > "$ROOT/etc/systemd/system/hekitrace.service.d/install.conf" <<'CONF'
# Written by packaging/install.sh: where the installed BPF sources are.
[Service]
Environment=HEKITRACE_BPF_DIR=/usr/share/hekitrace/bpf
CONF
}

[ "$PACKAGES" = 1 ] && install_packages
[ "$PYTHON" = 1 ] && install_python
install_files
log "installed into ${ROOT:-/}"
if [ "$START" = 1 ]; then
    systemctl daemon-reload
    systemctl enable --now hekitrace.service
    log "started; verify with: hekitrace check && curl -s localhost:9864/metrics | head"
else
    log "not started; when ready: systemctl daemon-reload && systemctl enable --now hekitrace"
fi
