# Shared by the bench run scripts (sourced, with $ROOT the repository and $D a scratch directory):
# the binaries and the reports' directory unless given, raises the fd limit, makes $OUT, kills
# the server in $PID and removes $D on exit, waits for a port, starts an all-in-one node.
T=${T:-${CARGO_TARGET_DIR:-$ROOT/target}}
SB=${SB:-$T/release/switchboard}
B=${B:-${BENCH:-$T/release/switchboard-bench}}
OUT=${OUT:-$ROOT/bench/reports}
ulimit -n 20000
mkdir -p "$OUT"
PID=
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$D"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    exit 1
}

# Mints tokens for $CONNS users (msg-0 ..) into $D/tokens.txt and starts an all-in-one node on
# embedded storage in $D, pinned to core 0 (its pid in $PID); returns once it serves.
start_node() {
    "$SB" token --data-dir "$D" --user msg --users "$CONNS" --device d --ttl 7200 >"$D/tokens.txt"
    SB_LOG=warn taskset -c 0 "$SB" all-in-one --data-dir "$D" --tcp-addr off --shards 1 \
        --user-rate 0 --ip-rate 0 --auth-rate 0 >"$D/server.log" 2>&1 &
    PID=$!
    wait_port 8090; wait_port 8080   # the gateway binds first, the HTTP API (registrations) after
}
