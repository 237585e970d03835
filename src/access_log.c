#include "access_log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FLUSH_BYTES (64 * 1024)      /* write as soon as this much is buffered */
#define FLUSH_MS 200                 /* ... or this long after the first unwritten line */
#define MAX_BUFFERED (8 * 1024 * 1024) /* beyond this, lines are dropped */

struct sl_access_log {
  uv_loop_t *loop;
  uv_file fd;
  bool own_fd;
  char *path;
  sl_buf_t pending; /* lines not yet handed to a write */
  sl_buf_t writing; /* the buffer of the write in flight */
  size_t line_start; /* where the line being appended starts in pending */
  uv_fs_t req;
  uv_timer_t timer;
  bool in_flight;
  bool closing;
  bool timer_closed;
  uint64_t dropped;
};

static void start_write(sl_access_log_t *l);
static void on_timer(uv_timer_t *t);

static void maybe_free(sl_access_log_t *l) {
  if (!l->closing || l->in_flight || !l->timer_closed) return;
  /* Whatever is still buffered goes out synchronously: the process is stopping. */
  for (size_t off = 0; off < l->pending.len;) {
    ssize_t n = write(l->fd, l->pending.data + off, l->pending.len - off);
    if (n <= 0) break;
    off += (size_t)n;
  }
  if (l->own_fd) close(l->fd);
  sl_buf_free(&l->pending);
  sl_buf_free(&l->writing);
  free(l->path);
  free(l);
}

static void on_written(uv_fs_t *req) {
  sl_access_log_t *l = req->data;
  ssize_t n = req->result;
  uv_fs_req_cleanup(req);
  l->in_flight = false;
  if (n > 0 && (size_t)n < l->writing.len) { /* short write: the rest goes first next time */
    sl_buf_consume(&l->writing, (size_t)n);
    sl_buf_t rest = l->writing;
    sl_buf_init(&l->writing);
    sl_buf_append(&rest, l->pending.data, l->pending.len);
    sl_buf_free(&l->pending);
    l->pending = rest;
  } else {
    l->writing.len = 0;
  }
  if (l->closing) {
    maybe_free(l);
    return;
  }
  if (l->pending.len >= FLUSH_BYTES) start_write(l);
  else if (l->pending.len) uv_timer_start(&l->timer, on_timer, FLUSH_MS, 0);
}

static void start_write(sl_access_log_t *l) {
  if (l->in_flight || !l->pending.len) return;
  sl_buf_t t = l->writing; /* swap: pending becomes the write, the old write buffer is reused */
  l->writing = l->pending;
  l->pending = t;
  l->pending.len = 0;
  l->in_flight = true;
  uv_buf_t b = uv_buf_init(l->writing.data, (unsigned)l->writing.len);
  if (uv_fs_write(l->loop, &l->req, l->fd, &b, 1, -1, on_written) != 0) {
    l->in_flight = false;
    l->writing.len = 0;
  }
}

static void on_timer(uv_timer_t *t) { start_write(t->data); }

sl_access_log_t *sl_access_log_open(uv_loop_t *loop, const char *path, char *err, size_t errlen) {
  sl_access_log_t *l = sl_calloc(1, sizeof(*l));
  l->loop = loop;
  if (!path || !strcmp(path, "-")) {
    l->fd = STDOUT_FILENO;
  } else {
    l->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (l->fd < 0) {
      snprintf(err, errlen, "access_log: cannot open %s: %s", path, strerror(errno));
      free(l);
      return NULL;
    }
    l->own_fd = true;
  }
  l->path = sl_strdup(path ? path : "-");
  l->req.data = l;
  uv_timer_init(loop, &l->timer);
  uv_unref((uv_handle_t *)&l->timer); /* the log never keeps the loop alive */
  l->timer.data = l;
  return l;
}

sl_buf_t *sl_access_log_buf(sl_access_log_t *l) {
  l->line_start = l->pending.len;
  return &l->pending;
}

void sl_access_log_commit(sl_access_log_t *l) {
  if (l->pending.len > MAX_BUFFERED) { /* the disk is not keeping up: drop, never block */
    l->pending.len = l->line_start;
    l->dropped++;
    return;
  }
  if (l->in_flight) return; /* on_written picks it up */
  if (l->pending.len >= FLUSH_BYTES) start_write(l);
  else if (!uv_is_active((uv_handle_t *)&l->timer)) uv_timer_start(&l->timer, on_timer, FLUSH_MS, 0);
}

const char *sl_access_log_path(const sl_access_log_t *l) { return l->path; }
uint64_t sl_access_log_dropped(const sl_access_log_t *l) { return l->dropped; }

static void on_timer_closed(uv_handle_t *h) {
  sl_access_log_t *l = h->data;
  l->timer_closed = true;
  maybe_free(l);
}

void sl_access_log_close(sl_access_log_t *l) {
  if (!l || l->closing) return;
  l->closing = true;
  uv_close((uv_handle_t *)&l->timer, on_timer_closed);
}
