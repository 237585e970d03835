/* Worker threads: with workers = N, N - 1 threads beside the host loop's worker, each with its
 * own uv loop, Lua VM, generation, endpoints, connections, cache and metrics registry, all
 * accepting on SO_REUSEPORT listeners bound to the same ports. The main thread talks to them
 * only through a mutex-guarded mailbox and a uv_async (reload, stop). */
#ifndef SL_WORKERS_H
#define SL_WORKERS_H

#include "cache.h"
#include "config.h"
#include "metrics.h"

typedef struct sl_workers sl_workers_t;

/* Starts n worker threads on cfg, listening on `ports` (one per cfg->listen entry). Returns
 * once every thread listens, or NULL with err filled (the threads started are stopped). */
struct sl_ext;
sl_workers_t *sl_workers_start(uint32_t n, sl_config_t *cfg, const uint16_t *ports,
                               const struct sl_ext *exts, size_t nexts, char *err, size_t errlen);
/* Hands every thread a new config to build and activate (asynchronously). NULL is ignored. */
void sl_workers_reload(sl_workers_t *ws, sl_config_t *cfg);
/* Purges every thread's cache (asynchronously): one key, a route's entries (tag), or all
 * (both NULL). */
void sl_workers_purge(sl_workers_t *ws, const sl_cache_key_t *key, const char *tag);
/* Asks every thread to drain and stop. NULL is ignored. */
void sl_workers_stop(sl_workers_t *ws);
/* Waits for every thread to finish and frees ws. NULL is ignored. */
void sl_workers_join(sl_workers_t *ws);
/* The threads' metrics registries (for /metrics). Returns how many were written. */
size_t sl_workers_registries(sl_workers_t *ws, sl_metrics_t **out, size_t cap);
uint32_t sl_workers_count(const sl_workers_t *ws);

#endif
