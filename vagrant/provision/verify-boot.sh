#!/usr/bin/env bash
# After the reboot: the kernel must have booted with what bootargs.sh asked for, bpf must be
# an active LSM where the kernel has one, and BCC needs headers for the kernel that booted.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "${EXECGUARD_SRC:-/vagrant}/vagrant/provision/common.sh"
require_root

SECURITYFS=${EXECGUARD_SECURITYFS:-/sys/kernel/security}
box=$(cat "$EXECGUARD_STATE/box" 2>/dev/null) || die "$EXECGUARD_STATE/box missing: 'deps' did not finish"
kver=$(uname -r)
log "kernel $kver; cmdline: $(cat /proc/cmdline)"
log "lsm: $(cat "$SECURITYFS/lsm" 2>/dev/null || echo none); lockdown: $(cat "$SECURITYFS/lockdown" 2>/dev/null || echo unsupported)"

for f in "$EXECGUARD_STATE"/cmdline/*; do
    [ -e "$f" ] || continue
    want=$(cat "$f")
    grep -qwF -- "$want" /proc/cmdline || die "booted without $want (cmdline: $(cat /proc/cmdline))"
done
if [ -r "$SECURITYFS/lsm" ]; then
    case ",$(tr -d '\n' < "$SECURITYFS/lsm")," in
        *,bpf,*) ;;
        *) die "bpf is not an active LSM after the reboot: $(cat "$SECURITYFS/lsm")" ;;
    esac
fi
if [ "$box" != centos7 ]; then
    [ -e "/lib/modules/$kver/build/Makefile" ] \
        || die "no kernel headers for the booted kernel $kver: BCC cannot compile"
    check_bcc "$EXECGUARD_VENV/bin/python" 0.19
fi
auditctl -l | grep -q execguard-exec || die "the execguard-exec audit rule is not loaded after boot"
record_versions
log "boot verified on $box"
