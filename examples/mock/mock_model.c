/* mock_model.c — sluice-mock: a mock AI model server for integration tests, benchmarks
 * and demos. This file holds main: options, the listener, signals and the port file.
 * See mock.h for how the sources divide the work. */
#include "mock_listen.h"
#include "mock.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char usage[] =
    "usage: sluice-mock [options]\n"
    "  --listen HOST:PORT     address to listen on (default 127.0.0.1:0, 0 = ephemeral)\n"
    "  --port-file PATH       write the bound port to PATH (atomically) once listening\n"
    "  --name NAME            instance name, sent as x-mock-instance (default mock)\n"
    "  --latency-ms N         service time before the response head (default 0)\n"
    "  --jitter-ms N          uniform random extra 0..N ms (default 0)\n"
    "  --fail-rate F          probability 0..1 that a request fails (default 0)\n"
    "  --fail-status N        status of failed requests (default 500)\n"
    "  --max-concurrency N    requests processed at once, the rest wait FIFO (0 = unlimited)\n"
    "  --sse-events N         content events in a streamed chat completion (default 5)\n"
    "  --sse-interval-ms N    delay between SSE events (default 10)\n"
    "  --report-load          add x-load: <inflight+queued> to every response\n"
    "  --seed N               random seed for jitter and fail-rate (default: time and pid)\n"
    "  --quiet                no per-request log lines (the default)\n"
    "  --verbose              one line per request on stderr\n"
    "  --help                 this text\n"
    "endpoints: POST /v1/chat/completions, /echo[/...], POST /upload, GET /stream,\n"
    "  GET /bytes, GET /healthz, GET /stats, POST /stats/reset\n"
    "per-request headers: x-mock-delay-ms, x-mock-status, x-mock-fail: 1,\n"
    "  x-mock-action: close|reset|hang|partial\n";

double mock_rand01(mock_server_t *s) {
  uint64_t x = s->rng; /* xorshift64* */
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  s->rng = x;
  return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;
}

/* ---- options ---- */

static int opt_u64(const char *name, const char *v, uint64_t max, uint64_t *out) {
  if (mock_parse_u64(v, strlen(v), max, out) < 0) {
    fprintf(stderr, "sluice-mock: %s wants a number <= %" PRIu64 ", got '%s'\n", name, max, v);
    return -1;
  }
  return 0;
}

static int opt_rate(const char *v, double *out) {
  char *end;
  errno = 0;
  *out = strtod(v, &end);
  if (errno || end == v || *end || !(*out >= 0 && *out <= 1)) {
    fprintf(stderr, "sluice-mock: --fail-rate wants 0..1, got '%s'\n", v);
    return -1;
  }
  return 0;
}

/* Parses argv into o. Returns 0, 1 for --help, -1 on a bad option (already reported). */
static int parse_args(int argc, char **argv, mock_opts_t *o) {
  enum { O_LISTEN = 256, O_PORT_FILE, O_NAME, O_LATENCY, O_JITTER, O_FAIL_RATE, O_FAIL_STATUS,
         O_MAX_CONC, O_SSE_EVENTS, O_SSE_INTERVAL, O_REPORT_LOAD, O_SEED, O_QUIET, O_VERBOSE,
         O_HELP };
  static const struct option longopts[] = {
      {"listen", required_argument, NULL, O_LISTEN},
      {"port-file", required_argument, NULL, O_PORT_FILE},
      {"name", required_argument, NULL, O_NAME},
      {"latency-ms", required_argument, NULL, O_LATENCY},
      {"jitter-ms", required_argument, NULL, O_JITTER},
      {"fail-rate", required_argument, NULL, O_FAIL_RATE},
      {"fail-status", required_argument, NULL, O_FAIL_STATUS},
      {"max-concurrency", required_argument, NULL, O_MAX_CONC},
      {"sse-events", required_argument, NULL, O_SSE_EVENTS},
      {"sse-interval-ms", required_argument, NULL, O_SSE_INTERVAL},
      {"report-load", no_argument, NULL, O_REPORT_LOAD},
      {"seed", required_argument, NULL, O_SEED},
      {"quiet", no_argument, NULL, O_QUIET},
      {"verbose", no_argument, NULL, O_VERBOSE},
      {"help", no_argument, NULL, O_HELP},
      {NULL, 0, NULL, 0}};
  const uint64_t ms_max = 3600000, big = 1000000000;
  uint64_t v = 0;
  int ch, bad = 0;
  while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    switch (ch) {
    case O_LISTEN: o->listen = optarg; break;
    case O_PORT_FILE: o->port_file = optarg; break;
    case O_NAME: o->name = optarg; break;
    case O_LATENCY: bad = opt_u64("--latency-ms", optarg, ms_max, &o->latency_ms); break;
    case O_JITTER: bad = opt_u64("--jitter-ms", optarg, ms_max, &o->jitter_ms); break;
    case O_FAIL_RATE: bad = opt_rate(optarg, &o->fail_rate); break;
    case O_FAIL_STATUS:
      bad = opt_u64("--fail-status", optarg, 999, &v);
      if (!bad && v < 200) {
        fprintf(stderr, "sluice-mock: --fail-status wants 200..999\n");
        bad = -1;
      }
      o->fail_status = (int)v;
      break;
    case O_MAX_CONC: bad = opt_u64("--max-concurrency", optarg, big, &o->max_concurrency); break;
    case O_SSE_EVENTS: bad = opt_u64("--sse-events", optarg, big, &o->sse_events); break;
    case O_SSE_INTERVAL:
      bad = opt_u64("--sse-interval-ms", optarg, ms_max, &o->sse_interval_ms);
      break;
    case O_REPORT_LOAD: o->report_load = 1; break;
    case O_SEED: bad = opt_u64("--seed", optarg, UINT64_MAX, &o->seed); break;
    case O_QUIET: o->verbose = 0; break;
    case O_VERBOSE: o->verbose = 1; break;
    case O_HELP: return 1;
    default: return -1;
    }
    if (bad)
      return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "sluice-mock: unexpected argument '%s'\n", argv[optind]);
    return -1;
  }
  for (const char *p = o->name; *p; p++) /* it goes into a header line */
    if ((unsigned char)*p < 0x20 || *p == 0x7f) {
      fprintf(stderr, "sluice-mock: --name must not contain control characters\n");
      return -1;
    }
  return 0;
}

