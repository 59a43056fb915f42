#!/usr/bin/env bash
# soak.sh: a bounded soak of luafcgid behind a private nginx on loopback, with a mix of
# good, erroring, limit-hitting and rate-limited scripts, in wrk segments. Checks that
# nothing is lost or malformed (every request wrk sent has a response with an expected
# status, and the audit log holds exactly one request line per response, with the same
# count for each status) and reports, per segment, req/s, p50/p99, and the daemon's RSS,
# descriptors and threads, so flatness can be read off.
#
# Usage: bench/soak.sh
#
# Environment (all optional):
#   SEGMENTS=10        wrk runs, one after the other
#   SEGMENT=60         seconds per wrk run
#   CONNS=32           wrk connections (2 threads)
#   WORKERS=2          luafcgid --workers
#   SKIP_BUILD=1       use the binaries already built (CARGO_TARGET_DIR or target/release)
#   KEEP_TMP=1         keep the temp dir (configs, logs, audit log) afterwards
#
# Everything runs in a private temp dir on 127.0.0.1 and unix sockets; the daemon and
# nginx it starts are stopped by PID on exit. Duration: SEGMENTS x SEGMENT seconds plus
# start-up and the audit-log check (a few seconds per million lines). Exit status 0 only
# when every check passed.
#
# The mix (wrk picks a path per request, round robin over this list of 100 slots):
#   80 x /good/hello.lua      200 "Hello World"
#    8 x /bad/error.lua       500 (script_error)
#    2 x /limits/spin.lua     500 (limit_cpu: 200,000 instructions)
#    2 x /limits/memory.lua   500 (limit_memory: 1 MiB)
#    8 x /rated/hello.lua     200 or 429 (rate_limited: per_script 200/s, burst 20)

set -euo pipefail

SEGMENTS=${SEGMENTS:-10}
SEGMENT=${SEGMENT:-60}
CONNS=${CONNS:-32}
WORKERS=${WORKERS:-2}
SKIP_BUILD=${SKIP_BUILD:-0}

die() { echo "soak: $*" >&2; exit 2; }
note() { echo "soak: $*" >&2; }

for v in SEGMENTS SEGMENT CONNS WORKERS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number (got '${!v}')"
done
for tool in nginx wrk jq timeout; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk jq coreutils)"
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
if [[ $SKIP_BUILD != 1 ]]; then
    note "building: cargo build --release -p luafcgid"
    (cd "$REPO" && cargo build --release -p luafcgid)
fi
[[ -x $BIN/luafcgid ]] || die "$BIN/luafcgid missing"

T=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")
T=$(cd "$T" && pwd -P)
declare -a STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        timeout 20 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_TMP:-0} == 1 ]]; then note "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
# Scripts and policies.

W=$T/www
mkdir -p "$W/good" "$W/bad" "$W/limits" "$W/rated"
printf 's = "Hello World"\nfunction handler() return s end\n' >"$W/good/hello.lua"
printf 'function handler() error("failing on purpose") end\n' >"$W/bad/error.lua"
printf 'function handler() while true do end end\n' >"$W/limits/spin.lua"
printf 'function handler() local t = {} for i = 1, 1e7 do t[i] = {} end end\n' >"$W/limits/memory.lua"
printf 'instructions = 200_000\nmemory = "1MiB"\n' >"$W/limits/policy.toml"
cp "$W/good/hello.lua" "$W/rated/hello.lua"
printf '[rate]\nper_script = "200/s"\nburst = 20\n' >"$W/rated/policy.toml"

# ---------------------------------------------------------------------------
# The daemon and nginx.

"$BIN/luafcgid" serve --docroot "$W" --listen "$T/fcgi.sock" --workers "$WORKERS" \
    --log "$T/audit.jsonl" 2>"$T/luafcgid.err" &
