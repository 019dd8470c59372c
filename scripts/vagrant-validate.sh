#!/usr/bin/env bash
# Offline checks of the Vagrant matrix (CI runs this through tests/integration/test_vagrant.py):
#   - `vagrant validate` on vagrant/Vagrantfile with the libvirt provider (vagrant-libvirt
#     validates its own settings; the virtualbox block is only checked where VirtualBox is
#     installed, because Vagrant validates the config of the provider in use);
#   - shellcheck on every provisioning script and on the runners;
#   - the runners' --dry-run plans.
# Installs vagrant, vagrant-libvirt and shellcheck from Debian when missing. Exits non-zero
# on any failure. Boots nothing and downloads no box.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'vagrant-validate: %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

need=()
command -v vagrant >/dev/null || need+=(vagrant)
command -v shellcheck >/dev/null || need+=(shellcheck)
if ! dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q "install ok installed"; then
    need+=(vagrant-libvirt)
fi
if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}: run as root to install them from Debian"
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    lock=(-o DPkg::Lock::Timeout=600)
    apt-get "${lock[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { apt-get "${lock[@]}" update -qq \
             && apt-get "${lock[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } \
        || die "apt-get install ${need[*]} failed"
fi
log "$(vagrant --version), shellcheck $(shellcheck --version | sed -n 's/^version: //p')"

# validate writes machine state under .vagrant/: keep it out of the tree
dot=$(mktemp -d)
trap 'rm -rf "$dot"' EXIT
VAGRANT_CWD=vagrant VAGRANT_DOTFILE_PATH=$dot VAGRANT_DEFAULT_PROVIDER=libvirt \
    VAGRANT_CHECKPOINT_DISABLE=1 vagrant validate || die "vagrant validate"

scripts=(vagrant/provision/*.sh vagrant/run-suite.sh vagrant/matrix.sh scripts/vagrant-validate.sh)
shellcheck -x -P SCRIPTDIR "${scripts[@]}" || die "shellcheck"
log "shellcheck clean: ${scripts[*]}"

for s in "${scripts[@]}"; do
    [ -x "$s" ] || die "$s is not executable"
done

# The in-box runner's plan against a made-up securityfs (--dry-run changes nothing).
fake=$dot/securityfs
mkdir -p "$fake"
printf '[none] integrity confidentiality\n' > "$fake/lockdown"
plan=$(EXECGUARD_SECURITYFS=$fake EXECGUARD_BOX=rocky9 vagrant/run-suite.sh --dry-run 2>&1) \
    || die "run-suite.sh --dry-run: $plan"
grep -q "tests/vm/guest.sh /var/tmp/execguard-results/runtime runtime" <<< "$plan" || die "run-suite plan: $plan"
vagrant/matrix.sh --dry-run >/dev/null 2>&1 || die "matrix.sh --dry-run"
log "OK"
