#include "metrics.h"
#include "t.h"

#include <math.h>
#include <pthread.h>

/* Renders `regs` into a NUL-terminated string the caller frees. */
static char *render(sl_metrics_t *const *regs, size_t n) {
  sl_buf_t b;
  sl_buf_init(&b);
  sl_metrics_render(regs, n, &b);
  sl_buf_append(&b, "", 1);
  return sl_buf_steal(&b);
}

static char *render1(sl_metrics_t *m) { return render(&m, 1); }

static void families_and_series(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *rl[] = {"route", "pool", "code"};
  sl_mfamily_t *req = sl_metrics_family(m, "sluice_requests_total", "Requests answered.",
                                        SL_M_COUNTER, rl, 3, NULL, 0, NULL, 0);
  sl_mfamily_t *gen = sl_metrics_family(m, "sluice_config_generation", "Config generation.",
                                        SL_M_GAUGE, NULL, 0, NULL, 0, NULL, 0);
  CHECK(req && gen);
  const char *a[] = {"/v1/chat", "llm", "2xx"}, *b[] = {"/v1/chat", "llm", "5xx"};
  sl_mseries_t *s2 = sl_mfamily_series(req, a), *s5 = sl_mfamily_series(req, b);
  sl_mseries_t *g = sl_mfamily_series(gen, NULL);
  CHECK(s2 && s5 && g && s2 != s5);
  CHECK(sl_mfamily_series(req, a) == s2); /* get-or-create: the same handle */
  sl_mseries_release(s2);
  sl_m_inc(s2, 1);
  sl_m_inc(s2, 2);
  sl_m_inc(s5, 1);
  sl_m_set(g, 7);
  sl_m_set(g, 3);
  CHECK(sl_m_get(s2) == 3);
  CHECK(sl_mseries_type(g) == SL_M_GAUGE);
  char *txt = render1(m);
  /* Families sorted by name, series in creation order. */
  CHECK_EQ_STR(txt, "# HELP sluice_config_generation Config generation.\n"
                    "# TYPE sluice_config_generation gauge\n"
                    "sluice_config_generation 3\n"
                    "# HELP sluice_requests_total Requests answered.\n"
                    "# TYPE sluice_requests_total counter\n"
                    "sluice_requests_total{route=\"/v1/chat\",pool=\"llm\",code=\"2xx\"} 3\n"
                    "sluice_requests_total{route=\"/v1/chat\",pool=\"llm\",code=\"5xx\"} 1\n");
  free(txt);
  sl_metrics_free(m);
}

static void escaping(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"policy"};
  sl_mfamily_t *f = sl_metrics_family(m, "sluice_policy_errors_total",
                                      "Errors in \\policies\\\nsecond line \"quoted\"",
                                      SL_M_COUNTER, ln, 1, NULL, 0, NULL, 0);
  const char *v[] = {"a\"b\\c\nd"};
  sl_mseries_t *s = sl_mfamily_series(f, v);
  sl_m_inc(s, 1);
  const char *empty[] = {NULL};
  sl_mseries_t *e = sl_mfamily_series(f, empty);
  CHECK(e && e != s);
  char *txt = render1(m);
  CHECK_EQ_STR(txt, "# HELP sluice_policy_errors_total Errors in \\\\policies\\\\\\nsecond line "
                    "\"quoted\"\n"
                    "# TYPE sluice_policy_errors_total counter\n"
                    "sluice_policy_errors_total{policy=\"a\\\"b\\\\c\\nd\"} 1\n"
                    "sluice_policy_errors_total{policy=\"\"} 0\n");
  free(txt);
  sl_metrics_free(m);
}

