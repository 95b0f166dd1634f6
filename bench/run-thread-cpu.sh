#!/usr/bin/env bash
# Where one all-in-one node's CPU goes, thread by thread, under 1:1 `messaging` (server pinned to
# core 0, load to core 1): each thread's share of a core over the middle of the run (read from
# /proc, summed per thread name), the store's log batches and checkpoints slower than 6.4 ms,
# then the run's delivered rate, delivery p50/p99, missing deliveries, server CPU, the 100 ms
# windows that held a delivery over 10 ms and the host's CPU steal. The report goes to
# bench/reports/thread-cpu-<rate>$SUFFIX.json.
#
#   cargo build --release -p switchboard -p switchboard-bench
#   bash bench/run-thread-cpu.sh [SUFFIX] [RATE]              # RATE: total msgs/s offered (10000)
#   LOAD_EXTRA="--body-words 8" SB=/path/to/other/switchboard bash bench/run-thread-cpu.sh -words8
#
# Interleave runs of the binaries being compared: this machine's speed drifts within an hour.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUFFIX=${1:-}
RATE=${2:-10000}
CONNS=${CONNS:-200}
SECS=${SECS:-20}   # the window read is from 12 s to SECS - 4 s
D=$(mktemp -d /tmp/sb-threads.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

start_node
per_conn=$(awk -v r="$RATE" -v c="$CONNS" 'BEGIN { printf "%.3f", r / c }')
REPORT="$OUT/thread-cpu-$RATE$SUFFIX.json"
# shellcheck disable=SC2086
taskset -c 1 "$B" messaging --url ws://127.0.0.1:8090/ws --http-url http://127.0.0.1:8080 \
    --tokens "$D/tokens.txt" --conns "$CONNS" --rate "$per_conn" --secs "$SECS" --server-pid "$PID" \
    ${LOAD_EXTRA:-} --label "thread-cpu-$RATE$SUFFIX" --report "$REPORT" >/dev/null 2>"$D/load.log" &
LOAD=$!
# CPU ticks (user + system) of every thread: "tid name ticks". Threads are matched by tid
# between the two snapshots, so a thread that exits in between (Tokio's blocking pool, started by
# password hashing at setup, has the workers' name) takes nothing from its name's sum.
snap() {
    for t in /proc/"$PID"/task/*; do
        echo "${t##*/} $(cat "$t/comm") $(awk '{ print $14 + $15 }' "$t/stat")"
    done | sort
}
sleep 12
snap >"$D/cpu1"
T1=$(date +%s.%N)
sleep $((SECS - 16))
snap >"$D/cpu2"
T2=$(date +%s.%N)
wait "$LOAD"
# The store's side of the tail: log batches (write + fdatasync) and checkpoints slower than
# 6.4 ms over the whole run, from the node's own histograms.
curl -s http://127.0.0.1:8080/metrics | awk '
    /^switchboard_embedded_(log_sync|checkpoint)_seconds_(bucket|count)/ {
        name = $1; sub(/_seconds_.*/, "", name); sub(/^switchboard_embedded_/, "", name)
        if ($1 ~ /_count/) { n[name] = $2 } else if ($1 ~ /le="0.0064"/) { under[name] = $2 }
    }
    END { for (k in n) printf "%s: %d, %d of them over 6.4 ms\n", k, n[k], n[k] - under[k] }' | sort
HZ=$(getconf CLK_TCK)
# (A thread started between the snapshots is counted from zero.)
join -a 2 -e 0 -o 2.2,1.3,2.3 "$D/cpu1" "$D/cpu2" | awk -v dt="$(echo "$T2 - $T1" | bc)" -v hz="$HZ" \
    '{ a[$1] += $3 - $2 } END { for (k in a) printf "%-20s %5.1f %%\n", k, 100 * a[k] / hz / dt }' | sort -k2 -nr
jq -r '"delivered \(.delivered_per_sec | floor)/s, p50 \(.delivery_latency.p50_ms) ms, p99 \(.delivery_latency.p99_ms) ms, missing \(.missing_deliveries), server CPU \(.server_cpu_util * 100 | floor) %, 100 ms windows with a delivery over 10 ms \(.delivery_stalls.windows_with_slow) of \(.delivery_stalls.windows), host steal \(.host_steal_secs * 100 | round / 100) s"' "$REPORT"
