#!/usr/bin/env bash
# Ubuntu 22.04: the distro's BCC (0.18) is known to fail against jammy's kernel headers
# (iovisor/bcc#3993, LP #1969626) and has no KMOD_RET, so BCC is built from its release
# source against the distro's LLVM 14. auditd is not installed by default.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "${EXECGUARD_SRC:-/vagrant}/vagrant/provision/common.sh"
require_root

BCC_VERSION=${EXECGUARD_BCC_VERSION:-0.31.0}
BCC_URL=https://github.com/iovisor/bcc/releases/download/v$BCC_VERSION/bcc-src-with-submodule.tar.gz
BCC_SHA256=${EXECGUARD_BCC_SHA256:-}   # pin it for CI: the tarball is fetched from GitHub

export DEBIAN_FRONTEND=noninteractive
kver=$(uname -r)
PKGS=(python3 python3-venv python3-pip python3-audit auditd openssl binutils file git make
      kmod procps gcc libc6-dev golang-go curl ca-certificates "linux-headers-$kver"
      # BCC build dependencies (the BCC INSTALL.md list for jammy)
      bison build-essential cmake flex libedit-dev libllvm14 llvm-14-dev libclang-14-dev
      zlib1g-dev libelf-dev libfl-dev python3-setuptools liblzma-dev libdebuginfod-dev
      libpolly-14-dev)   # LLVM 14's cmake files reference libPolly.a
if [ "${EXECGUARD_UBUNTU_HWE:-0}" = 1 ]; then
    # the 6.8 HWE kernel; the reboot in the bootargs step boots it
    PKGS+=(linux-generic-hwe-22.04 linux-headers-generic-hwe-22.04)
fi
apt-get update -qq
log "installing ${PKGS[*]}"
apt-get install -y -qq --no-install-recommends "${PKGS[@]}"

# The packaged BCC would shadow the one we build.
for p in python3-bpfcc bpfcc-tools libbpfcc libbpfcc-dev; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        log "removing the distro's $p (BCC 0.18)"
        apt-get purge -y -qq "$p"
    fi
done

have=$(/usr/bin/python3 -c 'import bcc; print(bcc.__version__)' 2>/dev/null || true)
if [ "$have" != "$BCC_VERSION" ]; then
    log "building BCC $BCC_VERSION from source (distro BCC is 0.18; found '${have:-none}')"
    work=$(mktemp -d)
    curl -fsSL --retry 3 -o "$work/bcc.tar.gz" "$BCC_URL" || die "cannot download $BCC_URL"
    if [ -n "$BCC_SHA256" ]; then
        printf '%s  %s\n' "$BCC_SHA256" "$work/bcc.tar.gz" | sha256sum -c - \
            || die "BCC tarball checksum mismatch"
    fi
    tar -xzf "$work/bcc.tar.gz" -C "$work"
    mkdir -p "$work/bcc/build"
    (
        cd "$work/bcc/build"
        cmake -DCMAKE_INSTALL_PREFIX=/usr -DPYTHON_CMD=python3 -DENABLE_EXAMPLES=OFF \
              -DENABLE_TESTS=OFF -DENABLE_MAN=OFF .. >/dev/null
        make -j"$(nproc)" >/dev/null
        make install >/dev/null
    ) || die "BCC $BCC_VERSION failed to build"
    rm -rf "$work"
    ldconfig
fi

systemctl enable --now auditd
make_venv /usr/bin/python3 --system-site-packages
check_bcc "$EXECGUARD_VENV/bin/python" 0.19
mark_box ubuntu2204
record_versions
