#!/usr/bin/env bash
# `make install` / `make uninstall`: the agent in a venv under $PREFIX, the systemd unit and
# its options file (docs/service.md). DESTDIR, PREFIX, UNITDIR and SYSCONFDIR are respected;
# with DESTDIR set nothing outside it is touched (no systemctl, no apt).
set -euo pipefail
cd "$(dirname "$0")/.."

ACTION=${1:-}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/execguard}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc}
DATADIR=${DATADIR:-/usr/local/share}  # the man page and bash completion (packages: /usr/share)
PY=${PYTHON:-/usr/bin/python3}  # the distro interpreter: its bcc and audit bindings import
PIP_OPTS=${PIP_OPTS:-}
DOCDIR=$PREFIX/share/doc/execguard
ROOT=$DESTDIR$PREFIX
UNIT=$DESTDIR$UNITDIR/execguard.service
DEFAULTS=$DESTDIR$SYSCONFDIR/default/execguard

log() { printf 'install: %s\n' "$*" >&2; }

case "$PREFIX" in
    /?*) ;;
    *) log "PREFIX must be an absolute path other than /, got '$PREFIX'"; exit 2 ;;
esac

# systemctl only on this machine's own root, and only where systemd is the running init
manager() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

is_our_venv() { [ -f "$ROOT/pyvenv.cfg" ] && [ -e "$ROOT/bin/execguard" ]; }

do_install() {
    # venv --clear empties the directory: only a missing or empty one, or our own venv
    if [ -d "$ROOT" ] && [ -n "$(ls -A "$ROOT")" ] && ! is_our_venv; then
        log "$ROOT exists, is not empty and is not an execguard venv: refusing to clear it" \
            "(choose another PREFIX, or remove it by hand)"
        exit 2
    fi
    log "venv with the agent in $ROOT"
    "$PY" -m venv --system-site-packages --clear "$ROOT"
    local compile=()
    [ -n "$DESTDIR" ] && compile=(--no-compile)  # bytecode would name the staging path
    # shellcheck disable=SC2086  # PIP_OPTS is a list of options
    "$ROOT/bin/pip" install --quiet --disable-pip-version-check "${compile[@]}" $PIP_OPTS .
    if [ -n "$DESTDIR" ]; then  # scripts, activate and pyvenv.cfg name the venv's final place
        grep -rlI -- "$ROOT" "$ROOT/bin" "$ROOT/pyvenv.cfg" | while read -r f; do
            sed -i "s#$ROOT#$PREFIX#g" "$f"
        done
    fi
    log "unit $UNIT"
    install -d -m 0755 "$(dirname "$UNIT")"
    sed -e "s#/opt/execguard#$PREFIX#g" -e "s#/etc/default/execguard#$SYSCONFDIR/default/execguard#g" \
        packaging/execguard.service > "$UNIT.tmp"
    chmod 0644 "$UNIT.tmp"
    mv "$UNIT.tmp" "$UNIT"
    if [ -e "$DEFAULTS" ]; then
        log "$DEFAULTS exists: kept (the shipped one is $DESTDIR$DOCDIR/execguard.default)"
    else
        install -D -m 0644 packaging/execguard.default "$DEFAULTS"
    fi
    install -D -m 0644 packaging/execguard.default "$DESTDIR$DOCDIR/execguard.default"
    install -D -m 0644 docs/service.md "$DESTDIR$DOCDIR/service.md"
    install -D -m 0644 packaging/policy-enforce.toml "$DESTDIR$DOCDIR/policy-enforce.toml"
    install -D -m 0644 packaging/rsyslog/60-execguard.conf \
        "$DESTDIR$DOCDIR/rsyslog-60-execguard.conf"
    # the service steps the Debian and RPM packages' scripts take (docs/packaging.md)
    install -D -m 0755 packaging/service-ctl "$ROOT/share/execguard/service-ctl"
    install -D -m 0644 packaging/man/execguard.1 "$DESTDIR$DATADIR/man/man1/execguard.1"
    install -D -m 0644 packaging/completion/execguard.bash \
        "$DESTDIR$DATADIR/bash-completion/completions/execguard"
    install -d -m 0755 "$DESTDIR$SYSCONFDIR/execguard/keys"
    if manager; then
        systemctl daemon-reload
        log "installed; start it with: systemctl enable --now execguard"
    else
        log "installed; on the target host: systemctl daemon-reload && systemctl enable --now execguard"
    fi
}

do_uninstall() {
    if manager && systemctl list-unit-files execguard.service >/dev/null 2>&1; then
        systemctl disable --now execguard.service || true
    fi
    rm -f "$UNIT" "$DESTDIR$DATADIR/man/man1/execguard.1" \
        "$DESTDIR$DATADIR/bash-completion/completions/execguard"
    manager && systemctl daemon-reload
    # only a venv this script made: never rm -rf an arbitrary PREFIX
    if is_our_venv; then
        rm -rf "$ROOT"
    elif [ -e "$ROOT" ]; then
        log "$ROOT is not an execguard venv: left alone"
    fi
    log "removed the unit and $ROOT; kept $SYSCONFDIR/default/execguard, $SYSCONFDIR/execguard," \
        "/var/lib/execguard and /var/log/execguard (remove them by hand if wanted)"
}

case "$ACTION" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) log "usage: $0 install|uninstall"; exit 2 ;;
esac
