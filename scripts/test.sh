#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs and starts what the
# tests need (scripts/services.sh, 127.0.0.1 only), checks formatting and
# lints, builds, runs every test and a short fuzz run, and stops the services again.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)"; exit 1; }
scripts/services.sh up
trap 'scripts/services.sh down' EXIT
eval "$(scripts/services.sh env)"

echo "== fmt"; cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets -- -D warnings
# The binary still builds without the optional MongoDB driver (cargo feature `mongodb`).
echo "== no-default-features"; cargo clippy -p switchboard --no-default-features -- -D warnings
echo "== test"; cargo test --workspace 2>&1 | tee "${TMPDIR:-/tmp}/switchboard-test.log"
echo "== browser"; scripts/browser-test.sh
# A short run of every fuzz target on its seeds (cargo-fuzz and nightly installed when missing).
echo "== fuzz"; scripts/fuzz.sh "${SB_FUZZ_SECONDS:-20}"

# One closing line over every test binary (cargo's last line is the doc-test
# run, which has no tests in this workspace).
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' \
    "${TMPDIR:-/tmp}/switchboard-test.log"
