#!/usr/bin/env bash
# Fuzzes the gateway's parsers and codecs with cargo-fuzz (libFuzzer, AddressSanitizer):
# installs cargo-fuzz when missing (once, under $SB_TOOLS_DIR, like the broker in services.sh),
# builds every target of fuzz/, and runs each for SECONDS (default 60) on a temporary copy of
# its committed seed corpus (fuzz/corpus/<target>/ is never written to). Exits non-zero when a
# target finds a crash, a hang (10 s for one input) or an allocation above 2 GiB; the input is
# kept in fuzz/artifacts/<target>/ (git-ignored) and printed in base64 by libFuzzer.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Toolchain: the `nightly` rustup toolchain, installed (profile minimal) when missing; if that
# cannot be had, the default toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz only needs nightly for
# -Z flags). SB_FUZZ_TOOLCHAIN=default skips nightly. Builds go to $SB_FUZZ_TARGET_DIR, by
# default $CARGO_TARGET_DIR/fuzz (or target/fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

SECS="${1:-60}"
shift || true
TOOLS="${SB_TOOLS_DIR:-$HOME/.cache/switchboard}"
CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ="$TOOLS/cargo-fuzz/bin/cargo-fuzz"
TARGET_DIR="${SB_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/fuzz}"
TOOLCHAIN="${SB_FUZZ_TOOLCHAIN:-nightly}"

log() { echo "[fuzz] $*"; }

[[ "$SECS" =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]"; exit 2; }
command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)"; exit 1; }

if ! "$CARGO_FUZZ" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION (once)"
    t0=$SECONDS
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$TOOLS/cargo-fuzz" --quiet
    log "cargo-fuzz install took $((SECONDS - t0))s"
fi
export PATH="$TOOLS/cargo-fuzz/bin:$PATH"

CARGO=(cargo)
if [ "$TOOLCHAIN" = nightly ]; then
    if ! command -v rustup >/dev/null; then
        TOOLCHAIN=default
    elif ! rustup toolchain list | grep -q '^nightly-'; then
        log "installing the nightly toolchain (profile minimal)"
        t0=$SECONDS
        if rustup toolchain install nightly --profile minimal; then
            log "nightly install took $((SECONDS - t0))s"
        else
            log "nightly could not be installed"
            TOOLCHAIN=default
        fi
    fi
fi
if [ "$TOOLCHAIN" = nightly ]; then
    CARGO=(cargo +nightly)
else
    log "using the default toolchain with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi
log "toolchain: $("${CARGO[@]}" --version)"

TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <("${CARGO[@]}" fuzz list)
fi

build=() # `cargo fuzz build` takes one target or none (= all)
[ ${#TARGETS[@]} -eq 1 ] && build=("${TARGETS[0]}")
t0=$SECONDS
"${CARGO[@]}" fuzz build --target-dir "$TARGET_DIR" "${build[@]}"
log "build took $((SECONDS - t0))s"

# libFuzzer dictionaries (fuzz/dict/): the protocol's tokens, so mutations find field names.
dict_for() {
    case "$1" in
        bin_encode | json_head) echo fuzz/dict/json.dict ;;
        bin_decode | tcp_frame) echo fuzz/dict/protobuf.dict ;;
        ws_upgrade) echo fuzz/dict/http.dict ;;
    esac
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "$WORK/corpus/$t" "fuzz/artifacts/$t"
    if [ -d "fuzz/corpus/$t" ]; then
        cp -R "fuzz/corpus/$t/." "$WORK/corpus/$t/"
    fi
    log "$t: ${SECS}s on $(find "$WORK/corpus/$t" -type f | wc -l) seeds"
    opts=(-max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
        -artifact_prefix="$ROOT/fuzz/artifacts/$t/")
    dict="$(dict_for "$t")"
    [ -n "$dict" ] && opts+=(-dict="$ROOT/$dict")
    if "${CARGO[@]}" fuzz run --target-dir "$TARGET_DIR" "$t" "$WORK/corpus/$t" -- "${opts[@]}" \
        >"$WORK/$t.log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$WORK/$t.log" | grep -o '[0-9]*$' || true)
        cov=$(grep -o 'cov: [0-9]*' "$WORK/$t.log" | tail -n1 || true)
        log "$t: ok, ${runs:-?} runs, ${cov:-cov: ?}, corpus $(find "$WORK/corpus/$t" -type f | wc -l)"
    else
        log "$t: FAILED; the end of its output:"
        tail -n 40 "$WORK/$t.log"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    log "crashes in: ${failed[*]} (inputs in fuzz/artifacts/; reproduce: cargo +nightly fuzz run TARGET FILE)"
    exit 1
fi
log "all ${#TARGETS[@]} targets ran ${SECS}s each without a crash"
