/* Watches the config file and the policies tree for changes (uv_fs_event on directories, so
 * editors that save by write-and-rename are seen too) and calls back once per burst of events
 * (debounced). Linux has no recursive watches: the policies directory and each of its
 * subdirectories are watched; sl_watch_refresh picks up new subdirectories. */
#ifndef SL_WATCH_H
#define SL_WATCH_H

#include <uv.h>

typedef struct sl_watch sl_watch_t;
typedef void (*sl_watch_cb)(void *arg);

sl_watch_t *sl_watch_start(uv_loop_t *loop, const char *config_file, const char *policies_dir,
                           unsigned debounce_ms, sl_watch_cb cb, void *arg);
/* Starts watching subdirectories of the policies directory that appeared since (after a
 * reload; the policies directory itself may have changed too). */
void sl_watch_refresh(sl_watch_t *w, const char *policies_dir);
/* Stops watching; memory is released once libuv has closed the handles. */
void sl_watch_stop(sl_watch_t *w);

#endif
