#!/usr/bin/env bash
# bench/direct.sh: server CPU per hello-world request over FastCGI directly (no web
# server), for one or more luafcgid binaries side by side, alternating, so that the
# machine's slow spells fall on every binary alike.
#
# Usage: bench/direct.sh [BINARY...]
#        bench/direct.sh /tmp/old/luafcgid target/release/luafcgid
#        CONST=1 bench/direct.sh          # the release build and fcgi-const
#
# With no BINARY, the release build ($CARGO_TARGET_DIR/release or target/release). For
# each alternation and each binary: a fresh daemon on a private unix socket (document root
# examples/www, audit log to a file), WARMUP untimed requests, then RUNS timed runs of
# REQUESTS requests from fcgi-load at CONNECTIONS connections; the figure is the daemon's
# CPU time (user + system, from /proc) during a run divided by its requests.
#
# Environment (all optional):
#   ALTERNATIONS=4   rounds over the binaries
#   RUNS=3           timed runs per daemon
#   REQUESTS=300000  requests per timed run
#   WARMUP=300000    untimed requests first (a fresh daemon is slower for a while)
#   CONNECTIONS=50   fcgi-load connections
#   CONST=0          1: also fcgi-const, the constant-answer responder, as a row
#
# Everything runs in a private temp dir, on a unix socket; every process it starts is
# stopped by PID when it ends, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

ALTERNATIONS=${ALTERNATIONS:-4}
RUNS=${RUNS:-3}
REQUESTS=${REQUESTS:-300000}
WARMUP=${WARMUP:-300000}
CONNECTIONS=${CONNECTIONS:-50}
CONST=${CONST:-0}
RELEASE=${CARGO_TARGET_DIR:-target}/release
LOAD=$RELEASE/fcgi-load
[[ -x $LOAD ]] || {
    echo "no $LOAD: cargo build --release -p luafcgid -p luafcgid-bench" >&2
    exit 1
}

BINARIES=("$@")
[[ ${#BINARIES[@]} -gt 0 ]] || BINARIES=("$RELEASE/luafcgid")
for b in "${BINARIES[@]}"; do
    [[ -x $b ]] || {
        echo "not an executable: $b" >&2
        exit 1
    }
done
NAMES=("${BINARIES[@]}")
if [[ $CONST == 1 ]]; then
    [[ -x $RELEASE/fcgi-const ]] || {
        echo "no $RELEASE/fcgi-const" >&2
        exit 1
    }
    NAMES+=(fcgi-const)
fi

T=$(mktemp -d /tmp/bench-direct.XXXXXX)
SERVER=""
cleanup() {
    if [[ -n $SERVER ]]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SCRIPT=$PWD/examples/www/hello.lua
START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
CLK_TCK=$(getconf CLK_TCK)

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# Starts one server (a luafcgid binary, or fcgi-const) on $T/s.sock; sets SERVER.
start() {
    rm -f "$T/s.sock" "$T/audit.jsonl"
    if [[ $1 == fcgi-const ]]; then
        "$RELEASE/fcgi-const" --listen "$T/s.sock" 2>>"$T/server.err" &
    else
        "$1" serve --docroot examples/www --listen "$T/s.sock" --log "$T/audit.jsonl" \
            2>>"$T/server.err" &
    fi
    SERVER=$!
    for ((i = 0; i < 100; i++)); do
        [[ -S $T/s.sock ]] && return 0
        kill -0 "$SERVER" 2>/dev/null || break
        sleep 0.1
    done
    echo "$1 did not start:" >&2
    cat "$T/server.err" >&2
    exit 1
}

stop() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
}

load() {
    "$LOAD" --connect "$T/s.sock" --script "$SCRIPT" --connections "$CONNECTIONS" \
        --requests "$1" >"$T/load.out" 2>&1 || {
        echo "fcgi-load failed:" >&2
        cat "$T/load.out" >&2
        exit 1
    }
}

declare -A FIGURES
for ((a = 1; a <= ALTERNATIONS; a++)); do
    for name in "${NAMES[@]}"; do
        start "$name"
        ((WARMUP > 0)) && load "$WARMUP"
        for ((r = 1; r <= RUNS; r++)); do
            before=$(cpu_ticks "$SERVER")
            load "$REQUESTS"
            after=$(cpu_ticks "$SERVER")
            us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$REQUESTS" \
                'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
            rps=$(awk '/^throughput/ { print $2 }' "$T/load.out")
            FIGURES[$name]="${FIGURES[$name]:-} $us"
            printf 'alternation %d/%d  %-40s run %d: %6s us/request  %s req/s\n' \
                "$a" "$ALTERNATIONS" "$name" "$r" "$us" "$rps" >&2
        done
        stop
    done
done

echo
echo "server CPU per request (user + system), us: $ALTERNATIONS alternation(s) x $RUNS run(s) of $REQUESTS requests, $CONNECTIONS connections, after $WARMUP untimed"
for name in "${NAMES[@]}"; do
    median=$(tr ' ' '\n' <<<"${FIGURES[$name]}" | awk NF | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    printf '%-40s median %6s  [%s ]\n' "$name" "$median" "${FIGURES[$name]}"
done
echo "$(nproc) CPUs; load average before: $START_LOAD, after: $(cut -d' ' -f1-3 /proc/loadavg)"
if grep -qiE 'panic|error' "$T/server.err" 2>/dev/null; then
    echo "server stderr had errors (first 5):"
    grep -iE 'panic|error' "$T/server.err" | head -n 5 | sed 's/^/    /'
    exit 1
fi
