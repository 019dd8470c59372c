#!/usr/bin/env bash
# Idempotent set-up for the local lockdown test VM (`make vm-setup`, docs/vm-testing.md).
# Installs Debian's qemu (TCG), Debian's stock kernel with its matching headers (the guest
# compiles BCC programs against the booted kernel's headers), and virtme-ng from PyPI into
# the project venv. Every failure is loud: a missing VM is a failed run, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
log() { printf 'vm-setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs Debian packages"
command -v apt-get >/dev/null || die "the test VM needs Debian's packages (apt-get not found)"
[ -x "$VENV/bin/python" ] || die "$VENV missing: run 'make setup-test' first"

arch=$(dpkg --print-architecture)
[ "$arch" = amd64 ] || die "the test VM is set up for amd64 only (this host is $arch)"

# busybox-static: virtme-ng's initramfs and fallback init (--no-virtme-ng-init) use it.
APT=(qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static)
need=()
for p in "${APT[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt run (a concurrent setup) instead of failing on its lock.
    lock=(-o DPkg::Lock::Timeout=900)
    apt-get "${lock[@]}" update -qq || die "apt-get update failed"
    apt-get "${lock[@]}" install -y -qq --no-install-recommends "${need[@]}" \
        || die "apt-get install ${need[*]} failed: the VM suite cannot run"
fi

# The kernel the meta-package points at, and its headers: both must exist or BCC in the
# guest has nothing to compile against.
kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' \
       | head -n 1 | sed 's/^linux-image-//')
[ -n "$kver" ] || die "cannot tell which kernel linux-image-amd64 installs"
[ -r "/boot/vmlinuz-$kver" ] || die "/boot/vmlinuz-$kver missing after install"
[ -d "/lib/modules/$kver/kernel" ] || die "/lib/modules/$kver has no modules"
[ -e "/lib/modules/$kver/build/Makefile" ] \
    || die "no headers at /lib/modules/$kver/build: install linux-headers-$kver"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after install"

if ! "$VENV/bin/python" -c 'import virtme_ng' 2>/dev/null; then
    log "installing virtme-ng into $VENV"
    "$VENV/bin/python" -m pip install -q virtme-ng || die "pip install virtme-ng failed"
fi
[ -x "$VENV/bin/vng" ] || die "$VENV/bin/vng missing after pip install virtme-ng"

log "ready: kernel $kver, $(qemu-system-x86_64 --version | head -n 1), vng $("$VENV/bin/vng" --version 2>&1 | tail -n 1)"
