#!/usr/bin/env bash
# bench/ws/run.sh — sluice against nginx as WebSocket proxies, same upstream, same run.
#
# Measures, per proxy: messages/s for 1 KiB binary messages over SESSIONS sessions (closed
# loop, one message in flight per session; median of ROUNDS alternating rounds), round-trip
# p50/p99 at a fixed rate of half of nginx's maximum (open loop) and the latency each proxy
# adds to the direct path at that rate, proxy CPU per message, and RSS per idle session
# (IDLE_SESSIONS idle sessions). Prints a table and sluice's figures against the targets;
# writes a key=value summary to $OUT/ws/summary.txt. See bench/ws/README.md.
#
# usage: bench/ws/run.sh [--no-build] [--no-memory] [--no-throughput] [--help]
# env:   ROUNDS=3 DURATION=10 WARMUP=2 SESSIONS=100 SIZE=1024 IDLE_SESSIONS=10000
#        RATE= (open-loop msgs/s; default half of nginx's closed-loop median)
#        SPIN=1 (open loop: the load generator busy-polls; 0: timerfd and sleep)
#        LAYOUT=upstream-with-proxy|load-apart|none  PROXY_CPUS/LOAD_CPUS/UP_CPUS (taskset)
#        PROXIES="sluice nginx" UPSTREAM=echo|stt NOISE_MAX=10 LAG_MAX=200 MAX_RETRIES=8
#        BUILD_DIR=/tmp/sluice-bench-build (or BUILD) OUT=/tmp/sluice-bench KEEP_TMP=1
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
export PYTHONDONTWRITEBYTECODE=1

BUILD_DIR=${BUILD_DIR:-${BUILD:-/tmp/sluice-bench-build}}
OUT=${OUT:-/tmp/sluice-bench}
RES=$OUT/ws
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
SESSIONS=${SESSIONS:-100}
SIZE=${SIZE:-1024}
IDLE_SESSIONS=${IDLE_SESSIONS:-10000}
RATE=${RATE:-}
SPIN=${SPIN:-1}
PROXIES=${PROXIES:-"sluice nginx"}
UPSTREAM=${UPSTREAM:-echo}
LAYOUT=${LAYOUT:-upstream-with-proxy}
NOISE_MAX=${NOISE_MAX:-10}    # redo a run when more than this % of a pinned CPU went elsewhere
MAX_RETRIES=${MAX_RETRIES:-8} # at most this many redone runs in all
LAG_MAX=${LAG_MAX:-200}       # open loop: redo a run whose sends were late by more (p99, us)
WS_PATH=/ws

do_build=1 do_memory=1 do_throughput=1
for arg in "$@"; do
  case "$arg" in
    --no-build) do_build=0 ;;
    --no-memory) do_memory=0 ;;
    --no-throughput) do_throughput=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

case "$LAYOUT" in
  upstream-with-proxy) : "${PROXY_CPUS=0}" "${LOAD_CPUS=1}" "${UP_CPUS=0}" ;;
  load-apart)          : "${PROXY_CPUS=0}" "${LOAD_CPUS=1}" "${UP_CPUS=1}" ;;
  none)                : "${PROXY_CPUS=}" "${LOAD_CPUS=}" "${UP_CPUS=}" ;;
  *) echo "run.sh: LAYOUT must be upstream-with-proxy, load-apart or none" >&2; exit 2 ;;
esac
if [ "$(nproc)" -lt 2 ] && [ "$LAYOUT" != none ]; then
  echo "run.sh: fewer than 2 CPUs; not pinning" >&2
  PROXY_CPUS= LOAD_CPUS= UP_CPUS=
fi
case "$UPSTREAM" in echo|stt) ;; *) echo "run.sh: UPSTREAM must be echo or stt" >&2; exit 2 ;; esac


# ---- processes and cleanup -------------------------------------------------------------------

# Neither the temp dir nor the copied binaries have "sluice" in their names: another session's
# `pkill sluice` must not stop the benchmark (and this script only ever kills its own PIDs).
TMP=$(mktemp -d /tmp/slwsbench.XXXXXX)
chmod 755 "$TMP" # nginx's worker runs as nobody and must reach its temp paths
PIDS=()          # everything started, stopped in reverse order on exit
declare -A NAME  # pid -> what it is (upstream, proxies), for check_alive


cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  save_logs "$RES/raw" # the processes' own logs, next to the results
  if [ -n "${KEEP_TMP:-}" ]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM


check_alive() { # dies with the exit status of the upstream or a proxy that has exited
  local pid rc
  for pid in "${!NAME[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" 2>/dev/null || rc=$?
    [ "$rc" -gt 128 ] && rc="$rc (signal $((rc - 128)): $(kill -l $((rc - 128)) 2>/dev/null))"
    die "${NAME[$pid]} (pid $pid) exited with status $rc; logs in $RES/raw/logs/"
  done
}

forget() { # forget PID: drop it from NAME (it is being stopped on purpose)
  unset "NAME[$1]" 2>/dev/null || true
}


free_port() { # a currently free TCP port on 127.0.0.1
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}


median() { # median V...: of numbers (empty -> NA)
  [ $# -gt 0 ] || { echo NA; return; }
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

kv() { # kv KEY LINE: the value of KEY=... in a key=value line (empty if absent)
  local key=$1 line=$2 tok
  for tok in $line; do [ "${tok%%=*}" = "$key" ] && { echo "${tok#*=}"; return; }; done
  echo ""
}

# ---- build -----------------------------------------------------------------------------------

rm -rf "$RES/raw"; mkdir -p "$RES/raw"
PATH=$PATH:/usr/sbin
for t in nginx taskset ss cc timeout; do
  command -v "$t" >/dev/null || die "$t not found (bash scripts/setup.sh --bench installs nginx)"
done
STT_TARGET=0
grep -qs 'sluice-mock-stt' "$ROOT/examples/mock/CMakeLists.txt" "$ROOT/examples/mock/stt/CMakeLists.txt" \
  && STT_TARGET=1
if [ "$do_build" = 1 ]; then
  log "building sluice (Release) in $BUILD_DIR"
  mkdir -p "$BUILD_DIR"
  cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DSLUICE_TESTS=OFF >"$TMP/build.log" 2>&1 ||
    { tail -30 "$TMP/build.log" >&2; die "cmake failed"; }
  targets=sluice
  [ "$UPSTREAM" = stt ] && targets="$targets sluice-mock-stt"
  make -C "$BUILD_DIR" -j"$(nproc)" $targets >>"$TMP/build.log" 2>&1 ||
    { tail -30 "$TMP/build.log" >&2; die "build failed"; }
fi
[ -x "$BUILD_DIR/sluice" ] || die "no sluice in $BUILD_DIR (drop --no-build)"
mkdir -p "$TMP/bin"
SLUICE=$TMP/bin/slb-proxy
LOADGEN=$TMP/bin/wsb-load
cp "$BUILD_DIR/sluice" "$SLUICE"
if [ "$UPSTREAM" = stt ]; then
  [ "$STT_TARGET" = 1 ] || die "UPSTREAM=stt: no sluice-mock-stt target in examples/mock"
  stt=$(find "$BUILD_DIR/examples" -type f -name sluice-mock-stt -perm -u+x | head -1)
  [ -n "$stt" ] || die "UPSTREAM=stt: sluice-mock-stt was not built"
  UPBIN=$TMP/bin/wsb-upstream-stt
  cp "$stt" "$UPBIN"
else
  UPBIN=$TMP/bin/wsb-echo
fi
log "building the load generator and echo server (cc -O2)"
CFLAGS="-O2 -g -Wall -Wextra -Wno-unused-parameter"
# shellcheck disable=SC2086
cc $CFLAGS -o "$LOADGEN" "$HERE/ws_load.c" -lwslay -luv -lcrypto >>"$TMP/build.log" 2>&1 &&
  { [ "$UPSTREAM" = stt ] || cc $CFLAGS -o "$UPBIN" "$HERE/ws_echo.c" -lwslay -luv -lcrypto \
      >>"$TMP/build.log" 2>&1; } ||
  { tail -30 "$TMP/build.log" >&2; die "could not build the bench tools (libuv1-dev, libwslay-dev, libssl-dev)"; }

# 10,000 idle sessions through a proxy need 2 descriptors per session in the proxy (client and
# upstream side), one in the client and one in the upstream.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
want=$((IDLE_SESSIONS * 2 + 1024))
if [ "$hard" -lt "$want" ]; then ulimit -Hn "$want" 2>/dev/null && hard=$want || true; fi
NOFILE=$(( hard < 1048576 ? hard : 1048576 ))
ulimit -Sn "$NOFILE"
IDLE_REQUESTED=$IDLE_SESSIONS
if [ "$do_memory" = 1 ] && [ $((IDLE_SESSIONS * 2 + 256)) -gt "$NOFILE" ]; then
  IDLE_SESSIONS=$(( (NOFILE - 256) / 2 ))
  log "open-file limit is $NOFILE (the hard limit): $IDLE_REQUESTED sessions need $((IDLE_REQUESTED * 2)) descriptors in the proxy; using IDLE_SESSIONS=$IDLE_SESSIONS"
fi

# ---- upstream --------------------------------------------------------------------------------

UP_PID= UP_PORT=
start_upstream() { # start_upstream TAG -> UP_PID, UP_PORT
  local tag=$1 pf="$TMP/up-$1.port"
  (pin "$UP_CPUS" "$UPBIN" --listen 127.0.0.1:0 --port-file "$pf") >"$TMP/up-$tag.log" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID"); NAME[$UP_PID]="upstream ($UPSTREAM)"
  local i
  for ((i = 0; i < 100; i++)); do [ -s "$pf" ] && break; sleep 0.05; done
  [ -s "$pf" ] || { cat "$TMP/up-$tag.log" >&2; die "upstream did not start"; }
  UP_PORT=$(cat "$pf")
}

stop_upstream() { forget "$UP_PID"; stop_pid "$UP_PID"; }

# ---- proxies ---------------------------------------------------------------------------------

# start_proxy NAME PORT -> PROXY_PID (the process to stop) and SERVE_PID (the one serving
# connections: nginx's worker, otherwise the same); PROXY_DIR holds its config and logs.
start_proxy() {
  local name=$1 port=$2 dir
  dir="$TMP/${name/sluice/sl}-$port"
  mkdir -p "$dir"; chmod 755 "$dir"
  PROXY_DIR=$dir
  case "$name" in
    sluice)
      cat >"$dir/config.lua" <<EOF
-- sluice as a WebSocket proxy under benchmark (generated by bench/ws/run.sh)
return {
  listen = { "127.0.0.1:$port" },
  admin = false,
  workers = 1,
  watch = false,
  log_level = "warn",
  policies = "$ROOT/policies",
  limits = { idle_timeout_ms = 300000 },
  pools = { echo = { endpoints = { "ws://127.0.0.1:$UP_PORT" } } },
  routes = { { path = "$WS_PATH", pool = "echo" } },
}
EOF
      (pin "$PROXY_CPUS" "$SLUICE" -c "$dir/config.lua") >"$dir/out.log" 2>&1 &
      ;;
    nginx)
      # Two connections per session. nginx starts closing fresh idle connections ("worker_connections
      # are not enough, reusing connections") once fewer than 1/16 of them are free, so give it
      # 17/16 of what it needs; that may exceed the descriptor limit, which nginx warns about
      # at start-up and otherwise ignores.
      local wc=$(( IDLE_SESSIONS * 2 * 17 / 16 + 512 ))
      cat >"$dir/nginx.conf" <<EOF
# nginx as a WebSocket proxy under benchmark (generated by bench/ws/run.sh)
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile $NOFILE;
events {
  worker_connections $wc; # client and upstream connections both count
  use epoll;
}
http {
  access_log off;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  server {
    listen 127.0.0.1:$port backlog=1024;
    location $WS_PATH {
      proxy_pass http://127.0.0.1:$UP_PORT;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
EOF
      (pin "$PROXY_CPUS" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log") >"$dir/out.log" 2>&1 &
      ;;
    *) die "unknown proxy $name" ;;
  esac
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  if ! wait_listen "$port" "$PROXY_PID" 10; then
    cat "$dir/out.log" "$dir/error.log" 2>/dev/null | tail -20 >&2
    die "$name did not start listening on $port"
  fi
  SERVE_PID=$PROXY_PID
  if [ "$name" = nginx ]; then
    local i
    for ((i = 0; i < 100; i++)); do
      SERVE_PID=$(pgrep -P "$PROXY_PID" | head -1 || true)
      [ -n "$SERVE_PID" ] && break; sleep 0.05
    done
    [ -n "$SERVE_PID" ] || die "nginx worker not found"
    PIDS+=("$SERVE_PID") # stopped after the master, in case the master is gone
  fi
  NAME[$PROXY_PID]=$name
  [ "$SERVE_PID" != "$PROXY_PID" ] && NAME[$SERVE_PID]="$name worker"
  return 0
}

stop_proxy() { # stop_proxy PROXY_PID SERVE_PID
  forget "$1"; forget "$2"
  stop_pid "$1"; stop_pid "$2"
}

proxy_log_lines() { # proxy_log_lines DIR: what the proxy logged (warn and up), less nginx's
  # expected start-up warning about worker_connections above the descriptor limit
  cat "$1/out.log" "$1/error.log" 2>/dev/null | grep -v 'exceed open file resource limit' || true
}

# ---- load runs -------------------------------------------------------------------------------

# noise_of LINE: how much CPU time went to something other than the processes under test,
# in % of one CPU over the recorded window (0 on a quiet machine):
# - closed loop (pinned CPUs saturated): on each pinned CPU, its busy time not spent in the
#   processes pinned there; the worst CPU;
# - open loop (CPUs partly idle: every wake-up then costs interrupt time that no process is
#   charged for, so busy-minus-processes would not be noise): the CPU time of every other task
#   on the machine (others_cpu_pct, from each task's schedstat), and with SPIN=1 the load CPU's
#   busy time not spent in the load generator.
# NA unless the proxy, upstream and load CPUs are single CPUs.
noise_of() {
  [[ "$PROXY_CPUS" =~ ^[0-9]+$ && "$LOAD_CPUS" =~ ^[0-9]+$ && "$UP_CPUS" =~ ^[0-9]+$ ]] ||
    { echo NA; return; }
  echo "$1" | tr ' ' '\n' | awk -F= -v pc="$PROXY_CPUS" -v lc="$LOAD_CPUS" -v uc="$UP_CPUS" -v spin="$SPIN" '
    { v[$1] = $2 }
    END {
      acc[pc] += v["proxy_cpu_pct"]; acc[uc] += v["up_cpu_pct"]; acc[lc] += v["self_cpu_pct"]
      worst = v["others_cpu_pct"] + 0
      if (v["mode"] == "closed") n = split(pc " " lc " " uc, cs, " ")
      else if (spin == 1) n = split(lc, cs, " ")
      else n = 0
      for (i = 1; i <= n; i++) { c = cs[i]; o = v["busy_cpu" c] - acc[c]; if (o > worst) worst = o }
      printf "%.0f\n", worst < 0 ? 0 : worst
    }'
}

RUNS=$RES/raw/runs.txt
NOISY=$RES/raw/noisy-runs.txt
: >"$RUNS"; : >"$NOISY"
RETRIES_LEFT=$MAX_RETRIES RETRIED=0
declare -A PORT SPID PPID_ PDIR

# load_once TARGET MODE TAG [RATE]: one load-generator run against TARGET (direct or a proxy);
# sets LINE to its summary line plus target=, tag=, noise=.
load_once() {
  local target=$1 mode=$2 tag=$3 rate=${4:-} port watch=() raw
  if [ "$target" = direct ]; then port=$UP_PORT
  else port=${PORT[$target]}; watch+=(--watch "proxy=${SPID[$target]}"); fi
  watch+=(--watch "up=$UP_PID")
  raw="$RES/raw/$tag-$target.txt"
  local args=(--port "$port" --path "$WS_PATH" --sessions "$SESSIONS" --size "$SIZE" --mode "$mode"
    --duration "$DURATION" --warmup "$WARMUP" --spin "$SPIN" "${watch[@]}")
  [ "$mode" = open ] && args+=(--rate "$rate")
  (pin "$LOAD_CPUS" timeout -k 5 "$(awk -v w="$WARMUP" -v d="$DURATION" 'BEGIN { printf "%d", w + d + 60 }')" "$LOADGEN" "${args[@]}") >"$raw" 2>"$raw.err" &
  local lp=$!
  PIDS+=("$lp")
  local rc=0
  wait "$lp" || rc=$?
  LINE=$(grep '^mode=' "$raw" | tail -1 || true)
  if [ "$rc" != 0 ] || [ -z "$LINE" ]; then
    cat "$raw" "$raw.err" >&2
    check_alive
    die "load generator failed against $target (status $rc)"
  fi
  LINE="target=$target tag=$tag $LINE noise=$(noise_of "$LINE")"
}

is_noisy() { # is_noisy LINE: noise above NOISE_MAX, or (open loop) sends late by over LAG_MAX us
  local n lag
  n=$(kv noise "$1"); lag=$(kv lag_p99_us "$1")
  [ "$n" != NA ] && [ "$n" -gt "$NOISE_MAX" ] && return 0
  [ -n "$lag" ] && awk -v l="$lag" -v m="$LAG_MAX" 'BEGIN { exit !(l > m) }' && return 0
  return 1
}

# run_load TARGET MODE TAG [RATE]: load_once, redone (within MAX_RETRIES for the whole run)
# while its noise is above NOISE_MAX; the kept run is appended to $RUNS.
run_load() {
  local target=$1 mode=$2 tag=$3 rate=${4:-} noise
  check_alive
  load_once "$@"
  noise=$(kv noise "$LINE")
  while is_noisy "$LINE" && [ "$RETRIES_LEFT" -gt 0 ]; do
    RETRIES_LEFT=$((RETRIES_LEFT - 1)); RETRIED=$((RETRIED + 1))
    echo "$LINE" >>"$NOISY"
    mv "$RES/raw/$tag-$target.txt" "$RES/raw/$tag-$target.noisy$RETRIED.txt"
    log "$tag $target: noise ${noise}% (NOISE_MAX=$NOISE_MAX%), send lag p99 $(kv lag_p99_us "$LINE") us (LAG_MAX=$LAG_MAX us); biggest other tasks: $(kv others_top "$LINE"); running it again"
    check_alive
    load_once "$@"
    noise=$(kv noise "$LINE")
  done
  echo "$LINE" >>"$RUNS"
  local extra=""
  [ "$target" != direct ] && extra=", proxy CPU $(kv proxy_cpu_pct "$LINE")% ($(kv proxy_us_per_msg "$LINE") us/msg)"
  log "$tag $target: $(kv msgs_per_s "$LINE") msgs/s, p50 $(kv p50_us "$LINE") us, p99 $(kv p99_us "$LINE") us$extra, upstream $(kv up_cpu_pct "$LINE")%, load $(kv self_cpu_pct "$LINE")%, noise ${noise}%$([ "$mode" = open ] && echo ", send lag p99 $(kv lag_p99_us "$LINE") us")"
  local k bad=""
  for k in failed bad lost stalled close_early eof_early err_early close_other not_closed skipped; do
    local v; v=$(kv "$k" "$LINE")
    [ -n "$v" ] && [ "$v" != 0 ] && bad="$bad $k=$v"
  done
  [ -n "$bad" ] && log "$tag $target: ANOMALY:$bad (early_code=$(kv early_code "$LINE"))"
  return 0
}

medians_of() { # medians_of TAGPREFIX TARGET KEY: median of KEY over the kept runs
  local vals=() l
  while read -r l; do
    [ "$(kv target "$l")" = "$2" ] || continue
    [[ "$(kv tag "$l")" == "$1"* ]] || continue
    vals+=("$(kv "$3" "$l")")
  done <"$RUNS"
  median "${vals[@]}"
}

# ---- memory: RSS with idle sessions ------------------------------------------------------------

MEM=$RES/raw/mem.txt
: >"$MEM"
hold_sessions() { # hold_sessions PORT N TAG -> HOLD_PID, HOLD_OPEN, HOLD_FAILED (once ready)
  local port=$1 n=$2 f="$TMP/hold-$3"
  (pin "$LOAD_CPUS" "$LOADGEN" --port "$port" --path "$WS_PATH" --sessions "$n" --mode idle \
    --connect-timeout 60) >"$f.out" 2>"$f.err" &
  HOLD_PID=$!
  PIDS+=("$HOLD_PID")
  local i
  for ((i = 0; i < 1500; i++)); do
    grep -q '^ready' "$f.out" 2>/dev/null && break
    kill -0 "$HOLD_PID" 2>/dev/null || break
    sleep 0.1
  done
  grep -q '^ready' "$f.out" || { cat "$f.out" "$f.err" >&2; die "idle sessions did not get ready (port $port, $n)"; }
  local line; line=$(grep '^ready' "$f.out")
  HOLD_OPEN=$(kv open "$line"); HOLD_FAILED=$(kv failed "$line")
  [ "$HOLD_FAILED" = 0 ] || log "warning: $HOLD_FAILED of $n idle sessions failed: $(tail -1 "$f.err")"
}

release_sessions() { # release_sessions PID TAG: stop a holder; echo what it lost while idle
  stop_pid "$1"
  grep -h '^ws-load idle' "$TMP/hold-$2.err" 2>/dev/null | sed 's/^ws-load idle: //' || true
}

if [ "$do_memory" = 1 ]; then
  start_upstream mem
  small=$(( IDLE_SESSIONS / 10 ))
  for p in $PROXIES; do
    port=$(free_port)
    start_proxy "$p" "$port"
    sleep 0.5
    idle=$(rss_kb "$SERVE_PID")
    master=0; [ "$SERVE_PID" != "$PROXY_PID" ] && master=$(rss_kb "$PROXY_PID")
    log "$p: idle RSS ${idle} kB; opening $small then $((IDLE_SESSIONS - small)) more idle WebSocket sessions"
    hold_sessions "$port" "$small" "$p-1"; h1=$HOLD_PID; open1=$HOLD_OPEN; failed1=$HOLD_FAILED
    sleep 0.5
    rss1=$(rss_kb "$SERVE_PID")
    hold_sessions "$port" $((IDLE_SESSIONS - small)) "$p-2"; h2=$HOLD_PID
    open=$((open1 + HOLD_OPEN)); failed=$((failed1 + HOLD_FAILED))
    sleep 1
    rss=$(rss_kb "$SERVE_PID")
    sleep 2 # still there a little later? (idle timers, lazy frees)
    rss_later=$(rss_kb "$SERVE_PID")
    estab=$(ss -Htn state established "dport = :$port" | wc -l)
    check_alive
    lost1=$(release_sessions "$h2" "$p-2"); lost2=$(release_sessions "$h1" "$p-1")
    logged=$(proxy_log_lines "$PROXY_DIR" | wc -l)
    log "$p: RSS ${rss} kB with $open sessions open ($estab client connections established, $failed failed), ${rss_later} kB 2 s later; holders: $lost1 / $lost2"
    echo "proxy=$p idle_kb=$idle small=$small rss_small_kb=$rss1 n=$IDLE_SESSIONS rss_kb=$rss rss_later_kb=$rss_later open=$open established=$estab failed=$failed master_kb=$master log_lines=$logged" >>"$MEM"
    { echo "# $p, idle sessions: what the holders saw"; echo "$lost1"; echo "$lost2"; } >>"$RES/raw/mem-holders.txt"
    proxy_log_lines "$PROXY_DIR" >"$RES/raw/mem-$p-proxy.log"
    stop_proxy "$PROXY_PID" "$SERVE_PID"
  done
  stop_upstream
fi

# ---- throughput and latency ----------------------------------------------------------------------

HALF_RATE=NA SLUICE_HALF=NA
if [ "$do_throughput" = 1 ]; then
  start_upstream load
  for p in $PROXIES; do
    PORT[$p]=$(free_port)
    start_proxy "$p" "${PORT[$p]}"
    SPID[$p]=$SERVE_PID; PPID_[$p]=$PROXY_PID; PDIR[$p]=$PROXY_DIR
    echo "proxy=$p phase=start rss_kb=$(rss_kb "$SERVE_PID")" >>"$RES/raw/rss-throughput.txt"
  done
  log "layout: proxy CPUs '${PROXY_CPUS:-any}', upstream CPUs '${UP_CPUS:-any}', load generator CPUs '${LOAD_CPUS:-any}'"
  read -r -a plist <<<"$PROXIES"
  np=${#plist[@]}

  # 1. Closed loop, maximum messages/s. The upstream alone first, for context.
  run_load direct closed closed-direct
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < np; k++)); do
      p=${plist[$(( (k + r - 1) % np ))]}
      run_load "$p" closed "closed$r"
    done
  done

  # 2. Open loop at half of nginx's maximum (or RATE): direct and every proxy, rotating order.
  ref=nginx; [[ " $PROXIES " == *" nginx "* ]] || ref=${plist[0]}
  ref_max=$(medians_of closed "$ref" msgs_per_s)
  HALF_RATE=${RATE:-$(awk -v m="$ref_max" 'BEGIN { printf "%.0f", m / 2 }')}
  targets=(direct "${plist[@]}")
  open_rounds() { # open_rounds TAG RATE
    local r k t nt=${#targets[@]}
    for ((r = 1; r <= ROUNDS; r++)); do
      for ((k = 0; k < nt; k++)); do
        t=${targets[$(( (k + r - 1) % nt ))]}
        run_load "$t" open "$1$r" "$2"
      done
    done
  }
  log "open loop at $HALF_RATE msgs/s ($([ -n "$RATE" ] && echo "RATE" || echo "half of $ref's median maximum, $ref_max"))"
  open_rounds half "$HALF_RATE"
  # When sluice's own maximum is well below nginx's, "half load" for sluice is a lower rate:
  # measure there too.
  if [ -z "$RATE" ] && [[ " $PROXIES " == *" sluice "* ]] && [ "$ref" != sluice ]; then
    sl_max=$(medians_of closed sluice msgs_per_s)
    SLUICE_HALF=$(awk -v m="$sl_max" 'BEGIN { printf "%.0f", m / 2 }')
    if awk -v a="$SLUICE_HALF" -v b="$HALF_RATE" 'BEGIN { exit !(a < 0.9 * b) }'; then
      log "sluice's maximum ($sl_max) is below nginx's: open loop at half of sluice's, $SLUICE_HALF msgs/s, too"
      open_rounds slhalf "$SLUICE_HALF"
    else
      SLUICE_HALF=NA
    fi
  fi
  check_alive
  for p in $PROXIES; do
    echo "proxy=$p phase=end rss_kb=$(rss_kb "${SPID[$p]}")" >>"$RES/raw/rss-throughput.txt"
    proxy_log_lines "${PDIR[$p]}" >"$RES/raw/load-$p-proxy.log"
    n=$(wc -l <"$RES/raw/load-$p-proxy.log")
    [ "$n" -gt 0 ] && { log "$p logged $n line(s) under load; first ones:"; head -5 "$RES/raw/load-$p-proxy.log" >&2; } || true
  done
  for p in $PROXIES; do stop_proxy "${PPID_[$p]}" "${SPID[$p]}"; done
  stop_upstream
  cp "$TMP/up-load.log" "$RES/raw/upstream-load.log" 2>/dev/null || true
fi

# ---- report ------------------------------------------------------------------------------------

"$PY" "$HERE/summarize.py" --runs "$RUNS" --noisy "$NOISY" --mem "$MEM" \
  --rss "$RES/raw/rss-throughput.txt" --logs "$RES/raw" --out "$RES/summary.txt" \
  --meta "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --meta "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --meta "layout=$LAYOUT" --meta "proxy_cpus=${PROXY_CPUS:-any}" \
  --meta "upstream_cpus=${UP_CPUS:-any}" --meta "load_cpus=${LOAD_CPUS:-any}" \
  --meta "sessions=$SESSIONS" --meta "size=$SIZE" --meta "rounds=$ROUNDS" \
  --meta "duration=${DURATION}s" --meta "warmup=${WARMUP}s" --meta "spin=$SPIN" \
  --meta "upstream=$UPSTREAM" --meta "half_rate=$HALF_RATE" --meta "sluice_half_rate=$SLUICE_HALF" \
  --meta "rate_override=${RATE:-none}" --meta "idle_sessions=$IDLE_SESSIONS" \
  --meta "idle_sessions_requested=$IDLE_REQUESTED" --meta "nofile=$NOFILE" \
  --meta "noisy_runs_redone=$RETRIED" --meta "noise_max=${NOISE_MAX}%" --meta "lag_max=${LAG_MAX}us" \
  --meta "nginx=$(nginx -v 2>&1 | sed 's/.*\///')" \
  | tee "$RES/table.txt"
log "summary: $RES/summary.txt, table: $RES/table.txt, raw: $RES/raw/"
