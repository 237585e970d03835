/* Config loading through the real loader: defaults, extraction, and error messages that name
 * file, line and key path. */
#include "config.h"
#include "t.h"

#include <stdlib.h>
#include <unistd.h>

static char dir[] = "/tmp/sluice-test-config-XXXXXX";

static const char *write_cfg(const char *name, const char *src) {
  static char path[512];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  fputs(src, f);
  fclose(f);
  return path;
}

static void expect_error(const char *src, const char *want) {
  char err[2048] = "";
  const char *path = write_cfg("bad.lua", src);
  sl_config_t *c = sl_config_load(path, err, sizeof(err));
  CHECK(c == NULL);
  if (!strstr(err, want)) fprintf(stderr, "error was: %s\nwanted substring: %s\n", err, want);
  CHECK(strstr(err, want) != NULL);
  sl_config_free(c);
}

static void defaults_and_extraction(void) {
  char err[2048] = "";
  const char *path = write_cfg("ok.lua",
                               "return {\n"
                               "  listen = { \"127.0.0.1:0\" },\n"
                               "  pools = {\n"
                               "    b = { endpoints = { \"http://127.0.0.1:9\" } },\n"
                               "    a = { endpoints = { \"http://127.0.0.1:1/base\", { url = \"ws://localhost:2\", weight = 3 } },\n"
                               "          balancer = \"round_robin\", max_inflight = 4,\n"
                               "          timeout_ms = { connect = 100 } },\n"
                               "  },\n"
                               "  routes = { { path = \"/v1\", pool = \"a\" }, { path = \"/\", pool = \"b\", host = \"x.y\" } },\n"
                               "}\n");
  sl_config_t *c = sl_config_load(path, err, sizeof(err));
  CHECK(c != NULL);
  if (!c) {
    fprintf(stderr, "%s\n", err);
    return;
  }
  CHECK_EQ_INT(c->nlisten, 1);
  CHECK_EQ_INT(c->listen[0].port, 0);
  CHECK_EQ_STR(c->admin.addr, "127.0.0.1:9901");
  CHECK_EQ_INT(c->workers, 1);
  CHECK_EQ_INT(c->npools, 2);
  CHECK_EQ_STR(c->pools[0].name, "a"); /* sorted by name */
  CHECK_EQ_STR(c->pools[0].balancer, "round_robin");
  CHECK_EQ_STR(c->pools[1].balancer, "least_inflight");
  CHECK_EQ_INT(c->pools[0].max_inflight, 4);
  CHECK_EQ_INT(c->pools[0].connect_timeout_ms, 100);
  CHECK_EQ_INT(c->pools[0].first_byte_timeout_ms, 60000);
  CHECK_EQ_INT(c->pools[0].nendpoints, 2);
  CHECK_EQ_STR(c->pools[0].endpoints[0].path, "/base");
  CHECK_EQ_INT(c->pools[0].endpoints[1].weight, 3);
  CHECK(c->pools[0].endpoints[1].websocket);
  CHECK_EQ_INT(c->nroutes, 2);
  CHECK_EQ_INT(c->routes[0].pool_idx, 0);
  CHECK_EQ_INT(c->routes[1].pool_idx, 1);
  CHECK_EQ_STR(c->routes[1].host, "x.y");
  CHECK_EQ_INT(c->limits.max_header_bytes, 32768);
  char want[600];
  snprintf(want, sizeof(want), "%s/policies", dir);
  CHECK_EQ_STR(c->policies_dir, want);
  sl_config_free(c);
}

static void errors_name_file_line_and_key(void) {
  expect_error("return {\n  pools = {\n    a = {\n      endpoints = { \"http://x:1\" },\n      retyr = {},\n    },\n  },\n}\n",
               "bad.lua:5: pools.a.retyr: unknown key");
  expect_error("return {\n  workers = \"two\",\n}\n", "bad.lua:2: workers: expected an integer");
  expect_error("return {\n  pools = { a = { endpoints = { \"http://x:1\" } } },\n  routes = {\n    { path = \"/\", pool = \"nope\" },\n  },\n}\n",
               "bad.lua:4: routes[1].pool: no pool named \"nope\"");
  expect_error("return {\n  pools = { a = { endpoints = {\n    \"http://ok:1\",\n    \"ftp://x\",\n  } } },\n}\n",
               "bad.lua:4: pools.a.endpoints[2].url: expected scheme http, https, ws or wss");
  expect_error("return {\n  pools = { a = { endpoints = {} } },\n}\n",
               "bad.lua:2: pools.a.endpoints: expected at least 1 item");
  expect_error("return { listen = { \"nohost\" } }\n", "bad.lua:1: listen[1].addr: expected \"host:port\"");
  expect_error("return {\n  pools = { a = { endpoints = { \"http://x:1\" }, fallback = \"zz\" } },\n}\n",
               "pools.a.fallback: no pool named \"zz\"");
  expect_error("return { pools = { a = { endpoints = { { url = \"http://x:1\", weight = 0 } } } } }\n",
               "pools.a.endpoints[1].weight: expected an integer from 1 to 1000");
  expect_error("return {\n  pools = \n", "bad.lua:3:"); /* syntax error names file:line */
  expect_error("return 42\n", "the config file must return a table");
  expect_error("error('custom failure')\n", "bad.lua:1: custom failure");
  expect_error("return { log_level = \"loud\" }\n", "log_level: expected one of error, warn, info, debug");
  /* a stored 206 or 304 would answer requests that asked for no range or revalidation */
  expect_error("return {\n  pools = { a = { endpoints = { \"http://x:1\" } } },\n  routes = { { path = \"/\", pool = \"a\",\n    cache = { statuses = { 200, 206 } } } },\n}\n",
               "bad.lua:4: routes[1].cache.statuses[2]: expected a final status 200-599 other than 206 and 304");
  expect_error("return {\n  pools = { a = { endpoints = { \"http://x:1\" } } },\n  routes = { { path = \"/\", pool = \"a\", cache = { statuses = { 304 } } } },\n}\n",
               "routes[1].cache.statuses[1]: expected a final status");
  expect_error("return {\n  pools = { a = { endpoints = { \"http://x:1\" } } },\n  routes = { { path = \"/\", pool = \"a\", cache = { statuses = { 101 } } } },\n}\n",
               "routes[1].cache.statuses[1]: expected a final status");
  /* the config cannot do I/O */
  expect_error("io.open('/etc/passwd')\nreturn {}\n", "bad.lua:1:");
}

static void missing_file(void) {
  char err[512] = "";
  sl_config_t *c = sl_config_load("/nonexistent/sluice.lua", err, sizeof(err));
  CHECK(c == NULL);
  CHECK(strstr(err, "/nonexistent/sluice.lua: cannot open") != NULL);
}

static void run(void) {
  setenv("SLUICE_LUA_DIR", SLUICE_SOURCE_DIR "/lua", 1);
  if (!mkdtemp(dir)) abort();
}

static void cleanup(void) {
  char cmd[600];
  snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
  if (system(cmd) != 0) fprintf(stderr, "cleanup failed\n");
}

TEST_MAIN(T(run), T(defaults_and_extraction), T(errors_name_file_line_and_key), T(missing_file),
          T(cleanup))
