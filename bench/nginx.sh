#!/usr/bin/env bash
# bench/nginx.sh: luafcgid behind nginx, next to nginx's own `return 200`, a
# constant-answer FastCGI responder (fcgi-const, the ceiling of the FastCGI
# path), in-process Lua in nginx (lua-nginx-module's content_by_lua) and
# php-fpm, all serving the same 11 bytes "Hello World" on loopback.
#
# Usage: bench/nginx.sh
#        DURATION=2 ROUNDS=1 WARMUP=0 bench/nginx.sh   # a smoke run, about 40 s
#
# Needs: nginx, wrk, curl, ss (iproute2), timeout (coreutils), chrt (util-linux), php-fpm
# and Debian's libnginx-mod-http-lua (apt-get install -y nginx wrk curl iproute2 util-linux
# php-fpm libnginx-mod-http-lua). Without php-fpm or the Lua module, their rows are skipped with a
# note saying what to install.
#
# Environment (all optional):
#   DURATION=5         seconds per wrk run
#   ROUNDS=5           interleaved rounds (every row, both connection counts, per round);
#                      the round-by-round ratios against const end with their median
#   WARMUP=1           seconds of untimed wrk load per row before round 1 (0: none)
#   CONNS="50 1"       wrk connection counts (always one wrk thread)
#   PHP_CHILDREN="4 2" one php-fpm pool (pm = static) per value; the best is "php-fpm best"
#   KEEPALIVE=         idle upstream connections nginx keeps per backend (`keepalive N`);
#                      default: the largest CONNS value. Fewer than the requests in flight
#                      makes nginx close and reopen upstream connections all the time
#                      (every backend then pays an accept and a close per few requests)
#   PHP_KEEPALIVE=0    1: keepalive + fastcgi_keep_conn on for php-fpm too. Off by default:
#                      each php-fpm child serves one connection until nginx closes it, so
#                      with more client connections than children the extra requests wait
#                      in the listen queue for the whole run (only ~N connections progress)
#   PHP_FPM=...        php-fpm binary (default: the newest /usr/sbin/php-fpm*)
#   NGINX_MODULES=/usr/lib/nginx/modules
#                      where ndk_http_module.so and ngx_http_lua_module.so are (lua-nginx row)
#   LUAFCGID_ARGS=...  extra flags for `luafcgid serve` (e.g. "--workers 2")
#   ORIG_LUAFCGID=...  the binary of the original C luafcgid (1.x, Lua 5.1, libfcgi): adds the
#                      row orig-luafcgid (see docs/performance.md for how to build it)
#   ORIG_KEEPALIVE=0   1: keepalive + fastcgi_keep_conn on for orig-luafcgid too. Off by
#                      default for the same reason as PHP_KEEPALIVE: each of its worker threads
#                      serves one connection at a time, until nginx closes it
#   SKIP_BUILD=1       use the binaries already in target/release ($CARGO_TARGET_DIR/release)
#   KEEP_TMP=1         keep the temp dir (configs, wrk outputs, logs) for a look afterwards
#
# Everything runs in a private temp dir (configs, sockets, logs) and on 127.0.0.1
# only; every process the script starts is stopped by PID on exit and the temp dir
# is removed. Worst-case duration: about rows x len(CONNS) x (ROUNDS x DURATION +
# WARMUP) seconds plus start-up (9 rows, 2 connection counts: about 8 minutes by default;
# 10 rows with ORIG_LUAFCGID).
#
# Rows (URL paths on one nginx server, 1 worker process, access_log off):
#   return        nginx `return 200 "Hello World"` (no backend); the other rows' req/s are
#                 also printed as a ratio to this one
#   const         /const              -> fcgi-const on a unix socket
#   const-batch   /const-batch        -> another fcgi-const, started under `chrt -b 0`
#                                        (SCHED_BATCH, the scheduling luafcgid gives its
#                                        own threads by default): the ceiling under the
#                                        same policy
#   lua-nginx     /lua-nginx          -> content_by_lua_block in nginx's own worker (Debian's
#                                        libnginx-mod-http-lua, LuaJIT), Content-Length set so
#                                        the reply is the same bytes as `return`'s
#   php-fpm/N     /php-N/hello.php    -> php-fpm, pm = static, pm.max_children = N, unix socket,
#                                        a new connection per request (see PHP_KEEPALIVE)
#   lua-unix      /lua-unix/site/hello.lua -> luafcgid, unix socket, script
#                                        `function handler() return s end`
#   lua-unix-r    /lua-unix/site/hello_r.lua -> the same luafcgid and socket, script
#                                        `function handler(r) r:puts(s) end` (the reply
#                                        written through the request object)
#   lua-tcp       /lua-tcp/site/hello.lua  -> the same luafcgid, 127.0.0.1 TCP
#   orig-luafcgid /orig/hello.lua     -> the original C luafcgid (only with ORIG_LUAFCGID), unix
#                                        socket, workers = CPUs, its shipped config's defaults
#                                        otherwise, script `function main(env, con) con:puts(s) end`,
#                                        a new connection per request (see ORIG_KEEPALIVE)
# const, const-batch and luafcgid upstreams: keepalive $KEEPALIVE, fastcgi_keep_conn on.
# luafcgid runs as deployed: sandbox and limits on, a policy.toml in the document root
# (limits and a ceiling) and one in the tenant directory site/ (tenant = "site"), the
# audit log to a file; the script checks that the log has one request line per request,
# naming both policy files.
#
# Measured per run: req/s, p50 and p99 (wrk --latency), and CPU time (utime+stime
# from /proc/PID/stat, summed over the process and all its descendants, e.g.
# php-fpm's master and children, nginx's master and worker) of the backend and of
# nginx, read just before and just after wrk, divided by wrk's request count.
# Any non-2xx/3xx response, socket error, wrk failure, or stalled connections
# (with C > 1 connections, req/s x mean latency below C/2: requests that never
# completed, which wrk does not count) marks the row FAIL; the script then exits 1.

