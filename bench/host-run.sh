#!/usr/bin/env bash
# Host-scale idle run: one logic process (embedded storage) and G gateway
# processes sharing one WebSocket port through SO_REUSEPORT, loaded by
# `switchboard-bench connect` spread over W worker processes (each process here
# may hold at most 20,000 fds, so both sides are split).
#
#   bash bench/host-run.sh CONNS GATEWAYS WORKERS HOLD_SECS [RATE] [LABEL]
#   e.g. bash bench/host-run.sh 100000 8 8 300 3000 host-100k
#
# Needs release builds (cargo build --release -p switchboard -p switchboard-bench)
# and, for more than ~28k connections per source address, the tuning script
# (sudo bash tuning/sysctl.sh). Writes bench/reports/LABEL.json (the load tool's
# report), LABEL-servers.log (per-5 s samples of every server process: open
# sockets and RSS; then, once the load tool exits and every connection closes at
# once, one sample a second for CLOSE_SECS, default 10) and LABEL-summary.json
# (totals, with the peak RSS of the mass close).
set -euo pipefail

CONNS=${1:?CONNS}
GATEWAYS=${2:?GATEWAYS}
WORKERS=${3:?WORKERS}
HOLD=${4:?HOLD_SECS}
RATE=${5:-3000}
LABEL=${6:-host-$CONNS}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=${CARGO_TARGET_DIR:-$ROOT/target}
SB=${SB:-$T/release/switchboard}
BENCH=${BENCH:-$T/release/switchboard-bench}
DATA=${DATA:-/tmp/sb-host-run}
OUT=${OUT:-$ROOT/bench/reports}
WS=127.0.0.1:8090
PER_GATEWAY=${PER_GATEWAY:-19500}

ulimit -n 20000
mkdir -p "$OUT"
rm -rf "$DATA" && mkdir -p "$DATA"
PIDS=()
LOAD=
cleanup() {
    [[ -n $LOAD ]] && kill "$LOAD" 2>/dev/null
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# 10 devices per user, as real users have a few (logic keeps a route list per user)
users=$(((CONNS + 9) / 10))
echo "minting $((users * 10)) tokens for $users users" >&2
"$SB" token --data-dir "$DATA" --user host --users "$users" --device d --count 10 --ttl 7200 >"$DATA/tokens.txt"

SB_LOG=warn "$SB" logic --data-dir "$DATA" --logic-addr 127.0.0.1:9100 --http-addr 127.0.0.1:8080 \
    --ws-addr "$WS" --tcp-addr off >"$DATA/logic.log" 2>&1 &
LOGIC=$!
PIDS+=("$LOGIC")
sleep 1
GWS=()
for i in $(seq 0 $((GATEWAYS - 1))); do
    SB_LOG=warn "$SB" gateway --ws-addr "$WS" --tcp-addr off --shards 1 --logic-url http://127.0.0.1:9100 \
        --push-addr "127.0.0.1:$((9200 + i))" --max-connections "$PER_GATEWAY" >"$DATA/gateway-$i.log" 2>&1 &
    GWS+=("$!")
    PIDS+=("$!")
done
sleep 2

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# fds come and go while it looks, so find may complain: never let that end the run
socks() { { find "/proc/$1/fd" -lname 'socket:*' 2>/dev/null || true; } | wc -l; }
sample() {
    local t=$1 total_rss=0 total_socks=0 line=""
    for p in "${GWS[@]}"; do
        local r s
        r=$(rss "$p") s=$(socks "$p")
        total_rss=$((total_rss + r)) total_socks=$((total_socks + s))
        line+=" $s/$r"
    done
    echo "$t gateways_sockets=$total_socks gateways_rss_kib=$total_rss logic_rss_kib=$(rss "$LOGIC") per_gateway(sockets/rss_kib):$line"
}
base_rss=0 base_socks=0
for p in "${GWS[@]}"; do base_rss=$((base_rss + $(rss "$p"))) base_socks=$((base_socks + $(socks "$p"))); done
base_logic=$(rss "$LOGIC")
sample 0 >"$OUT/$LABEL-servers.log"

"$BENCH" connect --url "ws://$WS/ws" --tokens "$DATA/tokens.txt" --conns "$CONNS" --rate "$RATE" \
    --hold "$HOLD" --ping-secs 25 --workers "$WORKERS" --src-ips 16 --label "$LABEL" \
    --report "$OUT/$LABEL.json" >/dev/null &
LOAD=$!
start=$(date +%s)
while kill -0 "$LOAD" 2>/dev/null; do
    sleep 5
    kill -0 "$LOAD" 2>/dev/null && { sample $(($(date +%s) - start)) >>"$OUT/$LABEL-servers.log" || true; }
done
wait "$LOAD" || echo "load tool exited non-zero (see failed_workers in the report)" >&2
LOAD=
# Every connection closed at once: the gateways tell logic, logic drops the routes.
for s in $(seq 1 "${CLOSE_SECS:-10}"); do
    sleep 1
    echo "close $(sample "$s")" >>"$OUT/$LABEL-servers.log"
done
for p in "${GWS[@]}" "$LOGIC"; do
    if ! kill -0 "$p" 2>/dev/null; then
        status=0
        wait "$p" || status=$?
        echo "server process $p died (exit status $status)" >&2
        exit 1
    fi
done

# The settled figure: the last sample taken while every connection was still held.
python3 - "$OUT/$LABEL-servers.log" "$OUT/$LABEL.json" "$base_rss" "$base_socks" "$base_logic" \
    "$GATEWAYS" "$WORKERS" >"$OUT/$LABEL-summary.json" <<'EOF'
import json, re, sys
log, report, base_rss, base_socks, base_logic, gateways, workers = sys.argv[1:]
base_rss, base_socks, base_logic = int(base_rss), int(base_socks), int(base_logic)
rows, closing = [], []
for line in open(log):
    m = re.match(r"(close )?(\d+) gateways_sockets=(\d+) gateways_rss_kib=(\d+) logic_rss_kib=(\d+)", line)
    (closing if m.group(1) else rows).append(tuple(int(x) for x in m.groups()[1:]))
peak = max(r[1] for r in rows)
held = [r for r in rows if r[1] >= peak - 5]
t, socks, grss, lrss = held[-1]
conns = socks - base_socks
rep = json.load(open(report))
print(json.dumps({
    "gateway_processes": int(gateways), "load_workers": int(workers),
    "connected": rep.get("connected"), "failed": rep.get("failed"),
    "dropped_during_ramp": rep.get("dropped_during_ramp"), "dropped_during_hold": rep.get("dropped_during_hold"),
    "achieved_connect_rate": rep.get("achieved_connect_rate"),
    "settled_sample_secs": t, "gateway_sockets_held": conns,
    "gateways_rss_before_kib": base_rss, "gateways_rss_settled_kib": grss,
    "gateway_rss_per_connection_bytes": round((grss - base_rss) * 1024 / max(conns, 1)),
    "logic_rss_before_kib": base_logic, "logic_rss_settled_kib": lrss,
    "logic_rss_per_connection_bytes": round((lrss - base_logic) * 1024 / max(conns, 1)),
    "after_close_gateway_sockets_left": closing[-1][1] - base_socks if closing else None,
    "after_close_gateways_rss_peak_kib": max((r[2] for r in closing), default=None),
    "after_close_logic_rss_peak_kib": max((r[3] for r in closing), default=None),
}, indent=2))
EOF
cat "$OUT/$LABEL-summary.json"
