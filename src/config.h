/* Configuration as the C runtime sees it, extracted from the normalized table that
 * lua/sluice/config.lua returns. Strings are owned by the config; sl_config_free releases
 * everything. The config is immutable once loaded and shared by the workers. */
#ifndef SL_CONFIG_H
#define SL_CONFIG_H

#include "common.h"
#include "http1.h"

#include <lua.h>

typedef struct sl_endpoint_conf {
  char *url, *host, *path;
  uint16_t port;
  uint32_t weight;
  bool tls, websocket;
} sl_endpoint_conf_t;

typedef struct sl_pool_conf {
  char *name;
  char *balancer;
  sl_endpoint_conf_t *endpoints;
  uint32_t nendpoints;
  uint32_t max_inflight;
  uint32_t queue_max, queue_timeout_ms;
  uint32_t connect_timeout_ms, first_byte_timeout_ms, total_timeout_ms;
  uint32_t keepalive_max_idle, keepalive_idle_timeout_ms;
  char *fallback;
  int fallback_idx; /* -1 = none */
  bool preserve_host;
  uint64_t ws_max_message_bytes;
  uint32_t ws_idle_timeout_ms;  /* 0 = none */
  uint32_t ws_ping_interval_ms; /* 0 = no keepalive pings */
  bool websocket; /* some endpoint is ws:// or wss://: upgrades on its routes become sessions */
  char *tls_ca;   /* CA file for https/wss endpoints (resolved path), NULL = system store */
  bool tls_verify;

  bool retry_enabled;
  char *retry_policy;
  uint32_t retry_attempts;
  uint32_t retry_per_try_timeout_ms;
  uint64_t retry_max_body_bytes;
  uint8_t retry_kinds; /* SL_RETRY_* bits */
  uint8_t retry_status[25]; /* bitmap of statuses 400..599 that may be retried */

  bool breaker_enabled;
  char *breaker_policy;
  uint32_t breaker_probes;
  double breaker_max_ejected_share;
} sl_pool_conf_t;

enum { SL_RETRY_CONNECT_ERROR = 1, SL_RETRY_CONNECT_TIMEOUT = 2, SL_RETRY_RESET = 4,
       SL_RETRY_TIMEOUT = 8 };

static inline bool sl_pool_conf_retries_status(const sl_pool_conf_t *p, int status) {
  if (status < 400 || status > 599) return false;
  int i = status - 400;
  return (p->retry_status[i >> 3] >> (i & 7)) & 1;
}

/* Response caching on a route (routes[i].cache). */
typedef struct sl_route_cache_conf {
  uint32_t ttl_ms;
  uint32_t methods;       /* bit (1 << llhttp method) per cacheable method */
  uint8_t statuses[63];   /* bit per status 100..599 */
  char **key_headers;     /* lowercase names added to the key */
  uint32_t nkey_headers;
  char **json_ignore;     /* top-level JSON fields left out of the key */
  uint32_t njson_ignore;
  uint32_t coalesce_wait_ms;
  char *policy;           /* policies/cache/<name>.lua, or NULL */
  bool authorization;     /* the Authorization header is part of the key (tenant isolation) */
  bool json_canonical;
  bool stream;            /* chunked / text/event-stream responses may be stored */
  bool coalesce;
} sl_route_cache_conf_t;

static inline bool sl_route_cache_status(const sl_route_cache_conf_t *c, int status) {
  int i = status - 100;
  return i >= 0 && i < 500 && ((c->statuses[i >> 3] >> (i & 7)) & 1);
}

typedef struct sl_route_conf {
  char *path;
  char *host; /* NULL = any host; "*.example.com" matches subdomains */
  char *pool;
  uint32_t pool_idx;
  sl_route_cache_conf_t *cache; /* NULL: not cached */
  char *hook;                   /* policies/route/<hook>.lua, or NULL */
  uint64_t hook_json_max;       /* JSON bodies up to this size are decoded for the hook */
} sl_route_conf_t;

typedef struct sl_listen_conf {
  char *addr, *host;
  uint16_t port;
  char *tls_cert, *tls_key;
} sl_listen_conf_t;

typedef struct sl_config {
  uint32_t refs;      /* the gateway's current config and each generation built from it, in
                         any worker thread: changed atomically */
  char *file;         /* path as given */
  char *dir;          /* directory of the file; relative paths are resolved against it */
  char *source;       /* file contents, so every worker builds from the same bytes */
  bool from_string;   /* given by an embedding host, not read from `file` */
  size_t source_len;
  sl_listen_conf_t *listen;
  uint32_t nlisten;
  sl_listen_conf_t admin; /* admin.addr == NULL when disabled */
  uint32_t workers;
  char *policies_dir; /* absolute or relative to cwd */
  int log_level;
  char *access_log; /* NULL = off, "-" = standard output, else a file path */
  char *admin_token; /* bearer token the admin listener requires, or NULL */
  bool watch;                  /* reload on changes to the config file or policies */
  bool lua_jit;                /* compile policies (fast; runaway loops cannot be stopped) */
  uint64_t lua_budget;         /* instructions per call into a policy */
  sl_h1_limits_t limits;
  uint32_t header_timeout_ms, idle_timeout_ms, drain_timeout_ms;
  uint64_t cache_max_bytes, cache_max_entry_bytes;
  sl_pool_conf_t *pools;
  uint32_t npools;
  sl_route_conf_t *routes;
  uint32_t nroutes;
} sl_config_t;

/* Validates a config given as Lua source; `name` stands for the file in messages and relative
 * paths are resolved against `dir` (NULL: the working directory). */
sl_config_t *sl_config_load_string(const char *name, const char *source, size_t len,
                                   const char *dir, char *err, size_t errlen);
/* Reads and validates `file`. On failure returns NULL and writes "file:line: key.path: what
 * was expected" (or the Lua error) into err. */
sl_config_t *sl_config_load(const char *file, char *err, size_t errlen);
/* Runs the config source in L (sandboxed) and leaves the normalized table on the stack.
 * Returns 0, or -1 with the message in err. Used by sl_config_load and by workers that need
 * the Lua values (balancer options) in their own VM. */
int sl_config_eval(lua_State *L, const sl_config_t *cfg, char *err, size_t errlen);
/* Formats "file:line: key.path: msg", finding the line of `path` in the config source. */
void sl_config_error(lua_State *L, const sl_config_t *cfg, const char *path, const char *msg,
                     char *err, size_t errlen);
int sl_config_pool_index(const sl_config_t *cfg, const char *name);
void sl_config_free(sl_config_t *cfg);
static inline sl_config_t *sl_config_ref(sl_config_t *cfg) {
  __atomic_add_fetch(&cfg->refs, 1, __ATOMIC_RELAXED);
  return cfg;
}
static inline void sl_config_unref(sl_config_t *cfg) {
  if (cfg && __atomic_sub_fetch(&cfg->refs, 1, __ATOMIC_ACQ_REL) == 0) sl_config_free(cfg);
}

#endif
