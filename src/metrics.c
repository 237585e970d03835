#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

const double SL_M_LATENCY_BUCKETS[SL_M_LATENCY_NBUCKETS] = SL_M_LATENCY_BUCKETS_INIT;

struct sl_metrics {
  pthread_mutex_t lock;
  sl_mfamily_t **fams; /* sorted by name */
  size_t nfams, capfams;
  void (*collect)(void *ud, sl_metrics_t *m);
  void *collect_ud;
};

struct sl_metric_family {
  sl_metrics_t *reg;
  char *name;
  char *help;
  sl_metric_type_t type;
  sl_metric_merge_t merge;
  char **labels;
  size_t nlabels;
  double *bounds;
  size_t nbounds;
  sl_list_t series; /* creation order */
  size_t nseries;
  sl_mseries_t **tab; /* hash table of series by rendered labels; size a power of two */
  size_t tabsize;
};

static const char *const type_names[] = {"counter", "gauge", "histogram"};

static void seterr(char *err, size_t errlen, const char *fmt, const char *arg) {
  if (err && errlen) snprintf(err, errlen, fmt, arg);
}

/* ---- names ------------------------------------------------------------------------------ */

static bool ident(const char *s) {
  if (!s || !*s) return false;
  for (const char *p = s; *p; p++) {
    char c = *p;
    bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(p > s && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool sl_metrics_valid_name(const char *name) { return ident(name); }

bool sl_metrics_valid_label(const char *name) {
  return ident(name) && !(name[0] == '_' && name[1] == '_');
}

/* ---- registry --------------------------------------------------------------------------- */

sl_metrics_t *sl_metrics_new(void) {
  sl_metrics_t *m = sl_calloc(1, sizeof(*m));
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
  pthread_mutex_init(&m->lock, &attr);
  pthread_mutexattr_destroy(&attr);
  return m;
}

static void series_free(sl_mseries_t *s) {
  free(s->labels);
  free(s);
}

static void family_free(sl_mfamily_t *f) {
  while (!sl_list_empty(&f->series)) {
    sl_mseries_t *s = SL_CONTAINER_OF(f->series.next, sl_mseries_t, link);
    sl_list_remove(&s->link);
    series_free(s);
  }
  for (size_t i = 0; i < f->nlabels; i++) free(f->labels[i]);
  free(f->labels);
  free(f->bounds);
  free(f->tab);
  free(f->name);
  free(f->help);
  free(f);
}

void sl_metrics_free(sl_metrics_t *m) {
  if (!m) return;
  for (size_t i = 0; i < m->nfams; i++) family_free(m->fams[i]);
  free(m->fams);
  pthread_mutex_destroy(&m->lock);
  free(m);
}

void sl_metrics_lock(sl_metrics_t *m) { pthread_mutex_lock(&m->lock); }
void sl_metrics_unlock(sl_metrics_t *m) { pthread_mutex_unlock(&m->lock); }

void sl_metrics_set_collector(sl_metrics_t *m, void (*fn)(void *ud, sl_metrics_t *m), void *ud) {
  sl_metrics_lock(m);
  m->collect = fn;
  m->collect_ud = fn ? ud : NULL;
  sl_metrics_unlock(m);
}

/* Index of `name` in m->fams, or of where it would be inserted (*found = false). */
static size_t family_find(const sl_metrics_t *m, const char *name, bool *found) {
  size_t lo = 0, hi = m->nfams;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(m->fams[mid]->name, name);
    if (c == 0) {
      *found = true;
      return mid;
    }
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  *found = false;
  return lo;
}

static bool same_definition(const sl_mfamily_t *f, sl_metric_type_t type,
                            const char *const *labels, size_t nlabels, const double *bounds,
                            size_t nbounds) {
  if (f->type != type || f->nlabels != nlabels) return false;
  for (size_t i = 0; i < nlabels; i++)
    if (strcmp(f->labels[i], labels[i]) != 0) return false;
  if (type != SL_M_HISTOGRAM) return true;
  if (f->nbounds != nbounds) return false;
  for (size_t i = 0; i < nbounds; i++)
    if (f->bounds[i] != bounds[i]) return false;
  return true;
}

sl_mfamily_t *sl_metrics_family(sl_metrics_t *m, const char *name, const char *help,
                                sl_metric_type_t type, const char *const *label_names,
                                size_t nlabels, const double *buckets, size_t nbuckets,
                                char *err, size_t errlen) {
  if (!sl_metrics_valid_name(name)) {
    seterr(err, errlen, "invalid metric name \"%s\"", name ? name : "");
    return NULL;
  }
  if (type != SL_M_COUNTER && type != SL_M_GAUGE && type != SL_M_HISTOGRAM) {
    seterr(err, errlen, "metric %s: unknown type", name);
    return NULL;
  }
  for (size_t i = 0; i < nlabels; i++) {
    if (!sl_metrics_valid_label(label_names[i])) {
      seterr(err, errlen, "invalid label name \"%s\"", label_names[i] ? label_names[i] : "");
      return NULL;
    }
    if (type == SL_M_HISTOGRAM && strcmp(label_names[i], "le") == 0) {
      seterr(err, errlen, "metric %s: a histogram cannot have the label \"le\"", name);
      return NULL;
    }
    for (size_t j = 0; j < i; j++)
      if (strcmp(label_names[i], label_names[j]) == 0) {
        seterr(err, errlen, "duplicate label name \"%s\"", label_names[i]);
        return NULL;
      }
  }
  const double *bounds = NULL;
  size_t nbounds = 0;
  if (type == SL_M_HISTOGRAM) {
    bounds = buckets;
    nbounds = nbuckets;
    if (nbounds == 0) {
      bounds = SL_M_LATENCY_BUCKETS;
      nbounds = SL_M_LATENCY_NBUCKETS;
    } else if (isinf(bounds[nbounds - 1]) && bounds[nbounds - 1] > 0) {
      nbounds--;
    }
    if (nbounds > SL_M_MAX_BUCKETS) {
      seterr(err, errlen, "metric %s: too many buckets", name);
      return NULL;
    }
    for (size_t i = 0; i < nbounds; i++)
      if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
        seterr(err, errlen, "metric %s: buckets must be finite and strictly increasing", name);
        return NULL;
      }
  }

  sl_metrics_lock(m);
  bool found;
  size_t at = family_find(m, name, &found);
  if (found) {
    sl_mfamily_t *f = m->fams[at];
    if (!same_definition(f, type, label_names, nlabels, bounds, nbounds)) {
      seterr(err, errlen, "metric %s is already defined with another type, labels or buckets",
             name);
      f = NULL;
    }
    sl_metrics_unlock(m);
    return f;
  }

  sl_mfamily_t *f = sl_calloc(1, sizeof(*f));
  f->reg = m;
  f->name = sl_strdup(name);
  f->help = sl_strdup(help ? help : "");
  f->type = type;
  f->nlabels = nlabels;
  f->labels = sl_calloc(nlabels, sizeof(char *));
  for (size_t i = 0; i < nlabels; i++) f->labels[i] = sl_strdup(label_names[i]);
  f->nbounds = nbounds;
  f->bounds = sl_calloc(nbounds, sizeof(double));
  if (nbounds) memcpy(f->bounds, bounds, nbounds * sizeof(double));
  sl_list_init(&f->series);
  f->tabsize = 8;
  f->tab = sl_calloc(f->tabsize, sizeof(sl_mseries_t *));

  if (m->nfams == m->capfams) {
    m->capfams = m->capfams ? m->capfams * 2 : 16;
    m->fams = sl_realloc(m->fams, m->capfams * sizeof(*m->fams));
  }
  memmove(m->fams + at + 1, m->fams + at, (m->nfams - at) * sizeof(*m->fams));
  m->fams[at] = f;
  m->nfams++;
  sl_metrics_unlock(m);
  return f;
}

void sl_mfamily_set_merge(sl_mfamily_t *f, sl_metric_merge_t how) {
  sl_metrics_lock(f->reg);
  if (f->type == SL_M_GAUGE) f->merge = how;
  sl_metrics_unlock(f->reg);
}

/* ---- series ----------------------------------------------------------------------------- */

static uint64_t fnv1a(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)s[i];
    h *= 1099511628211ull;
  }
  return h;
}

