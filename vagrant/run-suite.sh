#!/usr/bin/env bash
# In-box runner for the Vagrant matrix (vagrant/README.md). Runs inside a provisioned box:
#   runtime phase: tests/vm/guest.sh, the same script the local VM runs (`make vm-test`),
#                  which runs the lockdown suite at none, raises lockdown to integrity,
#                  runs it, raises to confidentiality and runs it again;
#   boot phase:    guest.sh once more in a box booted with lockdown=confidentiality.
# Around it, the platform-tier checks: doctor chooses the backend the capability matrix
# promises and says why it skipped the others, auditd logs every exec, and on the degraded
# tier the agent itself starts. CentOS 7's kernel has no lockdown, so it runs only those.
# Results (JUnit XML, pytest logs, doctor JSON, kernel facts) go to one directory, which
# matrix.sh copies back to the host.
#
# --dry-run prints the plan and changes nothing; it runs anywhere. Without it the script
# refuses to run outside a box that vagrant/provision marked.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: run-suite.sh [--phase runtime|boot] [--results DIR] [--dry-run]
environment: EXECGUARD_SRC (/vagrant), EXECGUARD_VENV (/opt/execguard/venv),
  EXECGUARD_BOX (from /etc/execguard-vagrant/box), EXECGUARD_EXPECT_BACKEND (space list),
  EXECGUARD_SECURITYFS (default /sys/kernel/security; for --dry-run tests)
USAGE
}

PHASE=runtime
DRY=0
RESULTS=
while [ $# -gt 0 ]; do
    case $1 in
        --phase) PHASE=${2:?--phase needs runtime or boot}; shift 2 ;;
        --results) RESULTS=${2:?--results needs a directory}; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
case $PHASE in runtime|boot) ;; *) usage >&2; exit 2 ;; esac

SRC=${EXECGUARD_SRC:-/vagrant}
VENV=${EXECGUARD_VENV:-/opt/execguard/venv}
STATE=${EXECGUARD_STATE:-/etc/execguard-vagrant}
SECURITYFS=${EXECGUARD_SECURITYFS:-/sys/kernel/security}
LOCKDOWN=$SECURITYFS/lockdown
RESULTS=${RESULTS:-/var/tmp/execguard-results/$PHASE}
BOX=${EXECGUARD_BOX:-$(cat "$STATE/box" 2>/dev/null || echo unknown)}
VM_MARKER=execguard.vmtest=1   # tests/vm refuses to run without it
FAILED=0

