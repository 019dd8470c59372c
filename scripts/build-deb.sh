#!/usr/bin/env bash
# `make deb`: a Debian package of what `make install` puts on a host (docs/packaging.md):
# the agent in its own venv under /opt/execguard, the unit in /lib/systemd/system,
# /etc/default/execguard as a conffile, and maintainer scripts that start and stop the
# service cleanly. State, cache, logs and the anti-rollback version live in /var/lib and
# /var/log/execguard, which the package does not own: an upgrade or a removal keeps them, a
# purge removes them. OUT (default dist/) receives execguard_VERSION_ARCH.deb.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-dist}
PY=${PYTHON:-/usr/bin/python3}

log() { printf 'build-deb: %s\n' "$*" >&2; }

command -v dpkg-deb >/dev/null || { log "dpkg-deb missing (package dpkg)"; exit 2; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
arch=$(dpkg --print-architecture)
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
pynext=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

log "staging the install (venv, unit, defaults) in $stage"
# --ignore-installed: every Python dependency inside the venv, whatever the build host has;
# only bcc and audit come from the distro (they are not on PyPI), as Depends say
DESTDIR=$stage PREFIX=/opt/execguard UNITDIR=/lib/systemd/system SYSCONFDIR=/etc DATADIR=/usr/share \
    PIP_OPTS="--ignore-installed" PYTHON="$PY" ./scripts/install.sh install

# byte code compiled in the staging tree (the venv's own pip) names the staging path
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
install -d -m 0755 "$stage/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$stage/DEBIAN/$script"
done
printf '/etc/default/execguard\n' >"$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: execguard
Version: $version
Architecture: $arch
Maintainer: execguard developers <execguard@localhost>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< $pynext), python3-bpfcc, python3-audit, libc6
Recommends: auditd, linux-headers-$arch
Section: admin
Priority: optional
Homepage: file:///opt/execguard/share/doc/execguard/service.md
Description: only Go binaries with a trusted cosign/Sigstore signature execute
 A host agent: BPF LSM (with fanotify and other fallbacks) denies the exec of a
 binary in scope that carries no signature the host's policy trusts. Every decision
 goes to auditd and to a decision log. Installs in monitor mode, which never blocks:
 /opt/execguard/share/doc/execguard/service.md says how to enforce.
EOF
mkdir -p "$OUT"
deb="$OUT/execguard_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
log "built $deb"
echo "$deb"