/* Label values escaped as the exposition format wants: backslash, double quote, newline. */
static void append_label_value(sl_buf_t *b, const char *v) {
  for (const char *p = v; *p; p++) {
    if (*p == '\\') sl_buf_append(b, "\\\\", 2);
    else if (*p == '"') sl_buf_append(b, "\\\"", 2);
    else if (*p == '\n') sl_buf_append(b, "\\n", 2);
    else sl_buf_append(b, p, 1);
  }
}

static void table_grow(sl_mfamily_t *f) {
  size_t size = f->tabsize * 2;
  sl_mseries_t **tab = sl_calloc(size, sizeof(*tab));
  for (size_t i = 0; i < f->tabsize; i++) {
    sl_mseries_t *s = f->tab[i];
    while (s) {
      sl_mseries_t *next = s->hnext;
      size_t slot = (size_t)s->hash & (size - 1);
      s->hnext = tab[slot];
      tab[slot] = s;
      s = next;
    }
  }
  free(f->tab);
  f->tab = tab;
  f->tabsize = size;
}

bool sl_metrics_value(sl_metrics_t *m, const char *name, const char *const *label_values,
                      double *out) {
  sl_metrics_lock(m);
  bool found = false;
  size_t i = family_find(m, name, &found);
  bool ok = false;
  if (found) {
    sl_mfamily_t *f = m->fams[i];
    sl_buf_t key;
    sl_buf_init(&key);
    for (size_t j = 0; j < f->nlabels; j++) {
      if (j) sl_buf_append(&key, ",", 1);
      sl_buf_appends(&key, f->labels[j]);
      sl_buf_append(&key, "=\"", 2);
      append_label_value(&key, label_values && label_values[j] ? label_values[j] : "");
      sl_buf_append(&key, "\"", 1);
    }
    uint64_t hash = fnv1a(key.data ? key.data : "", key.len);
    for (sl_mseries_t *s = f->tab[hash & (f->tabsize - 1)]; s && !ok; s = s->hnext)
      if (s->hash == hash && s->labels_len == key.len && !memcmp(s->labels, key.data, key.len)) {
        *out = sl_m_get(s);
        ok = true;
      }
    sl_buf_free(&key);
  }
  sl_metrics_unlock(m);
  return ok;
}

