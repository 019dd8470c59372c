#!/usr/bin/env bash
# Rocky 9: everything the agent needs comes from the distro (BaseOS/AppStream).
# BPF LSM is active by default here; bootargs.sh then finds nothing to add.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "${EXECGUARD_SRC:-/vagrant}/vagrant/provision/common.sh"
require_root

PKGS=(python3 python3-pip python3-bcc bcc-tools python3-audit audit openssl binutils file
      git make kmod procps-ng gcc glibc-devel golang elfutils-libelf-devel tar)
log "installing ${PKGS[*]}"
dnf install -y -q "${PKGS[@]}"

# BCC compiles against the running kernel's headers. After a minor-release bump the old
# kernel-devel can be gone from the repos (Rocky moves it to its vault): then install the
# newest kernel with its headers; the reboot in the bootargs step boots that kernel.
kver=$(uname -r)
if ! dnf install -y -q "kernel-devel-$kver"; then
    log "kernel-devel-$kver is not in the repos: installing the newest kernel and kernel-devel"
    dnf install -y -q kernel kernel-devel
fi

make_venv /usr/bin/python3 --system-site-packages
check_bcc "$EXECGUARD_VENV/bin/python" 0.19
mark_box rocky9
record_versions
