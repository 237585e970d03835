#include "watch.h"

#include "common.h"
#include "io.h"
#include "log.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

#define SL_WATCH_MAX 64

typedef struct watch_dir {
  uv_fs_event_t ev;
  sl_watch_t *owner;
  bool config_dir; /* only the config file's name matters here */
  char *path;
} watch_dir_t;

struct sl_watch {
  uv_loop_t *loop;
  uv_timer_t debounce;
  unsigned debounce_ms;
  sl_watch_cb cb;
  void *arg;
  char *config_name; /* basename of the config file */
  char *config_dir;
  watch_dir_t *dirs[SL_WATCH_MAX];
  unsigned ndirs;
  unsigned pending_close;
  bool stopping;
};

static void maybe_free(sl_watch_t *w) {
  if (!w->stopping || w->pending_close) return;
  free(w->config_name);
  free(w->config_dir);
  free(w);
}

static void on_dir_closed(uv_handle_t *h) {
  watch_dir_t *d = h->data;
  sl_watch_t *w = d->owner;
  free(d->path);
  free(d);
  w->pending_close--;
  maybe_free(w);
}

static void on_timer_closed(uv_handle_t *h) {
  sl_watch_t *w = h->data;
  w->pending_close--;
  maybe_free(w);
}

static void on_debounced(uv_timer_t *t) {
  sl_watch_t *w = t->data;
  w->cb(w->arg);
}

static bool ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && strcmp(s + n - m, suffix) == 0;
}

static void on_event(uv_fs_event_t *h, const char *name, int events, int status) {
  watch_dir_t *d = h->data;
  sl_watch_t *w = d->owner;
  if (status < 0 || w->stopping) return;
  if (d->config_dir ? !(name && strcmp(name, w->config_name) == 0)
                    : !(name && ends_with(name, ".lua")))
    return;
  SL_DEBUG("watch: %s changed", name);
  uv_timer_start(&w->debounce, on_debounced, w->debounce_ms, 0);
}

static void add_dir(sl_watch_t *w, const char *path, bool config_dir) {
  if (w->ndirs == SL_WATCH_MAX) {
    SL_WARN("watch: more than %d directories; %s is not watched", SL_WATCH_MAX, path);
    return;
  }
  for (unsigned i = 0; i < w->ndirs; i++)
    if (w->dirs[i]->config_dir == config_dir && strcmp(w->dirs[i]->path, path) == 0) return;
  watch_dir_t *d = sl_calloc(1, sizeof(*d));
  d->owner = w;
  d->config_dir = config_dir;
  d->path = sl_strdup(path);
  uv_fs_event_init(w->loop, &d->ev);
  d->ev.data = d;
  int rc = uv_fs_event_start(&d->ev, on_event, path, 0);
  if (rc != 0) {
    SL_WARN("watch: cannot watch %s: %s", path, uv_strerror(rc));
    w->pending_close++;
    uv_close((uv_handle_t *)&d->ev, on_dir_closed);
    return;
  }
  w->dirs[w->ndirs++] = d;
}

static void close_dirs(sl_watch_t *w) {
  for (unsigned i = 0; i < w->ndirs; i++) {
    w->pending_close++;
    uv_close((uv_handle_t *)&w->dirs[i]->ev, on_dir_closed);
  }
  w->ndirs = 0;
}

static void add_policy_dirs(sl_watch_t *w, const char *policies_dir) {
  add_dir(w, policies_dir, false);
  DIR *dir = opendir(policies_dir);
  if (!dir) return;
  struct dirent *e;
  while ((e = readdir(dir)) != NULL) {
    if (e->d_name[0] == '.') continue;
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", policies_dir, e->d_name);
    DIR *sub = opendir(path);
    if (!sub) continue;
    closedir(sub);
    add_dir(w, path, false);
  }
  closedir(dir);
}

sl_watch_t *sl_watch_start(uv_loop_t *loop, const char *config_file, const char *policies_dir,
                           unsigned debounce_ms, sl_watch_cb cb, void *arg) {
  sl_watch_t *w = sl_calloc(1, sizeof(*w));
  w->loop = loop;
  w->debounce_ms = debounce_ms;
  w->cb = cb;
  w->arg = arg;
  uv_timer_init(loop, &w->debounce);
  w->debounce.data = w;
  if (config_file) { /* NULL: a config given as a string, nothing to watch but policies */
    const char *slash = strrchr(config_file, '/');
    w->config_name = sl_strdup(slash ? slash + 1 : config_file);
    w->config_dir = slash ? sl_strndup(config_file, (size_t)(slash - config_file)) : sl_strdup(".");
    if (slash == config_file) {
      free(w->config_dir);
      w->config_dir = sl_strdup("/");
    }
    add_dir(w, w->config_dir, true);
  }
  add_policy_dirs(w, policies_dir);
  return w;
}

void sl_watch_refresh(sl_watch_t *w, const char *policies_dir) {
  /* Only adds what is new: closing and re-adding would lose events in between. */
  add_policy_dirs(w, policies_dir);
}

void sl_watch_stop(sl_watch_t *w) {
  if (!w || w->stopping) return;
  w->stopping = true;
  close_dirs(w);
  w->pending_close++;
  uv_close((uv_handle_t *)&w->debounce, on_timer_closed);
}
