-- exponential: retry with full-jitter exponential backoff.
--
-- When: the default for inference pools. Spreads retries out so a struggling pool is not hit
-- by synchronized waves, and stops retrying when too many requests of the pool are already
-- retrying (the retry budget), so a failing pool is not hammered.
--
-- Knobs (pool.retry in the config, defaults in docs/config.md):
--   attempts            total attempts including the first (default 3)
--   base_ms, max_ms     backoff before attempt n+1 is random(0, min(max_ms, base_ms * 2^(n-1)))
--   retry_after_max_ms  a 429/503 Retry-After up to this is honoured as the delay; a longer one
--                       stops retrying (the upstream asked for more patience than we have)
--   budget_ratio, budget_min
--                       a retry is allowed only while the pool's requests past their first
--                       attempt stay below max(budget_min, budget_ratio * active requests)
-- What is retryable (retry_on, body size) is checked by the runtime before decide() is called;
-- the runtime also prefers endpoints this request has not tried yet.
local M = {}

function M.decide(req, attempt, outcome, pool)
  local cfg = pool.retry
  if attempt >= cfg.attempts then return nil end

  local stats = pool.stats
  local budget = cfg.budget_ratio * stats.active
  if budget < cfg.budget_min then budget = cfg.budget_min end
  if stats.retrying >= budget then
    return nil
  end

  local after = outcome.retry_after_ms
  if after then
    if after > cfg.retry_after_max_ms then return nil end
    return after
  end

  local cap = cfg.base_ms * 2 ^ (attempt - 1)
  if cap > cfg.max_ms then cap = cfg.max_ms end
  return math.floor(sluice.random() * cap)
end

return M
