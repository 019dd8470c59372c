#!/usr/bin/env bash
# `make rpm`: packaging/rpm/execguard.spec built with rpmbuild (the `rpm` package on Debian).
# OUT (default dist/) receives execguard-VERSION-1.ARCH.rpm. docs/packaging.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-dist}
log() { printf 'build-rpm: %s\n' "$*" >&2; }
command -v rpmbuild >/dev/null || { log "rpmbuild missing (package rpm)"; exit 2; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
pyver=$("${PYTHON:-/usr/bin/python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
rpmbuild -bb --quiet --define "_topdir $top" --define "eg_version $version" \
    --define "eg_src $(pwd)" --define "eg_pyver $pyver" packaging/rpm/execguard.spec >&2
mkdir -p "$OUT"
rpm=$(find "$top/RPMS" -name "execguard-$version-*.rpm" | head -n 1)
[ -n "$rpm" ] || { log "rpmbuild made no package"; exit 1; }
cp "$rpm" "$OUT/"
log "built $OUT/$(basename "$rpm")"
echo "$OUT/$(basename "$rpm")"
