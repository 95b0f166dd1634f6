#!/usr/bin/env bash
# Kernel and file-descriptor limits for bare-metal Switchboard gateway hosts.
#
#   bash tuning/sysctl.sh --dry-run    # show current value, target and reason; change nothing
#   sudo bash tuning/sysctl.sh         # write /etc/sysctl.d + limits.d files, run sysctl --system
#
# Idempotent: every value written is max(current, target), so running it again
# writes the same file, and a value that is already higher is never lowered.
# The one deliberate exception is the middle ("default") value of
# net.ipv4.tcp_rmem / tcp_wmem, the initial per-socket buffer size, which is
# brought down to 16 KiB unless --keep-socket-defaults is given.
# See tuning/README.md for what each limit bounds.
set -euo pipefail

SYSCTL_FILE=${SB_SYSCTL_FILE:-/etc/sysctl.d/90-switchboard.conf}
LIMITS_FILE=${SB_LIMITS_FILE:-/etc/security/limits.d/90-switchboard.conf}
PROC_SYS=${SB_PROC_SYS:-/proc/sys}
MEMINFO=${SB_MEMINFO:-/proc/meminfo}
NOFILE=1048576          # per-process fd limit; matches LimitNOFILE= of the gateway unit
SOCKET_DEFAULT=16384    # initial per-socket receive/send buffer (bytes)

usage() {
    cat <<EOF
Usage: bash tuning/sysctl.sh [--dry-run] [--keep-socket-defaults] [--help]

Raises the kernel limits a Switchboard gateway host needs for many (up to about
a million) mostly idle TCP connections, and the per-process open-file limit.

  --dry-run               print each setting's current value, target and reason,
                          and the files that would be written; change nothing
                          (does not need root)
  --keep-socket-defaults  leave the middle (default) value of net.ipv4.tcp_rmem
                          and tcp_wmem as it is instead of lowering it to
                          ${SOCKET_DEFAULT} bytes
  -h, --help              this text

Without --dry-run (root only) it writes
  ${SYSCTL_FILE}   (every managed key as max(current, target))
  ${LIMITS_FILE}   (nofile ${NOFILE} for login sessions)
then runs 'sysctl --system' and reads every value back. Values that are already
higher than the target are kept, never lowered. systemd services do not read
limits.d: their fd limit is LimitNOFILE= in the unit (see tuning/systemd/).

Environment (for testing): SB_SYSCTL_FILE, SB_LIMITS_FILE, SB_PROC_SYS
(default /proc/sys), SB_MEMINFO (default /proc/meminfo).
EOF
}

DRY_RUN=0
KEEP_SOCKET_DEFAULTS=0
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --keep-socket-defaults) KEEP_SOCKET_DEFAULTS=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            printf 'sysctl.sh: unknown argument: %s\n\n' "$1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

die() {
    printf 'sysctl.sh: %s\n' "$*" >&2
    exit 1
}

if ((!DRY_RUN)) && ((EUID != 0)); then
    die "must run as root to change kernel settings (try: sudo bash $0, or bash $0 --dry-run to only look)"
fi

# --- helpers -----------------------------------------------------------------

# Path of a key under /proc/sys (net.ipv4.tcp_mem -> net/ipv4/tcp_mem).
key_path() { printf '%s/%s' "$PROC_SYS" "${1//.//}"; }

# Current value with whitespace collapsed to single spaces; fails if absent.
read_key() {
    local p
    p=$(key_path "$1")
    [[ -r "$p" ]] || return 1
    tr -s '[:space:]' ' ' <"$p" | sed 's/^ //; s/ $//'
}

max() { if (($1 > $2)); then printf '%s' "$1"; else printf '%s' "$2"; fi; }
min() { if (($1 < $2)); then printf '%s' "$1"; else printf '%s' "$2"; fi; }

is_uint_list() { [[ "$1" =~ ^[0-9]+( [0-9]+)*$ ]]; }

# RAM in pages, for tcp_mem (which counts pages).
page_size=$(getconf PAGESIZE 2>/dev/null || echo 4096)
mem_kib=$(awk '/^MemTotal:/ {print $2}' "$MEMINFO" 2>/dev/null || true)
[[ "$mem_kib" =~ ^[0-9]+$ ]] || die "cannot read MemTotal from $MEMINFO"
ram_pages=$((mem_kib * 1024 / page_size))

