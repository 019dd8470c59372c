#!/usr/bin/env bash
# `make bench-lsm`: the bpf-lsm exec overhead (bench/lsm_overhead.py) inside the lockdown test
# VM, which `make vm-setup` prepares: Debian's stock kernel under qemu TCG via virtme-ng,
# the host root fs shared read-only, the repo as a guest-only overlay. BPF LSM programs
# cannot load on the build host. Results: $RESULTS/vm-bench/lsm-overhead.json (+ console).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
RESULTS=${RESULTS:-test-results}
OUT=$(mkdir -p "$RESULTS/vm-bench" && cd "$RESULTS/vm-bench" && pwd)
APPEND=${EG_BENCH_APPEND:-lockdown=confidentiality}  # the strictest mode the backend runs in
ARGS=${EG_BENCH_ARGS:-}  # e.g. "--rounds 3 --blocks 4 --block 30"
DEADLINE=${EG_BENCH_DEADLINE:-2400}

die() { printf 'vm-bench-lsm: ERROR: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root"
[ -x "$VENV/bin/vng" ] || die "$VENV/bin/vng missing: run 'make vm-setup'"
kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null \
       | grep -o 'linux-image-[0-9][^ ,]*' | head -n 1 | sed 's/^linux-image-//') || true
if [ -z "$kver" ] || [ ! -r "/boot/vmlinuz-$kver" ]; then
    die "Debian's linux-image-amd64 kernel is not installed: run 'make vm-setup'"
fi

rm -rf "${OUT:?}"/*
"$VENV/bin/python" bench/lsm_overhead.py prebuild "$OUT/target" >/dev/null \
    || die "building the signed Go target failed"
guest="cd $REPO && export PATH=$REPO/$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
guest+=" LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1 && $REPO/$VENV/bin/python bench/lsm_overhead.py"
guest+=" run $OUT/target --out $OUT/lsm-overhead.json $ARGS > $OUT/bench.log 2>&1;"
guest+=" echo \$? > $OUT/rc"
start=$(date +%s)
PATH="$REPO/$VENV/bin:$PATH" timeout -k 30 "$DEADLINE" "$VENV/bin/vng" \
    -r "/boot/vmlinuz-$kver" --disable-kvm --disable-microvm -m "${EG_VM_MEMORY:-2G}" --cpus 2 \
    --overlay-rwdir "$REPO" --rwdir "$OUT" \
    --append "lsm=lockdown,capability,bpf execguard.vmtest=1 $APPEND" \
    -- "bash -c '$guest'" </dev/null >"$OUT/console.log" 2>&1 || true
echo "vm-bench-lsm: $(( $(date +%s) - start )) s; rc $(cat "$OUT/rc" 2>/dev/null || echo missing)"
[ "$(cat "$OUT/rc" 2>/dev/null)" = 0 ] || die "the bench failed: see $OUT/bench.log"
"$VENV/bin/python" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["summary"], indent=1))' \
    "$OUT/lsm-overhead.json"