set -euo pipefail

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-"50 1"}
PHP_CHILDREN=${PHP_CHILDREN:-"4 2"}
PHP_KEEPALIVE=${PHP_KEEPALIVE:-0}
ORIG_LUAFCGID=${ORIG_LUAFCGID:-}
ORIG_KEEPALIVE=${ORIG_KEEPALIVE:-0}
LUAFCGID_ARGS=${LUAFCGID_ARGS:-}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEPALIVE=${KEEPALIVE:-}

die() { echo "bench/nginx.sh: $*" >&2; exit 2; }
note() { echo "bench/nginx.sh: $*" >&2; }

for v in DURATION ROUNDS WARMUP PHP_KEEPALIVE ORIG_KEEPALIVE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((DURATION >= 1)) || die "DURATION must be at least 1"
((ROUNDS >= 1)) || die "ROUNDS must be at least 1"
for c in $CONNS; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "CONNS: bad connection count '$c'"; done
# shellcheck disable=SC2086 # CONNS is a list
[[ -n $KEEPALIVE ]] || KEEPALIVE=$(printf '%s\n' $CONNS | sort -n | tail -n 1)
[[ $KEEPALIVE =~ ^[1-9][0-9]*$ ]] || die "KEEPALIVE must be a whole number of at least 1 (got '$KEEPALIVE')"
for n in $PHP_CHILDREN; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "PHP_CHILDREN: bad value '$n'"; done

for tool in nginx wrk curl ss timeout chrt; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx wrk curl iproute2 coreutils util-linux)"
done
[[ -r /proc/self/stat ]] || die "/proc is needed to measure CPU time"

if [[ -z ${PHP_FPM:-} ]]; then
    PHP_FPM=$(compgen -G '/usr/sbin/php-fpm*' | sort -V | tail -n 1 || true)
fi
if [[ -z $PHP_FPM || ! -x $PHP_FPM ]]; then
    note "php-fpm not found (set PHP_FPM=...); the php-fpm rows are skipped"
    PHP_FPM=""
    PHP_CHILDREN=""
fi
NGINX_MODULES=${NGINX_MODULES:-/usr/lib/nginx/modules}
LUA_NGINX=1
for m in ndk_http_module ngx_http_lua_module; do
    if [[ ! -f $NGINX_MODULES/$m.so ]]; then
        note "$NGINX_MODULES/$m.so not found: the lua-nginx row is skipped" \
            "(apt-get install -y libnginx-mod-http-lua, or set NGINX_MODULES=DIR)"
        LUA_NGINX=0
        break
    fi
done

if [[ -n $ORIG_LUAFCGID ]]; then
    [[ -f $ORIG_LUAFCGID && -x $ORIG_LUAFCGID ]] || die "ORIG_LUAFCGID: '$ORIG_LUAFCGID' is not an executable file"
    ORIG_LUAFCGID=$(cd "$(dirname "$ORIG_LUAFCGID")" && pwd -P)/$(basename "$ORIG_LUAFCGID")
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------
# Build.

LUAFCGID_OK=1
LUAFCGID_WHY=""
if [[ $SKIP_BUILD != 1 ]]; then
    note "building: cargo build --release -p luafcgid -p luafcgid-bench"
    if ! (cd "$REPO" && cargo build --release -p luafcgid -p luafcgid-bench); then
        note "luafcgid did not build; building luafcgid-bench alone, the luafcgid rows will FAIL"
        LUAFCGID_OK=0
        LUAFCGID_WHY="luafcgid did not build"
        (cd "$REPO" && cargo build --release -p luafcgid-bench) || die "luafcgid-bench did not build"
    fi
fi
[[ -x $BIN/fcgi-const ]] || die "$BIN/fcgi-const missing"
if ((LUAFCGID_OK)) && [[ ! -x $BIN/luafcgid ]]; then
    LUAFCGID_OK=0
    LUAFCGID_WHY="$BIN/luafcgid missing"
fi

# ---------------------------------------------------------------------------
# Temp dir, process bookkeeping, cleanup.

T=$(mktemp -d "${TMPDIR:-/tmp}/bench-nginx.XXXXXX")
T=$(cd "$T" && pwd -P)
declare -a STARTED=()      # PIDs of everything started in the background
declare -A STARTED_NAME=() # PID -> name (for messages)
declare -A STOP_SIGNAL=()  # PID -> signal that stops it, when not TERM

