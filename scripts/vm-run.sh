#!/usr/bin/env bash
# `make vm-test`: boot Debian's stock kernel under qemu TCG with virtme-ng (the host root fs
# shared read-only, the repo as a guest-only overlay, the results dir shared read-write) and
# run tests/vm inside it:
#   boot 1 (lockdown none at boot): none -> integrity -> confidentiality, raised at runtime;
#   boot 2 (lockdown=confidentiality on the command line): the boot-time case.
# One JUnit XML per mode lands in $RESULTS/vm/. Any missing result, failure, error or skip
# fails the run. The host's own lockdown is never touched: only the guest raises its own.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
RESULTS=${RESULTS:-test-results}
OUT=$(mkdir -p "$RESULTS/vm" && cd "$RESULTS/vm" && pwd)
BOOT_DEADLINE=${EG_VM_BOOT_DEADLINE:-2400}  # seconds per boot, suite included (3 runs in boot 1)
MEMORY=${EG_VM_MEMORY:-2G}
PHASES=${EG_VM_PHASES:-runtime boot}
# Development only (the README's make test sets neither): a subset of tests/vm, and of the
# runtime phase's lockdown modes, e.g. EG_VM_TESTS=tests/vm/test_attacks_vm.py
# EG_VM_RUNTIME_MODES=none EG_VM_PHASES=runtime make vm-test
RUNTIME_MODES=${EG_VM_RUNTIME_MODES:-none integrity confidentiality}

log() { printf 'vm-run: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the guest runs the suite as root)"
[ -x "$VENV/bin/vng" ] || die "$VENV/bin/vng missing: run 'make vm-setup'"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run 'make vm-setup'"
kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null \
       | grep -o 'linux-image-[0-9][^ ,]*' | head -n 1 | sed 's/^linux-image-//') || true
if [ -z "$kver" ] || [ ! -r "/boot/vmlinuz-$kver" ]; then
    die "Debian's linux-image-amd64 kernel is not installed: run 'make vm-setup'"
fi
[ -e "/lib/modules/$kver/build/Makefile" ] || die "no headers for $kver: run 'make vm-setup'"

rm -rf "${OUT:?}"/*
mkdir -p "$OUT/fixtures"
# the guest sees no host environment: the selection travels in the shared results dir
printf 'EG_VM_TESTS=%q\nEG_VM_RUNTIME_MODES=%q\n' "${EG_VM_TESTS:-tests/vm}" "$RUNTIME_MODES" \
    >"$OUT/selection.env"
log "building the Go and key fixtures on the host (Go crawls under TCG)"
"$VENV/bin/python" -m tests.vm.guest_env prebuild "$OUT/fixtures" >/dev/null \
    || die "prebuilding the VM fixtures failed"

boot() {  # phase extra-append
    local phase=$1 extra=$2 start rc=0
    log "boot $phase: $kver, TCG, $MEMORY, append '$extra'"
    start=$(date +%s)
    PATH="$REPO/$VENV/bin:$PATH" timeout -k 30 "$BOOT_DEADLINE" "$VENV/bin/vng" \
        -r "/boot/vmlinuz-$kver" --disable-kvm --disable-microvm -m "$MEMORY" --cpus 2 \
        --overlay-rwdir "$REPO" --rwdir "$OUT" \
        --append "lsm=lockdown,capability,bpf execguard.vmtest=1 $extra" \
        -- "$REPO/tests/vm/guest.sh $OUT $phase" </dev/null 2>&1 | tee "$OUT/console-$phase.log" \
        || rc=$?
    echo "$phase $(( $(date +%s) - start ))" >>"$OUT/host-times.txt"
    log "boot $phase finished in $(( $(date +%s) - start )) s (vng exit $rc)"
}

total_start=$(date +%s)
labels=()
for phase in $PHASES; do
    case "$phase" in
        # shellcheck disable=SC2206  # a list of words
        runtime) boot runtime ""; labels+=($RUNTIME_MODES) ;;
        boot) boot boot "lockdown=confidentiality"; labels+=(confidentiality-boot) ;;
        *) die "unknown phase $phase (EG_VM_PHASES: runtime boot)" ;;
    esac
done
echo "total $(( $(date +%s) - total_start ))" >>"$OUT/host-times.txt"

# Judge by the files the guest wrote, not by vng's exit status.
"$VENV/bin/python" - "$OUT" "${labels[@]}" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, labels = Path(sys.argv[1]), sys.argv[2:]
bad = []
print(f"{'mode':22} {'tests':>5} {'fail':>4} {'err':>4} {'skip':>4} {'secs':>6}  rc")
for label in labels:
    xml, rc_file = out / f"junit-{label}.xml", out / f"rc-{label}"
    rc = rc_file.read_text().strip() if rc_file.exists() else "missing"
    if not xml.exists():
        print(f"{label:22} no JUnit XML (rc {rc})")
        bad.append(label)
        continue
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    secs = float(suite.get("time", 0))
    print(f"{label:22} {n['tests']:5} {n['failures']:4} {n['errors']:4} {n['skipped']:4} "
          f"{secs:6.0f}  {rc}")
    if rc != "0" or n["tests"] == 0 or n["failures"] or n["errors"] or n["skipped"]:
        bad.append(label)
if bad:
    sys.exit(f"vm-run: FAILED in {', '.join(bad)}: see {out}/pytest-<mode>.log")
print(f"vm-run: all {len(labels)} lockdown runs passed; JUnit XML in {out}")
EOF
log "timings (s): $(tr '\n' ' ' <"$OUT/host-times.txt")"
