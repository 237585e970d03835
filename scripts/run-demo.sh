#!/usr/bin/env bash
# Installs what is missing, builds, and runs sluice with examples/sluice.lua in front of the
# bundled mock model servers. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cmake -S . -B build/release -DSLUICE_TESTS=OFF >/dev/null
cmake --build build/release -j"$(nproc)" --target sluice sluice-mock sluice-mock-stt

bin=build/release
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Mock model servers, as examples/sluice.lua expects them.
"$bin/examples/mock/sluice-mock" --listen 127.0.0.1:9201 --name llm-1 --latency-ms 20 --sse-interval-ms 150 & pids+=($!)
"$bin/examples/mock/sluice-mock" --listen 127.0.0.1:9202 --name llm-2 --latency-ms 20 --sse-interval-ms 150 & pids+=($!)
"$bin/examples/mock/sluice-mock" --listen 127.0.0.1:9301 --name tts-1 --latency-ms 40 & pids+=($!)
"$bin/examples/mock/stt/sluice-mock-stt" --listen 127.0.0.1:9101 --name stt-1 --quiet & pids+=($!)
"$bin/examples/mock/stt/sluice-mock-stt" --listen 127.0.0.1:9102 --name stt-2 --quiet & pids+=($!)

"$bin/sluice" --check -c examples/sluice.lua
"$bin/sluice" -c examples/sluice.lua & pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:9901/healthz && break; sleep 0.1; done

cat <<'TXT'

sluice is listening on http://127.0.0.1:8080 in front of mock model servers (2 LLM, 1 TTS,
2 streaming speech-to-text over WebSocket).
Try:

  # an OpenAI-style chat completion, balanced across llm-1 and llm-2 (see x-mock-instance)
  curl -i http://127.0.0.1:8080/v1/chat/completions -d '{"model":"mock","messages":[]}'

  # the same, streamed as server-sent events, relayed event by event
  curl -N http://127.0.0.1:8080/v1/chat/completions -d '{"model":"mock","stream":true}'

  # ask the same again (keys in another order): answered from the cache (x-cache: HIT, age)
  curl -si http://127.0.0.1:8080/v1/chat/completions -d '{"messages":[],"model":"mock"}' | grep -i '^x-cache\|^age'

  # models the gateway routes (answered by a Lua route policy), and an unknown one → 404
  curl -s http://127.0.0.1:8080/v1/models
  curl -i http://127.0.0.1:8080/v1/chat/completions -d '{"model":"gpt-9","messages":[]}'

  # what the upstream received (X-Forwarded-*, X-Request-Id added; hop-by-hop removed)
  curl -s http://127.0.0.1:8080/echo -H 'x-request-id: demo-123'

  # a route with no pool → 404 JSON error; a slow upstream → 504 JSON error
  curl -i http://127.0.0.1:8080/nowhere
  curl -i http://127.0.0.1:8080/echo -H 'x-mock-delay-ms: 3000'

  # every instance answering 503: retried with backoff on the other one (see the log),
  # then the last 503 is relayed
  curl -i http://127.0.0.1:8080/echo -H 'x-mock-status: 503'

  # streaming speech-to-text over WebSocket: 20 audio frames, partial transcripts, a final one
  /usr/bin/python3 -c 'import asyncio, websockets
  async def main():
      async with websockets.connect("ws://127.0.0.1:8080/v1/listen") as ws:
          for _ in range(20): await ws.send(bytes(3200))
          await ws.send("{\"type\":\"end\"}")
          async for m in ws: print(m)
  asyncio.run(main())'

  # load: wrk -t1 -c50 -d5s http://127.0.0.1:8080/echo

  # what the operators see: Prometheus metrics, live status, readiness, cache stats
  curl -s http://127.0.0.1:9901/metrics | grep -v '^#' | grep -e requests_total -e endpoint_inflight
  curl -s http://127.0.0.1:9901/status
  curl -s http://127.0.0.1:9901/readyz
  curl -s http://127.0.0.1:9901/cache

Live changes: save examples/sluice.lua or a file under policies/ and sluice reloads it (a
broken edit is reported and the running version stays), or:
  curl -X POST http://127.0.0.1:9901/reload

Ctrl-C stops sluice (it drains in-flight requests) and the mocks.
TXT
wait "${pids[-1]}"
