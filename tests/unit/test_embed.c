/* The embedding API: two gateways in one process on the host's loop, configured from strings,
 * each serving its own port, with a host function (sluice.ext.*) called by their balancer. */
#include "t.h"

#include "sluice.h"

#include <lua.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static uv_loop_t loop;

/* Upstream: answers every request head with "ok" (keep-alive). ------------------------- */
static uv_tcp_t up_listener;
static char up_buf[4096];
typedef struct {
  uv_tcp_t tcp;
  size_t seen;
} up_conn_t;

static void up_alloc(uv_handle_t *h, size_t n, uv_buf_t *b) {
  (void)h;
  (void)n;
  *b = uv_buf_init(up_buf, sizeof(up_buf));
}
static void up_closed(uv_handle_t *h) { free(h); }
static void up_written(uv_write_t *w, int st) {
  (void)st;
  free(w);
}
static void up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  if (n < 0) {
    uv_close((uv_handle_t *)s, up_closed);
    return;
  }
  for (ssize_t i = 0; i + 3 < n; i++)
    if (!memcmp(b->base + i, "\r\n\r\n", 4)) {
      static const char resp[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
      uv_write_t *w = malloc(sizeof(*w));
      uv_buf_t out = uv_buf_init((char *)resp, sizeof(resp) - 1);
      uv_write(w, s, &out, 1, up_written);
    }
}
static void up_accept(uv_stream_t *srv, int st) {
  if (st < 0) return;
  up_conn_t *c = calloc(1, sizeof(*c));
  uv_tcp_init(&loop, &c->tcp);
  if (uv_accept(srv, (uv_stream_t *)&c->tcp) == 0) uv_read_start((uv_stream_t *)&c->tcp, up_alloc, up_read);
  else uv_close((uv_handle_t *)&c->tcp, up_closed);
}

/* Client: one GET, the whole response kept. --------------------------------------------- */
typedef struct {
  uv_tcp_t tcp;
  uv_connect_t creq;
  uv_write_t wreq;
  char resp[2048];
  size_t len;
  bool done;
} client_t;

static void cl_alloc(uv_handle_t *h, size_t n, uv_buf_t *b) {
  client_t *c = h->data;
  (void)n;
  *b = uv_buf_init(c->resp + c->len, (unsigned)(sizeof(c->resp) - 1 - c->len));
}
static void cl_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  client_t *c = s->data;
  (void)b;
  if (n > 0) c->len += (size_t)n;
  c->resp[c->len] = 0;
  if (n < 0 || strstr(c->resp, "\r\n\r\n")) {
    c->done = true;
    uv_close((uv_handle_t *)s, NULL);
  }
}
static void cl_connected(uv_connect_t *r, int st) {
  client_t *c = r->data;
  if (st < 0) {
    c->done = true;
    return;
  }
  static const char req[] = "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  uv_buf_t b = uv_buf_init((char *)req, sizeof(req) - 1);
  uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, NULL);
  uv_read_start((uv_stream_t *)&c->tcp, cl_alloc, cl_read);
}
static void get(client_t *c, uint16_t port) {
  memset(c, 0, sizeof(*c));
  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", port, &a);
  uv_tcp_init(&loop, &c->tcp);
  c->tcp.data = c->creq.data = c;
  uv_tcp_connect(&c->creq, &c->tcp, (struct sockaddr *)&a, cl_connected);
  while (!c->done) uv_run(&loop, UV_RUN_ONCE);
}

/* The host function: counts calls and returns the count. -------------------------------- */
static int ext_count(lua_State *L) {
  int *n = sluice_ext_data(L);
  lua_pushinteger(L, ++*n);
  return 1;
}

static int stopped;
static void on_stopped(sluice_t *s, void *arg) {
  (void)s;
  (void)arg;
  stopped++;
}

