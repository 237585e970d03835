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
