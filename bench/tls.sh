#!/usr/bin/env bash
# bench/tls.sh — HTTPS reverse proxying: sluice terminating TLS against nginx terminating TLS
# with the same certificate, same upstreams (two mock servers over plain HTTP), same run.
#
# wrk -t1 -c50 over keep-alive HTTPS connections (handshakes amortized, as with real clients),
# 1 worker each, proxies and mocks pinned to PROXY_CPUS, wrk to LOAD_CPUS; median of ROUNDS
# alternating rounds; then the same with a fresh TLS connection per request (-H "Connection:
# close") to show handshake cost. Writes key=value lines to $OUT/tls.txt.
#
# usage: bench/tls.sh [--no-build] [--help]
# env:   ROUNDS=3 DURATION=10 WARMUP=2 CONNS=50 PROXY_CPUS=0 LOAD_CPUS=1
#        BUILD_DIR=/tmp/sluice-bench-build OUT=/tmp/sluice-bench
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BUILD_DIR=${BUILD_DIR:-/tmp/sluice-bench-build}
OUT=${OUT:-/tmp/sluice-bench}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} CONNS=${CONNS:-50}
PROXY_CPUS=${PROXY_CPUS-0} LOAD_CPUS=${LOAD_CPUS-1}

bench_setup "$0" wrk nginx openssl -- "$@"

# One certificate (ECDSA P-256, what a modern deployment serves) for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" >/dev/null 2>&1 || die "openssl could not make a certificate"

for m in up1 up2; do
  (pin "$PROXY_CPUS" "$BUILD_DIR/examples/mock/sluice-mock" --listen 127.0.0.1:0 --port-file "$TMP/$m.port" >"$TMP/$m.log" 2>&1) &
  PIDS+=($!)
done
for _ in $(seq 100); do [ -s "$TMP/up1.port" ] && [ -s "$TMP/up2.port" ] && break; sleep 0.05; done
UP1=$(cat "$TMP/up1.port") UP2=$(cat "$TMP/up2.port")

SPORT=$(free_port) NPORT=$(free_port)
cat >"$TMP/sluice.lua" <<EOF
return {
  listen = { { addr = "127.0.0.1:$SPORT", tls = { cert = "cert.pem", key = "key.pem" } } },
  admin = false, log_level = "warn", policies = "$ROOT/policies", watch = false,
  limits = { idle_timeout_ms = 300000 },
  pools = { up = { endpoints = { "http://127.0.0.1:$UP1", "http://127.0.0.1:$UP2" },
                   balancer = "least_inflight", keepalive = { max_idle = 64 } } },
  routes = { { path = "/", pool = "up" } },
}
EOF
(pin "$PROXY_CPUS" "$BUILD_DIR/sluice" -c "$TMP/sluice.lua" >"$TMP/sluice.log" 2>&1) &
SPID=$!; PIDS+=($SPID)
wait_listen "$SPORT" "$SPID" || die "sluice did not start: $(cat "$TMP/sluice.log")"

mkdir -p "$TMP/ng"
{ nginx_conf_head "$TMP/ng"; cat <<EOF
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  upstream up {
    least_conn;
    server 127.0.0.1:$UP1;
    server 127.0.0.1:$UP2;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NPORT ssl backlog=1024;
    ssl_certificate $TMP/cert.pem;
    ssl_certificate_key $TMP/key.pem;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
} >"$TMP/ng/nginx.conf"
(pin "$PROXY_CPUS" nginx -p "$TMP/ng" -c "$TMP/ng/nginx.conf" >"$TMP/ng/out.log" 2>&1) &
NPID=$!; PIDS+=($NPID)
wait_listen "$NPORT" "$NPID" || die "nginx did not start: $(cat "$TMP/ng/out.log")"

curl -sk "https://127.0.0.1:$SPORT/echo" -o /dev/null -w '%{http_code}' | grep -q 200 || die "sluice does not answer over TLS"
curl -sk "https://127.0.0.1:$NPORT/echo" -o /dev/null -w '%{http_code}' | grep -q 200 || die "nginx does not answer over TLS"

run_wrk() { # run_wrk URL [wrk args...] -> req/s
  local url=$1; shift
  (pin "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$@" "$url" >/dev/null)
  (pin "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$@" "$url") >"$TMP/wrk.out"
  awk '/^Requests\/sec/ { print $2 }' "$TMP/wrk.out"
}

measure() { # measure LABEL [wrk args...]
  local label=$1; shift
  : >"$TMP/s.txt"; : >"$TMP/n.txt"
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="s n"; else order="n s"; fi
    for who in $order; do
      if [ "$who" = s ]; then v=$(run_wrk "https://127.0.0.1:$SPORT/echo" "$@"); echo "$v" >>"$TMP/s.txt"; log "$label round $r sluice: $v req/s"
      else v=$(run_wrk "https://127.0.0.1:$NPORT/echo" "$@"); echo "$v" >>"$TMP/n.txt"; log "$label round $r nginx: $v req/s"; fi
    done
  done
  S=$(median <"$TMP/s.txt") N=$(median <"$TMP/n.txt")
  echo "$label.sluice_rps=$S"
  echo "$label.nginx_rps=$N"
  echo "$label.ratio=$(awk -v s="$S" -v n="$N" 'BEGIN { printf "%.3f", s / n }')"
}

{
  measure keepalive
  measure handshake_per_request -H "Connection: close"
} | tee "$OUT/tls.txt"
ratio=$(awk -F= '/^keepalive.ratio/ { print $2 }' "$OUT/tls.txt")
printf '\nHTTPS keep-alive: sluice/nginx %sx (target >= 1.2x); full results in %s\n' "$ratio" "$OUT/tls.txt"