static void test_two_instances(void) {
  char dir[] = "/tmp/sluice-embed-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[256];
  snprintf(path, sizeof(path), "%s/balancer", dir);
  mkdir(path, 0755);
  snprintf(path, sizeof(path), "%s/balancer/counted.lua", dir);
  FILE *f = fopen(path, "w");
  fputs("return { pick = function(pool, req) sluice.ext.count(); return 1 end }\n", f);
  fclose(f);

  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", 0, &a);
  uv_tcp_init(&loop, &up_listener);
  uv_tcp_bind(&up_listener, (struct sockaddr *)&a, 0);
  uv_listen((uv_stream_t *)&up_listener, 16, up_accept);
  struct sockaddr_in bound;
  int blen = sizeof(bound);
  uv_tcp_getsockname(&up_listener, (struct sockaddr *)&bound, &blen);

  char cfg[1024];
  int n = snprintf(cfg, sizeof(cfg),
                   "return { listen = { '127.0.0.1:0' }, admin = false, watch = false,\n"
                   "  log_level = 'error', policies = '.',\n"
                   "  pools = { up = { endpoints = { 'http://127.0.0.1:%u' }, balancer = 'counted',"
                   " retry = false, breaker = false } },\n"
                   "  routes = { { path = '/', pool = 'up' } } }\n",
                   ntohs(bound.sin_port));
  /* policies = '.' is relative to `dir`, the temp dir holding balancer/counted.lua */

  int calls[2] = {0, 0};
  sluice_t *s[2];
  for (int i = 0; i < 2; i++) {
    CHECK_EQ_INT(sluice_new(&loop, &s[i]), 0);
    CHECK_EQ_INT(sluice_register(s[i], "count", ext_count, &calls[i]), 0);
    CHECK_EQ_INT(sluice_register(s[i], "not a name", ext_count, NULL), SLUICE_ECONFIG);
    int rc = sluice_load_string(s[i], "embedded.lua", cfg, (size_t)n, dir);
    if (rc) fprintf(stderr, "load: %s\n", sluice_last_error(s[i]));
    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(sluice_register(s[i], "late", ext_count, NULL), SLUICE_ESTATE);
    CHECK_EQ_INT(sluice_start(s[i]), 0);
  }
  CHECK(sluice_port(s[0]) != 0 && sluice_port(s[1]) != 0 && sluice_port(s[0]) != sluice_port(s[1]));

  client_t c;
  get(&c, sluice_port(s[0]));
  CHECK(strncmp(c.resp, "HTTP/1.1 200", 12) == 0);
  get(&c, sluice_port(s[1]));
  CHECK(strncmp(c.resp, "HTTP/1.1 200", 12) == 0);
  get(&c, sluice_port(s[1]));
  CHECK(strncmp(c.resp, "HTTP/1.1 200", 12) == 0);
  CHECK_EQ_INT(calls[0], 1); /* each instance calls its own registration */
  CHECK_EQ_INT(calls[1], 2);

  /* A bad config string is refused with file:line and the running one keeps serving. */
  static const char bad[] = "return { pools = { up = { endpoints = { 'nope' } } } }";
  CHECK_EQ_INT(sluice_reload_string(s[0], bad, sizeof(bad) - 1), SLUICE_ECONFIG);
  CHECK(strstr(sluice_last_error(s[0]), "embedded.lua:") != NULL);
  CHECK_EQ_INT(sluice_reload_string(s[0], cfg, (size_t)n), 0);
  CHECK_EQ_INT(sluice_generation(s[0]), 2);
  get(&c, sluice_port(s[0]));
  CHECK(strncmp(c.resp, "HTTP/1.1 200", 12) == 0);
  CHECK_EQ_INT(calls[0], 2);

  for (int i = 0; i < 2; i++) CHECK_EQ_INT(sluice_stop(s[i], on_stopped, NULL), 0);
  while (stopped < 2) uv_run(&loop, UV_RUN_ONCE);
  for (int i = 0; i < 2; i++) sluice_free(s[i]);
  uv_close((uv_handle_t *)&up_listener, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  remove(path);
  snprintf(path, sizeof(path), "%s/balancer", dir);
  rmdir(path);
  rmdir(dir);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  uv_loop_init(&loop);
  test_two_instances();
  CHECK_EQ_INT(uv_loop_close(&loop), 0);
  printf("%d checks, %d failed\n", t_checks, t_failed);
  return t_failed ? 1 : 0;
}
