/* Prometheus metrics: a registry of families (name, help, type, label names, buckets), each
 * holding series (one label-value tuple each), rendered in the text exposition format 0.0.4.
 *
 * Hot path. Callers resolve a series handle once (config load, per route/pool/endpoint) with
 * sl_mfamily_series and then update it with the inline sl_m_* functions below: no hashing,
 * no strings, no lock, no allocation per request.
 *
 * Threads. A registry has one writer thread (its worker) for values and for the structure.
 * Any thread may render it at the same time:
 *  - Values (counter/gauge value, histogram bucket counts and sum) are naturally aligned
 *    64-bit words. The owner updates them with a plain load, an add and a relaxed __atomic
 *    store (not a locked read-modify-write: there is only one writer); readers use relaxed
 *    __atomic loads. A reader therefore never sees a torn word, but a histogram's fields are
 *    not a consistent snapshot (its _sum may lag its _count by an observation). _count is
 *    derived from the buckets at render time, so _count always equals the +Inf bucket.
 *  - Structure (families, series, the collector) is guarded by a per-registry recursive
 *    mutex, taken by every call below that is not an sl_m_* update, and held by render while
 *    it runs the registry's collector and reads its series.
 *
 * Lifetimes. The registry owns families and series. sl_mfamily_series returns a series with
 * a new reference; sl_mseries_release drops one, and the last release unlinks and frees the
 * series (it disappears from /metrics). A config generation acquires its handles when it is
 * built and releases them when it is freed: since the new generation acquires before the old
 * one releases, series that survive a reload keep their values, and series of removed pools,
 * routes or endpoints vanish once the last generation naming them is gone. Families are never
 * freed before the registry; a family without series is not rendered.
 *
 * Aggregation. sl_metrics_render sums series with the same family name and label values
 * across registries (one per worker). A gauge whose per-worker values do not add up (a state,
 * a generation number) is merged with SL_M_MERGE_MAX instead; process-wide counters (reloads,
 * a shared cache) belong in exactly one registry.
 */
#ifndef SL_METRICS_H
#define SL_METRICS_H

#include "buf.h"
#include "common.h"

typedef enum { SL_M_COUNTER, SL_M_GAUGE, SL_M_HISTOGRAM } sl_metric_type_t;
/* How render combines one gauge series across registries (counters and histograms always sum). */
typedef enum { SL_M_MERGE_SUM, SL_M_MERGE_MAX } sl_metric_merge_t;

typedef struct sl_metrics sl_metrics_t;
typedef struct sl_metric_family sl_mfamily_t;
typedef struct sl_metric_series sl_mseries_t;

/* Default request-latency buckets, in seconds. */
#define SL_M_LATENCY_BUCKETS_INIT {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
#define SL_M_LATENCY_NBUCKETS 13
extern const double SL_M_LATENCY_BUCKETS[SL_M_LATENCY_NBUCKETS];

/* Families refuse to hold more series than this (protects against a policy that uses an
 * unbounded value, such as a request path, as a label). */
#define SL_M_MAX_SERIES 10000
/* Histograms take at most this many finite bucket bounds. */
#define SL_M_MAX_BUCKETS 64

/* One label-value tuple. The first fields are what the inline updates touch; the rest is
 * private to metrics.c. */
struct sl_metric_series {
  double value;          /* counter or gauge */
  double sum;            /* histogram: sum of observations */
  const double *bounds;  /* histogram: the family's finite upper bounds, ascending */
  uint32_t nbounds;
  uint32_t refs;
  sl_mfamily_t *family;
  char *labels;          /* rendered `a="x",b="y"` (escaped), "" when the family has none */
  size_t labels_len;
  uint64_t hash;
  sl_mseries_t *hnext;   /* family hash chain */
  sl_list_t link;        /* family series, creation order */
  uint64_t counts[];     /* histogram: nbounds + 1 non-cumulative counts, the last is +Inf */
};

/* A new, empty registry; free it with sl_metrics_free (which frees every family and series:
 * handles are dangling afterwards). */
sl_metrics_t *sl_metrics_new(void);
void sl_metrics_free(sl_metrics_t *m);

/* Returns the family `name`, creating it if needed. Idempotent: the same name with the same
 * type, label names and buckets returns the same family (a different help string is not a
 * conflict; the first one is kept). Returns NULL, with a reason in err (may be NULL), when a
 * name or label is invalid, a histogram uses the label "le", buckets are not finite and
 * strictly increasing, or the name exists with another type, labels or buckets. Strings and
 * arrays are copied. Histograms with nbuckets == 0 get SL_M_LATENCY_BUCKETS; a trailing
 * +Inf bound is accepted and ignored (it is always implicit). */
