#!/usr/bin/env bash
# The cluster message path: 2 gateways, 2 logic instances and 1 persist worker as processes on
# Redis, the Kafka-protocol broker and PostgreSQL of scripts/services.sh. Role processes pinned to
# core 0, the load to core 1 (the engines float). Offered-load sweep of 1:1 `messaging` (half the
# pairs on each gateway), and the broker's own produce rate with the same producer settings in the
# same run as the ceiling. Reports: bench/reports/cluster-messaging-<offered>$SUFFIX.json,
# bench/reports/cluster-broker-ceiling$SUFFIX.json.
#
#   cargo build --release -p switchboard -p switchboard-bench
#   cargo build --release -p switchboard-storage --example produce_rate
#   bash bench/run-cluster.sh [SUFFIX] [RATES...]
#
# The broker slows as its data directory grows (every run writes the ceiling's records and its
# own): with FRESH=1 the services are re-created first (empty broker and PostgreSQL data), so
# runs of a sequence start alike.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}
SB=${SB:-$T/release/switchboard}
B=${BENCH:-$T/release/switchboard-bench}
PR=${PRODUCE_RATE:-$T/release/examples/produce_rate}
OUT=${OUT:-$ROOT/bench/reports}
SUFFIX=${1:-}
shift || true
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(500 1000 2000 4000)
CONNS=${CONNS:-100}   # per gateway
SECS=${SECS:-10}
D=$(mktemp -d /tmp/sb-cluster.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
PIDS=()
cleanup_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n ${KEEP:-} ]] && echo "logs kept in $D" || rm -rf "$D"
}
trap cleanup_all EXIT

[[ -n ${FRESH:-} ]] && "$ROOT/scripts/services.sh" down >/dev/null
"$ROOT/scripts/services.sh" up >/dev/null
eval "$("$ROOT/scripts/services.sh" env)"
export SB_REDIS_URL=$SB_TEST_REDIS_URL SB_POSTGRES_URL=$SB_TEST_POSTGRES_URL SB_KAFKA_BROKERS=$SB_TEST_KAFKA_BROKERS
export SB_JWT_SECRET="bench-cluster-jwt-secret-0123456789abcdef" SB_CLUSTER_SECRET="bench-cluster-link-secret-0123456789abcd"
P="bc$(printf '%08x' $RANDOM$RANDOM)"
export SB_KEY_PREFIX="$P:" SB_TOPIC_PREFIX="$P." SB_LOG=warn SB_USER_RATE=0 SB_IP_RATE=0 SB_AUTH_RATE=0 SB_TCP_ADDR=off

for i in 0 1; do
    taskset -c 0 "$SB" logic --data-dir "$D/logic$i" --http-addr 127.0.0.1:1808$i --logic-addr 127.0.0.1:1910$i \
        >"$D/logic$i.log" 2>&1 &
    PIDS+=($!)
done
wait_port 18080; wait_port 18081
for i in 0 1; do
    taskset -c 0 "$SB" gateway --ws-addr 127.0.0.1:1809$i --push-addr 127.0.0.1:1911$i --shards 1 \
        --logic-url http://127.0.0.1:19100,http://127.0.0.1:19101 >"$D/gateway$i.log" 2>&1 &
    PIDS+=($!)
done
taskset -c 0 "$SB" persist >"$D/persist.log" 2>&1 &
PIDS+=($!)
wait_port 18090; wait_port 18091
sleep 2   # registry: gateways and logic instances see each other

taskset -c 1 "$PR" --brokers "$SB_KAFKA_BROKERS" --secs "$SECS" --inflight 256 --bytes 300 \
    >"$OUT/cluster-broker-ceiling$SUFFIX.json"
echo "broker ceiling (same producer settings, 256 in flight): $(cat "$OUT/cluster-broker-ceiling$SUFFIX.json")"

for i in 0 1; do
    "$SB" token --jwt-secret "$SB_JWT_SECRET" --user "${P}g$i" --users "$CONNS" --device d --ttl 7200 >"$D/tokens$i.txt"
done
printf '%-9s %-11s %-8s %-8s %-8s\n' offered delivered p50_ms p99_ms missing
for r in "${RATES[@]}"; do
    per_conn=$(awk -v r="$r" -v c="$CONNS" 'BEGIN { printf "%.3f", r / (2 * c) }')
    LOAD=()
    for i in 0 1; do
        taskset -c 1 "$B" messaging --url ws://127.0.0.1:1809$i/ws --http-url http://127.0.0.1:1808$i \
            --tokens "$D/tokens$i.txt" --conns "$CONNS" --rate "$per_conn" --secs "$SECS" \
            --label "cluster-2gw-2logic-gateway$i-offered-$r" --report "$D/m$i.json" >/dev/null 2>"$D/load$i.log" &
        LOAD+=($!)
    done
    if [[ -n ${CPU_PROFILE:-} ]]; then
        # CPU of every process over 5 s of the measured window (the load's set-up, registering
        # users with argon2, comes first: use SECS=20 with it)
        sleep "${CPU_DELAY:-14}"
        snap() { for p in "${PIDS[@]}" $(pgrep -f 'redis-server|postgres|tansu' | tr '\n' ' '); do
            echo "$p $(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0) $(tr '\0' ' ' </proc/$p/cmdline 2>/dev/null | cut -c1-40 | tr ' ' '_')"
        done | sort; }
        snap >"$D/cpu1"; sleep 5; snap >"$D/cpu2"
        join -o 1.1,1.3,1.2,2.2 "$D/cpu1" "$D/cpu2" |
            awk '{ printf "cpu %-6s %-42s %5.1f%%\n", $1, $2, ($4 - $3) / 5 }' | sort -k4 -nr | head -12
    fi
    wait "${LOAD[@]}"
    jq -s --arg r "$r" '{offered: ($r|tonumber), delivered_per_sec: (map(.delivered_per_sec)|add),
        p50_ms: (map(.delivery_latency.p50_ms)|max), p99_ms: (map(.delivery_latency.p99_ms)|max),
        missing: (map(.missing_deliveries)|add), per_gateway: .}' "$D/m0.json" "$D/m1.json" \
        >"$OUT/cluster-messaging-$r$SUFFIX.json"
    jq -r '[.offered, (.delivered_per_sec|floor), .p50_ms, .p99_ms, .missing] | @tsv' "$OUT/cluster-messaging-$r$SUFFIX.json" |
        awk -F'\t' '{ printf "%-9s %-11s %-8.2f %-8.2f %-8s\n", $1, $2, $3, $4, $5 }'
done