static void histogram(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"pool"};
  const double bk[] = {0.1, 0.5, 2.5};
  sl_mfamily_t *f = sl_metrics_family(m, "sluice_queue_wait_seconds", "Queue wait.",
                                      SL_M_HISTOGRAM, ln, 1, bk, 3, NULL, 0);
  CHECK(f != NULL);
  const char *v[] = {"stt"};
  sl_mseries_t *s = sl_mfamily_series(f, v);
  sl_m_observe(s, 0.05);
  sl_m_observe(s, 0.1); /* le is inclusive */
  sl_m_observe(s, 0.25);
  sl_m_observe(s, 3);
  sl_m_observe(s, 100);
  char *txt = render1(m);
  CHECK_EQ_STR(txt, "# HELP sluice_queue_wait_seconds Queue wait.\n"
                    "# TYPE sluice_queue_wait_seconds histogram\n"
                    "sluice_queue_wait_seconds_bucket{pool=\"stt\",le=\"0.1\"} 2\n"
                    "sluice_queue_wait_seconds_bucket{pool=\"stt\",le=\"0.5\"} 3\n"
                    "sluice_queue_wait_seconds_bucket{pool=\"stt\",le=\"2.5\"} 3\n"
                    "sluice_queue_wait_seconds_bucket{pool=\"stt\",le=\"+Inf\"} 5\n"
                    "sluice_queue_wait_seconds_sum{pool=\"stt\"} 103.4\n"
                    "sluice_queue_wait_seconds_count{pool=\"stt\"} 5\n");
  free(txt);

  /* No labels, default buckets, a trailing +Inf bound is implicit anyway. */
  sl_mfamily_t *d = sl_metrics_family(m, "lat_seconds", "L.", SL_M_HISTOGRAM, NULL, 0, NULL, 0,
                                      NULL, 0);
  const double inf[] = {1, INFINITY};
  sl_mfamily_t *one = sl_metrics_family(m, "one_seconds", "O.", SL_M_HISTOGRAM, NULL, 0, inf, 2,
                                        NULL, 0);
  CHECK(d && one);
  sl_mseries_t *ds = sl_mfamily_series(d, NULL), *os = sl_mfamily_series(one, NULL);
  sl_m_observe(ds, 0.007);
  sl_m_observe(os, 2);
  txt = render1(m);
  CHECK(strstr(txt, "lat_seconds_bucket{le=\"0.005\"} 0\nlat_seconds_bucket{le=\"0.01\"} 1\n"));
  CHECK(strstr(txt, "lat_seconds_bucket{le=\"60\"} 1\nlat_seconds_bucket{le=\"+Inf\"} 1\n"
                    "lat_seconds_sum 0.007\nlat_seconds_count 1\n"));
  CHECK(strstr(txt, "one_seconds_bucket{le=\"1\"} 0\none_seconds_bucket{le=\"+Inf\"} 1\n"
                    "one_seconds_sum 2\none_seconds_count 1\n"));
  free(txt);
  sl_metrics_free(m);
}

static void numbers(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"k"};
  sl_mfamily_t *f = sl_metrics_family(m, "g", "G.", SL_M_GAUGE, ln, 1, NULL, 0, NULL, 0);
  struct {
    const char *k;
    double v;
  } cases[] = {{"int", 123456789012.0}, {"neg", -42},       {"frac", 0.1},
               {"third", 1.0 / 3},      {"big", 1e300},     {"pinf", INFINITY},
               {"ninf", -INFINITY},     {"nan", NAN},       {"huge", 1e20}};
  for (size_t i = 0; i < SL_ARRAY_SIZE(cases); i++) {
    const char *v[] = {cases[i].k};
    sl_m_set(sl_mfamily_series(f, v), cases[i].v);
  }
  char *txt = render1(m);
  CHECK_EQ_STR(txt, "# HELP g G.\n# TYPE g gauge\n"
                    "g{k=\"int\"} 123456789012\n"
                    "g{k=\"neg\"} -42\n"
                    "g{k=\"frac\"} 0.1\n"
                    "g{k=\"third\"} 0.3333333333333333\n"
                    "g{k=\"big\"} 1e+300\n"
                    "g{k=\"pinf\"} +Inf\n"
                    "g{k=\"ninf\"} -Inf\n"
                    "g{k=\"nan\"} NaN\n"
                    "g{k=\"huge\"} 100000000000000000000\n");
  free(txt);
  sl_metrics_free(m);
}

/* Two workers' registries: the same family and labels are summed; series only one side has
 * are kept; the first registry's order comes first. */
