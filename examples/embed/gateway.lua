-- Config for the embedding example (examples/embed/host.c): sluice in front of the bundled
-- mock model servers (scripts/run-demo.sh starts them on 9201/9202), every /v1 request
-- checked against its tenant's quota by policies/route/tenant_quota.lua, which calls the
-- host's sluice.ext.quota_take.
return {
  listen = { "127.0.0.1:8090" },
  admin = "127.0.0.1:9902",
  workers = 2,                 -- the host's quota table is shared by both worker threads
  policies = "policies",       -- examples/embed/policies, then the bundled ones
  pools = {
    llm = { endpoints = { "http://127.0.0.1:9201", "http://127.0.0.1:9202" }, balancer = "least_queue" },
  },
  routes = {
    { path = "/v1", pool = "llm", hook = { policy = "tenant_quota", options = { tenant_header = "x-tenant-id" } } },
  },
}
