#!/usr/bin/env bash
# CentOS 7, the degraded tier: kernel 3.10 has no BPF LSM, no lockdown, no BTF and no
# FAN_OPEN_EXEC_PERM; its BCC (0.10) has Python 2 bindings only and its python3 is 3.6.
# So: repositories from the CentOS vault (the distro is EOL and its mirrors are gone),
# Python 3.9 built from source, no BCC. The agent is expected to choose fanotify-open or
# audit-only, and auditd logs every exec (audit-rules.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "${EXECGUARD_SRC:-/vagrant}/vagrant/provision/common.sh"
require_root

VAULT=${EXECGUARD_CENTOS_VAULT:-http://vault.centos.org/7.9.2009}
EPEL=${EXECGUARD_EPEL_ARCHIVE:-https://archives.fedoraproject.org/pub/archive/epel/7}
PY_VERSION=${EXECGUARD_C7_PYTHON:-3.9.23}
PY_SHA256=${EXECGUARD_C7_PYTHON_SHA256:-}   # pin it for CI
PY_PREFIX=/opt/python$PY_VERSION

# mirrorlist.centos.org is gone: set the stock repo files aside and use the vault.
if [ ! -f /etc/yum.repos.d/execguard-vault.repo ]; then
    mkdir -p /etc/yum.repos.d/disabled-by-execguard
    for f in /etc/yum.repos.d/*.repo; do
        [ -e "$f" ] && mv "$f" /etc/yum.repos.d/disabled-by-execguard/
    done
    # shellcheck disable=SC2016  # $basearch is for yum, not the shell
    {
        for r in os updates extras; do
            printf '[vault-%s]\nname=CentOS 7.9.2009 %s (vault)\n' "$r" "$r"
            printf 'baseurl=%s/%s/$basearch/\n' "$VAULT" "$r"
            printf 'gpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7\n\n'
        done
        # EPEL 7 lives in the Fedora archive now; only openssl11 is taken from it
        printf '[epel-archive]\nname=EPEL 7 (archive)\nbaseurl=%s/$basearch/\n' "$EPEL"
        printf 'gpgcheck=0\nenabled=1\nincludepkgs=openssl11*\n'
    } > /etc/yum.repos.d/execguard-vault.repo
    yum clean all -q
fi

PKGS=(audit gcc make tar curl binutils kmod file git procps-ng which openssl-devel
      bzip2-devel libffi-devel zlib-devel xz-devel sqlite-devel readline-devel
      openssl11 openssl11-devel)
log "installing ${PKGS[*]}"
yum install -y -q "${PKGS[@]}"

# Python >= 3.9: the software collections stop at 3.8 (rh-python38), so build 3.9 from
# python.org's source into its own prefix. The system python3 (3.6) is left alone.
if [ ! -x "$PY_PREFIX/bin/python3.9" ]; then
    log "building Python $PY_VERSION into $PY_PREFIX"
    work=$(mktemp -d)
    curl -fsSL --retry 3 -o "$work/py.tgz" \
        "https://www.python.org/ftp/python/$PY_VERSION/Python-$PY_VERSION.tgz" \
        || die "cannot download Python $PY_VERSION"
    if [ -n "$PY_SHA256" ]; then
        printf '%s  %s\n' "$PY_SHA256" "$work/py.tgz" | sha256sum -c - \
            || die "Python tarball checksum mismatch"
    fi
    tar -xzf "$work/py.tgz" -C "$work"
    (
        cd "$work/Python-$PY_VERSION"
        ./configure --prefix="$PY_PREFIX" --with-ensurepip=install >/dev/null
        make -j"$(nproc)" >/dev/null
        make altinstall >/dev/null
    ) || die "Python $PY_VERSION failed to build"
    rm -rf "$work"
fi
"$PY_PREFIX/bin/python3.9" -c 'import ssl, ctypes, sqlite3' || die "Python $PY_VERSION lacks ssl/ctypes"

# cryptography >= 44 publishes no wheels for glibc 2.17 (manylinux2014 stops at 43.0.3),
# so pip builds it from source: that needs Rust (rustup; CentOS 7 has none new enough) and
# OpenSSL >= 1.1.1 (EPEL's openssl11, beside the system 1.0.2).
if [ ! -x /root/.cargo/bin/cargo ]; then
    log "installing a Rust toolchain with rustup (for the cryptography build)"
    curl -fsSL --retry 3 https://sh.rustup.rs -o /tmp/rustup-init.sh || die "cannot fetch rustup"
    sh /tmp/rustup-init.sh -y -q --profile minimal || die "rustup failed"
fi
export PATH="/root/.cargo/bin:$PATH"
export OPENSSL_INCLUDE_DIR=/usr/include/openssl11 OPENSSL_LIB_DIR=/usr/lib64/openssl11

# No --system-site-packages: the only distro bindings (bcc, audit) are Python 2 modules.
make_venv "$PY_PREFIX/bin/python3.9"
mark_box centos7
record_versions