log() { printf 'run-suite[%s]: %s\n' "$BOX" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# guest.sh raises lockdown, which cannot be undone until reboot: only in a box we provisioned.
require_box() {
    [ -r "$STATE/box" ] || die "$STATE/box missing: not a provisioned execguard box, refusing"
    if command -v systemd-detect-virt >/dev/null && ! systemd-detect-virt -q; then
        die "systemd-detect-virt says this is not a VM: refusing to raise lockdown here"
    fi
    [ "$(id -u)" -eq 0 ] || die "run as root (vagrant ssh -c 'sudo ...')"
    tr ' ' '\n' < /proc/cmdline | grep -qx "$VM_MARKER" \
        || die "$VM_MARKER is not on the kernel command line (provision/bootargs.sh adds it)"
}

expected_backends() {
    if [ -n "${EXECGUARD_EXPECT_BACKEND:-}" ]; then
        printf '%s\n' "$EXECGUARD_EXPECT_BACKEND"
    elif [ "$BOX" = centos7 ]; then
        printf 'fanotify-open audit-only\n'   # no BPF LSM, no BTF, no FAN_OPEN_EXEC_PERM
    else
        printf 'bpf-lsm\n'
    fi
}

current_mode() { grep -o '\[[a-z]*\]' "$LOCKDOWN" | tr -d '[]'; }

xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'; }

# JUnit for the tier checks: one <testsuite> per label, written by write_junit.
CASES=""
NCASES=0
NFAIL=0
record_case() {   # NAME ok|fail MESSAGE
    local msg
    msg=$(printf '%s' "$3" | xml_escape)
    NCASES=$((NCASES + 1))
    if [ "$2" = ok ]; then
        CASES+="  <testcase classname=\"vagrant.$BOX\" name=\"$1\"><system-out>$msg</system-out></testcase>"$'\n'
        log "PASS $1: $3"
    else
        NFAIL=$((NFAIL + 1))
        FAILED=1
        CASES+="  <testcase classname=\"vagrant.$BOX\" name=\"$1\"><failure message=\"$msg\"/></testcase>"$'\n'
        log "FAIL $1: $3"
    fi
}
write_junit() {   # FILE SUITE
    {
        printf '<?xml version="1.0" encoding="utf-8"?>\n'
        printf '<testsuites><testsuite name="%s" tests="%d" failures="%d">\n' "$2" "$NCASES" "$NFAIL"
        printf '%s' "$CASES"
        printf '</testsuite></testsuites>\n'
    } > "$1"
    CASES=""
    NCASES=0
    NFAIL=0
}

collect_facts() {   # LABEL
    local f=$RESULTS/facts-$1.txt
    {
        printf 'box %s\nkernel %s\ncmdline %s\n' "$BOX" "$(uname -r)" "$(cat /proc/cmdline)"
        printf 'lsm %s\n' "$(cat "$SECURITYFS/lsm" 2>/dev/null || echo none)"
        printf 'lockdown %s\n' "$(cat "$LOCKDOWN" 2>/dev/null || echo unsupported)"
        cat "$STATE/versions" 2>/dev/null || true
        dmesg 2>/dev/null | grep -i lockdown || true
    } > "$f"
}

# doctor's choice must be the one the capability matrix promises for this box, and every
# backend it skipped must say why.
check_doctor() {   # LABEL
    local out=$RESULTS/doctor-$1.json verdict rc=0
    "$VENV/bin/execguard" doctor --json > "$out" 2> "$RESULTS/doctor-$1.err" || rc=$?
    if [ "$rc" -ge 2 ]; then
        record_case "doctor-$1" fail "doctor exited $rc: $(tail -n 3 "$RESULTS/doctor-$1.err")"
        return 0
    fi
    verdict=$("$VENV/bin/python" - "$out" "$(expected_backends)" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
want = sys.argv[2].split()
b = rep["backend"]
silent = [r["backend"] for r in b["reasons"] if r["status"] != "chosen" and not r["why"].strip()]
if b["chosen"] not in want:
    print(f"fail chose {b['chosen']}, expected one of {want}")
elif silent:
    print(f"fail no reason given for skipping {silent}")
else:
    why = "; ".join(f"{r['backend']}: {r['why']}" for r in b["reasons"])
    print(f"ok chose {b['chosen']} ({why})")
PY
) || verdict="fail cannot read $out"
    record_case "doctor-$1" "${verdict%% *}" "${verdict#* }"
}

# The execguard-exec audit rule (provision/audit-rules.sh) logs an exec of a fresh file.
check_exec_audited() {   # LABEL
    local dir canary deadline
    dir=$(mktemp -d /var/tmp/execguard-canary.XXXXXX)
    canary=$dir/canary-$1
    cp /bin/true "$canary"
    "$canary"
    deadline=$((SECONDS + 15))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ausearch -i -k execguard-exec --start recent 2>/dev/null | grep -qF "$canary"; then
            record_case "exec-audited-$1" ok "auditd logged the exec of $canary (key execguard-exec)"
            rm -rf "$dir"
            return 0
        fi
        sleep 1
    done
    record_case "exec-audited-$1" fail "no execguard-exec audit record for $canary within 15 s"
    rm -rf "$dir"
}

# The agent itself starts, in monitor mode (it blocks nothing), and reports its backend.
check_agent_starts() {   # LABEL
    local tmp pid status="" deadline
    tmp=$(mktemp -d /var/tmp/execguard-agent.XXXXXX)
    "$VENV/bin/execguard" run --mode monitor --quiet --state-dir "$tmp/state" \
        --log-dir "$tmp/log" > "$RESULTS/agent-$1.log" 2>&1 &
    pid=$!
    deadline=$((SECONDS + 90))
    while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$pid" 2>/dev/null; do
        status=$("$VENV/bin/execguard" status --json --state-dir "$tmp/state" 2>/dev/null) && break
        status=""
        sleep 1
    done
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$tmp"
    if [ -z "$status" ]; then
        record_case "agent-starts-$1" fail "the agent did not answer status within 90 s (agent-$1.log)"
        return 0
    fi
    printf '%s\n' "$status" > "$RESULTS/agent-status-$1.json"
    local backend
    backend=$(printf '%s' "$status" | "$VENV/bin/python" -c \
        'import json,sys; print(json.load(sys.stdin).get("backend"))')
    if [[ " $(expected_backends) " == *" $backend "* ]]; then
        record_case "agent-starts-$1" ok "agent ran with backend $backend"
    else
        record_case "agent-starts-$1" fail "agent ran with backend $backend, expected $(expected_backends)"
    fi
}

tier_checks() {   # LABEL
    if [ "$DRY" = 1 ]; then
        log "dry-run: tier checks '$1' (doctor expects: $(expected_backends); exec audited)"
        return 0
    fi
    collect_facts "$1"
    check_doctor "$1"
    check_exec_audited "$1"
    [ "$BOX" = centos7 ] && check_agent_starts "$1"
    write_junit "$RESULTS/tier-$1.xml" "vagrant.$BOX.tier.$1"
}

# The suite itself is tests/vm/guest.sh, the same script the local VM runs: it raises
# lockdown between runs and writes junit-<label>.xml and rc-<label> per lockdown mode.
run_guest() {   # PHASE LABEL...
    local phase=$1
    shift
    if [ "$DRY" = 1 ]; then
        log "dry-run: would build the fixtures into $RESULTS/fixtures (tests.vm.guest_env prebuild)"
        log "dry-run: would run $SRC/tests/vm/guest.sh $RESULTS $phase (modes: $*)"
        return 0
    fi
    log "building the tests/vm fixtures (Go binaries, keys) in the box"
    (cd "$SRC" && "$VENV/bin/python" -m tests.vm.guest_env prebuild "$RESULTS/fixtures" >/dev/null) \
        || { log "prebuilding the fixtures failed"; FAILED=1; return 0; }
    "$SRC/tests/vm/guest.sh" "$RESULTS" "$phase" || { log "guest.sh exited $?"; FAILED=1; }
    # judge by the files, as scripts/vm-run.sh does: a missing run, failure or skip fails
    "$VENV/bin/python" - "$RESULTS" "$@" <<'PY' || FAILED=1
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, labels = Path(sys.argv[1]), sys.argv[2:]
bad = []
for label in labels:
    xml, rc_file = out / f"junit-{label}.xml", out / f"rc-{label}"
    rc = rc_file.read_text().strip() if rc_file.exists() else "missing"
    if not xml.exists():
        print(f"{label}: no JUnit XML (rc {rc})")
        bad.append(label)
        continue
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"{label}: {n} rc {rc}")
    if rc != "0" or n["tests"] == 0 or n["failures"] or n["errors"] or n["skipped"]:
        bad.append(label)
sys.exit(f"FAILED: {', '.join(bad)}" if bad else 0)
PY
}

