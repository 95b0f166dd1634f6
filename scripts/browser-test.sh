#!/usr/bin/env bash
# The web client's tests in a real browser: installs Debian's Chromium when missing, the
# driver (playwright-core, pinned by tests/browser/package-lock.json) with `npm ci`, builds the
# switchboard binary, and runs tests/browser/run.mjs against an all-in-one server it starts on
# free ports. Screenshots and the server log go to $TMPDIR/switchboard-browser/.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[browser] $*"; }

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    log "apt install took $((SECONDS - t0))s"
fi

t0=$SECONDS
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
cargo build -p switchboard
BIN="${CARGO_TARGET_DIR:-target}/debug/switchboard"
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac

export SWITCHBOARD_BIN="$BIN" CHROMIUM
export ARTIFACTS="${ARTIFACTS:-${TMPDIR:-/tmp}/switchboard-browser}"
rm -rf "$ARTIFACTS"
(cd tests/browser && node run.mjs)
log "done in $((SECONDS - t0))s (npm ci, build and tests)"
