#!/usr/bin/env bash
# Instructions per 1:1 message, counted by valgrind's callgrind: one all-in-one node (embedded
# storage) runs under callgrind with instrumentation off; `messaging` loads it at a low fixed
# rate; once SKIP sends are stored, counting is switched on for WINDOW seconds, and each thread's
# instructions over that window are divided by the sends stored in it (read from /metrics before
# and after). Counts are of user-space instructions only (the kernel's socket work is not in
# them) and repeat within ~1 % for the same binary and load, whatever else the machine does: they
# show what a change to the message path saves where a timed run's spread would hide it. Work
# done per timer tick (cursor flushes, checkpoints) is spread over this rate's messages, so
# compare builds at the same rate. Writes bench/reports/instructions$SUFFIX.json, and the
# callgrind files to $KEEP if set. Needs valgrind (Debian's `valgrind`) and curl.
#
#   cargo build --release -p switchboard -p switchboard-bench
#   bash bench/run-instructions.sh [SUFFIX]
#   SB=/path/to/other/switchboard bash bench/run-instructions.sh -other
#   KEEP=/tmp/cg bash bench/run-instructions.sh   # then: callgrind_annotate /tmp/cg/callgrind.out.*
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUFFIX=${1:-}
CONNS=${CONNS:-100}
RATE=${RATE:-2}           # messages per second per connection (200 a second in all: callgrind runs ~50× slower)
SKIP=${SKIP:-1000}        # sends stored before counting starts (caches, maps and pages warm)
WINDOW=${WINDOW:-10}      # seconds counted
LOAD_EXTRA=${LOAD_EXTRA:---quiet-acks}
D=$(mktemp -d /tmp/sb-instr.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
CG=${KEEP:-$D/cg}
mkdir -p "$CG"
rm -f "$CG"/callgrind.out.*

metric() {
    curl -sf http://127.0.0.1:8080/metrics | awk -v m="$1" '$1 == m { print $2 }'
}

"$SB" token --data-dir "$D" --user msg --users "$CONNS" --device d --ttl 7200 >"$D/tokens.txt"
SB_LOG=warn taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
    --callgrind-out-file="$CG/callgrind.out.%p" \
    "$SB" all-in-one --data-dir "$D" --tcp-addr off --shards 1 --user-rate 0 --ip-rate 0 --auth-rate 0 \
    >"$D/server.log" 2>&1 &
PID=$!
for _ in $(seq 600); do
    curl -sf http://127.0.0.1:8080/metrics >/dev/null && break
    sleep 0.2
done
# shellcheck disable=SC2086
taskset -c 1 "$B" messaging --url ws://127.0.0.1:8090/ws --http-url http://127.0.0.1:8080 --tokens "$D/tokens.txt" \
    --conns "$CONNS" --rate "$RATE" --secs $((WINDOW * 3 + 60)) $LOAD_EXTRA --label instructions \
    --report "$D/load.json" >/dev/null 2>"$D/load.log" &
LOAD=$!
until [[ $(metric switchboard_logic_sends_total || echo 0) -ge $SKIP ]]; do
    kill -0 $LOAD 2>/dev/null || { tail -5 "$D/load.log" >&2; exit 1; }
    sleep 0.5
done
s0=$(metric switchboard_logic_sends_total)
callgrind_control -i on $PID >/dev/null 2>&1
sleep "$WINDOW"
callgrind_control -i off $PID >/dev/null 2>&1
s1=$(metric switchboard_logic_sends_total)
callgrind_control -d $PID >/dev/null 2>&1
kill $LOAD 2>/dev/null || true
wait $LOAD 2>/dev/null || true
kill $PID
wait $PID 2>/dev/null || true
PID=
sends=$((s1 - s0))

# Each thread's file: its instructions, and a function only that thread runs to name it.
rows=()
for f in "$CG"/callgrind.out.*.1-*; do
    ir=$(awk '/^totals:/ { print $2; exit }' "$f")
    [[ -n $ir && $ir != 0 ]] || continue
    if grep -q 'TreeThread::checkpoint' "$f"; then name=checkpoint
    elif grep -q 'Shard::run' "$f"; then name=shard
    elif grep -q -E 'group_commit::LogThread::|run_batch' "$f"; then name=log
    elif grep -q 'multi_thread::worker::Context::run' "$f"; then name=tokio
    else name=other
    fi
    rows+=("$name $ir")
done
report="$OUT/instructions$SUFFIX.json"
printf '%s\n' "${rows[@]}" | jq -R -s --argjson sends "$sends" --argjson window "$WINDOW" --arg sb "$SB" '
    [split("\n")[] | select(length > 0) | split(" ") | {thread: .[0], ir: (.[1] | tonumber)}]
    | group_by(.thread) | map({thread: .[0].thread, ir: (map(.ir) | add)}) as $t
    | {mode: "instructions", binary: $sb, window_secs: $window, sends: $sends,
       per_message: (($t | map(.ir) | add) / $sends | floor),
       threads: ($t | map({thread, per_message: (.ir / $sends | floor)}))}' >"$report"
jq -r '"instructions per message: \(.per_message) over \(.sends) sends", (.threads[] | "  \(.thread): \(.per_message)")' "$report"
