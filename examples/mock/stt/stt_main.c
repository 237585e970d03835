/* stt_main.c — sluice-mock-stt: a mock streaming speech-to-text WebSocket server for
 * integration tests and demos of WebSocket proxying. This file holds main: options, the
 * listener, signals, the port file and /stats. See stt.h for how the sources divide the
 * work. */
#include "../mock_listen.h"
#include "stt.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
    "usage: sluice-mock-stt [options]\n"
    "  --listen HOST:PORT        address to listen on (default 127.0.0.1:0, 0 = ephemeral)\n"
    "  --port-file PATH          write the bound port to PATH (atomically) once listening\n"
    "  --name NAME               instance name: x-mock-instance and \"instance\" (default stt)\n"
    "  --partial-every N         a partial transcript every N binary frames (default 5, 0 = none)\n"
    "  --latency-ms N            delay before each transcript message (default 0)\n"
    "  --refuse-handshake STATUS answer upgrades with STATUS instead of 101\n"
    "  --drop-after N            drop the TCP connection, no close frame, after N binary frames\n"
    "  --max-message BYTES       largest message accepted, else close 1009 (default 16777216)\n"
    "  --quiet                   no per-session log lines\n"
    "  --help                    this text\n"
    "HTTP: GET /healthz, GET /stats; a WebSocket upgrade on any path (header x-mock-refuse:\n"
    "  STATUS refuses it). Client messages: binary = audio; text \"echo:...\" is echoed;\n"
    "  binary starting 0xEE is echoed too; {\"type\":\"end\"} = final transcript + close 1000;\n"
    "  \"close:CODE:REASON\" = server closes; a client close gets the final transcript, then\n"
    "  its own code and reason back.\n";

void stt_stats_json(const stt_server_t *s, mock_buf_t *out) {
  const stt_stats_t *st = &s->stats;
  mock_buf_addf(out,
               "{\"sessions_open\":%" PRIu64 ",\"sessions_total\":%" PRIu64 ",\"frames\":%" PRIu64
               ",\"bytes\":%" PRIu64 ",\"handshakes_refused\":%" PRIu64 "}",
               st->sessions_open, st->sessions_total, st->frames, st->bytes,
               st->handshakes_refused);
}

/* ---- options ---- */

static int opt_u64(const char *name, const char *v, uint64_t max, uint64_t *out) {
  if (mock_parse_u64(v, strlen(v), max, out) < 0) {
    fprintf(stderr, "sluice-mock-stt: %s wants a number <= %" PRIu64 ", got '%s'\n", name, max,
            v);
    return -1;
  }
  return 0;
}

/* Parses argv into o. Returns 0, 1 for --help, -1 on a bad option (already reported). */
static int parse_args(int argc, char **argv, stt_opts_t *o) {
  enum { O_LISTEN = 256, O_PORT_FILE, O_NAME, O_PARTIAL, O_LATENCY, O_REFUSE, O_DROP,
         O_MAX_MESSAGE, O_QUIET, O_HELP };
  static const struct option longopts[] = {
      {"listen", required_argument, NULL, O_LISTEN},
      {"port-file", required_argument, NULL, O_PORT_FILE},
      {"name", required_argument, NULL, O_NAME},
      {"partial-every", required_argument, NULL, O_PARTIAL},
      {"latency-ms", required_argument, NULL, O_LATENCY},
      {"refuse-handshake", required_argument, NULL, O_REFUSE},
      {"drop-after", required_argument, NULL, O_DROP},
      {"max-message", required_argument, NULL, O_MAX_MESSAGE},
      {"quiet", no_argument, NULL, O_QUIET},
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
    case O_PARTIAL: bad = opt_u64("--partial-every", optarg, big, &o->partial_every); break;
    case O_LATENCY: bad = opt_u64("--latency-ms", optarg, ms_max, &o->latency_ms); break;
    case O_REFUSE:
      bad = opt_u64("--refuse-handshake", optarg, 999, &v);
      if (!bad && v < 200) {
        fprintf(stderr, "sluice-mock-stt: --refuse-handshake wants 200..999\n");
        bad = -1;
      }
      o->refuse_status = (int)v;
      break;
    case O_DROP: bad = opt_u64("--drop-after", optarg, big, &o->drop_after); break;
    case O_MAX_MESSAGE:
      bad = opt_u64("--max-message", optarg, (1u << 31) - 1, &o->max_message);
      break;
    case O_QUIET: o->quiet = 1; break;
    case O_HELP: return 1;
    default: return -1;
    }
    if (bad)
      return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "sluice-mock-stt: unexpected argument '%s'\n", argv[optind]);
    return -1;
  }
  for (const char *p = o->name; *p; p++) /* it goes into a header line */
    if ((unsigned char)*p < 0x20 || *p == 0x7f) {
      fprintf(stderr, "sluice-mock-stt: --name must not contain control characters\n");
      return -1;
    }
  return 0;
}