sl_mseries_t *sl_mfamily_series(sl_mfamily_t *f, const char *const *label_values) {
  sl_buf_t key;
  sl_buf_init(&key);
  for (size_t i = 0; i < f->nlabels; i++) {
    const char *v = label_values && label_values[i] ? label_values[i] : "";
    if (i) sl_buf_append(&key, ",", 1);
    sl_buf_appends(&key, f->labels[i]);
    sl_buf_append(&key, "=\"", 2);
    append_label_value(&key, v);
    sl_buf_append(&key, "\"", 1);
  }
  sl_buf_append(&key, "", 1); /* NUL-terminate (an empty key included) */
  size_t klen = key.len - 1;
  uint64_t hash = fnv1a(key.data, klen);

  sl_metrics_t *m = f->reg;
  sl_metrics_lock(m);
  for (sl_mseries_t *s = f->tab[hash & (f->tabsize - 1)]; s; s = s->hnext) {
    if (s->hash == hash && s->labels_len == klen && memcmp(s->labels, key.data, klen) == 0) {
      s->refs++;
      sl_metrics_unlock(m);
      sl_buf_free(&key);
      return s;
    }
  }
  if (f->nseries >= SL_M_MAX_SERIES) {
    sl_metrics_unlock(m);
    sl_buf_free(&key);
    return NULL;
  }
  size_t ncounts = f->type == SL_M_HISTOGRAM ? f->nbounds + 1 : 0;
  sl_mseries_t *s = sl_calloc(1, sizeof(*s) + ncounts * sizeof(uint64_t));
  s->bounds = f->bounds;
  s->nbounds = (uint32_t)f->nbounds;
  s->refs = 1;
  s->family = f;
  s->labels = sl_buf_steal(&key);
  s->labels_len = klen;
  s->hash = hash;
  if (f->nseries >= f->tabsize) table_grow(f);
  size_t slot = (size_t)hash & (f->tabsize - 1);
  s->hnext = f->tab[slot];
  f->tab[slot] = s;
  sl_list_insert_tail(&f->series, &s->link);
  f->nseries++;
  sl_metrics_unlock(m);
  return s;
}

void sl_mseries_acquire(sl_mseries_t *s) {
  sl_metrics_t *m = s->family->reg;
  sl_metrics_lock(m);
  s->refs++;
  sl_metrics_unlock(m);
}

void sl_mseries_release(sl_mseries_t *s) {
  if (!s) return;
  sl_mfamily_t *f = s->family;
  sl_metrics_t *m = f->reg;
  sl_metrics_lock(m);
  if (--s->refs == 0) {
    sl_mseries_t **pp = &f->tab[s->hash & (f->tabsize - 1)];
    while (*pp != s) pp = &(*pp)->hnext;
    *pp = s->hnext;
    sl_list_remove(&s->link);
    f->nseries--;
    series_free(s);
  }
  sl_metrics_unlock(m);
}

