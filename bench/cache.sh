#!/usr/bin/env bash
# bench/cache.sh — sluice answering from its response cache against nginx answering the same
# 1 KiB body directly with `return 200`, same run.
#
# Measures: requests/s of cache hits (wrk -t1 -c50 on one URL whose response sluice has
# cached; median of ROUNDS alternating rounds) against nginx's `return 200` (1 worker each,
# proxy pinned to PROXY_CPUS, wrk to LOAD_CPUS), and the memory an entry costs: RSS growth
# and the cache's own accounting (GET /cache) after ENTRIES distinct 1 KiB responses.
# Writes key=value lines to $OUT/cache.txt.
#
# usage: bench/cache.sh [--no-build] [--help]
# env:   ROUNDS=3 DURATION=10 WARMUP=2 CONNS=50 SIZE=1024 ENTRIES=20000
#        PROXY_CPUS=0 LOAD_CPUS=1 BUILD_DIR=/tmp/sluice-bench-build OUT=/tmp/sluice-bench
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BUILD_DIR=${BUILD_DIR:-/tmp/sluice-bench-build}
OUT=${OUT:-/tmp/sluice-bench}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} CONNS=${CONNS:-50}
SIZE=${SIZE:-1024} ENTRIES=${ENTRIES:-20000}
PROXY_CPUS=${PROXY_CPUS-0} LOAD_CPUS=${LOAD_CPUS-1}

bench_setup "$0" wrk nginx curl -- "$@"


# Upstream: the mock's /bytes?n=SIZE (only ever asked once per URL: the rest are hits).
("$BUILD_DIR/examples/mock/sluice-mock" --listen 127.0.0.1:0 --port-file "$TMP/up.port" >"$TMP/mock.log" 2>&1) &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$TMP/up.port" ] && break; sleep 0.05; done
UP=$(cat "$TMP/up.port")

SPORT=$(free_port) APORT=$(free_port) NPORT=$(free_port)
cat >"$TMP/sluice.lua" <<EOF
return {
  listen = { "127.0.0.1:$SPORT" }, admin = "127.0.0.1:$APORT", log_level = "warn",
  policies = "$ROOT/policies",
  limits = { idle_timeout_ms = 300000 },
  cache = { max_bytes = 1024 * 1024 * 1024 },
  pools = { up = { endpoints = { "http://127.0.0.1:$UP" } } },
  routes = { { path = "/", pool = "up", cache = { ttl_s = 86400 } } },
}
EOF
(pin "$PROXY_CPUS" "$BUILD_DIR/sluice" -c "$TMP/sluice.lua" >"$TMP/sluice.log" 2>&1) &
SPID=$!; PIDS+=($SPID)
wait_listen "$SPORT" "$SPID" || die "sluice did not start: $(cat "$TMP/sluice.log")"

body=$(head -c "$SIZE" /dev/zero | tr '\0' 'x')
mkdir -p "$TMP/ng"
{ nginx_conf_head "$TMP/ng"; cat <<EOF
  server {
    listen 127.0.0.1:$NPORT backlog=1024;
    location / { default_type application/octet-stream; return 200 "$body"; }
  }
}
EOF
} >"$TMP/ng/nginx.conf"
(pin "$PROXY_CPUS" nginx -p "$TMP/ng" -c "$TMP/ng/nginx.conf" >"$TMP/ng/out.log" 2>&1) &
NPID=$!; PIDS+=($NPID)
wait_listen "$NPORT" "$NPID" || die "nginx did not start: $(cat "$TMP/ng/out.log")"

URL_S="http://127.0.0.1:$SPORT/bytes?n=$SIZE"
URL_N="http://127.0.0.1:$NPORT/bytes"
curl -s -o /dev/null "$URL_S"
hdr=$(curl -s -D - -o "$TMP/body" "$URL_S")
echo "$hdr" | grep -qi '^x-cache: HIT' || die "sluice did not answer from its cache: $hdr"
[ "$(wc -c <"$TMP/body")" -eq "$SIZE" ] || die "unexpected body size from sluice"
[ "$(curl -s "$URL_N" | wc -c)" -eq "$SIZE" ] || die "unexpected body size from nginx"

run_wrk() { # run_wrk URL -> prints req/s
  (pin "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$1" >/dev/null)
  (pin "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$1") >"$TMP/wrk.out"
  awk '/^Requests\/sec/ { print $2 }' "$TMP/wrk.out"
}

: >"$TMP/s.txt"; : >"$TMP/n.txt"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="s n"; else order="n s"; fi
  for who in $order; do
    if [ "$who" = s ]; then v=$(run_wrk "$URL_S"); echo "$v" >>"$TMP/s.txt"; log "round $r sluice (cache hits): $v req/s"
    else v=$(run_wrk "$URL_N"); echo "$v" >>"$TMP/n.txt"; log "round $r nginx (return 200): $v req/s"; fi
  done
done
S=$(median <"$TMP/s.txt") N=$(median <"$TMP/n.txt")
RATIO=$(awk -v s="$S" -v n="$N" 'BEGIN { printf "%.3f", s / n }')

# Memory per entry: ENTRIES distinct URLs, each stored once.
before=$(rss_kb "$SPID")
log "filling the cache with $ENTRIES entries of $SIZE bytes"
python3 - "$SPORT" "$SIZE" "$ENTRIES" <<'EOF'
import http.client, sys
port, size, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    c.request("GET", "/bytes?n=%d&i=%d" % (size, i))
    r = c.getresponse(); r.read()
    if r.status != 200: sys.exit("status %d" % r.status)
EOF
after=$(rss_kb "$SPID")
stats=$(curl -s "http://127.0.0.1:$APORT/cache")
entries=$(echo "$stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entries"])')
bytes=$(echo "$stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')
RSS_PER=$(( (after - before) * 1024 / ENTRIES ))
ACCT_PER=$(( bytes / (entries > 0 ? entries : 1) ))

{
  echo "sluice.cache_hit_rps=$S"
  echo "nginx.return200_rps=$N"
  echo "ratio.sluice_nginx=$RATIO"
  echo "entry.size=$SIZE"
  echo "entry.rss_bytes=$RSS_PER"
  echo "entry.accounted_bytes=$ACCT_PER"
  echo "entries=$entries"
} | tee "$OUT/cache.txt"
printf '\ncache hits %s req/s vs nginx return 200 %s req/s: %sx (target >= 0.9x)\n' "$S" "$N" "$RATIO"
printf 'per %s-byte entry: %s bytes of RSS, %s bytes accounted against max_bytes (overhead %s / %s)\n' \
  "$SIZE" "$RSS_PER" "$ACCT_PER" "$((RSS_PER - SIZE))" "$((ACCT_PER - SIZE))"
