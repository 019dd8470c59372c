#!/usr/bin/env bash
# Every exec goes to auditd, whatever the enforcement backend: the degraded tier (CentOS 7)
# relies on it, and the other boxes keep the same rule so the records compare.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "${EXECGUARD_SRC:-/vagrant}/vagrant/provision/common.sh"
require_root

RULES=/etc/audit/rules.d/execguard.rules
KEY=execguard-exec
command -v auditctl >/dev/null || die "auditctl not found: the distro script installs audit"

# Some images ship '-a task,never', which turns syscall auditing off for every task.
for f in /etc/audit/rules.d/*.rules; do
    [ -e "$f" ] || continue
    if grep -Eq '^-a[[:space:]]+(task,never|never,task)' "$f"; then
        log "WARNING: $f disables syscall auditing ('-a task,never'): commenting it out"
        sed -i -E 's/^(-a[[:space:]]+(task,never|never,task).*)$/# execguard: \1/' "$f"
    fi
done

printf '%s\n' "# execguard: log every exec (vagrant/provision/audit-rules.sh)" \
    "-a always,exit -F arch=b64 -S execve -k $KEY" > "$RULES"

# auditd refuses systemctl restart on RHEL; `service` and augenrules work everywhere.
if ! auditctl -s | grep -Eq 'pid [1-9]'; then
    service auditd start || systemctl start auditd
fi
augenrules --load >/dev/null || die "augenrules --load failed"
auditctl -l | grep -q -- "-k $KEY\|key=$KEY" || die "the $KEY rule is not loaded: auditctl -l"
auditctl -s | grep -Eq 'enabled 1|enabled 2' || die "auditing is not enabled: auditctl -s"
log "audit rule $KEY loaded; auditd $(auditctl -s | grep -o 'pid [0-9]*')"