DAEMON=$!
STARTED+=("$DAEMON")
for _ in $(seq 1 200); do [[ -S $T/fcgi.sock ]] && break; sleep 0.05; done
[[ -S $T/fcgi.sock ]] || die "the daemon did not start: $(cat "$T/luafcgid.err")"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$T/nginx"
cat >"$T/nginx/nginx.conf" <<EOF
daemon off;
master_process off; # one process, as the invoking user (it must reach the temp dir)
worker_processes 1;
error_log $T/nginx/error.log warn;
pid $T/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $T/nginx/body;
    proxy_temp_path $T/nginx/proxy;
    fastcgi_temp_path $T/nginx/fastcgi;
    uwsgi_temp_path $T/nginx/uwsgi;
    scgi_temp_path $T/nginx/scgi;
    upstream luafcgid { server unix:$T/fcgi.sock; keepalive 64; }
    server {
        listen 127.0.0.1:$PORT;
        root $W;
        location ~ \.lua\$ {
            fastcgi_param SCRIPT_FILENAME \$document_root\$fastcgi_script_name;
            fastcgi_param REQUEST_METHOD \$request_method;
            fastcgi_param QUERY_STRING \$query_string;
            fastcgi_param REQUEST_URI \$request_uri;
            fastcgi_param REMOTE_ADDR \$remote_addr;
            fastcgi_keep_conn on;
            fastcgi_pass luafcgid;
        }
    }
}
EOF
nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" 2>"$T/nginx/stderr" &
STARTED+=("$!")
CURLS=0 # requests that reached the daemon before the segments
for _ in $(seq 1 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/good/hello.lua" || true)
    [[ $code == 200 ]] && { CURLS=1; break; }
    sleep 0.05
done
((CURLS == 1)) || die "nginx does not reach the daemon"

# ---------------------------------------------------------------------------
# wrk: a path per request from the mix; counts of each status per path kind; anything
# but the expected statuses is counted as wrong.

cat >"$T/mix.lua" <<'EOF'
local mix = {}
local function add(path, n) for _ = 1, n do mix[#mix + 1] = path end end
add("/good/hello.lua", 80); add("/bad/error.lua", 8); add("/limits/spin.lua", 2)
add("/limits/memory.lua", 2); add("/rated/hello.lua", 8)
-- Spread the slots so each kind recurs evenly.
local spread = {}
for i = 0, #mix - 1 do spread[#spread + 1] = mix[(i * 37) % #mix + 1] end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) n = 0; counts = {}; wrong = 0 end
function request()
    n = n + 1
    return wrk.format("GET", spread[(n - 1) % #spread + 1])
end
function response(status, headers, body)
    counts[status] = (counts[status] or 0) + 1
    if not (status == 200 or status == 500 or status == 429) then wrong = wrong + 1 end
    if status == 200 and body ~= "Hello World" then wrong = wrong + 1 end
end
function done(summary, latency, requests)
    local total, statuses, bad = 0, {}, 0
    for _, t in ipairs(threads) do
        for s, c in pairs(t:get("counts")) do statuses[s] = (statuses[s] or 0) + c; total = total + c end
        bad = bad + t:get("wrong")
    end
    local parts = {}
    for s, c in pairs(statuses) do parts[#parts + 1] = s .. "=" .. c end
    table.sort(parts)
    io.write(string.format("SOAK requests=%d responses=%d wrong=%d errors=%d p50_us=%d p99_us=%d statuses=%s\n",
        summary.requests, total, bad,
        summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
        latency:percentile(50), latency:percentile(99), table.concat(parts, ",")))
end
EOF

proc_field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
health() {
    echo "$(proc_field "$DAEMON" VmRSS) $(ls "/proc/$DAEMON/fd" | wc -l) $(ls "/proc/$DAEMON/task" | wc -l)"
}

# ---------------------------------------------------------------------------
# Segments.

printf '%-8s %10s %10s %8s %8s %10s %6s %7s  %s\n' segment requests req/s p50 p99 rss_kib fds threads statuses
total=0 fail=0
declare -A client_status=()
read -r rss0 fds0 thr0 < <(health)
for seg in $(seq 1 "$SEGMENTS"); do
    out=$(wrk -t2 -c"$CONNS" -d"${SEGMENT}s" --latency -s "$T/mix.lua" "http://127.0.0.1:$PORT/" 2>&1) || {
        echo "$out" >&2
        die "wrk failed"
    }
    line=$(grep '^SOAK ' <<<"$out") || die "no summary from wrk: $out"
    declare -A f=()
    for kv in ${line#SOAK }; do f[${kv%%=*}]=${kv#*=}; done
    read -r rss fds thr < <(health)
    printf '%-8s %10s %10s %6sµs %6sµs %10s %6s %7s  %s\n' "$seg" "${f[requests]}" \
        "$((f[responses] / SEGMENT))" "${f[p50_us]}" "${f[p99_us]}" "$rss" "$fds" "$thr" "${f[statuses]}"
    total=$((total + f[responses]))
    if ((f[wrong] != 0 || f[errors] != 0 || f[responses] != f[requests])); then
        note "segment $seg: ${f[wrong]} unexpected answers, ${f[errors]} socket errors or timeouts"
        fail=1
    fi
    IFS=, read -ra pairs <<<"${f[statuses]}"
    for p in "${pairs[@]}"; do
        client_status[${p%%=*}]=$((${client_status[${p%%=*}]:-0} + ${p#*=}))
    done
done

# ---------------------------------------------------------------------------
# Nothing lost: every response wrk got has its request line in the audit log, status for
# status. The log may hold a few more: the requests in flight when each wrk run ended (wrk
# closes its connections without waiting; nginx then ends them, and the daemon logs them
# as answered or `aborted`), at most CONNS per segment.

kill -TERM "$DAEMON"
timeout 30 tail --pid="$DAEMON" -f /dev/null || die "the daemon did not stop"
# One streaming pass over the log (it holds millions of lines): status and outcome of
# every request line.
declare -A logged=()
lines=0 aborted=0
while read -r count status outcome; do
    logged[$status]=$((${logged[$status]:-0} + count))
    lines=$((lines + count))
    if [[ $outcome == aborted ]]; then aborted=$((aborted + count)); fi
done < <(
    jq -r 'select(.event == "request") | "\(.status) \(.outcome)"' "$T/audit.jsonl" | sort | uniq -c
)
echo
echo "responses: $total in $((SEGMENTS * SEGMENT)) s; request lines in the audit log: $lines ($CURLS start-up check, $aborted aborted)"
for s in $(printf '%s\n' "${!client_status[@]}" "${!logged[@]}" | sort -u); do
    want=${client_status[$s]:-0}
    [[ $s == 200 ]] && want=$((want + CURLS))
    got=${logged[$s]:-0}
    printf 'status %s: wrk %s, audit log %s\n' "$s" "${client_status[$s]:-0}" "$got"
    ((got >= want)) || { note "status $s: the audit log has $got lines, wrk got $want answers"; fail=1; }
done
extra=$((lines - total - CURLS))
if ((extra < 0 || extra > CONNS * SEGMENTS)); then
    note "$extra request lines beyond wrk's answers (at most $((CONNS * SEGMENTS)) expected)"
    fail=1
fi
dropped=$({ grep '"event":"log_dropped"' "$T/audit.jsonl" || true; } |
    jq -r 'select(.request_id == null) | .count' | awk '{ s += $1 } END { print s + 0 }')
((dropped == 0)) || { note "$dropped audit lines dropped"; fail=1; }
echo "daemon at start: rss ${rss0} KiB, $fds0 descriptors, $thr0 threads"
if ((fail)); then echo "soak: FAIL"; exit 1; fi
echo "soak: PASS"
