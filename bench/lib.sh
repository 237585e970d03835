# Helpers shared by the benchmark scripts (bench/proxy.sh, bench/ws/run.sh). Sourced; expects
# PIDS (array) and TMP to be set by the caller where the helpers use them.

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

stop_pid() { # stop_pid PID: TERM, wait up to 5 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

pin() { # pin CPUS CMD...: exec CMD pinned to CPUS (a taskset list), or unpinned if empty
  local cpus=$1; shift
  if [ -n "$cpus" ]; then exec taskset -c "$cpus" "$@"; else exec "$@"; fi
}

wait_listen() { # wait_listen PORT PID [SECONDS]
  local port=$1 pid=$2 secs=${3:-10} i
  for ((i = 0; i < secs * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] && return 0
    sleep 0.05
  done
  return 1
}

save_logs() { # save_logs DIR: copy the processes' own logs from $TMP into DIR/logs
  local dir=$1
  [ -d "$dir" ] || return 0
  rm -rf "$dir/logs"; mkdir -p "$dir/logs"
  (cd "$TMP" && find . -name '*.log' ! -name build.log -size +0 | while read -r f; do
    cp "$f" "$dir/logs/$(echo "${f#./}" | tr / _)"; done) || true
}

# The small benchmarks' common start (bench/cache.sh, bench/tls.sh): parses --no-build and
# --help (printed from the script's header comment), checks the tools, makes $TMP with a
# cleanup trap for $PIDS, and builds sluice and the mock in Release into $BUILD_DIR.
bench_setup() { # bench_setup SCRIPT TOOLS... -- ARGS...
  local script=$1; shift
  local tools=() do_build=1 arg
  while [ $# -gt 0 ] && [ "$1" != -- ]; do tools+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  for arg in "$@"; do
    case "$arg" in
      --no-build) do_build=0 ;;
      -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$script"; exit 0 ;;
      *) die "unknown argument '$arg' (try --help)" ;;
    esac
  done
  for arg in "${tools[@]}"; do
    command -v "$arg" >/dev/null || die "$arg not found (bash scripts/setup.sh --bench)"
  done
  TMP=$(mktemp -d "/tmp/sluice-$(basename "$script" .sh)-bench-XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do stop_pid "$p"; done; rm -rf "$TMP"' EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$OUT"
  if [ $do_build = 1 ]; then
    log "building sluice (Release) in $BUILD_DIR"
    cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DSLUICE_TESTS=OFF >"$TMP/build.log" 2>&1
    make -C "$BUILD_DIR" -j"$(nproc)" sluice sluice-mock >>"$TMP/build.log" 2>&1 ||
      { tail -30 "$TMP/build.log" >&2; die "build failed"; }
  fi
}

nginx_conf_head() { # nginx_conf_head DIR: the top of a one-worker nginx.conf with its files in DIR,
  # up to and including the opening of the http block (the caller adds its servers and the "}")
  cat <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; use epoll; }
http {
  access_log off;
  client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1;
  uwsgi_temp_path $1; scgi_temp_path $1;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
EOF
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
