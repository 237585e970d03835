/* Access log writer: lines are appended to a memory buffer and written by libuv's thread pool
 * (uv_fs_write), in batches, so logging never blocks the event loop. When the disk falls so
 * far behind that the buffer would pass its cap, lines are dropped and counted instead. */
#ifndef SL_ACCESS_LOG_H
#define SL_ACCESS_LOG_H

#include "buf.h"

#include <uv.h>

typedef struct sl_access_log sl_access_log_t;

/* Opens `path` for appending (NULL or "-": standard output). Returns NULL with err filled. */
sl_access_log_t *sl_access_log_open(uv_loop_t *loop, const char *path, char *err, size_t errlen);
/* The buffer to append one complete line to; call sl_access_log_commit after. */
sl_buf_t *sl_access_log_buf(sl_access_log_t *l);
void sl_access_log_commit(sl_access_log_t *l);
const char *sl_access_log_path(const sl_access_log_t *l);
uint64_t sl_access_log_dropped(const sl_access_log_t *l);
/* Writes what is buffered (synchronously, at shutdown) and frees the log once its last
 * asynchronous write has finished. */
void sl_access_log_close(sl_access_log_t *l);

#endif
