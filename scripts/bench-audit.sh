#!/bin/sh
# Hello-world throughput with the audit log written to a file and discarded (/dev/null),
# alternating the two in one run, a fresh daemon for each measurement.
#
#   scripts/bench-audit.sh                     # builds, then ROUNDS=3 of each
#   SKIP_BUILD=1 ROUNDS=5 REQUESTS=300000 scripts/bench-audit.sh
#
# TARGET (default: target, or $CARGO_TARGET_DIR) holds release/luafcgid and
# release/fcgi-load. Prints one line per measurement, then the median of each mode.
set -eu

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-300000}
CONNECTIONS=${CONNECTIONS:-50}
TARGET=${TARGET:-${CARGO_TARGET_DIR:-target}}
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release -p luafcgid -p luafcgid-bench
fi
BIN="$TARGET/release"
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
SCRIPT="$PWD/examples/www/hello.lua"

# measure MODE LOG: one daemon, a warm-up, one measured load; prints a result line.
measure() {
    mode=$1
    log=$2
    sock="$WORK/lf.sock"
    "$BIN/luafcgid" serve --docroot examples/www --listen "$sock" --log "$log" 2>"$WORK/stderr" &
    PID=$!
    i=0
    while [ ! -S "$sock" ]; do
        i=$((i + 1))
        [ "$i" -gt 200 ] && { echo "the daemon did not start" >&2; cat "$WORK/stderr" >&2; exit 1; }
        sleep 0.05
    done
    "$BIN/fcgi-load" --connect "$sock" --connections "$CONNECTIONS" --requests 20000 \
        --script "$SCRIPT" >/dev/null
    out=$("$BIN/fcgi-load" --connect "$sock" --connections "$CONNECTIONS" \
        --requests "$REQUESTS" --script "$SCRIPT" --server-pid "$PID")
    kill -TERM "$PID"
    wait "$PID" || true
    PID=
    lines=-
    dropped=-
    if [ "$log" != /dev/null ]; then
        lines=$(wc -l <"$log")
        dropped=$(grep -c '"event":"log_dropped"' "$log" || true)
        rm -f "$log"
    fi
    echo "$out" | awk -v mode="$mode" -v lines="$lines" -v dropped="$dropped" '
        $1 == "errors" { errors = $2 }
        $1 == "throughput" { rps = $2 }
        $1 == "latency" { p50 = $4; p99 = $6 }
        $1 == "server" { cpu = $3 }
        END { printf "%-9s %8d req/s  p50 %7.1f µs  p99 %7.1f µs  server %5.2f µs/req  errors %s  log lines %s  log_dropped %s\n",
                     mode, rps, p50, p99, cpu, errors, lines, dropped }'
}

results="$WORK/results"
r=1
while [ "$r" -le "$ROUNDS" ]; do
    measure file "$WORK/audit.jsonl" | tee -a "$results"
    measure devnull /dev/null | tee -a "$results"
    r=$((r + 1))
done
echo
for mode in file devnull; do
    grep "^$mode " "$results" | awk -v mode="$mode" '
        { rps[NR] = $2; cpu[NR] = $11 }
        function median(a, n,    i, j, t) {
            for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        END { n = NR; lo = rps[1]; hi = rps[1]; for (i = 1; i <= n; i++) { if (rps[i] < lo) lo = rps[i]; if (rps[i] > hi) hi = rps[i] }
              printf "%-9s median %d req/s (range %d-%d), server %.2f µs/req, over %d runs\n", mode, median(rps, n), lo, hi, median(cpu, n), n }'
done
