#include "route.h"
#include "t.h"

static void prefix_boundaries(void) {
  CHECK(sl_route_prefix_matches("/v1", "/v1", 3));
  CHECK(sl_route_prefix_matches("/v1", "/v1/chat", 8));
  CHECK(!sl_route_prefix_matches("/v1", "/v10", 4));
  CHECK(sl_route_prefix_matches("/v1/", "/v1/x", 5));
  CHECK(sl_route_prefix_matches("/", "/anything", 9));
  CHECK(!sl_route_prefix_matches("/v1/chat", "/v1", 3));
}

static void hosts(void) {
  CHECK(sl_route_host_matches("api.example.com", "API.example.com", 15));
  CHECK(sl_route_host_matches("api.example.com", "api.example.com:8080", 20));
  CHECK(!sl_route_host_matches("api.example.com", "xapi.example.com", 16));
  CHECK(sl_route_host_matches("*.example.com", "a.example.com", 13));
  CHECK(!sl_route_host_matches("*.example.com", "example.com", 11));
  CHECK(sl_route_host_matches("[::1]", "[::1]:80", 8));
}

static void longest_prefix_and_host_preference(void) {
  sl_route_conf_t routes[] = {
      {.path = "/", .pool = "default", .pool_idx = 0},
      {.path = "/v1", .pool = "v1", .pool_idx = 1},
      {.path = "/v1/chat", .pool = "chat", .pool_idx = 2},
      {.path = "/v1", .host = "tenant.example.com", .pool = "tenant", .pool_idx = 3},
  };
  sl_config_t cfg = {.routes = routes, .nroutes = 4};
  const char *h = "other.example.com";
  const sl_route_conf_t *r = sl_route_match(&cfg, "/v1/chat/completions", 20, h, strlen(h));
  CHECK(r && strcmp(r->pool, "chat") == 0);
  r = sl_route_match(&cfg, "/v1/models", 10, h, strlen(h));
  CHECK(r && strcmp(r->pool, "v1") == 0);
  r = sl_route_match(&cfg, "/v10", 4, h, strlen(h));
  CHECK(r && strcmp(r->pool, "default") == 0);
  const char *t = "tenant.example.com:443";
  r = sl_route_match(&cfg, "/v1/models", 10, t, strlen(t));
  CHECK(r && strcmp(r->pool, "tenant") == 0);
  r = sl_route_match(&cfg, "/v1/models", 10, NULL, 0);
  CHECK(r && strcmp(r->pool, "v1") == 0);

  sl_config_t none = {.routes = routes + 1, .nroutes = 1};
  CHECK(sl_route_match(&none, "/other", 6, h, strlen(h)) == NULL);
}

TEST_MAIN(T(prefix_boundaries), T(hosts), T(longest_prefix_and_host_preference))