void sl_mseries_inc(sl_mseries_t *s, double v) { sl_m_inc(s, v); }
void sl_mseries_set(sl_mseries_t *s, double v) { sl_m_set(s, v); }
void sl_mseries_observe(sl_mseries_t *s, double v) { sl_m_observe(s, v); }
sl_metric_type_t sl_mseries_type(const sl_mseries_t *s) { return s->family->type; }

/* ---- rendering -------------------------------------------------------------------------- */

/* Integers without an exponent; other values in the shortest form that reads back exactly;
 * infinities and NaN spelled as Prometheus does. */
static void append_number(sl_buf_t *b, double v) {
  if (isnan(v)) {
    sl_buf_appends(b, "NaN");
    return;
  }
  if (isinf(v)) {
    sl_buf_appends(b, v > 0 ? "+Inf" : "-Inf");
    return;
  }
  if (fabs(v) < 1e18 && v == trunc(v)) {
    if (v < 0) sl_buf_append(b, "-", 1);
    sl_buf_append_u64(b, (uint64_t)fabs(v));
    return;
  }
  char tmp[40];
  if (fabs(v) < 1e21 && v == trunc(v)) {
    snprintf(tmp, sizeof(tmp), "%.0f", v);
  } else {
    for (int prec = 15; prec <= 17; prec++) {
      snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
      if (strtod(tmp, NULL) == v) break;
    }
  }
  sl_buf_appends(b, tmp);
}

static void append_help(sl_buf_t *b, const char *help) {
  for (const char *p = help; *p; p++) {
    if (*p == '\\') sl_buf_append(b, "\\\\", 2);
    else if (*p == '\n') sl_buf_append(b, "\\n", 2);
    else sl_buf_append(b, p, 1);
  }
}

typedef struct {
  const sl_mfamily_t *f;
  size_t reg;
} famref_t;

static int famref_cmp(const void *a, const void *b) {
  const famref_t *x = a, *y = b;
  int c = strcmp(x->f->name, y->f->name);
  if (c) return c;
  return x->reg < y->reg ? -1 : x->reg > y->reg;
}

/* One output series: the sum of the same label tuple over every registry. */
typedef struct {
  const sl_mseries_t *first; /* labels come from here */
  bool seen;
  double value, sum;
  uint64_t *counts;
} acc_t;

static double load_double(const double *p) {
  double v;
  __atomic_load(p, &v, __ATOMIC_RELAXED);
  return v;
}

/* `name` + suffix + {labels[,extra]} */
static void append_sample_name(sl_buf_t *b, const sl_mfamily_t *f, const char *suffix,
                               const sl_mseries_t *s, const char *extra) {
  sl_buf_appends(b, f->name);
  sl_buf_appends(b, suffix);
  if (s->labels_len || extra) {
    sl_buf_append(b, "{", 1);
    sl_buf_append(b, s->labels, s->labels_len);
    if (extra) {
      if (s->labels_len) sl_buf_append(b, ",", 1);
      sl_buf_appends(b, extra);
    }
    sl_buf_append(b, "}", 1);
  }
  sl_buf_append(b, " ", 1);
}

