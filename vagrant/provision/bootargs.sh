#!/usr/bin/env bash
# Kernel command-line changes for the boxes; Vagrant reboots after this script
# (`reboot: true` in the Vagrantfile) and verify-boot.sh checks the result.
#   enable-bpf-lsm            add bpf to the active LSM list (lsm=<current>,bpf) if missing,
#                             and execguard.vmtest=1, which marks a test machine: tests/vm
#                             and run-suite.sh refuse to run (and raise lockdown) without it
#   lockdown-confidentiality  boot with lockdown=confidentiality (the boot-time run)
#   lockdown-clear            drop lockdown= again
# RHEL family: grubby on every kernel. Ubuntu: a grub.d drop-in that sorts after the
# cloud image's 50-cloudimg-settings.cfg, then update-grub.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "${EXECGUARD_SRC:-/vagrant}/vagrant/provision/common.sh"
require_root

SECURITYFS=${EXECGUARD_SECURITYFS:-/sys/kernel/security}
EXPECT_DIR=$EXECGUARD_STATE/cmdline
mkdir -p "$EXPECT_DIR"

# set_arg NAME VALUE|"" : make NAME=VALUE part of every boot entry (or remove NAME).
set_arg() {
    local name=$1 value=$2 dropin=/etc/default/grub.d/99-execguard-$1.cfg
    if command -v grubby >/dev/null; then
        grubby --update-kernel=ALL --remove-args="$name"
        [ -z "$value" ] || grubby --update-kernel=ALL --args="$name=$value"
    elif command -v update-grub >/dev/null; then
        mkdir -p /etc/default/grub.d
        if [ -z "$value" ]; then
            rm -f "$dropin"
        else
            # shellcheck disable=SC2016  # grub expands $GRUB_CMDLINE_LINUX itself
            printf 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX %s=%s"\n' "$name" "$value" > "$dropin"
        fi
        update-grub
    else
        die "neither grubby nor update-grub: cannot change the kernel command line"
    fi
    if [ -z "$value" ]; then
        rm -f "$EXPECT_DIR/$name"
    else
        printf '%s=%s\n' "$name" "$value" > "$EXPECT_DIR/$name"
    fi
    log "kernel command line: ${name}=${value:-<removed>} (effective after the reboot)"
}

case "${1:-}" in
    enable-bpf-lsm)
        set_arg execguard.vmtest 1
        if [ ! -r "$SECURITYFS/lsm" ]; then
            # CentOS 7: no LSM list and no BPF LSM to enable; the agent degrades instead
            log "no $SECURITYFS/lsm: this kernel has no BPF LSM; nothing to add"
            exit 0
        fi
        lsms=$(tr -d '\n' < "$SECURITYFS/lsm")
        case ",$lsms," in
            *,bpf,*) log "bpf is already an active LSM ($lsms)"; exit 0 ;;
        esac
        set_arg lsm "$lsms,bpf"
        ;;
    lockdown-confidentiality)
        [ -e "$SECURITYFS/lockdown" ] || { log "no lockdown LSM here: nothing to do"; exit 0; }
        set_arg lockdown confidentiality
        ;;
    lockdown-clear)
        set_arg lockdown ""
        ;;
    *)
        die "usage: bootargs.sh enable-bpf-lsm|lockdown-confidentiality|lockdown-clear"
        ;;
esac