/* ---- listening ---- */



static void on_connection(uv_stream_t *listener, int status) {
  mock_server_t *s = listener->data;
  if (status < 0) {
    fprintf(stderr, "sluice-mock: accept: %s\n", uv_strerror(status));
    return;
  }
  if (!s->stopping)
    mock_conn_accept(s);
}

/* Closes the listener, the signal handles and every connection; uv_run then returns. */
static void server_stop(mock_server_t *s) {
  if (s->stopping)
    return;
  s->stopping = 1;
  uv_close((uv_handle_t *)&s->listener, NULL);
  uv_close((uv_handle_t *)&s->sigint, NULL);
  uv_close((uv_handle_t *)&s->sigterm, NULL);
  while (!mock_list_empty(&s->conns))
    mock_conn_close(MOCK_CONTAINER(s->conns.next, mock_conn_t, link), 0, 0);
}

static void on_signal(uv_signal_t *h, int signum) { server_stop(h->data); }

/* Binds and listens; prints the address and writes the port file. */
static int server_listen(mock_server_t *s) {
  struct sockaddr_storage ss;
  uv_tcp_init(s->loop, &s->listener); /* first: server_stop closes it on any failure */
  s->listener.data = s;
  int rc = mock_resolve_listen(s->loop, s->opts.listen, &ss);
  if (rc < 0) {
    fprintf(stderr, "sluice-mock: bad --listen '%s': %s\n", s->opts.listen, uv_strerror(rc));
    return -1;
  }
  if ((rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0)) < 0 ||
      (rc = uv_listen((uv_stream_t *)&s->listener, 1024, on_connection)) < 0) {
    fprintf(stderr, "sluice-mock: listen on %s: %s\n", s->opts.listen, uv_strerror(rc));
    return -1;
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  char ip[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len);
  if (bound.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&bound, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&bound, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
  }
  fprintf(stderr, bound.ss_family == AF_INET6 ? "sluice-mock %s listening on [%s]:%d\n"
                                               : "sluice-mock %s listening on %s:%d\n",
          s->opts.name, ip, port);
  if (s->opts.port_file && mock_write_port_file(s->opts.port_file, port) < 0) {
    fprintf(stderr, "sluice-mock: cannot write port file %s: %s\n", s->opts.port_file,
            strerror(errno));
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  static mock_server_t srv; /* static: zeroed, and big enough not to belong on the stack */
  mock_server_t *s = &srv;
  uv_loop_t loop;
  s->opts = (mock_opts_t){.listen = "127.0.0.1:0", .name = "mock", .fail_status = 500,
                          .sse_events = 5, .sse_interval_ms = 10};
  int rc = parse_args(argc, argv, &s->opts);
  if (rc > 0) {
    fputs(usage, stdout);
    return 0;
  }
  if (rc < 0) {
    fputs("sluice-mock: see --help\n", stderr);
    return 2;
  }
  s->rng = s->opts.seed ? s->opts.seed
                        : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid() ^ 0x9e3779b97f4a7c15ULL;
  if (s->rng == 0)
    s->rng = 1;
  signal(SIGPIPE, SIG_IGN); /* a peer that vanished is an error code, not a signal */
  if (uv_loop_init(&loop) < 0)
    return 1;
  s->loop = &loop;
  mock_list_init(&s->conns);
  mock_list_init(&s->waitq);
  mock_settings_init(&s->settings);
  uv_signal_init(&loop, &s->sigint);
  uv_signal_init(&loop, &s->sigterm);
  s->sigint.data = s->sigterm.data = s;
  uv_signal_start(&s->sigint, on_signal, SIGINT);
  uv_signal_start(&s->sigterm, on_signal, SIGTERM);
  int status = 0;
  if (server_listen(s) < 0) {
    status = 1;
    server_stop(s);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return status;
}
