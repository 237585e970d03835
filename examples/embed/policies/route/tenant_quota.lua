-- Per-tenant quotas from the embedding host (examples/embed/host.c): the host registers
-- sluice.ext.quota_take and sluice.ext.quota_peek; this policy asks before a request is
-- admitted and reports what is left on the response.
--
--   hook = { policy = "tenant_quota", options = { tenant_header = "x-tenant-id" } }
--
-- No tenant header → 401; quota spent → 429 with Retry-After; otherwise the request goes on
-- and the response carries x-ratelimit-remaining.
local M = {}

local header

function M.init(options)
  if not (sluice.ext and sluice.ext.quota_take and sluice.ext.quota_peek) then
    error("tenant_quota: needs the host functions sluice.ext.quota_take and quota_peek " ..
          "(run it under examples/embed/host.c)", 0)
  end
  header = options.tenant_header or "x-tenant-id"
  if type(header) ~= "string" then error("tenant_quota: options.tenant_header must be a header name", 0) end
end

local function reject(status, kind, message, req, headers)
  return { status = status, headers = headers,
           body = { error = { type = kind, message = message, request_id = req.id } } }
end

function M.on_request(req)
  local tenant = req:header(header)
  if not tenant or tenant == "" then
    return reject(401, "tenant_required", "a " .. header .. " header is required", req)
  end
  local ok, _, reset_ms = sluice.ext.quota_take(tenant)
  if not ok then
    local secs = math.max(1, math.ceil(reset_ms / 1000))
    return reject(429, "quota_exceeded", "tenant " .. tenant .. " has used its quota; retry in " ..
                  secs .. " s", req, { ["Retry-After"] = secs })
  end
end

function M.on_response(req, res)
  local tenant = req:header(header)
  res:set_header("x-ratelimit-remaining", sluice.ext.quota_peek(tenant))
end

return M
