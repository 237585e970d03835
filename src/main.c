/* sluice command line: a thin main over libsluice. */
#include "sluice.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f,
          "usage: sluice [-c FILE] [--check] [--log-level LEVEL]\n"
          "\n"
          "  -c, --config FILE    config file (default: sluice.lua)\n"
          "      --check          validate the config and the policies it names, then exit\n"
          "  -l, --log-level L    error | warn | info | debug (overrides the config)\n"
          "  -v, --version        print the version and exit\n"
          "  -h, --help           this text\n"
          "\n"
          "Signals: SIGINT/SIGTERM stop accepting, finish in-flight requests, exit 0;\n"
          "         SIGHUP reloads the config and policies (the running version stays on error).\n");
}

typedef struct app {
  uv_loop_t *loop;
  sluice_t *s;
  uv_signal_t sigint, sigterm, sighup;
  int stopping;
} app_t;

static void on_stopped(sluice_t *s, void *arg) {
  app_t *a = arg;
  uv_close((uv_handle_t *)&a->sigint, NULL);
  uv_close((uv_handle_t *)&a->sigterm, NULL);
  uv_close((uv_handle_t *)&a->sighup, NULL);
}

static void on_sighup(uv_signal_t *h, int signum) {
  app_t *a = h->data;
  if (!a->stopping) sluice_reload(a->s); /* logs the outcome */
}

static void on_signal(uv_signal_t *h, int signum) {
  app_t *a = h->data;

  if (a->stopping++) {
    fprintf(stderr, "sluice: second signal, exiting now\n");
    exit(1);
  }
  fprintf(stderr, "sluice: %s received, draining\n", signum == SIGINT ? "SIGINT" : "SIGTERM");
  sluice_stop(a->s, on_stopped, a);
}

int main(int argc, char **argv) {
  const char *config = "sluice.lua";
  int check = 0, level = -1;
  static const struct option opts[] = {
      {"config", required_argument, NULL, 'c'}, {"check", no_argument, NULL, 'C'},
      {"log-level", required_argument, NULL, 'l'}, {"version", no_argument, NULL, 'v'},
      {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "c:l:vh", opts, NULL)) != -1) {
    switch (ch) {
    case 'c': config = optarg; break;
    case 'C': check = 1; break;
    case 'l':
      if (!strcmp(optarg, "error")) level = 0;
      else if (!strcmp(optarg, "warn")) level = 1;
      else if (!strcmp(optarg, "info")) level = 2;
      else if (!strcmp(optarg, "debug")) level = 3;
      else {
        fprintf(stderr, "sluice: unknown log level '%s'\n", optarg);
        return 2;
      }
      break;
    case 'v': printf("sluice %s\n", sluice_version()); return 0;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "sluice: unexpected argument '%s'\n", argv[optind]);
    usage(stderr);
    return 2;
  }
  if (level >= 0) sluice_set_log_level(level);

  if (check) {
    char err[2048];
    int rc = sluice_check_file(config, err, sizeof(err));
    if (rc != 0) {
      fprintf(stderr, "%s\n", err);
      return 1;
    }
    printf("%s: ok\n", config);
    return 0;
  }

  app_t a = {0};
  a.loop = uv_default_loop();
  sluice_new(a.loop, &a.s);
  /* A client that resets its connection while we write is an error code, not a reason to die
   * (libuv writes with write(2), which raises SIGPIPE). */
  signal(SIGPIPE, SIG_IGN);
  /* Handlers first: a signal that arrives once "listening" is logged must drain, not kill. */
  uv_signal_init(a.loop, &a.sigint);
  uv_signal_init(a.loop, &a.sigterm);
  uv_signal_init(a.loop, &a.sighup);
  a.sigint.data = a.sigterm.data = a.sighup.data = &a;
  uv_signal_start(&a.sigint, on_signal, SIGINT);
  uv_signal_start(&a.sigterm, on_signal, SIGTERM);
  uv_signal_start(&a.sighup, on_sighup, SIGHUP);
  int rc = sluice_load_file(a.s, config);
  if (rc == 0) rc = sluice_start(a.s);
  if (rc != 0) {
    fprintf(stderr, "sluice: %s\n", sluice_last_error(a.s));
    sluice_free(a.s);
    uv_close((uv_handle_t *)&a.sigint, NULL);
    uv_close((uv_handle_t *)&a.sigterm, NULL);
    uv_close((uv_handle_t *)&a.sighup, NULL);
    uv_run(a.loop, UV_RUN_DEFAULT);
    return 1;
  }
  uv_run(a.loop, UV_RUN_DEFAULT);
  sluice_free(a.s);
  uv_run(a.loop, UV_RUN_DEFAULT); /* close callbacks of upstream connections */
  uv_loop_close(a.loop);
  return 0;
}
