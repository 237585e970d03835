#include "io.h"

#include "common.h"

#include <stdlib.h>

typedef struct write_req {
  uv_write_t req;
  sl_write_cb cb;
  char data[];
} write_req_t;

static void on_write(uv_write_t *req, int status) {
  write_req_t *wr = (write_req_t *)req;
  sl_write_cb cb = wr->cb;
  uv_stream_t *s = req->handle;
  free(wr);
  if (cb) cb(s, status);
}

int sl_stream_writev(uv_stream_t *s, const uv_buf_t *bufs, unsigned nbufs, sl_write_cb cb) {
  size_t total = 0;
  for (unsigned i = 0; i < nbufs; i++) total += bufs[i].len;
  if (total == 0) return 0;
  if (uv_is_closing((uv_handle_t *)s)) return UV_ECANCELED;

  size_t done = 0;
  if (uv_stream_get_write_queue_size(s) == 0) {
    int n = uv_try_write(s, bufs, nbufs);
    if (n < 0 && n != UV_EAGAIN) return n;
    if (n > 0) done = (size_t)n;
    if (done == total) return 0;
  }
  write_req_t *wr = sl_malloc(sizeof(*wr) + (total - done));
  wr->cb = cb;
  size_t off = 0, skip = done;
  for (unsigned i = 0; i < nbufs; i++) {
    size_t len = bufs[i].len;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    memcpy(wr->data + off, bufs[i].base + skip, len - skip);
    off += len - skip;
    skip = 0;
  }
  uv_buf_t b = uv_buf_init(wr->data, (unsigned)off);
  int r = uv_write(&wr->req, s, &b, 1, on_write);
  if (r < 0) {
    free(wr);
    return r;
  }
  return 1;
}

int sl_stream_write(uv_stream_t *s, const char *data, size_t len, sl_write_cb cb) {
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  return sl_stream_writev(s, &b, 1, cb);
}

void sl_close_handle(uv_handle_t *h, uv_close_cb cb) {
  if (!uv_is_closing(h)) uv_close(h, cb);
}
