#!/usr/bin/env bash
# Shared helpers for the box provisioning scripts (sourced, never run on its own).
# Boxes only: these functions install packages and change boot settings.

EXECGUARD_SRC=${EXECGUARD_SRC:-/vagrant}            # the repository, rsync'd by Vagrant
EXECGUARD_VENV=${EXECGUARD_VENV:-/opt/execguard/venv}
EXECGUARD_STATE=${EXECGUARD_STATE:-/etc/execguard-vagrant}   # marks a provisioned box

log() { printf 'provision: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (Vagrant's shell provisioner does by default)"
}

# The marker that run-suite.sh requires before it raises lockdown: only a box we
# provisioned ever gets its lockdown raised, never a developer's machine.
mark_box() {
    mkdir -p "$EXECGUARD_STATE"
    printf '%s\n' "$1" > "$EXECGUARD_STATE/box"
}

# make_venv PYTHON [--system-site-packages]: the agent and its test tools in a venv outside
# the synced folder (rsync would otherwise overwrite it), linked as $EXECGUARD_SRC/.venv so
# that repository commands (`.venv/bin/pytest`) work unchanged inside the box.
make_venv() {
    local py=$1
    shift
    [ -x "$py" ] || die "$py not found: cannot make the agent's venv"
    "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
        || die "$py is older than 3.9: the agent needs Python >= 3.9"
    if [ ! -x "$EXECGUARD_VENV/bin/python" ]; then
        log "creating $EXECGUARD_VENV from $py $*"
        mkdir -p "$(dirname "$EXECGUARD_VENV")"
        "$py" -m venv "$@" "$EXECGUARD_VENV"
    fi
    "$EXECGUARD_VENV/bin/python" -m pip install -q --upgrade pip
    log "installing execguard[test] from $EXECGUARD_SRC"
    "$EXECGUARD_VENV/bin/python" -m pip install -q -e "${EXECGUARD_SRC}[test]" \
        || die "pip install of execguard failed"
    ln -sfn "$EXECGUARD_VENV" "$EXECGUARD_SRC/.venv"
    "$EXECGUARD_VENV/bin/python" -c 'import agent' || die "the agent does not import"
}

# check_bcc PYTHON MIN: the venv's python imports bcc at MIN or newer.
check_bcc() {
    local py=$1 min=$2 ver
    ver=$("$py" -c 'import bcc; print(getattr(bcc, "__version__", "0"))' 2>/dev/null) \
        || die "$py cannot import bcc"
    if ! printf '%s\n%s\n' "$min" "$ver" | sort -V -C; then
        die "bcc $ver is older than $min"
    fi
    log "bcc $ver imports in $py"
}

# Record the package versions this run really got (platforms.md section 9 asks for them).
record_versions() {
    mkdir -p "$EXECGUARD_STATE"
    {
        printf 'kernel %s\n' "$(uname -r)"
        printf 'python %s\n' "$("$EXECGUARD_VENV/bin/python" -V 2>&1)"
        "$EXECGUARD_VENV/bin/python" -c 'import bcc; print("bcc", bcc.__version__)' 2>&1 \
            || printf 'bcc none\n'
        auditctl -v 2>&1 || true
    } > "$EXECGUARD_STATE/versions"
    log "versions: $(tr '\n' ';' < "$EXECGUARD_STATE/versions")"
}
