#!/bin/bash
# Runs INSIDE the test VM (scripts/vm-run.sh boots it): the tests/vm suite once per lockdown
# level, raising the level between runs. Usage: guest.sh RESULTS_DIR runtime|boot
#   runtime: the kernel booted at none; run none, raise to integrity, run, raise to
#            confidentiality, run (raising is one-way until reboot).
#   boot:    the kernel booted with lockdown=confidentiality; run once.
# Writes junit-<label>.xml, pytest-<label>.log, rc-<label> and env-<label>.txt per run.
set -u
RES=${1:?results dir}
PHASE=${2:?runtime or boot}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY="$REPO/.venv/bin/python"
MARKER=execguard.vmtest=1
LOCKDOWN=/sys/kernel/security/lockdown
export PATH="$REPO/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export PYTHONUNBUFFERED=1 HOME=/root LC_ALL=C.UTF-8
PYTEST_DEADLINE=${EG_VM_PYTEST_DEADLINE:-900}  # seconds per mode; a hung run fails, never hangs
# Development: a subset of the suite and of the runtime modes (make vm-test never sets these;
# scripts/vm-run.sh writes what EG_VM_TESTS and EG_VM_RUNTIME_MODES said into selection.env)
# shellcheck disable=SC1091
[ -r "$RES/selection.env" ] && . "$RES/selection.env"
TESTS=${EG_VM_TESTS:-tests/vm}
RUNTIME_MODES=${EG_VM_RUNTIME_MODES:-none integrity confidentiality}
# doctor's BCC probes (one child, several compiles of 6-30 s each under TCG on a shared CPU)
export EXECGUARD_PROBE_TIMEOUT=${EG_VM_PROBE_TIMEOUT:-200}

say() { printf 'vm-guest: %s\n' "$*"; }

# The one place that raises lockdown, so it must be sure it is not the host.
if ! tr ' ' '\n' </proc/cmdline | grep -qx "$MARKER"; then
    say "REFUSING: $MARKER is not on the kernel command line; this is not the test VM"
    exit 3
fi
if [ ! -d "$RES" ] || [ ! -w "$RES" ]; then
    say "results dir $RES is not writable"
    exit 3
fi
cd "$REPO" || exit 3

current() { sed -n 's/.*\[\(.*\)\].*/\1/p' "$LOCKDOWN"; }

env_facts() {
    {
        echo "kernel: $(uname -r)"
        echo "cmdline: $(cat /proc/cmdline)"
        echo "lsm: $(cat /sys/kernel/security/lsm)"
        echo "lockdown: $(cat "$LOCKDOWN")"
        echo "cpus: $(nproc)"
        echo "headers: $(readlink -f "/lib/modules/$(uname -r)/build")"
    } >"$RES/env-$1.txt"
}

run_mode() {  # mode label origin
    local mode=$1 label=$2 origin=$3 start rc
    if [ "$(current)" != "$mode" ]; then
        say "raising lockdown $(current) -> $mode"
        echo "$mode" >"$LOCKDOWN" || { say "cannot raise lockdown to $mode"; echo 90 >"$RES/rc-$label"; return; }
    fi
    env_facts "$label"
    say "pytest under lockdown=$mode ($origin)"
    start=$(date +%s)
    # shellcheck disable=SC2086  # TESTS is a list of paths or node ids
    timeout -k 10 "$PYTEST_DEADLINE" "$PY" -m pytest $TESTS -p no:cacheprovider -v --durations=0 \
        --lockdown-mode="$mode" --lockdown-origin="$origin" --vm-results="$RES" \
        --junitxml="$RES/junit-$label.xml" -o junit_suite_name="vm-$label" \
        >"$RES/pytest-$label.log" 2>&1
    rc=$?
    echo "$rc" >"$RES/rc-$label"
    echo "$label $(( $(date +%s) - start ))" >>"$RES/guest-times.txt"
    tail -n 15 "$RES/pytest-$label.log"
    say "lockdown=$mode: pytest exit $rc in $(( $(date +%s) - start )) s"
}

echo "boot-$PHASE $(cut -d' ' -f1 /proc/uptime)" >>"$RES/guest-times.txt"
case "$PHASE" in
    runtime)
        [ "$(current)" = none ] || { say "expected to boot at none, found $(current)"; exit 4; }
        for mode in $RUNTIME_MODES; do
            run_mode "$mode" "$mode" runtime
        done
        ;;
    boot)
        [ "$(current)" = confidentiality ] || { say "expected lockdown=confidentiality at boot"; exit 4; }
        run_mode confidentiality confidentiality-boot boot
        ;;
    *) say "unknown phase $PHASE"; exit 2 ;;
esac
dmesg | grep -iE 'lockdown|module verification|bpf' >"$RES/dmesg-$PHASE.txt" 2>&1
say "done ($PHASE)"
