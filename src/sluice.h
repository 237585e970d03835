/* sluice — a scriptable gateway for AI inference traffic. This is the embedding API: run a
 * gateway on the host's libuv loop, with a config from a file.
 *
 * All functions must be called on the loop's thread. Errors are negative codes; use
 * sluice_strerror for the code and sluice_last_error for the detailed message (file, line,
 * key) of the last failure on an instance. */
#ifndef SLUICE_H
#define SLUICE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct lua_State;

#ifdef __cplusplus
extern "C" {
#endif

#define SLUICE_ECONFIG (-30001) /* config file missing, unreadable or invalid */
#define SLUICE_EPOLICY (-30002) /* a policy failed to load */
#define SLUICE_ELISTEN (-30003) /* a listener could not be opened */
#define SLUICE_ESTATE (-30004)  /* call not valid in the instance's current state */

typedef struct sluice sluice_t;

/* Creates an instance on `loop` (not owned). The host must ignore SIGPIPE
 * (signal(SIGPIPE, SIG_IGN)), as for any libuv program that writes to sockets: a peer that
 * resets its connection during a write would otherwise kill the process. */
int sluice_new(uv_loop_t *loop, sluice_t **out);

/* Loads and validates a config file and the policies it names. Must precede sluice_start. */
int sluice_load_file(sluice_t *s, const char *path);
/* The same with the config given as Lua source (a chunk returning the config table). `name`
 * stands for the file in error messages; relative paths in it (policies, certificates, the
 * access log) are relative to `dir` (NULL: the working directory). No file is watched; the
 * policies directory still is unless watch = false. */
int sluice_load_string(sluice_t *s, const char *name, const char *source, size_t len,
                       const char *dir);
/* Reloads from new Lua source (for instances loaded with sluice_load_string). */
int sluice_reload_string(sluice_t *s, const char *source, size_t len);

/* A C function policies can call as sluice.ext.<name>(...). It follows the Lua C API
 * (lua_CFunction from LuaJIT's lua.h); sluice_ext_data(L) returns the `data` given at
 * registration. Register before loading a config. With workers > 1 it is called from every
 * worker thread, possibly at once: it must be thread-safe. Raising a Lua error from it fails
 * the calling policy like any policy error. */
typedef int (*sluice_ext_fn)(struct lua_State *L);
int sluice_register(sluice_t *s, const char *name, sluice_ext_fn fn, void *data);
void *sluice_ext_data(struct lua_State *L);

/* Reloads the config file and its policies: builds a new generation and swaps it in only when
 * everything loaded. In-flight requests finish on the generation they started with. On failure
 * the running generation stays and sluice_last_error says why. */
int sluice_reload(sluice_t *s);
/* Id of the current generation (1 after the first load, +1 per successful reload). */
uint64_t sluice_generation(const sluice_t *s);

/* Starts listening (and watching the config and policies for changes, unless watch = false). */
int sluice_start(sluice_t *s);

/* Graceful stop of a started instance: stops accepting, lets in-flight requests finish (up
 * to the config's limits.drain_timeout_ms), then calls `done`. The instance's handles are
 * closed by the time `done` runs; free it afterwards. An instance never started needs only
 * sluice_free. */
int sluice_stop(sluice_t *s, void (*done)(sluice_t *s, void *arg), void *arg);

/* Frees the instance. Handles it still owns are closed; run the loop once more afterwards to
 * let their close callbacks complete. */
void sluice_free(sluice_t *s);

/* Validates a config file and every policy it names without listening. Returns 0, or an error
 * with the message written into err. */
int sluice_check_file(const char *path, char *err, size_t errlen);

const char *sluice_strerror(int err);
const char *sluice_last_error(const sluice_t *s);
/* Port of the first listener once started (useful with port 0). */
uint16_t sluice_port(const sluice_t *s);
const char *sluice_version(void);

/* Log verbosity for the process: 0 error, 1 warn, 2 info, 3 debug. Overrides the config. */
void sluice_set_log_level(int level);

#ifdef __cplusplus
}
#endif
#endif
