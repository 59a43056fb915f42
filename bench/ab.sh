#!/usr/bin/env bash
# bench/ab.sh: two luafcgid binaries (or two sets of flags) side by side behind one nginx,
# with fcgi-const as the reference, at one connection by default: for telling whether a
# change moves the p50 when the machine's own noise is several percent from run to run.
#
# Usage: bench/ab.sh BINARY_A [BINARY_B]
#        bench/ab.sh /tmp/old/luafcgid target/release/luafcgid
#        ARGS_B="--sched normal" bench/ab.sh target/release/luafcgid   # one binary, two flag sets
#
# Rows, one nginx (1 worker, access_log off), the same 11-byte body and the usual
# fastcgi_params from each: `c` fcgi-const (the ceiling of the FastCGI path), `a` and `b`
# the two daemons on unix sockets, keep-alive upstream, with the policies of
# bench/nginx.sh (a policy.toml in the document root and one in the tenant directory
# site/) and the audit log to a file. Each round runs `wrk -t1 --latency` for SECS seconds
# on c, a and b in turn; the script prints every round, the medians of the rows, and the
# medians of the rounds' ratios a/c, b/c and b/a with how many rounds had b below a.
#
# Environment (all optional):
#   ROUNDS=24     rounds
#   SECS=1        seconds per row and round
#   CONNS=1       wrk connections
#   ARGS_A=, ARGS_B=   extra flags for `luafcgid serve` of a and of b
#   CONST=...     the fcgi-const binary (default: next to BINARY_A, else
#                 $CARGO_TARGET_DIR/release or target/release)
#
# Needs nginx, wrk, curl and ss (iproute2). Everything runs in a private temp dir and on
# 127.0.0.1; every process it starts is stopped by PID when it ends, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -ge 1 && $# -le 2 ]] || {
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}
BIN_A=$1
BIN_B=${2:-$1}
ROUNDS=${ROUNDS:-24}
SECS=${SECS:-1}
CONNS=${CONNS:-1}
ARGS_A=${ARGS_A:-}
ARGS_B=${ARGS_B:-}
RELEASE=${CARGO_TARGET_DIR:-target}/release
if [[ -z ${CONST:-} ]]; then
    CONST=$(dirname "$BIN_A")/fcgi-const
    [[ -x $CONST ]] || CONST=$RELEASE/fcgi-const
fi
for b in "$BIN_A" "$BIN_B" "$CONST"; do
    [[ -x $b ]] || {
        echo "not an executable: $b (cargo build --release -p luafcgid -p luafcgid-bench)" >&2
        exit 1
    }
done
for tool in nginx wrk curl ss; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || {
        echo "$tool is missing (apt-get install -y nginx wrk curl iproute2)" >&2
        exit 1
    }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

T=$(mktemp -d /tmp/bench-ab.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$T/www/site" "$T/tmp"
printf 's = "Hello World"\nfunction handler() return s end\n' >"$T/www/site/hello.lua"
cat >"$T/www/policy.toml" <<'EOF'
timeout_ms = 1000
instructions = 50_000_000
memory = "64MiB"
output = "8MiB"
body = "1MiB"
clones = 2

[ceiling]
timeout_ms = 5000
memory = "256MiB"
EOF
cat >"$T/www/site/policy.toml" <<'EOF'
tenant = "site"
timeout_ms = 500
libs = ["string", "table", "math", "utf8", "os.time", "os.clock", "os.date"]
EOF

"$CONST" --listen "$T/c.sock" >/dev/null 2>"$T/c.err" &
PIDS+=($!)
# shellcheck disable=SC2086 # ARGS_A and ARGS_B are lists of flags
"$BIN_A" serve --docroot "$T/www" --listen "$T/a.sock" --log "$T/a.log" $ARGS_A >/dev/null 2>"$T/a.err" &
PIDS+=($!)
# shellcheck disable=SC2086
"$BIN_B" serve --docroot "$T/www" --listen "$T/b.sock" --log "$T/b.log" $ARGS_B >/dev/null 2>"$T/b.err" &
PIDS+=($!)

PORT=""
for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 40000))
    if [[ -z $(ss -Htan "sport = :$p") ]]; then
        PORT=$p
        break
    fi
done
[[ -n $PORT ]] || {
    echo "no free port found" >&2
    exit 1
}