descendants() { # PID: the PIDs of all its descendants, one a line
    local root=$1 f line pid rest changed=1
    local -A ppid=() set=([$root]=1)
    local -a a
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        rest=${line##*) }
        read -ra a <<<"$rest"
        ppid[$pid]=${a[1]}
    done
    while ((changed)); do
        changed=0
        for pid in "${!ppid[@]}"; do
            if [[ -z ${set[$pid]:-} && -n ${set[${ppid[$pid]}]:-} ]]; then
                set[$pid]=1
                changed=1
                echo "$pid"
            fi
        done
    done
}

cleanup() {
    local rc=$? pid i all=() left
    trap - EXIT INT TERM HUP
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        pid=${STARTED[i]}
        kill -0 "$pid" 2>/dev/null || continue
        all+=("$pid")
        mapfile -t -O "${#all[@]}" all < <(descendants "$pid")
        kill -"${STOP_SIGNAL[$pid]:-TERM}" "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do # up to 5 s for a clean exit
        left=0
        for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for pid in "${all[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            note "PID $pid (${STARTED_NAME[$pid]:-child}) still running; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        note "kept $T"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

start() { # NAME CMD...: run CMD in the background, output to $T/NAME.{out,err}
    local name=$1
    shift
    "$@" >"$T/$name.out" 2>"$T/$name.err" &
    STARTED+=("$!")
    STARTED_NAME[$!]=$name
    LAST_PID=$!
}

wait_ready() { # PID NAME unix:PATH|tcp:PORT: up to 10 s for a listener
    local pid=$1 name=$2 what=$3 i
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            note "$name exited at start-up:"
            sed 's/^/    /' "$T/$name.err" "$T/$name.out" >&2 2>/dev/null || true
            return 1
        fi
        case $what in
        unix:*) [[ -S ${what#unix:} ]] && return 0 ;;
        tcp:*) [[ -n $(ss -Htln "sport = :${what#tcp:}") ]] && return 0 ;;
        esac
        sleep 0.1
    done
    note "$name not listening on $what after 10 s"
    return 1
}

free_port() { # [PORT...]: a TCP port nobody uses, other than those given
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 40000))
        if [[ -z $(ss -Htan "sport = :$p") && " $* " != *" $p "* ]]; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

tree_ticks() { # PID...: utime+stime (clock ticks) of those processes and all their descendants
    local f line pid rest p total=0
    local -A ppid=() ticks=() want=()
    local -a a
    for p in "$@"; do want[$p]=1; done
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        rest=${line##*) } # the command name may hold spaces and parentheses
        read -ra a <<<"$rest"
        ppid[$pid]=${a[1]}
        ticks[$pid]=$((a[11] + a[12]))
    done
    for pid in "${!ticks[@]}"; do
        p=$pid
        while [[ -n $p && $p != 0 ]]; do
            if [[ -n ${want[$p]:-} ]]; then
                total=$((total + ticks[$pid]))
                break
            fi
            p=${ppid[$p]:-}
        done
    done
    echo "$total"
}

# ---------------------------------------------------------------------------
# Document root, configs.

mkdir -p "$T/www/site" "$T/nginx-tmp"
printf 's = "Hello World"\nfunction handler() return s end\n' >"$T/www/site/hello.lua"
printf 's = "Hello World"\nfunction handler(r) r:puts(s) end\n' >"$T/www/site/hello_r.lua"
# luafcgid's policies: limits and a ceiling for the whole document root, and a tenant
# directory with its own file, as a hosting setup would have them.
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
printf '<?php echo "Hello World";' >"$T/www/hello.php"
if [[ -n $ORIG_LUAFCGID ]]; then
    # The original's entry point is main(env, con) and it ignores return values.
    mkdir -p "$T/www/orig"
    printf 's = "Hello World"\nfunction main(env, con) con:puts(s) end\n' >"$T/www/orig/hello.lua"
fi

NGINX_PORT=$(free_port)
LUA_TCP_PORT=$(free_port "$NGINX_PORT")

USER_LINE=""
if ((EUID == 0)); then
    # nginx's workers would otherwise run as nobody, who cannot enter the 0700 temp dir.
    USER_LINE="user $(id -un) $(id -gn);"
fi

# The usual fastcgi_params (SCRIPT_FILENAME and SCRIPT_NAME are set per location).
cat >"$T/fastcgi_params" <<'EOF'
fastcgi_param  QUERY_STRING       $query_string;
fastcgi_param  REQUEST_METHOD     $request_method;
fastcgi_param  CONTENT_TYPE       $content_type;
fastcgi_param  CONTENT_LENGTH     $content_length;
fastcgi_param  REQUEST_URI        $request_uri;
fastcgi_param  DOCUMENT_URI       $document_uri;
fastcgi_param  DOCUMENT_ROOT      $document_root;
fastcgi_param  SERVER_PROTOCOL    $server_protocol;
fastcgi_param  REQUEST_SCHEME     $scheme;
fastcgi_param  GATEWAY_INTERFACE  CGI/1.1;
fastcgi_param  SERVER_SOFTWARE    nginx/$nginx_version;
fastcgi_param  REMOTE_ADDR        $remote_addr;
fastcgi_param  REMOTE_PORT        $remote_port;
fastcgi_param  SERVER_ADDR        $server_addr;
fastcgi_param  SERVER_PORT        $server_port;
fastcgi_param  SERVER_NAME        $server_name;
fastcgi_param  REDIRECT_STATUS    200;
EOF

# Rows: name, URL path, the daemon that must be up (key into BACKEND_PID; "" = nginx alone).
declare -a ROW_NAME=() ROW_PATH=() ROW_BACKEND=()
add_row() { ROW_NAME+=("$1"); ROW_PATH+=("$2"); ROW_BACKEND+=("$3"); }
add_row return /return ""
add_row const /const const
add_row const-batch /const-batch const-batch
((LUA_NGINX)) && add_row lua-nginx /lua-nginx ""
for n in $PHP_CHILDREN; do add_row "php-fpm/$n" "/php-$n/hello.php" "php-$n"; done
add_row lua-unix /lua-unix/site/hello.lua luafcgid
add_row lua-unix-r /lua-unix/site/hello_r.lua luafcgid
add_row lua-tcp /lua-tcp/site/hello.lua luafcgid
if [[ -n $ORIG_LUAFCGID ]]; then
    add_row orig-luafcgid /orig/hello.lua orig
fi

{
    if ((LUA_NGINX)); then
        # lua-nginx-module needs the Nginx Development Kit loaded first.
        echo "load_module $NGINX_MODULES/ndk_http_module.so;"
        echo "load_module $NGINX_MODULES/ngx_http_lua_module.so;"
    fi
    cat <<EOF
$USER_LINE
worker_processes 1;
daemon off;
master_process on;
pid $T/nginx.pid;
error_log $T/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $T/nginx-tmp/client;
    proxy_temp_path $T/nginx-tmp/proxy;
    fastcgi_temp_path $T/nginx-tmp/fastcgi;
    uwsgi_temp_path $T/nginx-tmp/uwsgi;
    scgi_temp_path $T/nginx-tmp/scgi;
    # wrk's connections and the upstream connections are never recycled mid-run.
    keepalive_requests 1000000;

    upstream const        { server unix:$T/const.sock;    keepalive $KEEPALIVE; keepalive_requests 1000000; }
    upstream const_batch  { server unix:$T/const-batch.sock; keepalive $KEEPALIVE; keepalive_requests 1000000; }
    upstream lua_unix     { server unix:$T/lua.sock;      keepalive $KEEPALIVE; keepalive_requests 1000000; }
    upstream lua_tcp      { server 127.0.0.1:$LUA_TCP_PORT; keepalive $KEEPALIVE; keepalive_requests 1000000; }
EOF
    for n in $PHP_CHILDREN; do
        if ((PHP_KEEPALIVE)); then
            echo "    upstream php_$n { server unix:$T/php-$n.sock; keepalive $KEEPALIVE; keepalive_requests 1000000; }"
        else
            echo "    upstream php_$n { server unix:$T/php-$n.sock; }"
        fi
    done
    if [[ -n $ORIG_LUAFCGID ]]; then
        if ((ORIG_KEEPALIVE)); then
            echo "    upstream orig { server unix:$T/orig.sock; keepalive $KEEPALIVE; keepalive_requests 1000000; }"
        else
            echo "    upstream orig { server unix:$T/orig.sock; }"
        fi
    fi
    cat <<EOF

    server {
        listen 127.0.0.1:$NGINX_PORT;
        server_name localhost;
        root $T/www;

        location = /return { return 200 "Hello World"; }

        # What a user of lua-nginx-module writes, with the length set so the reply has the
        # same bytes as return's (without it, nginx sends the body chunked).
        location = /lua-nginx {
            content_by_lua_block {
                local s = "Hello World"
                ngx.header["Content-Length"] = #s
                ngx.print(s)
            }
        }

        location = /const {
            include $T/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME \$document_root/const;
            fastcgi_param SCRIPT_NAME /const;
            fastcgi_keep_conn on;
            fastcgi_pass const;
        }

        location = /const-batch {
            include $T/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME \$document_root/const;
            fastcgi_param SCRIPT_NAME /const;
            fastcgi_keep_conn on;
            fastcgi_pass const_batch;
        }
EOF
    for pair in lua-unix:lua_unix lua-tcp:lua_tcp; do
        cat <<EOF
        location ~ ^/${pair%%:*}(?<script>/[^.]+\.lua)\$ {
            include $T/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME \$document_root\$script;
            fastcgi_param SCRIPT_NAME \$script;
            fastcgi_keep_conn on;
            fastcgi_pass ${pair##*:};
        }
EOF
    done
    for n in $PHP_CHILDREN; do
        cat <<EOF
        location ~ ^/php-$n(?<script>/[^/]+\.php)\$ {
            include $T/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME \$document_root\$script;
            fastcgi_param SCRIPT_NAME \$script;
            fastcgi_keep_conn $( ((PHP_KEEPALIVE)) && echo on || echo off);
            fastcgi_pass php_$n;
        }
EOF
    done
    if [[ -n $ORIG_LUAFCGID ]]; then
        cat <<EOF
        location ~ ^/orig(?<script>/[^/]+\.lua)\$ {
            include $T/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME \$document_root/orig\$script;
            fastcgi_param SCRIPT_NAME \$script;
            fastcgi_keep_conn $( ((ORIG_KEEPALIVE)) && echo on || echo off);
            fastcgi_pass orig;
        }
EOF
    fi
    echo "    }"
    echo "}"
} >"$T/nginx.conf"

for n in $PHP_CHILDREN; do
    {
        cat <<EOF
[global]
pid = $T/php-fpm-$n.pid
error_log = $T/php-fpm-$n.log
daemonize = no

[bench$n]
listen = $T/php-$n.sock
listen.mode = 0600
pm = static
pm.max_children = $n
EOF
        if ((EUID == 0)); then
            echo "user = $(id -un)"
            echo "group = $(id -gn)"
        fi
    } >"$T/php-fpm-$n.conf"
done

if [[ -n $ORIG_LUAFCGID ]]; then
    # The original's shipped config.lua, with this run's socket, worker count and log file.
    # Its log replaces its stderr (freopen), so it lands where start() puts stderr.
    cat >"$T/orig-luafcgid.lua" <<EOF
listen = "$T/orig.sock"
workers = $(nproc)
states = workers * 2
clones = states
sweep = 5000
retries = 1
showerrors = true
buffering = true
headersize = 64
bodysize = 1024
handler = "main"
daemonize = false
logfile = "$T/orig.err"
EOF
fi

# ---------------------------------------------------------------------------
# Start everything.

declare -A BACKEND_PID=()   # key -> PID (its descendants are counted too)
declare -A BACKEND_ERR=()   # key -> why it is not there

start const "$BIN/fcgi-const" --listen "$T/const.sock"
BACKEND_PID[const]=$LAST_PID
wait_ready "$LAST_PID" const "unix:$T/const.sock" || BACKEND_ERR[const]="fcgi-const did not start"
# chrt execs the responder, so the PID is the responder's.
start const-batch chrt -b 0 "$BIN/fcgi-const" --listen "$T/const-batch.sock"
BACKEND_PID[const-batch]=$LAST_PID
wait_ready "$LAST_PID" const-batch "unix:$T/const-batch.sock" ||
    BACKEND_ERR[const-batch]="fcgi-const under chrt -b 0 did not start"

PHP_ROOT_FLAG=()
((EUID == 0)) && PHP_ROOT_FLAG=(-R)
for n in $PHP_CHILDREN; do
    start "php-$n" "$PHP_FPM" -F -y "$T/php-fpm-$n.conf" -p "$T" "${PHP_ROOT_FLAG[@]}"
    BACKEND_PID[php-$n]=$LAST_PID
    wait_ready "$LAST_PID" "php-$n" "unix:$T/php-$n.sock" || BACKEND_ERR[php-$n]="php-fpm did not start"
done

if ((LUAFCGID_OK)); then
    # shellcheck disable=SC2086 # LUAFCGID_ARGS is a list of flags
    "$BIN/luafcgid" policy check --docroot "$T/www" >"$T/policy-check.out" 2>&1 ||
        die "luafcgid policy check rejected the benchmark's policies: $(cat "$T/policy-check.out")"
    # shellcheck disable=SC2086 # LUAFCGID_ARGS is a list of flags
    start luafcgid "$BIN/luafcgid" serve --docroot "$T/www" --listen "$T/lua.sock" \
        --listen "127.0.0.1:$LUA_TCP_PORT" --log "$T/audit.log" $LUAFCGID_ARGS
    BACKEND_PID[luafcgid]=$LAST_PID
    if ! wait_ready "$LAST_PID" luafcgid "unix:$T/lua.sock" ||
        ! wait_ready "$LAST_PID" luafcgid "tcp:$LUA_TCP_PORT"; then
        BACKEND_ERR[luafcgid]="luafcgid did not start"
    fi
else
    BACKEND_ERR[luafcgid]=$LUAFCGID_WHY
fi

if [[ -n $ORIG_LUAFCGID ]]; then
    start orig "$ORIG_LUAFCGID" "$T/orig-luafcgid.lua"
    BACKEND_PID[orig]=$LAST_PID
    # libfcgi catches SIGTERM and the original's main thread never leaves its sweep loop.
    # Out of the job table, bash does not announce its SIGKILL ("Killed").
    STOP_SIGNAL[$LAST_PID]=KILL
    disown "$LAST_PID"
    wait_ready "$LAST_PID" orig "unix:$T/orig.sock" || BACKEND_ERR[orig]="the original luafcgid did not start"
fi

nginx -t -q -p "$T/" -c "$T/nginx.conf" -e "$T/nginx-error.log" ||
    die "nginx rejected $T/nginx.conf (see above)"
start nginx nginx -p "$T/" -c "$T/nginx.conf" -e "$T/nginx-error.log"
NGINX_PID=$LAST_PID
wait_ready "$NGINX_PID" nginx "tcp:$NGINX_PORT" || die "nginx did not start"

# ---------------------------------------------------------------------------
# Check every row answers 200 with exactly the 11 bytes "Hello World" once; a row that
# does not is not run. How each row frames its body (Content-Length or chunked) and the
# size of its headers are kept for the summary: wrk reads all of it.

BASE="http://127.0.0.1:$NGINX_PORT"
printf 'Hello World' >"$T/expected.body"
declare -A ROW_ERR=() ROW_WIRE=()
for i in "${!ROW_NAME[@]}"; do
    key=${ROW_BACKEND[i]}
    if [[ -n $key && -n ${BACKEND_ERR[$key]:-} ]]; then
        ROW_ERR[$i]=${BACKEND_ERR[$key]}
        continue
    fi
    : >"$T/check.body"
    got=$(curl -sS -m 5 -D "$T/check.head" -o "$T/check.body" -w '%{http_code} %{size_header}' \
        "$BASE${ROW_PATH[i]}" 2>&1) || true
    body=$(head -c 200 "$T/check.body" 2>/dev/null || true)
    if [[ ${got%% *} != 200 ]] || ! cmp -s "$T/check.body" "$T/expected.body"; then
        ROW_ERR[$i]="check failed: HTTP ${got%% *}, body '${body//$'\n'/\\n}' ($(wc -c <"$T/check.body") bytes)"
        continue
    fi
    framing=$(tr -d '\r' <"$T/check.head" | awk -F': *' '
        tolower($1) == "content-length" { cl = $2 }
        tolower($1) == "transfer-encoding" { te = $2 }
        END { if (cl != "") print "Content-Length " cl; else if (te != "") print te; else print "close" }')
    ROW_WIRE[$i]="$framing, ${got#* } header bytes"
done

# ---------------------------------------------------------------------------
# Runs.

to_us() { # wrk time ("254.00us", "1.23ms", "2.00s", "1.00m") -> microseconds
    awk -v t="$1" 'BEGIN {
        n = t + 0; u = t; sub(/^[0-9.]+/, "", u)
        m = (u == "us") ? 1 : (u == "ms") ? 1e3 : (u == "s") ? 1e6 : (u == "m") ? 6e7 : (u == "h") ? 3.6e9 : -1
        if (m < 0) print "nan"; else printf "%.1f", n * m
    }'
}

# Results, keyed "row,conns": space-separated per-round values.
declare -A R_RPS=() R_P50=() R_P99=() R_REQ=() R_BT=() R_NT=() R_BAD=() R_SOCK=() R_FAIL=()

run_wrk() { # ROW CONNS SECONDS OUTFILE: wrk with a hard time bound
    timeout -k 5 $(($3 + 30)) wrk -t1 -c"$2" -d"$3"s --latency "$BASE${ROW_PATH[$1]}" >"$4" 2>&1
}

measure() { # ROW CONNS ROUND
    local i=$1 c=$2 r=$3 key=${ROW_BACKEND[$1]} out="$T/wrk-$1-$2-$3.txt"
    local bpid="" b0=0 b1=0 n0 n1 rc=0 parsed req rps p50 p99 bad sock avg busy fail="" bus nus
    [[ -n $key ]] && bpid=${BACKEND_PID[$key]}
    [[ -n $bpid ]] && b0=$(tree_ticks "$bpid")
    n0=$(tree_ticks "$NGINX_PID")
    run_wrk "$i" "$c" "$DURATION" "$out" || rc=$?
    n1=$(tree_ticks "$NGINX_PID")
    [[ -n $bpid ]] && b1=$(tree_ticks "$bpid")
    parsed=$(awk '
        / requests in /            { req = $1 }
        /^Requests\/sec:/          { rps = $2 }
        /^ +Latency +[0-9]/        { avg = $2 }
        /^ +50% /                  { p50 = $2 }
        /^ +99% /                  { p99 = $2 }
        /Non-2xx or 3xx responses/ { bad = $NF }
        /Socket errors:/           { gsub(/,/, ""); sock = $4 + $6 + $8 + $10 }
        END { printf "%s %s %s %s %d %d %s\n", req + 0, (rps == "" ? 0 : rps), (p50 == "" ? "-" : p50), (p99 == "" ? "-" : p99), bad, sock, (avg == "" ? "-" : avg) }
    ' "$out")
    read -r req rps p50 p99 bad sock avg <<<"$parsed"
    ((rc == 0)) || fail="wrk exit $rc"
    ((req > 0)) || fail="${fail:+$fail, }no requests"
    ((bad == 0)) || fail="${fail:+$fail, }$bad non-2xx/3xx"
    ((sock == 0)) || fail="${fail:+$fail, }$sock socket errors"
    if ((c > 1)) && [[ $avg != - ]]; then
        # Little's law: connections busy on average = throughput x mean latency.
        busy=$(awk -v r="$rps" -v a="$(to_us "$avg")" 'BEGIN { printf "%.1f", r * a / 1e6 }')
        if awk -v b="$busy" -v c="$c" 'BEGIN { exit !(b < c / 2) }'; then
            fail="${fail:+$fail, }stalled: only ~$busy of $c connections busy"
        fi
    fi
    [[ $p50 == - ]] || p50=$(to_us "$p50")
    [[ $p99 == - ]] || p99=$(to_us "$p99")
    local k="$i,$c"
    R_RPS[$k]+="$rps "
    R_P50[$k]+="$p50 "
    R_P99[$k]+="$p99 "
    R_REQ[$k]+="$req "
    R_BT[$k]+="$((b1 - b0)) "
    R_NT[$k]+="$((n1 - n0)) "
    R_BAD[$k]=$((${R_BAD[$k]:-0} + bad))
    R_SOCK[$k]=$((${R_SOCK[$k]:-0} + sock))
    [[ -z $fail ]] || R_FAIL[$k]="${R_FAIL[$k]:+${R_FAIL[$k]}; }round $r: $fail"
    bus=$(awk -v t=$((b1 - b0)) -v n="$req" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')
    nus=$(awk -v t=$((n1 - n0)) -v n="$req" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')
    [[ -n $key ]] || bus="-"
    printf 'round %d/%d  %-13s c=%-3s %9s req/s  p50 %8s us  p99 %8s us  backend %6s us/req  nginx %6s us/req%s\n' \
        "$r" "$ROUNDS" "${ROW_NAME[i]}" "$c" "$rps" "$p50" "$p99" "$bus" "$nus" "${fail:+  FAIL: $fail}" >&2
    if [[ -n $fail ]]; then
        sed 's/^/    | /' "$out" >&2
    fi
}

START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
nrows=0
for i in "${!ROW_NAME[@]}"; do [[ -z ${ROW_ERR[$i]:-} ]] && nrows=$((nrows + 1)); done
nconns=$(wc -w <<<"$CONNS")
est=$((nrows * (nconns * ROUNDS * DURATION + WARMUP)))
echo "bench/nginx.sh: $(nproc) CPUs, load $START_LOAD; $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2), ${PHP_FPM:+$("$PHP_FPM" -v | head -n 1 | cut -d' ' -f1-2)}" >&2
echo "bench/nginx.sh: DURATION=$DURATION ROUNDS=$ROUNDS WARMUP=$WARMUP CONNS='$CONNS' KEEPALIVE=$KEEPALIVE PHP_CHILDREN='$PHP_CHILDREN'; $nrows rows, about ${est}s of load; temp dir $T" >&2

if ((WARMUP > 0)); then
    for i in "${!ROW_NAME[@]}"; do
        [[ -z ${ROW_ERR[$i]:-} ]] || continue
        run_wrk "$i" 50 "$WARMUP" "$T/warmup-$i.txt" || true
    done
fi

for ((r = 1; r <= ROUNDS; r++)); do
    for i in "${!ROW_NAME[@]}"; do
        [[ -z ${ROW_ERR[$i]:-} ]] || continue
        for c in $CONNS; do measure "$i" "$c" "$r"; done
    done
done
END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------
# Summary: per row and connection count, req/s is the best round (min-max over
# rounds beside it), p50/p99 come from that best round, CPU per request is the
# total over all rounds divided by all requests.

declare -A BEST=() BEST_AT=()
for k in "${!R_RPS[@]}"; do
    read -r best at <<<"$(tr ' ' '\n' <<<"${R_RPS[$k]}" | awk 'NF { n++; if ($1 > b || n == 1) { b = $1; at = n } } END { print b, at }')"
    BEST[$k]=$best
    BEST_AT[$k]=$at
done

nth() { awk -v n="$2" '{ print $n }' <<<"$1"; }
sum() { tr ' ' '\n' <<<"$1" | awk 'NF { s += $1 } END { print s + 0 }'; }
fmt_us() { # microseconds -> "254us" / "1.23ms"
    awk -v v="$1" 'BEGIN { if (v == "-" || v == "nan") print "-"; else if (v < 1000) printf "%.0fus\n", v; else if (v < 1e6) printf "%.2fms\n", v / 1e3; else printf "%.2fs\n", v / 1e6 }'
}

FAILED=0
print_table() {
    echo
    echo "nginx 1 worker, wrk -t1 -d${DURATION}s --latency, ${ROUNDS} round(s); req/s best of rounds [min-max]; CPU = utime+stime per request (all rounds)"
    printf '%-13s %5s %9s %-17s %8s %8s %11s %11s %9s %9s  %s\n' \
        row conns req/s "[min-max]" p50 p99 "backend us" "nginx us" "/return" "/php-best" status
    for c in $CONNS; do
        ret_rps=""
        php_best=""
        php_best_name=""
        for i in "${!ROW_NAME[@]}"; do
            k="$i,$c"
            [[ -z ${ROW_ERR[$i]:-} && -z ${R_FAIL[$k]:-} && -n ${BEST[$k]:-} ]] || continue
            [[ ${ROW_NAME[i]} == return ]] && ret_rps=${BEST[$k]}
            if [[ ${ROW_NAME[i]} == php-fpm/* ]]; then
                if awk -v a="${php_best:-0}" -v b="${BEST[$k]}" 'BEGIN { exit !(b > a) }'; then
                    php_best=${BEST[$k]}
                    php_best_name=${ROW_NAME[i]}
                fi
            fi
        done
        for i in "${!ROW_NAME[@]}"; do
            k="$i,$c"
            name=${ROW_NAME[i]}
            if [[ -n ${ROW_ERR[$i]:-} ]]; then
                printf '%-13s %5s %9s %-17s %8s %8s %11s %11s %9s %9s  FAIL: %s\n' \
                    "$name" "$c" - - - - - - - - "${ROW_ERR[$i]}"
                FAILED=1
                continue
            fi
            at=${BEST_AT[$k]}
            rps=${BEST[$k]}
            range=$(tr ' ' '\n' <<<"${R_RPS[$k]}" | awk 'NF { if (n++ == 0 || $1 < lo) lo = $1; if ($1 > hi) hi = $1 } END { printf "[%.0f-%.0f]", lo, hi }')
            p50=$(fmt_us "$(nth "${R_P50[$k]}" "$at")")
            p99=$(fmt_us "$(nth "${R_P99[$k]}" "$at")")
            reqs=$(sum "${R_REQ[$k]}")
            bus=$(awk -v t="$(sum "${R_BT[$k]}")" -v n="$reqs" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')
            [[ -n ${ROW_BACKEND[i]} ]] || bus="-"
            nus=$(awk -v t="$(sum "${R_NT[$k]}")" -v n="$reqs" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')
            vr=$(awk -v a="$rps" -v b="$ret_rps" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
            vp=$(awk -v a="$rps" -v b="$php_best" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
            status=ok
            if [[ -n ${R_FAIL[$k]:-} ]]; then
                status="FAIL: ${R_FAIL[$k]}"
                FAILED=1
            fi
            [[ $name == "${php_best_name:-}" && -n $php_best ]] && status="$status (php-fpm best)"
            printf '%-13s %5s %9.0f %-17s %8s %8s %11s %11s %9s %9s  %s\n' \
                "$name" "$c" "$rps" "$range" "$p50" "$p99" "$bus" "$nus" "$vr" "$vp" "$status"
        done
    done
    echo "us = microseconds; /return and /php-best: req/s over that row's at the same connection count."
    print_round_ratios
    echo -n "Replies (body 11 bytes in every row):"
    for i in "${!ROW_NAME[@]}"; do
        [[ -n ${ROW_WIRE[$i]:-} ]] && echo -n " ${ROW_NAME[i]}: ${ROW_WIRE[$i]};"
    done
    echo
    echo "$(nproc) CPUs; load average before the runs: $START_LOAD, after: $END_LOAD"
}


# The median of ratios such as "0.90x 0.72x 1.07x" ("-" for none): with the rounds
# interleaved, each ratio pairs two rows measured minutes apart at most, and the median of
# the pairs is what one slow spell of the machine moves least.
median_ratio() {
    tr ' ' '\n' <<<"$1" | sed -n 's/x$//p' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.2fx\n", v[(NR + 1) / 2]; else printf "%.2fx\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Each luafcgid row against each constant responder (const, const-batch) round by round:
# the rows of one round ran minutes apart at most, so these ratios show how much of the
# best-of-rounds ratio the machine's drift between rounds makes.
print_round_ratios() {
    local ref ref_i i c k rps p50
    for ref in const const-batch; do
        ref_i=""
        for i in "${!ROW_NAME[@]}"; do [[ ${ROW_NAME[i]} == "$ref" ]] && ref_i=$i; done
        [[ -n $ref_i ]] || continue
        echo "Round by round against $ref (req/s ratio; p50 ratio), rounds in order:"
        for c in $CONNS; do
            for i in "${!ROW_NAME[@]}"; do
                [[ ${ROW_BACKEND[i]} == luafcgid && -z ${ROW_ERR[$i]:-} ]] || continue
                k="$i,$c"
                [[ -n ${R_RPS[$k]:-} && -n ${R_RPS[$ref_i,$c]:-} ]] || continue
                rps=$(paste -d' ' <(tr ' ' '\n' <<<"${R_RPS[$k]}" | awk NF) \
                    <(tr ' ' '\n' <<<"${R_RPS[$ref_i,$c]}" | awk NF) |
                    awk '{ printf "%s%.2fx", (NR > 1 ? " " : ""), ($2 > 0 ? $1 / $2 : 0) }')
                p50=$(paste -d' ' <(tr ' ' '\n' <<<"${R_P50[$k]}" | awk NF) \
                    <(tr ' ' '\n' <<<"${R_P50[$ref_i,$c]}" | awk NF) |
                    awk '{ printf "%s%s", (NR > 1 ? " " : ""), ($2 > 0 && $1 != "-" ? sprintf("%.2fx", $1 / $2) : "-") }')
                printf '  %-13s c=%-3s req/s %s (median %s); p50 %s (median %s)\n' "${ROW_NAME[i]}" "$c" \
                    "$rps" "$(median_ratio "$rps")" "$p50" "$(median_ratio "$p50")"
            done
        done
    done
}

# ---------------------------------------------------------------------------
# Diagnostics: anything the daemons complained about.

print_diagnostics() {
    echo
    n=$(grep -cE '\[(error|crit|alert|emerg)\]' "$T/nginx-error.log" 2>/dev/null || true)
    echo "nginx error log: ${n:-0} error lines"
    grep -E '\[(error|crit|alert|emerg)\]' "$T/nginx-error.log" 2>/dev/null | head -n 5 | sed 's/^/    /' || true
    for n in $PHP_CHILDREN; do
        w=$(grep -ciE 'warning|error' "$T/php-fpm-$n.log" 2>/dev/null || true)
        echo "php-fpm/$n log: ${w:-0} warning/error lines"
        grep -iE 'warning|error' "$T/php-fpm-$n.log" 2>/dev/null | head -n 5 | sed 's/^/    /' || true
    done
    for name in const const-batch luafcgid orig; do
        [[ -f $T/$name.err ]] || continue
        # Anything above INFO (luafcgid colours its stderr even into a file); the original
        # logs only problems.
        pat='warn|error|panic|fatal'
        [[ $name == orig ]] && pat='.'
        msgs=$(sed 's/\x1b\[[0-9;]*m//g' "$T/$name.err" | grep -iE "$pat" || true)
        if [[ -n $msgs ]]; then
            echo "$name stderr: $(wc -l <<<"$msgs") warning/error lines (first 10):"
            head -n 10 <<<"$msgs" | sed 's/^/    /'
        else
            echo "$name stderr: no warnings or errors"
        fi
        if [[ -n ${BACKEND_PID[$name]:-} ]] && ! kill -0 "${BACKEND_PID[$name]}" 2>/dev/null; then
            echo "$name DIED during the run"
            FAILED=1
        fi
    done
    if [[ -f $T/audit.log ]]; then
        measured=0 warm=0 checks=0
        for i in "${!ROW_NAME[@]}"; do
            [[ ${ROW_BACKEND[i]} == luafcgid ]] || continue
            checks=$((checks + 1))
            for c in $CONNS; do measured=$((measured + $(sum "${R_REQ[$i,$c]:-}"))); done
            if [[ -f $T/warmup-$i.txt ]]; then
                warm=$((warm + $(awk '/ requests in / { print $1 + 0 }' "$T/warmup-$i.txt")))
            fi
        done
        # The audit writer is a thread of its own: give it up to 5 s to catch up.
        for ((k = 0; k < 50; k++)); do
            lines=$(grep -c '"event":"request"' "$T/audit.log" || true)
            ((${lines:-0} >= measured + warm + checks)) && break
            sleep 0.1
        done
        echo "audit log (lua-unix, lua-unix-r, lua-tcp): ${lines:-0} request lines; wrk completed $measured measured + $warm warm-up requests, plus $checks checks"
        echo "audit log policies and states: $(grep '"event":"request"' "$T/audit.log" | grep -o '"policy":[^]]*]\|"state":"[^"]*"' | sort | uniq -c |
            awk '{ c = $1; $1 = ""; printf "%s%s x%s", (NR > 1 ? "; " : ""), substr($0, 2), c }')"
        echo "audit log outcomes: $(grep '"event":"request"' "$T/audit.log" | grep -o '"outcome":"[^"]*"' | sort | uniq -c |
            awk '{ sub(/"outcome":/, "", $2); printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2 }')"
        odd=$(grep '"event":"request"' "$T/audit.log" | grep -v '"status":200' | head -n 1 || true)
        [[ -z $odd ]] || echo "    e.g. $odd"
        other=$(grep -v '"event":"request"' "$T/audit.log" | head -n 5 || true)
        if [[ -n $other ]]; then
            echo "audit log, other events (first 5):"
            sed 's/^/    /' <<<"$other"
        fi
    fi
}

print_diagnostics >&2
print_table

exit "$FAILED"
