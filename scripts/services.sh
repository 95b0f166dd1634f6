#!/usr/bin/env bash
# Installs (when missing) and runs the engines the cluster tests need, on
# 127.0.0.1 only: Redis, PostgreSQL and tansu (a Kafka-protocol broker).
# Also installs HAProxy, which the load-balancer test starts itself.
# Redis and PostgreSQL also take TLS (Redis on a port of its own), with a
# certificate signed by a throwaway CA made here (also usable as a client
# certificate: the mutual-TLS test of the internal links uses it).
#   scripts/services.sh up|down|status|env
# `env` prints the export lines the tests read (SB_TEST_*). Idempotent: `up`
# reuses running services and an already-built broker binary.
set -euo pipefail

STATE="${SB_SERVICES_DIR:-/var/tmp/switchboard-services}"
TOOLS="${SB_TOOLS_DIR:-$HOME/.cache/switchboard}"
REDIS_PORT="${SB_REDIS_PORT:-16379}"
REDIS_TLS_PORT="${SB_REDIS_TLS_PORT:-16380}"
PG_PORT="${SB_PG_PORT:-15432}"
KAFKA_PORT="${SB_KAFKA_PORT:-19092}"
TANSU_VERSION=0.6.0
TANSU="$TOOLS/tansu/bin/tansu"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"

log() { echo "[services] $*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name, seconds, command...
    local name=$1 secs=$2; shift 2
    for _ in $(seq $((secs * 10))); do
        if "$@" >/dev/null 2>&1; then log "$name ready"; return 0; fi
        sleep 0.1
    done
    log "$name did not become ready in ${secs}s"; return 1
}

install_packages() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v openssl >/dev/null || missing+=(openssl)
    [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    [ -n "$PG_BIN" ] || missing+=(postgresql)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        local t0=$SECONDS
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
        log "apt install took $((SECONDS - t0))s"
        PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
    fi
    if [ ! -x "$TANSU" ]; then
        log "building tansu $TANSU_VERSION (once; about 10 minutes on 2 cores)"
        local t0=$SECONDS
        cargo install tansu --version "$TANSU_VERSION" --locked --features libsql --root "$TOOLS/tansu" --quiet
        log "tansu build took $((SECONDS - t0))s"
    fi
}

# A CA and a server certificate for 127.0.0.1/localhost, made once per state dir.
tls_certs() {
    local d="$STATE/tls"
    [ -f "$d/server.pem" ] && return
    mkdir -p "$d"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout "$d/ca.key" -out "$d/ca.pem" -days 3650 -subj /CN=switchboard-test-ca \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -new "${ec[@]}" -keyout "$d/server.key" -out "$d/server.csr" -subj /CN=localhost 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n' \
        >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 3650 \
        -extfile "$d/server.ext" -out "$d/server.pem" 2>/dev/null
    log "made a test CA and server certificate in $d"
}

redis_up() {
    if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then log "redis already up"; return; fi
    mkdir -p "$STATE/redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --tls-port "$REDIS_TLS_PORT" --tls-cert-file "$STATE/tls/server.pem" --tls-key-file "$STATE/tls/server.key" \
        --tls-ca-cert-file "$STATE/tls/ca.pem" --tls-auth-clients no \
        --dir "$STATE/redis" --pidfile "$STATE/redis/redis.pid" --logfile "$STATE/redis/redis.log"
    wait_for redis 20 redis-cli -p "$REDIS_PORT" ping
}

pg_up() {
    if port_open "$PG_PORT"; then log "postgres already up"; return; fi
    rm -rf "$STATE/pg"
    mkdir -p "$STATE/pg/data" "$STATE/pg/run"
    cp "$STATE/tls/server.pem" "$STATE/tls/server.key" "$STATE/pg/"
    chmod 600 "$STATE/pg/server.key"
    chown -R postgres "$STATE/pg"
    su postgres -c "$PG_BIN/initdb -D $STATE/pg/data -A trust -U postgres" >/dev/null
    su postgres -c "$PG_BIN/pg_ctl -D $STATE/pg/data -l $STATE/pg/run/pg.log \
        -o '-p $PG_PORT -k $STATE/pg/run -c listen_addresses=127.0.0.1 -c fsync=on \
        -c ssl=on -c ssl_cert_file=$STATE/pg/server.pem -c ssl_key_file=$STATE/pg/server.key' start" >/dev/null
    wait_for postgres 30 psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 'select 1'
}

kafka_up() {
    if port_open "$KAFKA_PORT"; then log "broker already up"; return; fi
    rm -rf "$STATE/kafka"
    mkdir -p "$STATE/kafka"
    # tansu doubles an absolute sqlite path: run it in its directory.
    # exec: the background job *is* the broker, holding none of our fds.
    (cd "$STATE/kafka" && exec setsid "$TANSU" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "sqlite://tansu.db" </dev/null >tansu.log 2>&1) &
    echo $! >"$STATE/kafka/tansu.pid"
    wait_for broker 30 port_open "$KAFKA_PORT"
}

down() {
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    if [ -n "$PG_BIN" ] && [ -d "$STATE/pg/data" ]; then
        su postgres -c "$PG_BIN/pg_ctl -D $STATE/pg/data -m fast stop" >/dev/null 2>&1 || true
    fi
    if [ -f "$STATE/kafka/tansu.pid" ]; then
        kill "$(cat "$STATE/kafka/tansu.pid")" 2>/dev/null || true
        rm -f "$STATE/kafka/tansu.pid"
    fi
    log "stopped"
}

status() {
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && log "redis up :$REDIS_PORT" || log "redis down"
    port_open "$PG_PORT" && log "postgres up :$PG_PORT" || log "postgres down"
    port_open "$KAFKA_PORT" && log "broker up :$KAFKA_PORT" || log "broker down"
}

env_lines() {
    echo "export SB_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/"
    echo "export SB_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    echo "export SB_TEST_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT"
    echo "export SB_TANSU_BIN=$TANSU"
    echo "export SB_TEST_REDIS_TLS_URL=rediss://127.0.0.1:$REDIS_TLS_PORT/"
    echo "export SB_TEST_POSTGRES_TLS_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres?sslmode=require"
    echo "export SB_TEST_CA_FILE=$STATE/tls/ca.pem"
    echo "export SB_HAPROXY_BIN=/usr/sbin/haproxy"
}

case "${1:-}" in
    up)
        t0=$SECONDS
        install_packages
        mkdir -p "$STATE"
        tls_certs; redis_up; pg_up; kafka_up
        log "services up in $((SECONDS - t0))s"
        ;;
    down) down ;;
    status) status ;;
    env) env_lines ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
