/* An embedding host: a program with its own libuv loop that runs a sluice gateway inside it and
 * gives its policies a primitive of its own — per-tenant request quotas (quota.c), called from
 * Lua as sluice.ext.quota_take(tenant) / sluice.ext.quota_peek(tenant) by the route policy
 * policies/route/tenant_quota.lua.
 *
 *   sluice-embed-example -c gateway.lua [--quota N] [--window-s S] [--port-file PATH]
 *
 * SIGHUP reloads the config and policies; SIGINT/SIGTERM drain and exit 0. */
#include "quota.h"

#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <sluice.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uv_loop_t loop;
static uv_signal_t sig_int, sig_term, sig_hup;
static sluice_t *gw;
static int exit_code;

static uint64_t now_ms(void) { return uv_hrtime() / 1000000u; }

/* sluice.ext.quota_take(tenant) -> allowed, remaining, reset_ms. Runs on whichever worker
 * thread serves the request: quota.c locks. */
static int l_quota_take(lua_State *L) {
  quota_t *q = sluice_ext_data(L);
  size_t len;
  const char *tenant = luaL_checklstring(L, 1, &len);
  uint32_t remaining;
  uint64_t reset_ms;
  bool ok = quota_take(q, tenant, len, now_ms(), &remaining, &reset_ms);
  lua_pushboolean(L, ok);
  lua_pushinteger(L, (lua_Integer)remaining);
  lua_pushnumber(L, (lua_Number)reset_ms);
  return 3;
}

/* sluice.ext.quota_peek(tenant) -> remaining */
static int l_quota_peek(lua_State *L) {
  quota_t *q = sluice_ext_data(L);
  size_t len;
  const char *tenant = luaL_checklstring(L, 1, &len);
  lua_pushinteger(L, (lua_Integer)quota_peek(q, tenant, len, now_ms()));
  return 1;
}

static void on_stopped(sluice_t *s, void *arg) {
  (void)s;
  (void)arg;
  uv_close((uv_handle_t *)&sig_int, NULL);
  uv_close((uv_handle_t *)&sig_term, NULL);
  uv_close((uv_handle_t *)&sig_hup, NULL);
}

static void on_signal(uv_signal_t *h, int signum) {
  if (signum == SIGHUP) {
    int rc = sluice_reload(gw);
    if (rc == 0)
      fprintf(stderr, "embed: reloaded (generation %llu)\n",
              (unsigned long long)sluice_generation(gw));
    else
      fprintf(stderr, "embed: reload failed, still running the previous config: %s\n",
              sluice_last_error(gw));
    return;
  }
  uv_signal_stop(h);
  fprintf(stderr, "embed: stopping\n");
  sluice_stop(gw, on_stopped, NULL);
}

static int write_port_file(const char *path, uint16_t port) {
  char tmp[4096];
  snprintf(tmp, sizeof(tmp), "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return -1;
  fprintf(f, "%u\n", port);
  if (fclose(f) != 0) return -1;
  return rename(tmp, path);
}

static void usage(FILE *out) {
  fprintf(out, "usage: sluice-embed-example -c CONFIG [--quota N] [--window-s S] "
               "[--port-file PATH]\n"
               "  -c CONFIG        sluice config file (see examples/embed/gateway.lua)\n"
               "  --quota N        requests per tenant per window (default 100)\n"
               "  --window-s S     window length in seconds (default 60)\n"
               "  --port-file PATH write the gateway's port to PATH once listening\n");
}

int main(int argc, char **argv) {
  const char *config = NULL, *port_file = NULL;
  unsigned long limit = 100, window_s = 60;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (v && !strcmp(a, "-c")) {
      config = v;
    } else if (v && !strcmp(a, "--quota")) {
      limit = strtoul(v, NULL, 10);
    } else if (v && !strcmp(a, "--window-s")) {
      window_s = strtoul(v, NULL, 10);
    } else if (v && !strcmp(a, "--port-file")) {
      port_file = v;
    } else {
      usage(stderr);
      return 2;
    }
    i++;
  }
  if (!config || window_s == 0 || limit > UINT32_MAX) {
    usage(stderr);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN); /* required of every host: see sluice.h */
  uv_loop_init(&loop);
  quota_t *q = quota_new((uint32_t)limit, (uint64_t)window_s * 1000u);
  int rc = q ? sluice_new(&loop, &gw) : UV_ENOMEM;
  if (rc == 0) rc = sluice_register(gw, "quota_take", l_quota_take, q);
  if (rc == 0) rc = sluice_register(gw, "quota_peek", l_quota_peek, q);
  if (rc == 0) rc = sluice_load_file(gw, config);
  if (rc == 0) rc = sluice_start(gw);
  if (rc != 0) {
    fprintf(stderr, "embed: %s: %s\n", sluice_strerror(rc), gw ? sluice_last_error(gw) : "");
    exit_code = 1;
  } else {
    fprintf(stderr, "embed: gateway on port %u, quota %lu requests per %lu s per tenant\n",
            sluice_port(gw), limit, window_s);
    if (port_file && write_port_file(port_file, sluice_port(gw)) != 0) {
      perror("embed: port file");
      exit_code = 1;
      sluice_stop(gw, on_stopped, NULL);
    }
    uv_signal_init(&loop, &sig_int);
    uv_signal_init(&loop, &sig_term);
    uv_signal_init(&loop, &sig_hup);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_hup, on_signal, SIGHUP);
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  if (gw) sluice_free(gw);
  uv_run(&loop, UV_RUN_DEFAULT); /* close callbacks of what sluice_free closed */
  uv_loop_close(&loop);
  quota_free(q);
  return exit_code;
}
