#!/usr/bin/env bash
# Throughput runs of bench/README.md in one go: ping (16 and 1 in flight) against
# Switchboard and the tokio-tungstenite baseline, fanout (ack per read batch and
# at most one ack a second) and messaging against Switchboard. Server pinned to
# core 0, load to core 1. Reports go to bench/reports/ (or $OUT).
#
#   cargo build --release -p switchboard -p switchboard-bench
#   bash bench/run-throughput.sh [SUFFIX]     # reports named e.g. ping16-switchboard$SUFFIX.json
#   LOAD_EXTRA=--quiet-acks bash bench/run-throughput.sh -quiet   # extra flags for fanout and messaging
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUFFIX=${1:-}
D=$(mktemp -d /tmp/sb-throughput.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

"$SB" token --data-dir "$D" --user bench --users 10 --device d --count 10 --ttl 7200 >"$D/tokens.txt"
{
    "$SB" token --data-dir "$D" --user fansender --device d --ttl 7200
    "$SB" token --data-dir "$D" --user fan --users 100 --device d --count 10 --ttl 7200
} >"$D/fanout-tokens.txt"
"$SB" token --data-dir "$D" --user msg --users 200 --device d --ttl 7200 >"$D/messaging-tokens.txt"

SB_LOG=warn taskset -c 0 "$SB" all-in-one --data-dir "$D" --tcp-addr off --shards 1 \
    --user-rate 0 --ip-rate 0 --auth-rate 0 >"$D/server.log" 2>&1 &
PID=$!
wait_port 8090; wait_port 8080   # the gateway binds first, the HTTP API (registrations) after
for k in 16 1; do
    taskset -c 1 "$B" ping --url ws://127.0.0.1:8090/ws --tokens "$D/tokens.txt" --conns 100 --inflight $k \
        --secs 10 --server-pid $PID --label switchboard-shards1-core0 --report "$OUT/ping$k-switchboard$SUFFIX.json" >/dev/null
done
taskset -c 1 "$B" fanout --url ws://127.0.0.1:8090/ws --tokens "$D/fanout-tokens.txt" --members 1000 --rate 0 \
    --inflight 16 --secs 10 --server-pid $PID ${LOAD_EXTRA:-} --label switchboard-shards1-core0 \
    --report "$OUT/fanout-switchboard$SUFFIX.json" >/dev/null
taskset -c 1 "$B" fanout --url ws://127.0.0.1:8090/ws --tokens "$D/fanout-tokens.txt" --members 1000 --rate 0 \
    --inflight 16 --secs 10 --ack-interval-ms 1000 --server-pid $PID ${LOAD_EXTRA:-} --label switchboard-shards1-core0-ack1s \
    --report "$OUT/fanout-ack1s-switchboard$SUFFIX.json" >/dev/null
taskset -c 1 "$B" messaging --url ws://127.0.0.1:8090/ws --http-url http://127.0.0.1:8080 \
    --tokens "$D/messaging-tokens.txt" --conns 200 --rate 10 --secs 10 --server-pid $PID ${LOAD_EXTRA:-} \
    --label switchboard-shards1-core0 --report "$OUT/messaging-switchboard$SUFFIX.json" >/dev/null
kill $PID
wait $PID || true

taskset -c 0 "$B" baseline-server --addr 127.0.0.1:9200 >"$D/baseline.log" 2>&1 &
PID=$!
wait_port 9200
for k in 16 1; do
    taskset -c 1 "$B" ping --url ws://127.0.0.1:9200/ws --tokens "$D/tokens.txt" --conns 100 --inflight $k \
        --secs 10 --server-pid $PID --label baseline-core0 --report "$OUT/ping$k-baseline$SUFFIX.json" >/dev/null
done
kill $PID
wait $PID || true
PID=

for f in ping16-switchboard ping16-baseline ping1-switchboard ping1-baseline; do
    jq -c --arg f "$f" '{run: $f, frames_per_sec, p99_ms: .rtt.p99_ms, client_cpu_util, server_cpu_util}' "$OUT/$f$SUFFIX.json"
done
for f in fanout-switchboard fanout-ack1s-switchboard; do
    jq -c --arg f "$f" '{run: $f, deliveries_per_sec, missing_deliveries, p50_ms: .delivery_latency.p50_ms,
        p99_ms: .delivery_latency.p99_ms, server_cpu_util}' "$OUT/$f$SUFFIX.json"
done
jq -c '{run: "messaging", delivered_per_sec, missing_deliveries, p50_ms: .delivery_latency.p50_ms,
    p99_ms: .delivery_latency.p99_ms, server_cpu_util}' "$OUT/messaging-switchboard$SUFFIX.json"