sl_mfamily_t *sl_metrics_family(sl_metrics_t *m, const char *name, const char *help,
                                sl_metric_type_t type, const char *const *label_names,
                                size_t nlabels, const double *buckets, size_t nbuckets,
                                char *err, size_t errlen);

/* Sets how render merges this gauge family's series across registries; SL_M_MERGE_SUM is the
 * default. Ignored for counters and histograms. */
void sl_mfamily_set_merge(sl_mfamily_t *f, sl_metric_merge_t how);

/* Returns the series for `label_values` (the family's nlabels strings, in label-name order;
 * NULL entries mean ""; the array may be NULL when the family has no labels) with a new
 * reference, creating it at zero if needed. Returns NULL only when the family already holds
 * SL_M_MAX_SERIES series. */
sl_mseries_t *sl_mfamily_series(sl_mfamily_t *f, const char *const *label_values);
/* Reads the current value of an existing counter or gauge series (no series is created).
 * Returns false when the family or series does not exist. Any thread. */
bool sl_metrics_value(sl_metrics_t *m, const char *name, const char *const *label_values,
                      double *out);
/* Another reference to a series the caller already holds. */
void sl_mseries_acquire(sl_mseries_t *s);
/* Drops a reference; the last one removes the series from the registry and frees it. NULL is
 * ignored. */
void sl_mseries_release(sl_mseries_t *s);

/* Called with the registry lock held at the start of each render, on the rendering thread,
 * to set gauges from live state (e.g. endpoint inflight) so the request path does not keep
 * duplicate gauges. It may create and release series. The gauges it sets must be written by
 * nobody else (they have a single writer: the collector). When it reads state owned by another
 * thread, that thread must not free the state without holding sl_metrics_lock. One
 * collector per registry; fn == NULL removes it. */
void sl_metrics_set_collector(sl_metrics_t *m, void (*fn)(void *ud, sl_metrics_t *m), void *ud);
/* The registry's structure lock (recursive), for owners that free state a collector reads. */
void sl_metrics_lock(sl_metrics_t *m);
void sl_metrics_unlock(sl_metrics_t *m);

/* Appends the Prometheus text exposition (format 0.0.4) of the sum of `regs` to `out`:
 * families sorted by name, each with # HELP and # TYPE, series in creation order (first
 * registry first); histograms as cumulative _bucket{le=...} lines ending with +Inf, then
 * _sum and _count. A family whose definition differs between registries is taken from the
 * first registry that has it; the others' are skipped. Families without series are omitted.
 * NULL entries in regs are skipped. */
void sl_metrics_render(sl_metrics_t *const *regs, size_t nregs, sl_buf_t *out);

/* The same without running the collectors: for rendering on another thread after the owner
 * ran them itself with sl_metrics_collect (collectors read the owner's live state). */
void sl_metrics_render_opts(sl_metrics_t *const *regs, size_t nregs, sl_buf_t *out,
                            bool run_collectors);
void sl_metrics_collect(sl_metrics_t *m);

/* Metric names: [a-zA-Z_][a-zA-Z0-9_]* (colons are legal in Prometheus but reserved for
 * recording rules, so an exporter does not use them). Label names: [a-zA-Z_][a-zA-Z0-9_]*,
 * not starting with "__" (reserved). */
bool sl_metrics_valid_name(const char *name);
bool sl_metrics_valid_label(const char *name);

/* Hot-path updates: the owner thread only, handles from sl_mfamily_series. */

/* Adds v to a counter (v >= 0; not checked here) or to a gauge (any sign). */
static inline void sl_m_inc(sl_mseries_t *s, double v) {
  double n = s->value + v;
  __atomic_store(&s->value, &n, __ATOMIC_RELAXED);
}
/* Sets a gauge. */
static inline void sl_m_set(sl_mseries_t *s, double v) {
  __atomic_store(&s->value, &v, __ATOMIC_RELAXED);
}
/* Records one observation in a histogram. */
static inline void sl_m_observe(sl_mseries_t *s, double v) {
  uint32_t i = 0;
  while (i < s->nbounds && !(v <= s->bounds[i])) i++;
  __atomic_store_n(&s->counts[i], s->counts[i] + 1, __ATOMIC_RELAXED);
  double sum = s->sum + v;
  __atomic_store(&s->sum, &sum, __ATOMIC_RELAXED);
}
/* A counter's or gauge's current value; safe from any thread. */
static inline double sl_m_get(const sl_mseries_t *s) {
  double v;
  __atomic_load(&s->value, &v, __ATOMIC_RELAXED);
  return v;
}

/* Out-of-line forms of the updates, for LuaJIT's FFI (policies) and cold callers. */
void sl_mseries_inc(sl_mseries_t *s, double v);
void sl_mseries_set(sl_mseries_t *s, double v);
void sl_mseries_observe(sl_mseries_t *s, double v);
sl_metric_type_t sl_mseries_type(const sl_mseries_t *s);

#endif