static void sum_across_registries(void) {
  sl_metrics_t *r[2] = {sl_metrics_new(), sl_metrics_new()};
  const char *ln[] = {"pool"};
  const double bk[] = {1};
  sl_mseries_t *c[2], *h[2];
  for (int i = 0; i < 2; i++) {
    sl_mfamily_t *cf = sl_metrics_family(r[i], "sluice_retries_total", "Retries.", SL_M_COUNTER,
                                         ln, 1, NULL, 0, NULL, 0);
    sl_mfamily_t *hf = sl_metrics_family(r[i], "sluice_queue_wait_seconds", "Wait.",
                                         SL_M_HISTOGRAM, ln, 1, bk, 1, NULL, 0);
    const char *v[] = {"llm"};
    c[i] = sl_mfamily_series(cf, v);
    h[i] = sl_mfamily_series(hf, v);
    if (i == 1) {
      const char *w[] = {"stt"};
      sl_m_inc(sl_mfamily_series(cf, w), 5);
    }
  }
  sl_m_inc(c[0], 2);
  sl_m_inc(c[1], 3);
  sl_m_observe(h[0], 0.5);
  sl_m_observe(h[1], 0.25);
  sl_m_observe(h[1], 4);
  /* Only the second registry has this one. */
  sl_mfamily_t *only = sl_metrics_family(r[1], "a_total", "A.", SL_M_COUNTER, NULL, 0, NULL, 0,
                                         NULL, 0);
  sl_m_inc(sl_mfamily_series(only, NULL), 1);
  sl_metrics_t *regs[3] = {r[0], NULL, r[1]};
  char *txt = render(regs, 3);
  CHECK_EQ_STR(txt, "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
                    "# HELP sluice_queue_wait_seconds Wait.\n"
                    "# TYPE sluice_queue_wait_seconds histogram\n"
                    "sluice_queue_wait_seconds_bucket{pool=\"llm\",le=\"1\"} 2\n"
                    "sluice_queue_wait_seconds_bucket{pool=\"llm\",le=\"+Inf\"} 3\n"
                    "sluice_queue_wait_seconds_sum{pool=\"llm\"} 4.75\n"
                    "sluice_queue_wait_seconds_count{pool=\"llm\"} 3\n"
                    "# HELP sluice_retries_total Retries.\n"
                    "# TYPE sluice_retries_total counter\n"
                    "sluice_retries_total{pool=\"llm\"} 5\n"
                    "sluice_retries_total{pool=\"stt\"} 5\n");
  free(txt);

  /* A family defined differently in the second registry is skipped there. */
  sl_mfamily_t *x0 = sl_metrics_family(r[0], "x", "X.", SL_M_COUNTER, NULL, 0, NULL, 0, NULL, 0);
  sl_mfamily_t *x1 = sl_metrics_family(r[1], "x", "X.", SL_M_GAUGE, NULL, 0, NULL, 0, NULL, 0);
  sl_m_inc(sl_mfamily_series(x0, NULL), 1);
  sl_m_set(sl_mfamily_series(x1, NULL), 10);
  txt = render(r, 2);
  CHECK(strstr(txt, "# TYPE x counter\nx 1\n") != NULL);
  free(txt);

  /* A state gauge merged by maximum instead of summed. */
  const char *el[] = {"endpoint"}, *ev[] = {"http://a"};
  for (int i = 0; i < 2; i++) {
    sl_mfamily_t *bf = sl_metrics_family(r[i], "sluice_breaker_state", "State.", SL_M_GAUGE, el,
                                         1, NULL, 0, NULL, 0);
    sl_mfamily_set_merge(bf, SL_M_MERGE_MAX);
    sl_m_set(sl_mfamily_series(bf, ev), i == 0 ? 1 : 0);
  }
  txt = render(r, 2);
  CHECK(strstr(txt, "sluice_breaker_state{endpoint=\"http://a\"} 1\n") != NULL);
  free(txt);
  sl_metrics_t *rev[2] = {r[1], r[0]};
  txt = render(rev, 2);
  CHECK(strstr(txt, "sluice_breaker_state{endpoint=\"http://a\"} 1\n") != NULL);
  free(txt);
  sl_metrics_free(r[0]);
  sl_metrics_free(r[1]);
}