USER_LINE=""
((EUID == 0)) && USER_LINE="user $(id -un) $(id -gn);"
{
    cat <<EOF
$USER_LINE
worker_processes 1;
daemon off;
master_process on;
pid $T/nginx.pid;
error_log $T/nginx.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $T/tmp/client;
    proxy_temp_path $T/tmp/proxy;
    fastcgi_temp_path $T/tmp/fastcgi;
    uwsgi_temp_path $T/tmp/uwsgi;
    scgi_temp_path $T/tmp/scgi;
EOF
    for row in c a b; do
        echo "    upstream $row { server unix:$T/$row.sock; keepalive 64; keepalive_requests 1000000; }"
    done
    cat <<EOF
    server {
        listen 127.0.0.1:$PORT;
        root $T/www;
EOF
    for row in c a b; do
        cat <<EOF
        location = /$row {
            fastcgi_param QUERY_STRING \$query_string;
            fastcgi_param REQUEST_METHOD \$request_method;
            fastcgi_param CONTENT_TYPE \$content_type;
            fastcgi_param CONTENT_LENGTH \$content_length;
            fastcgi_param REQUEST_URI \$request_uri;
            fastcgi_param DOCUMENT_URI \$document_uri;
            fastcgi_param DOCUMENT_ROOT \$document_root;
            fastcgi_param SERVER_PROTOCOL \$server_protocol;
            fastcgi_param REQUEST_SCHEME \$scheme;
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
            fastcgi_param SERVER_SOFTWARE nginx/\$nginx_version;
            fastcgi_param REMOTE_ADDR \$remote_addr;
            fastcgi_param REMOTE_PORT \$remote_port;
            fastcgi_param SERVER_ADDR \$server_addr;
            fastcgi_param SERVER_PORT \$server_port;
            fastcgi_param SERVER_NAME \$server_name;
            fastcgi_param REDIRECT_STATUS 200;
            fastcgi_param SCRIPT_FILENAME \$document_root/site/hello.lua;
            fastcgi_param SCRIPT_NAME /site/hello.lua;
            fastcgi_keep_conn on;
            fastcgi_pass $row;
        }
EOF
    done
    echo "    }"
    echo "}"
} >"$T/nginx.conf"
"$NGINX" -c "$T/nginx.conf" >/dev/null 2>"$T/nginx.out" &
PIDS+=($!)

ready=0
for ((i = 0; i < 100; i++)); do
    if [[ -S $T/a.sock && -S $T/b.sock && -S $T/c.sock ]] &&
        curl -s -o /dev/null "http://127.0.0.1:$PORT/c"; then
        ready=1
        break
    fi
    sleep 0.1
done
for row in c a b; do
    body=$(curl -s "http://127.0.0.1:$PORT/$row" || true)
    if ((!ready)) || [[ $body != "Hello World" ]]; then
        echo "row $row does not answer Hello World:" >&2
        cat "$T"/*.err "$T/nginx.out" >&2
        exit 1
    fi
done

START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
for row in c a b; do wrk -t1 -c"$CONNS" -d1 "http://127.0.0.1:$PORT/$row" >/dev/null; done

p50_us() { # wrk --latency output -> its p50 in microseconds
    awk '/^ +50%/ { v = $2
        if (v ~ /us$/) { sub(/us$/, "", v); print v }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v * 1000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000000 } }'
}
median() {
    tr ' ' '\n' | awk NF | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { printf "%.4f", x / y }'; }

declare -A P50 RPS
RA="" RB="" RBA=""
for ((r = 1; r <= ROUNDS; r++)); do
    line="round $r/$ROUNDS:"
    declare -A NOW
    for row in c a b; do
        out=$(wrk -t1 -c"$CONNS" -d"$SECS" --latency "http://127.0.0.1:$PORT/$row")
        v=$(p50_us <<<"$out")
        q=$(awk '/^Requests\/sec/ { print int($2) }' <<<"$out")
        [[ -n $v && -n $q ]] || {
            echo "wrk gave no p50 for $row: $out" >&2
            exit 1
        }
        NOW[$row]=$v
        P50[$row]="${P50[$row]:-} $v"
        RPS[$row]="${RPS[$row]:-} $q"
        line="$line  $row p50 ${v} us ${q} req/s"
    done
    RA="$RA $(ratio "${NOW[a]}" "${NOW[c]}")"
    RB="$RB $(ratio "${NOW[b]}" "${NOW[c]}")"
    RBA="$RBA $(ratio "${NOW[b]}" "${NOW[a]}")"
    echo "$line" >&2
done

echo
echo "$ROUNDS rounds of $SECS s per row, wrk -t1 -c$CONNS; a = $BIN_A $ARGS_A; b = $BIN_B $ARGS_B"
for row in c a b; do
    printf '%s  p50 median %6s us   req/s median %s\n' "$row" "$(median <<<"${P50[$row]}")" \
        "$(median <<<"${RPS[$row]}")"
done
lower=$(tr ' ' '\n' <<<"$RBA" | awk 'NF && $1 < 1' | wc -l)
echo "rounds' p50 ratios, medians: a/c $(median <<<"$RA")  b/c $(median <<<"$RB")  b/a $(median <<<"$RBA") (b lower in $lower of $ROUNDS rounds)"
echo "$(nproc) CPUs; load average before: $START_LOAD, after: $(cut -d' ' -f1-3 /proc/loadavg)"
for row in a b; do
    lines=$(wc -l <"$T/$row.log")
    [[ $lines -gt 0 ]] || {
        echo "daemon $row wrote no audit line" >&2
        exit 1
    }
done
if grep -qiE 'panic' "$T/a.err" "$T/b.err"; then
    echo "a daemon panicked:" >&2
    grep -iE 'panic' "$T/a.err" "$T/b.err" | head -n 5 >&2
    exit 1
fi