# --- the settings ----------------------------------------------------------------
# Each row: key | kind | target | optional (1: skip when the key is absent) | why
#   max    one integer, new = max(current, target)
#   vmax   integers, element-wise max
#   range  "low high", widened only: new = (min(low), max(high))
#   buf    "min default max": min and max element-wise max; default lowered to target
#   on     boolean-ish, new = target unless current already equals it
ROWS=(
    "fs.file-max|max|4194304|0|system-wide open files: a gateway holds one fd per connection, a proxy on the same host two"
    "fs.nr_open|max|2097152|0|ceiling for any process's RLIMIT_NOFILE; must exceed the ${NOFILE} given to gateways (LimitNOFILE, limits.d) and leaves room for a proxy with 2 fds per connection"
    "net.core.somaxconn|max|65535|0|cap on every listen() backlog; the gateway asks for 1024 per shard listener (gateway/src/lib.rs), proxies and other servers may ask for more"
    "net.ipv4.tcp_max_syn_backlog|max|65535|0|half-open connections queued per listener, for reconnect storms after a gateway restart or drain"
    "net.ipv4.ip_local_port_range|range|10240 65535|0|ephemeral ports per (source address, destination address:port): bounds connections a load generator or proxy opens to one gateway address; 10240 stays above Switchboard's default ports (8080, 8090, 8091, 9100, 9101)"
    "net.ipv4.tcp_mem|vmax|$((ram_pages / 16)) $((ram_pages / 8)) $((ram_pages / 4))|0|pages all TCP sockets may use for queued data (min, pressure, max): RAM/16, RAM/8, RAM/4 of $((mem_kib / 1024)) MiB"
    "net.ipv4.tcp_rmem|buf|4096 ${SOCKET_DEFAULT} 6291456|0|per-socket receive buffer (min, initial, max): a small initial size keeps a burst across a million sockets bounded; autotuning still grows busy sockets up to max"
    "net.ipv4.tcp_wmem|buf|4096 ${SOCKET_DEFAULT} 4194304|0|per-socket send buffer (min, initial, max): small initial size for many idle sockets; busy sockets grow up to max"
    "net.core.netdev_max_backlog|max|16384|0|packets queued per CPU between the NIC and the TCP stack, for bursts of many small frames"
    "net.netfilter.nf_conntrack_max|max|2097152|1|connection-tracking entries; each tracked connection uses one and a full table drops new connections (only when nf_conntrack is loaded)"
    "net.ipv4.tcp_tw_reuse|on|1|0|lets new outgoing connections reuse TIME_WAIT ports when TCP timestamps make it safe (load generators, proxies); 0 = off, 2 = loopback only"
)

# Computes the value to write for one row from its current value; prints
# "<new>|<action>" where action is raise, keep or lower-default.
compute() {
    local kind=$1 cur=$2 target=$3
    local -a c t n
    case "$kind" in
        max)
            n=("$(max "$cur" "$target")")
            ;;
        on)
            n=("$target")
            ;;
        range)
            read -r -a c <<<"$cur"
            read -r -a t <<<"$target"
            n=("$(min "${c[0]}" "${t[0]}")" "$(max "${c[1]}" "${t[1]}")")
            ;;
        vmax)
            read -r -a c <<<"$cur"
            read -r -a t <<<"$target"
            n=()
            local i
            for i in "${!t[@]}"; do n+=("$(max "${c[i]}" "${t[i]}")"); done
            ;;
        buf)
            read -r -a c <<<"$cur"
            read -r -a t <<<"$target"
            local lo hi def
            lo=$(max "${c[0]}" "${t[0]}")
            hi=$(max "${c[2]}" "${t[2]}")
            if ((KEEP_SOCKET_DEFAULTS)); then def=${c[1]}; else def=$(min "${c[1]}" "${t[1]}"); fi
            def=$(max "$def" "$lo")
            def=$(min "$def" "$hi")
            n=("$lo" "$def" "$hi")
            ;;
        *) die "internal: unknown kind $kind" ;;
    esac
    local new="${n[*]}" action=keep
    if [[ "$new" != "$cur" ]]; then
        action=raise
        if [[ "$kind" == buf ]] && ((n[1] < c[1])); then action=lower-default; fi
    fi
    printf '%s|%s' "$new" "$action"
}

# Fills PLAN (key|new|action|optional) and prints the report.
PLAN=()
report() {
    local row key kind target optional why cur res new action
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key kind target optional why <<<"$row"
        if ! cur=$(read_key "$key"); then
            if ((optional)); then
                printf '%s\n  current: absent (module not loaded)\n  target:  %s: skipped\n  why:     %s\n\n' \
                    "$key" "$target" "$why"
                continue
            fi
            printf '%s\n  current: unreadable (%s)\n  target:  %s: skipped\n  why:     %s\n\n' \
                "$key" "$(key_path "$key")" "$target" "$why"
            continue
        fi
        if ! is_uint_list "$cur"; then
            printf '%s\n  current: %s (not numeric): skipped\n\n' "$key" "$cur"
            continue
        fi
        res=$(compute "$kind" "$cur" "$target")
        new=${res%|*}
        action=${res##*|}
        PLAN+=("$key|$new|$action|$optional")
        case "$action" in
            keep)
                if [[ "$cur" == "$target" ]]; then
                    action="already at target: kept"
                else
                    action="current already meets it: kept"
                fi
                ;;
            raise) action="set to $new" ;;
            lower-default) action="set to $new (initial size lowered; --keep-socket-defaults keeps it)" ;;
        esac
        printf '%s\n  current: %s\n  target:  %s -> %s\n  why:     %s\n\n' "$key" "$cur" "$target" "$action" "$why"
    done
}

