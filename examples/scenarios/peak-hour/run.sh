#!/usr/bin/env bash
# peak-hour: reproduces the STT incident of DESIGN.md ("The incident it exists to prevent")
# and compares round_robin with least_queue on identical instances and identical load.
# See docs/scenarios.md for what it models and the figures measured.
#
#   bash examples/scenarios/peak-hour/run.sh            # ~2.5 minutes
#   DURATION=20 OUT=/tmp/ph bash examples/scenarios/peak-hour/run.sh
#
# Environment: DURATION (40 s per run), OUT (/tmp/peak-hour), SEED (1, the arrival trace),
# HIGH/LOW/PHASE (1.10/0.60/2: offered load as a share of capacity, alternating every PHASE s),
# BALANCERS ("round_robin least_queue least_queue:mi2"; the first two are compared and plotted; a name may
#   carry diagnostic variants: least_queue:mi2 = max_inflight 2, least_queue:w = weights),
# FAST_MS/FAST_JITTER (170/20: ~180 ms), SLOW_MS/SLOW_JITTER (300/100: ~350 ms),
# SLOTS (2, --max-concurrency of each instance), BUILD_DIR (build/release), NO_BUILD=1.
# Exit status: non-zero when a run failed (a process died, no request answered), never
# because of the latencies measured.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cd "$root"

DURATION="${DURATION:-40}"
OUT="${OUT:-/tmp/peak-hour}"
SEED="${SEED:-1}"
HIGH="${HIGH:-1.10}" LOW="${LOW:-0.60}" PHASE="${PHASE:-2}"
BALANCERS="${BALANCERS:-round_robin least_queue least_queue:mi2}"
FAST_MS="${FAST_MS:-170}" FAST_JITTER="${FAST_JITTER:-20}"
SLOW_MS="${SLOW_MS:-300}" SLOW_JITTER="${SLOW_JITTER:-100}"
SLOTS="${SLOTS:-2}"
BUILD_DIR="${BUILD_DIR:-build/release}"

# 1. What it needs: gnuplot (Debian's gnuplot-nox) for the PNG, cmake and a compiler to build.
if ! dpkg -s gnuplot-nox >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get)
  "${apt[@]}" install -y gnuplot-nox >/dev/null ||
    { "${apt[@]}" update >/dev/null && "${apt[@]}" install -y gnuplot-nox >/dev/null; }
fi

mkdir -p "$OUT"
: >"$OUT/mocks.log"
sluice="$root/$BUILD_DIR/sluice"
mock="$root/$BUILD_DIR/examples/mock/sluice-mock"
if [ -z "${NO_BUILD:-}" ]; then
  cmake -S . -B "$BUILD_DIR" >/dev/null
  # The tree may be mid-edit by others: retry a failed build for a minute; if it still fails
  # and binaries from an earlier build exist, say so and use them.
  built=""
  for attempt in 1 2 3 4 5 6 7; do
    if cmake --build "$BUILD_DIR" -j2 --target sluice sluice-mock >"$OUT/build.log" 2>&1; then
      built=1
      break
    fi
    if [ "$attempt" -lt 7 ]; then sleep 10; fi
  done
  if [ -z "$built" ]; then
    if [ -x "$sluice" ] && [ -x "$mock" ]; then
      echo "peak-hour: WARNING: build failed (see $OUT/build.log); using the binaries already" \
        "in $BUILD_DIR, built $(date -r "$sluice" '+%F %T')" >&2
    else
      echo "peak-hour: build failed, see $OUT/build.log" >&2
      exit 1
    fi
  fi
fi
if ! [ -x "$sluice" ] || ! [ -x "$mock" ]; then
  echo "peak-hour: binaries missing in $BUILD_DIR" >&2
  exit 1
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/peak-hour.XXXXXX")"
pids=()
driver_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$driver_pid" ] && kill "$driver_pid" 2>/dev/null || true
  # sluice instances the driver started (it stops them itself; this is for a killed driver)
  if [ -f "$tmp/sluice.pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$tmp/sluice.pids"
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 2. Twelve mock STT instances on ephemeral ports. stt-4, stt-8 and stt-12 are the slow ones
# (an older GPU, a noisy neighbour): same 2 slots, about twice the service time.
printf '# name\tport\tlatency_ms\tjitter_ms\tslots\tpid\n' >"$tmp/mocks.tsv"
names=()
for i in $(seq 1 12); do
  lat=$FAST_MS jit=$FAST_JITTER
  if [ $((i % 4)) -eq 0 ]; then lat=$SLOW_MS jit=$SLOW_JITTER; fi
  "$mock" --listen 127.0.0.1:0 --port-file "$tmp/stt-$i.port" --name "stt-$i" \
    --latency-ms "$lat" --jitter-ms "$jit" --max-concurrency "$SLOTS" --seed "$i" \
    2>>"$OUT/mocks.log" &
  pids+=($!)
  names+=("stt-$i $lat $jit $!")
done
for i in $(seq 1 12); do
  for _ in $(seq 100); do [ -s "$tmp/stt-$i.port" ] && break; sleep 0.05; done
  [ -s "$tmp/stt-$i.port" ] || { echo "peak-hour: mock stt-$i did not start" >&2; exit 1; }
done
i=0
for entry in "${names[@]}"; do
  i=$((i + 1))
  read -r name lat jit pid <<<"$entry"
  port="$(cat "$tmp/stt-$i.port")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$port" "$lat" "$jit" "$SLOTS" "$pid" >>"$tmp/mocks.tsv"
done
cp "$tmp/mocks.tsv" "$OUT/mocks.tsv"

# 3-5. One run per balancer (the driver starts and stops sluice), tables, plot.
/usr/bin/python3 "$here/driver.py" --mocks "$tmp/mocks.tsv" --sluice "$sluice" --out "$OUT" \
  --pids-file "$tmp/sluice.pids" --balancers "${BALANCERS// /,}" --duration "$DURATION" \
  --seed "$SEED" --high "$HIGH" --low "$LOW" --phase "$PHASE" &
driver_pid=$!
rc=0
wait "$driver_pid" || rc=$?
driver_pid=""

# 6. Every mock must have survived both runs.
for p in "${pids[@]}"; do
  kill -0 "$p" 2>/dev/null || { echo "peak-hour: mock pid $p died" >&2; rc=1; }
done
exit "$rc"