static void idempotent_and_conflicts(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"pool", "endpoint"}, *other[] = {"pool"}, *swapped[] = {"endpoint", "pool"};
  const double bk[] = {0.1, 1}, bk2[] = {0.1, 2};
  char err[128] = "";
  sl_mfamily_t *f = sl_metrics_family(m, "t_seconds", "T.", SL_M_HISTOGRAM, ln, 2, bk, 2, err,
                                      sizeof(err));
  CHECK(f != NULL);
  CHECK(sl_metrics_family(m, "t_seconds", "Other help.", SL_M_HISTOGRAM, ln, 2, bk, 2, err,
                          sizeof(err)) == f);
  CHECK(sl_metrics_family(m, "t_seconds", "T.", SL_M_GAUGE, ln, 2, NULL, 0, err,
                          sizeof(err)) == NULL);
  CHECK(strstr(err, "already defined") != NULL);
  CHECK(sl_metrics_family(m, "t_seconds", "T.", SL_M_HISTOGRAM, other, 1, bk, 2, NULL, 0) ==
        NULL);
  CHECK(sl_metrics_family(m, "t_seconds", "T.", SL_M_HISTOGRAM, swapped, 2, bk, 2, NULL, 0) ==
        NULL);
  CHECK(sl_metrics_family(m, "t_seconds", "T.", SL_M_HISTOGRAM, ln, 2, bk2, 2, NULL, 0) == NULL);
  CHECK(sl_metrics_family(m, "t_seconds", "T.", SL_M_HISTOGRAM, ln, 2, NULL, 0, NULL, 0) == NULL);
  /* Defaults compare equal to the explicit default buckets. */
  sl_mfamily_t *d = sl_metrics_family(m, "d_seconds", "D.", SL_M_HISTOGRAM, NULL, 0, NULL, 0,
                                      NULL, 0);
  CHECK(d && sl_metrics_family(m, "d_seconds", "D.", SL_M_HISTOGRAM, NULL, 0,
                               SL_M_LATENCY_BUCKETS, SL_M_LATENCY_NBUCKETS, NULL, 0) == d);
  /* The help kept is the first one. */
  sl_mfamily_series(f, (const char *const[]){"a", "b"});
  char *txt = render1(m);
  CHECK(strstr(txt, "# HELP t_seconds T.\n") != NULL);
  free(txt);
  /* Many families keep their sorted order and lookups. */
  for (int i = 99; i >= 0; i--) {
    char name[16];
    snprintf(name, sizeof(name), "f%02d", i);
    CHECK(sl_metrics_family(m, name, "", SL_M_COUNTER, NULL, 0, NULL, 0, NULL, 0) != NULL);
  }
  sl_mfamily_t *f42 = sl_metrics_family(m, "f42", "", SL_M_COUNTER, NULL, 0, NULL, 0, NULL, 0);
  sl_m_inc(sl_mfamily_series(f42, NULL), 42);
  sl_m_inc(sl_mfamily_series(sl_metrics_family(m, "f07", "", SL_M_COUNTER, NULL, 0, NULL, 0,
                                               NULL, 0),
                             NULL),
           7);
  txt = render1(m);
  char *p7 = strstr(txt, "\nf07 7\n"), *p42 = strstr(txt, "\nf42 42\n");
  CHECK(p7 && p42 && p7 < p42);
  free(txt);
  sl_metrics_free(m);
}

static void invalid_names(void) {
  CHECK(sl_metrics_valid_name("sluice_requests_total"));
  CHECK(sl_metrics_valid_name("_x9"));
  CHECK(!sl_metrics_valid_name(""));
  CHECK(!sl_metrics_valid_name(NULL));
  CHECK(!sl_metrics_valid_name("9lives"));
  CHECK(!sl_metrics_valid_name("a-b"));
  CHECK(!sl_metrics_valid_name("a b"));
  CHECK(!sl_metrics_valid_name("job:rate5m")); /* recording-rule names are not exported */
  CHECK(!sl_metrics_valid_name("caf\xc3\xa9"));
  CHECK(sl_metrics_valid_label("pool"));
  CHECK(sl_metrics_valid_label("_p"));
  CHECK(!sl_metrics_valid_label("__name__"));
  CHECK(!sl_metrics_valid_label("a:b"));
  CHECK(!sl_metrics_valid_label("1a"));

  sl_metrics_t *m = sl_metrics_new();
  char err[128];
  CHECK(!sl_metrics_family(m, "bad-name", "", SL_M_COUNTER, NULL, 0, NULL, 0, err, sizeof(err)));
  CHECK_EQ_STR(err, "invalid metric name \"bad-name\"");
  const char *bad[] = {"__x"}, *dup[] = {"a", "a"}, *le[] = {"le"};
  CHECK(!sl_metrics_family(m, "ok", "", SL_M_COUNTER, bad, 1, NULL, 0, err, sizeof(err)));
  CHECK_EQ_STR(err, "invalid label name \"__x\"");
  CHECK(!sl_metrics_family(m, "ok", "", SL_M_COUNTER, dup, 2, NULL, 0, err, sizeof(err)));
  CHECK(!sl_metrics_family(m, "ok", "", SL_M_HISTOGRAM, le, 1, NULL, 0, err, sizeof(err)));
  CHECK(sl_metrics_family(m, "ok_le", "", SL_M_GAUGE, le, 1, NULL, 0, err, sizeof(err)));
  const double unsorted[] = {1, 0.5}, dupb[] = {1, 1}, nan[] = {NAN}, ninf[] = {-INFINITY, 1};
  CHECK(!sl_metrics_family(m, "h", "", SL_M_HISTOGRAM, NULL, 0, unsorted, 2, NULL, 0));
  CHECK(!sl_metrics_family(m, "h", "", SL_M_HISTOGRAM, NULL, 0, dupb, 2, NULL, 0));
  CHECK(!sl_metrics_family(m, "h", "", SL_M_HISTOGRAM, NULL, 0, nan, 1, NULL, 0));
  CHECK(!sl_metrics_family(m, "h", "", SL_M_HISTOGRAM, NULL, 0, ninf, 2, err, sizeof(err)));
  CHECK_EQ_STR(err, "metric h: buckets must be finite and strictly increasing");
  CHECK(!sl_metrics_family(m, "h", "", (sl_metric_type_t)7, NULL, 0, NULL, 0, NULL, 0));
  /* Nothing half-created: families without series render nothing at all. */
  char *txt = render1(m);
  CHECK_EQ_STR(txt, "");
  free(txt);
  sl_metrics_free(m);
}

