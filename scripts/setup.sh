#!/usr/bin/env bash
# Idempotent host set-up for execguard on Debian/Ubuntu (apt) or Rocky/RHEL (dnf).
# Installs only what is missing, then makes .venv from the distro python3 with
# --system-site-packages so that the distro's bcc and audit bindings import.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=${WITH_TEST:-0}
VENV=${VENV:-.venv}
PY=/usr/bin/python3   # the distro interpreter: a pyenv python on PATH has no distro bcc

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "run as root (prefix the command with sudo): packages and BPF need it"
    exit 2
fi

APT_RUN=(python3 python3-venv python3-pip python3-bpfcc bpfcc-tools libbpfcc python3-audit
         auditd openssl binutils file git make kmod procps python3-prometheus-client)
# runc and busybox-static: the container test (a real runtime starting a real overlay rootfs);
# fuse3: the setuid fusermount3 a user mounts a FUSE filesystem with (test_agent_fuse.py)
APT_TEST=(golang-go gcc libc6-dev dpkg-dev nodejs npm vagrant vagrant-libvirt shellcheck systemd
          runc busybox-static bpftool strace gdb debootstrap rpm
          python3-argparse-manpage groff-base man-db rsyslog fuse3)
DNF_RUN=(python3 python3-pip python3-bcc bcc-tools python3-audit audit openssl binutils file git
         make kmod procps-ng)
DNF_TEST=(golang gcc glibc-devel nodejs npm)

missing_apt() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s\n' "$p"
    done
}

if command -v apt-get >/dev/null; then
    pkgs=("${APT_RUN[@]}")
    [ "$WITH_TEST" = 1 ] && pkgs+=("${APT_TEST[@]}")
    # node from another source (e.g. nodesource) already satisfies nodejs/npm
    if command -v node >/dev/null && command -v npm >/dev/null; then
        mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | grep -vx -e nodejs -e npm)
    fi
    mapfile -t need < <(missing_apt "${pkgs[@]}")
    if [ "${#need[@]}" -gt 0 ]; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
elif command -v dnf >/dev/null; then
    pkgs=("${DNF_RUN[@]}")
    [ "$WITH_TEST" = 1 ] && pkgs+=("${DNF_TEST[@]}")
    need=()
    for p in "${pkgs[@]}"; do rpm -q "$p" >/dev/null 2>&1 || need+=("$p"); done
    if [ "${#need[@]}" -gt 0 ]; then
        log "installing ${need[*]}"
        dnf install -y -q "${need[@]}"
    fi
else
    log "no apt-get or dnf: install python3 (>= 3.9), bcc's python bindings and auditd by hand"
fi

# BCC compiles against kernel headers. Where the running kernel has none (a custom kernel,
# as on our Firecracker VMs), fall back to the distro's newest headers and say so loudly:
# struct offsets then come from another kernel, which the agent's identity self-test checks.
ensure_kernel_headers() {
    local kver arch hdr common
    kver=$(uname -r)
    [ -e "/lib/modules/$kver/build/Makefile" ] && return 0
    command -v apt-get >/dev/null || { log "no kernel headers for $kver: install kernel-devel-$kver"; return 0; }
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
        apt-get install -y -qq --no-install-recommends "linux-headers-$kver"
        return 0
    fi
    arch=$(dpkg --print-architecture)
    dpkg-query -W -f='${Status}' "linux-headers-$arch" 2>/dev/null | grep -q "install ok installed" \
        || apt-get install -y -qq --no-install-recommends "linux-headers-$arch"
    hdr=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    common=${hdr%-"$arch"}-common
    if [ -z "$hdr" ] || [ ! -d "$common" ]; then
        log "WARNING: no kernel headers for $kver and none could be installed; BCC cannot compile"
        return 0
    fi
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
    log "WARNING: no kernel headers exist for the running kernel $kver."
    log "WARNING: linked $hdr (+ -common) as its build tree so that BCC compiles;"
    log "WARNING: struct offsets come from that kernel: the agent's identity self-test guards this."
}

ensure_kernel_headers

stamp="$VENV/.execguard-setup"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-test$WITH_TEST"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV from $PY (--system-site-packages)"
    "$PY" -m venv --system-site-packages "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    extra=""
    [ "$WITH_TEST" = 1 ] && extra="[test]"
    log "installing execguard$extra into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".$extra"
    printf '%s' "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import agent' >/dev/null
log "ready: $VENV/bin/execguard"
