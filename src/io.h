/* Stream writes that never block and never lose data: the bytes are written at once when the
 * socket accepts them, and only the unwritten remainder is copied and queued. */
#ifndef SL_IO_H
#define SL_IO_H

#include <uv.h>

/* Called when a queued write finished (status < 0 on error or UV_ECANCELED on close). Not
 * called for bytes written synchronously. */
typedef void (*sl_write_cb)(uv_stream_t *s, int status);

/* Returns 0 when everything was written now, 1 when some bytes were queued, or a negative
 * libuv error (the stream should then be closed). */
int sl_stream_writev(uv_stream_t *s, const uv_buf_t *bufs, unsigned nbufs, sl_write_cb cb);
int sl_stream_write(uv_stream_t *s, const char *data, size_t len, sl_write_cb cb);

/* Closes a handle unless it is already closing. */
void sl_close_handle(uv_handle_t *h, uv_close_cb cb);

#endif