typedef struct {
  sl_mseries_t *inflight;
  int calls;
  int live;
} collect_ctx_t;

static void collect(void *ud, sl_metrics_t *m) {
  collect_ctx_t *c = ud;
  c->calls++;
  sl_m_set(c->inflight, c->live);
}

static void collector(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"pool", "endpoint"}, *v[] = {"stt", "ws://127.0.0.1:9101"};
  sl_mfamily_t *f = sl_metrics_family(m, "sluice_endpoint_inflight", "In flight.", SL_M_GAUGE,
                                      ln, 2, NULL, 0, NULL, 0);
  collect_ctx_t c = {.inflight = sl_mfamily_series(f, v), .live = 3};
  sl_metrics_set_collector(m, collect, &c);
  char *txt = render1(m);
  CHECK_EQ_INT(c.calls, 1);
  CHECK(strstr(txt, "sluice_endpoint_inflight{pool=\"stt\",endpoint=\"ws://127.0.0.1:9101\"} 3\n"));
  free(txt);
  c.live = 1;
  txt = render1(m);
  CHECK_EQ_INT(c.calls, 2);
  CHECK(strstr(txt, "} 1\n") != NULL);
  free(txt);
  sl_metrics_set_collector(m, NULL, NULL);
  c.live = 9;
  txt = render1(m);
  CHECK_EQ_INT(c.calls, 2);
  free(txt);
  sl_metrics_free(m);
}

/* Reference-counted removal, as a reload does it: the new generation acquires before the old
 * one releases, so surviving series keep their values and removed ones vanish. */
static void removal(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"pool"};
  sl_mfamily_t *f = sl_metrics_family(m, "sluice_fallbacks_total", "Fallbacks.", SL_M_COUNTER,
                                      ln, 1, NULL, 0, NULL, 0);
  const char *a[] = {"a"}, *b[] = {"b"}, *c[] = {"c"};
  sl_mseries_t *old_a = sl_mfamily_series(f, a), *old_b = sl_mfamily_series(f, b);
  sl_m_inc(old_a, 4);
  sl_m_inc(old_b, 2);
  /* Reload: the new config keeps pool a, drops b, adds c. */
  sl_mseries_t *new_a = sl_mfamily_series(f, a), *new_c = sl_mfamily_series(f, c);
  CHECK(new_a == old_a);
  sl_mseries_release(old_a);
  sl_mseries_release(old_b);
  sl_m_inc(new_a, 1);
  char *txt = render1(m);
  CHECK_EQ_STR(txt, "# HELP sluice_fallbacks_total Fallbacks.\n"
                    "# TYPE sluice_fallbacks_total counter\n"
                    "sluice_fallbacks_total{pool=\"a\"} 5\n"
                    "sluice_fallbacks_total{pool=\"c\"} 0\n");
  free(txt);
  /* A removed tuple comes back from zero. */
  sl_mseries_t *again_b = sl_mfamily_series(f, b);
  CHECK(sl_m_get(again_b) == 0);
  sl_mseries_acquire(again_b);
  sl_mseries_release(again_b);
  CHECK(sl_m_get(again_b) == 0); /* still held once */
  sl_mseries_release(again_b);
  sl_mseries_release(new_a);
  sl_mseries_release(new_c);
  sl_mseries_release(NULL);
  txt = render1(m);
  CHECK_EQ_STR(txt, ""); /* no series left: the family is not rendered */
  free(txt);
  /* The family can be used again. */
  sl_m_inc(sl_mfamily_series(f, a), 1);
  txt = render1(m);
  CHECK(strstr(txt, "sluice_fallbacks_total{pool=\"a\"} 1\n") != NULL);
  free(txt);
  sl_metrics_free(m);
}