/* ---- listening ---- */

static void on_connection(uv_stream_t *listener, int status) {
  stt_server_t *s = listener->data;
  if (status < 0) {
    fprintf(stderr, "sluice-mock-stt: accept: %s\n", uv_strerror(status));
    return;
  }
  if (!s->stopping)
    stt_conn_accept(s);
}

/* Closes the listener, the signal handles and every connection; uv_run then returns. */
static void server_stop(stt_server_t *s) {
  if (s->stopping)
    return;
  s->stopping = 1;
  uv_close((uv_handle_t *)&s->listener, NULL);
  uv_close((uv_handle_t *)&s->sigint, NULL);
  uv_close((uv_handle_t *)&s->sigterm, NULL);
  while (!stt_list_empty(&s->conns))
    stt_conn_close(STT_CONTAINER(s->conns.next, stt_conn_t, link));
}

static void on_signal(uv_signal_t *h, int signum) { server_stop(h->data); }

/* Binds and listens; prints the address and writes the port file. */
static int server_listen(stt_server_t *s) {
  struct sockaddr_storage ss;
  uv_tcp_init(s->loop, &s->listener); /* first: server_stop closes it on any failure */
  s->listener.data = s;
  int rc = mock_resolve_listen(s->loop, s->opts.listen, &ss);
  if (rc < 0) {
    fprintf(stderr, "sluice-mock-stt: bad --listen '%s': %s\n", s->opts.listen,
            uv_strerror(rc));
    return -1;
  }
  if ((rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&ss, 0)) < 0 ||
      (rc = uv_listen((uv_stream_t *)&s->listener, 1024, on_connection)) < 0) {
    fprintf(stderr, "sluice-mock-stt: listen on %s: %s\n", s->opts.listen, uv_strerror(rc));
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
  fprintf(stderr,
          bound.ss_family == AF_INET6 ? "sluice-mock-stt %s listening on [%s]:%d\n"
                                      : "sluice-mock-stt %s listening on %s:%d\n",
          s->opts.name, ip, port);
  if (s->opts.port_file && mock_write_port_file(s->opts.port_file, port) < 0) {
    fprintf(stderr, "sluice-mock-stt: cannot write port file %s: %s\n", s->opts.port_file,
            strerror(errno));
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  static stt_server_t srv; /* static: zeroed */
  stt_server_t *s = &srv;
  uv_loop_t loop;
  s->opts = (stt_opts_t){.listen = "127.0.0.1:0", .name = "stt", .partial_every = 5,
                         .max_message = 16u << 20};
  int rc = parse_args(argc, argv, &s->opts);
  if (rc > 0) {
    fputs(usage, stdout);
    return 0;
  }
  if (rc < 0) {
    fputs("sluice-mock-stt: see --help\n", stderr);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN); /* a peer that vanished is an error code, not a signal */
  if (uv_loop_init(&loop) < 0)
    return 1;
  s->loop = &loop;
  stt_list_init(&s->conns);
  stt_http_settings_init(&s->settings);
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
