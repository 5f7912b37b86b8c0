#!/usr/bin/env bash
# Build the Debian package (make deb; docs/install.md). Run as root on Debian 12 or newer:
# installs the build dependencies it lacks with apt-get (so `make test` stays lean), then
#  1. stages the checkout's files (tracked and new, not ignored) as hekitrace-VERSION/ in
#     build/deb/, with hekitrace_VERSION.orig.tar.gz made from them,
#  2. adds packaging/debian as its debian/ and runs dpkg-buildpackage -us -uc (source and
#     binary, patches from debian/patches applied by dpkg-source),
#  3. runs lintian on the result: any error fails the build (warnings carry overrides),
#  4. copies the .deb (and the source package) to dist/ and prints the .deb's path.
# Environment: HEKITRACE_DEB_DIST (default: <checkout>/dist).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dist="${HEKITRACE_DEB_DIST:-$here/dist}"
work="$here/build/deb"
export DEBIAN_FRONTEND=noninteractive
# Debian's own tools and python3 only: a python3.11 earlier in PATH (pyenv, a venv) would
# build the wheel without the distribution's setuptools and dh-python would pick it
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }

build_deps=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
            lintian dpkg-dev fakeroot)
missing=()
for p in "${build_deps[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing build dependencies (${missing[*]}); run as root"
    log "installing build dependencies: ${missing[*]}"
    apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null >&2
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
        "${missing[@]}" </dev/null >&2
fi

version=$(dpkg-parsechangelog -l "$here/packaging/debian/changelog" -S Version)
upstream=${version%-*}
py_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$here/hekitrace/__init__.py")
[ "$upstream" = "$py_version" ] \
    || die "packaging/debian/changelog is at $upstream, hekitrace/__init__.py at $py_version"

rm -rf "$work"
src="$work/hekitrace-$upstream"
mkdir -p "$src" "$dist"
# the checkout's own files: tracked (as they are in the work tree) and new ones git does not
# ignore; never .venv, build products or caches
(cd "$here" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$src"
tar --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$(dpkg-parsechangelog -l "$here/packaging/debian/changelog" -S Timestamp)" \
    -C "$work" -czf "$work/hekitrace_$upstream.orig.tar.gz" "hekitrace-$upstream"
cp -r "$here/packaging/debian" "$src/debian"

log "dpkg-buildpackage in $src"
(cd "$src" && dpkg-buildpackage -us -uc) >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; die "dpkg-buildpackage failed (log: $work/build.log)"; }

changes="$work/hekitrace_${version}_$(dpkg --print-architecture).changes"
log "lintian $(basename "$changes")"
lintian --fail-on error --info --display-info "$changes" | tee "$work/lintian.log" >&2 \
    || die "lintian reports errors (log: $work/lintian.log)"

deb="hekitrace_${version}_all.deb"
cp "$work/$deb" "$work/hekitrace_$version.dsc" "$work/hekitrace_$upstream.orig.tar.gz" \
    "$work"/hekitrace_"$version".debian.tar.* "$dist/"
log "built $dist/$deb"
echo "$dist/$deb"