sysctl_conf() {
    local entry key new action optional
    printf '# Written by Switchboard tuning/sysctl.sh; running it again rewrites this file.\n'
    printf '# Each value is max(value found, target): nothing here lowers a higher setting,\n'
    printf '# except the initial (middle) value of tcp_rmem/tcp_wmem. See tuning/README.md.\n'
    for entry in "${PLAN[@]}"; do
        IFS='|' read -r key new action optional <<<"$entry"
        # A leading '-' makes sysctl --system / systemd-sysctl ignore a failure,
        # for keys of modules that may not be loaded yet at boot.
        if ((optional)); then printf -- '-'; fi
        printf '%s = %s\n' "$key" "$new"
    done
}

limits_conf() {
    printf '# Written by Switchboard tuning/sysctl.sh. pam_limits applies this to login\n'
    printf '# sessions (ssh, su, login); systemd services ignore it and use LimitNOFILE=.\n'
    printf '# "*" does not cover root, hence the second pair of lines.\n'
    local who
    for who in '*' root; do
        printf '%-4s soft nofile %s\n%-4s hard nofile %s\n' "$who" "$NOFILE" "$who" "$NOFILE"
    done
}

# Writes $2 to $1 only when it differs; prints what happened.
install_file() {
    local path=$1 content=$2 tmp
    if [[ -f "$path" ]] && [[ "$(cat "$path")" == "$content" ]]; then
        printf 'unchanged: %s\n' "$path"
        return 0
    fi
    mkdir -p "$(dirname "$path")"
    tmp=$(mktemp "$path.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$path"
    printf 'wrote: %s\n' "$path"
}

# --- main --------------------------------------------------------------------

if ((DRY_RUN)); then
    printf '# Dry run: nothing is changed. Values in /proc/sys now, the target, and the reason.\n\n'
fi
report

conf=$(sysctl_conf)
limits=$(limits_conf)

if ((DRY_RUN)); then
    printf -- '--- would write %s:\n%s\n\n' "$SYSCTL_FILE" "$conf"
    printf -- '--- would write %s:\n%s\n\n' "$LIMITS_FILE" "$limits"
    printf 'process fd limit of this shell: soft %s, hard %s (target %s for gateways)\n' \
        "$(ulimit -Sn)" "$(ulimit -Hn)" "$NOFILE"
    printf 'systemd units set their own limit with LimitNOFILE= (tuning/systemd/); limits.d only\n'
    printf 'applies to new login sessions. Then: sysctl --system, and read every value back.\n'
    exit 0
fi

command -v sysctl >/dev/null 2>&1 || die "sysctl not found (install procps)"
install_file "$SYSCTL_FILE" "$conf"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! sysctl --system >"$log" 2>&1; then
    printf 'sysctl --system reported errors:\n' >&2
    grep -v '^\* Applying\|^[a-z]' "$log" >&2 || cat "$log" >&2
fi

# Read every value back: a later file in sysctl.d, or a read-only /proc/sys
# (containers), can leave a value below what was written.
failed=0
for entry in "${PLAN[@]}"; do
    IFS='|' read -r key new _ optional <<<"$entry"
    now=$(read_key "$key" || printf 'absent')
    if [[ "$now" == "$new" ]]; then
        printf 'ok: %s = %s\n' "$key" "$now"
    elif ((optional)) && [[ "$now" == absent ]]; then
        printf 'skipped: %s (module not loaded)\n' "$key"
    else
        printf 'NOT APPLIED: %s is %s, wanted %s (a later file in /etc/sysctl.d or /etc/sysctl.conf, or read-only /proc/sys?)\n' \
            "$key" "$now" "$new" >&2
        failed=1
    fi
done

# A hard nofile above fs.nr_open makes pam_limits fail at login: only write the
# limits file once nr_open allows it.
nr_open=$(read_key fs.nr_open || printf 0)
if ((nr_open >= NOFILE)); then
    install_file "$LIMITS_FILE" "$limits"
    printf 'login sessions get nofile %s from their next login; systemd units use LimitNOFILE=.\n' "$NOFILE"
else
    printf 'NOT WRITTEN: %s (fs.nr_open is %s, below %s)\n' "$LIMITS_FILE" "$nr_open" "$NOFILE" >&2
    failed=1
fi

if ((failed)); then
    die "some settings did not take effect (see above)"
fi
printf 'done.\n'