static void render_group(const famref_t *refs, size_t n, sl_buf_t *out) {
  const sl_mfamily_t *base = refs[0].f;
  size_t total = 0;
  for (size_t i = 0; i < n; i++) {
    const sl_mfamily_t *f = refs[i].f;
    if (i == 0 ||
        same_definition(f, base->type, (const char *const *)base->labels, base->nlabels,
                        base->bounds, base->nbounds))
      total += f->nseries;
  }
  if (total == 0) return;

  size_t ncounts = base->type == SL_M_HISTOGRAM ? base->nbounds + 1 : 0;
  acc_t *acc = sl_calloc(total, sizeof(*acc));
  uint64_t *counts = sl_calloc(total * ncounts, sizeof(uint64_t));
  size_t tabsize = 16;
  while (tabsize < total * 2) tabsize *= 2;
  size_t *tab = sl_calloc(tabsize, sizeof(size_t)); /* acc index + 1; 0 = empty */
  size_t nacc = 0;

  for (size_t i = 0; i < n; i++) {
    const sl_mfamily_t *f = refs[i].f;
    if (i > 0 && !same_definition(f, base->type, (const char *const *)base->labels,
                                  base->nlabels, base->bounds, base->nbounds))
      continue;
    for (const sl_list_t *l = f->series.next; l != &f->series; l = l->next) {
      const sl_mseries_t *s = SL_CONTAINER_OF(l, sl_mseries_t, link);
      size_t slot = (size_t)s->hash & (tabsize - 1);
      acc_t *a = NULL;
      while (tab[slot]) {
        acc_t *c = &acc[tab[slot] - 1];
        if (c->first->hash == s->hash && c->first->labels_len == s->labels_len &&
            memcmp(c->first->labels, s->labels, s->labels_len) == 0) {
          a = c;
          break;
        }
        slot = (slot + 1) & (tabsize - 1);
      }
      if (!a) {
        a = &acc[nacc];
        a->first = s;
        a->counts = counts + nacc * ncounts;
        tab[slot] = ++nacc;
      }
      if (ncounts) {
        for (size_t k = 0; k < ncounts; k++)
          a->counts[k] += __atomic_load_n(&s->counts[k], __ATOMIC_RELAXED);
        a->sum += load_double(&s->sum);
      } else if (base->merge == SL_M_MERGE_MAX && a->seen) {
        a->value = fmax(a->value, load_double(&s->value));
      } else {
        a->value += load_double(&s->value);
      }
      a->seen = true;
    }
  }

  sl_buf_appends(out, "# HELP ");
  sl_buf_appends(out, base->name);
  sl_buf_append(out, " ", 1);
  append_help(out, base->help);
  sl_buf_appends(out, "\n# TYPE ");
  sl_buf_appends(out, base->name);
  sl_buf_append(out, " ", 1);
  sl_buf_appends(out, type_names[base->type]);
  sl_buf_append(out, "\n", 1);

  sl_buf_t le;
  sl_buf_init(&le);
  for (size_t i = 0; i < nacc; i++) {
    const acc_t *a = &acc[i];
    if (!ncounts) {
      append_sample_name(out, base, "", a->first, NULL);
      append_number(out, a->value);
      sl_buf_append(out, "\n", 1);
      continue;
    }
    uint64_t cum = 0;
    for (size_t k = 0; k < ncounts; k++) {
      cum += a->counts[k];
      le.len = 0;
      sl_buf_appends(&le, "le=\"");
      append_number(&le, k < base->nbounds ? base->bounds[k] : INFINITY);
      sl_buf_append(&le, "\"", 2); /* with the NUL */
      append_sample_name(out, base, "_bucket", a->first, le.data);
      sl_buf_append_u64(out, cum);
      sl_buf_append(out, "\n", 1);
    }
    append_sample_name(out, base, "_sum", a->first, NULL);
    append_number(out, a->sum);
    sl_buf_append(out, "\n", 1);
    append_sample_name(out, base, "_count", a->first, NULL);
    sl_buf_append_u64(out, cum);
    sl_buf_append(out, "\n", 1);
  }
  sl_buf_free(&le);
  free(tab);
  free(counts);
  free(acc);
}

void sl_metrics_collect(sl_metrics_t *m) {
  sl_metrics_lock(m);
  if (m->collect) m->collect(m->collect_ud, m);
  sl_metrics_unlock(m);
}

void sl_metrics_render(sl_metrics_t *const *regs, size_t nregs, sl_buf_t *out) {
  sl_metrics_render_opts(regs, nregs, out, true);
}

void sl_metrics_render_opts(sl_metrics_t *const *regs, size_t nregs, sl_buf_t *out,
                            bool run_collectors) {
  /* Lock every registry (in array order; owners only ever take their own lock) so series
   * cannot be freed under us, then let each collector refresh its gauges. */
  size_t nrefs = 0;
  for (size_t r = 0; r < nregs; r++) {
    if (!regs[r]) continue;
    sl_metrics_lock(regs[r]);
    if (run_collectors && regs[r]->collect) regs[r]->collect(regs[r]->collect_ud, regs[r]);
    nrefs += regs[r]->nfams;
  }
  famref_t *refs = sl_calloc(nrefs, sizeof(*refs));
  size_t k = 0;
  for (size_t r = 0; r < nregs; r++) {
    if (!regs[r]) continue;
    for (size_t i = 0; i < regs[r]->nfams; i++) refs[k++] = (famref_t){regs[r]->fams[i], r};
  }
  qsort(refs, nrefs, sizeof(*refs), famref_cmp);
  for (size_t i = 0; i < nrefs;) {
    size_t j = i + 1;
    while (j < nrefs && strcmp(refs[j].f->name, refs[i].f->name) == 0) j++;
    render_group(refs + i, j - i, out);
    i = j;
  }
  free(refs);
  for (size_t r = nregs; r-- > 0;)
    if (regs[r]) sl_metrics_unlock(regs[r]);
}
