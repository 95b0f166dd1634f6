# Shared by the bench run scripts (sourced): raises the fd limit, makes $OUT, kills the server
# in $PID and removes $D on exit, and waits for a port.
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