[ "$DRY" = 1 ] || require_box
if [ "$DRY" = 0 ]; then
    mkdir -p "$RESULTS"
    # a rerun must not be judged by the files of an earlier one
    rm -rf "$RESULTS/fixtures" "$RESULTS/guest-times.txt"
    for f in "$RESULTS"/*; do
        case ${f##*/} in
            junit-*|rc-*|pytest-*|env-*|dmesg-*|tier-*|doctor-*|facts-*|agent-*) rm -f "$f" ;;
        esac
    done
fi
log "phase $PHASE, results in $RESULTS"

if [ ! -e "$LOCKDOWN" ]; then
    # CentOS 7: no lockdown LSM, so no lockdown modes to run the suite under
    log "no $LOCKDOWN: this kernel has no lockdown; platform-tier checks only"
    [ "$PHASE" = boot ] && die "the boot phase needs a kernel with lockdown"
    tier_checks unsupported
elif [ "$PHASE" = boot ]; then
    [ "$(current_mode)" = confidentiality ] || die "booted at lockdown $(current_mode), not confidentiality"
    tier_checks boot-confidentiality
    run_guest boot confidentiality-boot
else
    [ "$(current_mode)" = none ] \
        || die "booted at lockdown $(current_mode): the runtime phase starts at none (Secure Boot?)"
    tier_checks none
    run_guest runtime none integrity confidentiality
    # the doctor and audit checks once more, now that lockdown is at its highest
    [ "$DRY" = 1 ] || tier_checks "after-$(current_mode)"
fi

if [ "$DRY" = 0 ]; then
    ausearch -m ANOM_EXEC --start boot -i > "$RESULTS/ausearch-anom-exec.txt" 2>&1 || true
fi
if [ "$DRY" = 1 ]; then
    log "dry-run: plan complete, nothing was changed"
elif [ "$FAILED" = 0 ]; then
    log "all passed"
else
    log "FAILURES: see the JUnit files in $RESULTS"
fi
exit "$FAILED"
