#!/usr/bin/env bash
# Offered-load sweep of 1:1 `messaging` against all-in-one (server pinned to core 0, load to
# core 1): for each total offered rate, delivered msgs/s and delivery/send.ok latency. Writes one
# report per rate to bench/reports/messaging-sweep-<rate>$SUFFIX.json, prints a table and plots
# the sweep (`switchboard-bench plot`) to bench/reports/messaging-sweep$SUFFIX.png.
#
#   cargo build --release -p switchboard -p switchboard-bench
#   bash bench/run-messaging-sweep.sh [SUFFIX] [RATES...]    # RATES: total msgs/s offered
#   LOAD_EXTRA=--quiet-acks bash bench/run-messaging-sweep.sh -quiet 10000   # extra load-tool flags
#   SECS=10 bash bench/run-messaging-sweep.sh -short 20000   # the 10-second window of earlier reports
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUFFIX=${1:-}
shift || true
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(2000 10000 20000 30000 40000 60000)
CONNS=${CONNS:-200}
SECS=${SECS:-40}   # long enough for the embedded checkpoint to keep up or fall behind (see bench/README)
D=$(mktemp -d /tmp/sb-sweep.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

start_node
printf '%-9s %-11s %-8s %-8s %-8s %-8s %-8s %-8s\n' offered delivered p50_ms p99_ms ok_p50 ok_p99 missing srv_cpu
REPORTS=()
for r in "${RATES[@]}"; do
    per_conn=$(awk -v r="$r" -v c="$CONNS" 'BEGIN { printf "%.3f", r / c }')
    f="$OUT/messaging-sweep-$r$SUFFIX.json"
    REPORTS+=("$f")
    taskset -c 1 "$B" messaging --url ws://127.0.0.1:8090/ws --http-url http://127.0.0.1:8080 \
        --tokens "$D/tokens.txt" --conns "$CONNS" --rate "$per_conn" --secs "$SECS" --server-pid $PID ${LOAD_EXTRA:-} \
        --label "switchboard-all-in-one-core0-offered-$r" --report "$f" >/dev/null 2>"$D/load.log"
    jq -r --arg r "$r" '[$r, (.delivered_per_sec|floor), .delivery_latency.p50_ms, .delivery_latency.p99_ms,
        .send_ok_latency.p50_ms, .send_ok_latency.p99_ms, .missing_deliveries, .server_cpu_util] | @tsv' "$f" |
        awk -F'\t' '{ printf "%-9s %-11s %-8.2f %-8.2f %-8.2f %-8.2f %-8s %-8.2f\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
done
"$B" plot --out "$OUT/messaging-sweep$SUFFIX.png" "${REPORTS[@]}" \
    --title "all-in-one, 1:1 messaging, $CONNS conns, ${SECS} s per rate${SUFFIX:+ ($SUFFIX)}"
