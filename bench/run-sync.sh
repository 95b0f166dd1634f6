#!/usr/bin/env bash
# `sync` and `convs` for a user in many conversations of which few changed (`switchboard-bench
# sync`): an all-in-one node on embedded storage, or with CLUSTER=1 one logic, one gateway and
# the persist worker on Redis, the broker and PostgreSQL of scripts/services.sh. Server pinned to
# core 0, load to core 1. Prints the round trips and the server's own time per op (the logic
# role's request histogram: mean, and the share under 1 ms and 5 ms). Report:
# bench/reports/sync-<CONVS>-convs$SUFFIX.json.
#
#   cargo build --release -p switchboard -p switchboard-bench
#   bash bench/run-sync.sh [SUFFIX]                 # CONVS=1000 CHANGED=10 ROUNDS=1000 CONVS_ROUNDS=200
#   CLUSTER=1 bash bench/run-sync.sh -cluster
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUFFIX=${1:-}
CONVS=${CONVS:-1000}
CHANGED=${CHANGED:-10}
ROUNDS=${ROUNDS:-1000}
CONVS_ROUNDS=${CONVS_ROUNDS:-200}
D=$(mktemp -d /tmp/sb-sync.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
PIDS=()
cleanup_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup_all EXIT

if [[ -n ${CLUSTER:-} ]]; then
    "$ROOT/scripts/services.sh" up >/dev/null
    eval "$("$ROOT/scripts/services.sh" env)"
    export SB_REDIS_URL=$SB_TEST_REDIS_URL SB_POSTGRES_URL=$SB_TEST_POSTGRES_URL SB_KAFKA_BROKERS=$SB_TEST_KAFKA_BROKERS
    export SB_JWT_SECRET="bench-sync-jwt-secret-0123456789abcdefgh" SB_CLUSTER_SECRET="bench-sync-link-secret-0123456789abcdef"
    P="bs$(printf '%08x' $RANDOM$RANDOM)"
    export SB_KEY_PREFIX="$P:" SB_TOPIC_PREFIX="$P." SB_LOG=warn SB_USER_RATE=0 SB_IP_RATE=0 SB_AUTH_RATE=0 SB_TCP_ADDR=off
    "$SB" token --jwt-secret "$SB_JWT_SECRET" --user "${P}u" --users 2 --device d --ttl 7200 >"$D/tokens.txt"
    taskset -c 0 "$SB" logic --data-dir "$D/logic" --http-addr 127.0.0.1:18080 --logic-addr 127.0.0.1:19100 \
        >"$D/logic.log" 2>&1 &
    PIDS+=($!)
    wait_port 18080
    taskset -c 0 "$SB" gateway --ws-addr 127.0.0.1:18090 --push-addr 127.0.0.1:19110 --shards 1 \
        --logic-url http://127.0.0.1:19100 >"$D/gateway.log" 2>&1 &
    PIDS+=($!)
    taskset -c 0 "$SB" persist >"$D/persist.log" 2>&1 &
    PIDS+=($!)
    wait_port 18090
    sleep 2   # registry: the gateway and the logic instance see each other
    WS=ws://127.0.0.1:18090/ws METRICS=http://127.0.0.1:18080/metrics
else
    CONNS=2 start_node
    PIDS+=("$PID")
    WS=ws://127.0.0.1:8090/ws METRICS=http://127.0.0.1:8080/metrics
fi

REPORT="$OUT/sync-$CONVS-convs$SUFFIX.json"
taskset -c 1 "$B" sync --url "$WS" --tokens "$D/tokens.txt" --convs "$CONVS" --changed "$CHANGED" \
    --rounds "$ROUNDS" --convs-rounds "$CONVS_ROUNDS" --label "sync-$CONVS-convs$SUFFIX" --report "$REPORT" \
    >/dev/null 2>"$D/load.log" || { cat "$D/load.log" >&2; exit 1; }
jq -r '"round trip: sync p50 \(.sync_rtt.p50_ms) ms, p99 \(.sync_rtt.p99_ms) ms; convs p50 \(.convs_rtt.p50_ms) ms, p99 \(.convs_rtt.p99_ms) ms"' "$REPORT"
curl -s "$METRICS" | awk '
    /^switchboard_logic_request_seconds_(sum|count|bucket)\{.*op="(sync|convs)"/ {
        op = $1; sub(/.*op="/, "", op); sub(/".*/, "", op)
        if ($1 ~ /_sum/) sum[op] = $2
        else if ($1 ~ /_count/) n[op] = $2
        else if ($1 ~ /le="0.0008"/) u1[op] = $2
        else if ($1 ~ /le="0.0064"/) u5[op] = $2
    }
    END { for (op in n) printf "server %s: mean %.3f ms over %d, %.0f %% under 0.8 ms, %.0f %% under 6.4 ms\n",
        op, 1000 * sum[op] / n[op], n[op], 100 * u1[op] / n[op], 100 * u5[op] / n[op] }' | sort
