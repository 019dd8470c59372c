#!/usr/bin/env bash
# Host side of the Vagrant matrix (vagrant/README.md): for each machine, bring it up
# (provisioning installs, sets lsm=...,bpf and reboots, then verifies the boot), run the
# lockdown suite at runtime-raised modes, reboot with lockdown=confidentiality for the
# boot-time run where the kernel has lockdown, and copy every result back to
#   test-results/vagrant/<machine>/<phase>/
# The synced folder is rsync (host -> guest only), so results come back over
# `vagrant ssh -c` as a base64 tar stream. --dry-run prints the vagrant commands only.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")

usage() {
    cat <<'USAGE'
usage: vagrant/matrix.sh [--provider libvirt|virtualbox] [--keep] [--dry-run] [MACHINE...]
  MACHINE: centos7 ubuntu2204 rocky9 (default: all three, one after the other)
  --keep     leave the machines running (default: vagrant destroy -f after each)
  results:   test-results/vagrant/<machine>/{runtime,boot}/ (JUnit XML, doctor JSON, facts)
USAGE
}

PROVIDER=${VAGRANT_DEFAULT_PROVIDER:-libvirt}
KEEP=0
DRY=0
MACHINES=()
while [ $# -gt 0 ]; do
    case $1 in
        --provider) PROVIDER=${2:?--provider needs a name}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        centos7|ubuntu2204|rocky9) MACHINES+=("$1"); shift ;;
        *) usage >&2; exit 2 ;;
    esac
done
[ "${#MACHINES[@]}" -gt 0 ] || MACHINES=(centos7 ubuntu2204 rocky9)
RESULTS=${EXECGUARD_VAGRANT_RESULTS:-$ROOT/test-results/vagrant}
REMOTE=/var/tmp/execguard-results
RUNNER=/vagrant/vagrant/run-suite.sh
export VAGRANT_CWD=$HERE

log() { printf 'matrix: %s\n' "$*" >&2; }
v() {
    if [ "$DRY" = 1 ]; then
        printf 'dry-run: vagrant %s\n' "$*" >&2
    else
        vagrant "$@"
    fi
}

fetch() {   # MACHINE PHASE
    local dest=$RESULTS/$1
    if [ "$DRY" = 1 ]; then
        log "dry-run: would copy $1:$REMOTE/$2 to $dest/$2"
        return 0
    fi
    mkdir -p "$dest"
    # `vagrant ssh -c` runs the command on a pty (its --[no-]tty defaults to true, and
    # `--no-tty` is taken by vagrant's global non-interactive flag): base64 survives it
    vagrant ssh "$1" --no-tty -c "sudo tar -C $REMOTE -czf - $2 | base64 -w0" \
        | tr -d '\r\n' | base64 -d | tar -xz -C "$dest" \
        || { log "could not copy $1 $2 results"; return 1; }
    log "results: $dest/$2"
}

has_lockdown() {   # MACHINE
    if [ "$DRY" = 1 ]; then
        [ "$1" != centos7 ]   # what the capability matrix expects; the real run asks the box
        return
    fi
    vagrant ssh "$1" --no-tty -c 'test -e /sys/kernel/security/lockdown' >/dev/null 2>&1
}

failed=()
for m in "${MACHINES[@]}"; do
    log "== $m ($PROVIDER)"
    ok=1
    v up "$m" --provider "$PROVIDER" || { failed+=("$m:up"); continue; }
    v ssh "$m" --no-tty -c "sudo $RUNNER --phase runtime" || ok=0
    fetch "$m" runtime || ok=0
    if has_lockdown "$m"; then
        # two calls: within one, Vagrant runs provisioners in Vagrantfile order
        if v provision "$m" --provision-with lockdown-boot \
            && v provision "$m" --provision-with verify-boot; then
            v ssh "$m" --no-tty -c "sudo $RUNNER --phase boot" || ok=0
            fetch "$m" boot || ok=0
            v provision "$m" --provision-with lockdown-clear || true
        else
            ok=0
        fi
    else
        log "$m: no lockdown in this kernel: no boot-time run"
    fi
    [ "$ok" = 1 ] || failed+=("$m")
    [ "$KEEP" = 1 ] || v destroy -f "$m" || true
done

if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED: ${failed[*]} (results under $RESULTS)"
    exit 1
fi
if [ "$DRY" = 1 ]; then
    log "dry-run: nothing was started"
else
    log "all machines passed (results under $RESULTS)"
fi
