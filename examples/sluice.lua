-- Example config: sluice in front of the bundled mock model servers (scripts/run-demo.sh
-- starts them). Every key is documented in docs/config.md.
return {
  listen = { "127.0.0.1:8080" },
  workers = 1,
  policies = "../policies", -- relative to this file
  log_level = "info",
  admin = "127.0.0.1:9901", -- /healthz /readyz /metrics /status /reload /cache (loopback only)
  cache = { max_bytes = 64 * 1024 * 1024 },
  watch = true,             -- saving this file or a policy reloads it

  limits = {
    max_header_bytes = 32 * 1024,
    max_body_bytes = 16 * 1024 * 1024,
    header_timeout_ms = 10000,
    idle_timeout_ms = 60000,
  },

  pools = {
    llm = {
      endpoints = { "http://127.0.0.1:9201", "http://127.0.0.1:9202" },
      balancer = "least_queue",    -- policies/balancer/least_queue.lua: idle instances first
      max_inflight = 8,            -- per instance; the rest waits in the pool's queue
      queue = { max = 64, timeout_ms = 2000 },
      timeout_ms = { connect = 1000, first_byte = 2000, total = 120000 },
      keepalive = { max_idle = 64, idle_timeout_ms = 60000 },
      retry = { policy = "exponential", attempts = 3, base_ms = 25, max_ms = 250 },
      breaker = { policy = "consecutive", failures = 5, open_ms = 10000 },
    },
    stt = { -- streaming speech-to-text over WebSocket
      endpoints = { "ws://127.0.0.1:9101", "ws://127.0.0.1:9102" },
      balancer = "least_queue",    -- an open session counts as in flight
      max_inflight = 64,
      websocket = { max_message_bytes = 1024 * 1024, idle_timeout_ms = 60000, ping_interval_ms = 20000 },
    },
    tts = {
      endpoints = { { url = "http://127.0.0.1:9301", weight = 1 } },
      balancer = "round_robin",
    },
  },

  routes = {
    -- identical prompts (same model and parameters, any key order, any "user") are answered
    -- from the cache for 60 s; streamed answers are replayed as streams. The body's "model"
    -- picks the pool (policies/route/model_router.lua); an unknown model is answered 404.
    { path = "/v1/chat/completions", pool = "llm",
      hook = { policy = "model_router", options = { models = { mock = "llm", ["mock-*"] = "llm" } } },
      cache = { ttl_s = 60, methods = { "POST" }, json = { canonical = true, ignore = { "user" } }, stream = true } },
    -- the model list, answered by the same policy without an upstream
    { path = "/v1/models", pool = "llm",
      hook = { policy = "model_router", options = { models = { mock = "llm", ["mock-*"] = "llm" } } } },
    { path = "/v1/listen", pool = "stt" },
    { path = "/v1/audio/speech", pool = "tts" },
    { path = "/echo", pool = "llm" },
  },
}