static void many_series_and_cap(void) {
  sl_metrics_t *m = sl_metrics_new();
  const char *ln[] = {"k"};
  sl_mfamily_t *f = sl_metrics_family(m, "c_total", "C.", SL_M_COUNTER, ln, 1, NULL, 0, NULL, 0);
  sl_mseries_t **all = calloc(SL_M_MAX_SERIES, sizeof(*all));
  char v[16];
  const char *vals[] = {v};
  for (int i = 0; i < SL_M_MAX_SERIES; i++) {
    snprintf(v, sizeof(v), "%d", i);
    all[i] = sl_mfamily_series(f, vals);
    sl_m_inc(all[i], i);
  }
  snprintf(v, sizeof(v), "x");
  CHECK(sl_mfamily_series(f, vals) == NULL);
  snprintf(v, sizeof(v), "%d", 1234);
  sl_mseries_t *s = sl_mfamily_series(f, vals);
  CHECK(s == all[1234]);
  sl_mseries_release(s);
  /* Remove every other series; lookups of the rest still work. */
  for (int i = 0; i < SL_M_MAX_SERIES; i += 2) sl_mseries_release(all[i]);
  snprintf(v, sizeof(v), "%d", 4321);
  s = sl_mfamily_series(f, vals);
  CHECK(s == all[4321] && sl_m_get(s) == 4321);
  sl_mseries_release(s);
  snprintf(v, sizeof(v), "x");
  CHECK(sl_mfamily_series(f, vals) != NULL);
  char *txt = render1(m);
  CHECK(strstr(txt, "c_total{k=\"9999\"} 9999\n") != NULL);
  CHECK(strstr(txt, "c_total{k=\"9998\"}") == NULL);
  free(txt);
  free(all);
  sl_metrics_free(m);
}

/* The owner updates while another thread renders: values are never torn and the render sees
 * monotonic counters. (Under TSan this would also show the access pattern is race-free.) */
typedef struct {
  sl_mseries_t *c, *h;
  volatile int stop;
} race_t;

static void *writer(void *arg) {
  race_t *r = arg;
  for (int i = 0; i < 200000; i++) {
    sl_m_inc(r->c, 1);
    sl_m_observe(r->h, 0.01);
  }
  __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
  return NULL;
}

static void concurrent_render(void) {
  sl_metrics_t *m = sl_metrics_new();
  race_t r = {0};
  r.c = sl_mfamily_series(
      sl_metrics_family(m, "n_total", "N.", SL_M_COUNTER, NULL, 0, NULL, 0, NULL, 0), NULL);
  r.h = sl_mfamily_series(
      sl_metrics_family(m, "h_seconds", "H.", SL_M_HISTOGRAM, NULL, 0, NULL, 0, NULL, 0), NULL);
  pthread_t t;
  pthread_create(&t, NULL, writer, &r);
  long long last = -1;
  int renders = 0;
  while (!__atomic_load_n(&r.stop, __ATOMIC_ACQUIRE) || renders == 0) {
    char *txt = render1(m);
    const char *p = strstr(txt, "\nn_total ");
    long long n = p ? atoll(p + 9) : -1;
    CHECK(n >= last);
    last = n;
    renders++;
    free(txt);
  }
  pthread_join(t, NULL);
  char *txt = render1(m);
  CHECK(strstr(txt, "\nn_total 200000\n") != NULL);
  CHECK(strstr(txt, "h_seconds_count 200000\n") != NULL);
  free(txt);
  sl_metrics_free(m);
}

TEST_MAIN(T(families_and_series), T(escaping), T(histogram), T(numbers),
          T(sum_across_registries), T(idempotent_and_conflicts), T(invalid_names), T(collector),
          T(removal), T(many_series_and_cap), T(concurrent_render))
