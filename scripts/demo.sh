#!/usr/bin/env bash
# A verification demo in a private temp dir: make a key, sign a binary, verify it, tamper, verify.
set -euo pipefail
EG=$(command -v "${1:-execguard}" || true)
[ -n "$EG" ] || { echo "demo: execguard not found" >&2; exit 2; }
EG=$(readlink -f "$EG")
work=$(mktemp -d /tmp/execguard-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

if command -v go >/dev/null; then
    mkdir src && cd src
    printf 'module example.com/hello\n\ngo 1.19\n' > go.mod
    printf 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello") }\n' > main.go
    GOCACHE="$work/gocache" GOFLAGS=-mod=mod GOTOOLCHAIN=local go build -o "$work/hello" . 
    cd "$work"
else
    echo "demo: go is not installed; signing a copy of /bin/true (not a Go binary)"
    cp /bin/true hello
fi

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
step execguard keygen --no-password --output-prefix demo
"$EG" keygen --no-password --output-prefix demo
step execguard sign hello --key demo.key
"$EG" sign hello --key demo.key
step execguard verify hello --key demo.pub
"$EG" verify hello --key demo.pub || true
step execguard goinfo hello
"$EG" goinfo hello || true
step "printf x >> hello   # tamper"
printf x >> hello
step execguard verify hello --key demo.pub
"$EG" verify hello --key demo.pub || echo "(exit $? — untrusted, as it should be)"
