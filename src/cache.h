/* Response cache: a per-worker (single-threaded, lock-free) store of complete responses keyed by
 * a SHA-256 of the request's key material. Hash table + LRU + per-entry TTL, bounded by bytes:
 * the accounted size of the entries in the table never exceeds max_bytes. Entries are
 * refcounted, so one evicted, purged or replaced while a reader replays it stays valid until
 * the reader's unref. Times are caller-supplied milliseconds (uv_now), which keeps it testable. */
#ifndef SL_CACHE_H
#define SL_CACHE_H

#include "common.h"

struct evp_md_ctx_st;

typedef struct {
  uint8_t b[32];
} sl_cache_key_t;

/* Key builder. Each field is hashed as (tag length, tag, value length, value), so field
 * boundaries and names both matter: ("ab","c") != ("a","bc"). init allocates; final releases,
 * so every init must be paired with a final. */
typedef struct sl_cache_keyb {
  struct evp_md_ctx_st *md;
} sl_cache_keyb_t;

void sl_cache_keyb_init(sl_cache_keyb_t *kb);
/* `tag` is a NUL-terminated field name ("method", "host", "auth", "hdr:x-foo", "body"). */
void sl_cache_keyb_add(sl_cache_keyb_t *kb, const char *tag, const void *p, size_t n);
void sl_cache_keyb_final(sl_cache_keyb_t *kb, sl_cache_key_t *out);
/* Lowercase hex, NUL-terminated. */
void sl_cache_key_hex(const sl_cache_key_t *k, char out[65]);
/* Parses exactly 64 hex digits (either case). Returns 0, or -1 if malformed. */
int sl_cache_key_parse_hex(const char *hex, size_t n, sl_cache_key_t *out);

typedef struct sl_cache sl_cache_t;
typedef struct sl_cache_entry sl_cache_entry_t;

/* max_entry_bytes 0 means max_bytes / 8; it is clamped to max_bytes. */
sl_cache_t *sl_cache_new(size_t max_bytes, size_t max_entry_bytes);
/* New bounds (on reload); evicts LRU entries down to the new max_bytes at once. */
void sl_cache_set_limits(sl_cache_t *c, size_t max_bytes, size_t max_entry_bytes);
/* Drops the table's references; entries still referenced by readers stay valid until unref. */
void sl_cache_free(sl_cache_t *c);

/* Starts an entry for a response streaming in; invisible to lookups until committed. The
 * caller owns the one reference. `c` is only read for its current max entry size (the entry
 * keeps no pointer to it); `tag` (route name, may be NULL) is copied, for purge by tag. */
sl_cache_entry_t *sl_cache_entry_new(sl_cache_t *c, const sl_cache_key_t *key, const char *tag);
/* Stores the status and the serialized header lines ("Name: value\r\n"...) as they will be
 * replayed. Replaces any previous head. */
void sl_cache_entry_set_head(sl_cache_entry_t *e, uint16_t status, const char *head, size_t len);
/* Appends one body chunk as it arrived; each append stays its own chunk so a streamed (SSE)
 * response replays with the same framing. Returns false once the entry is over the max entry
 * size (the data is then not stored; the caller should abandon the entry). */
bool sl_cache_entry_append(sl_cache_entry_t *e, const char *data, size_t len);
/* Makes the entry visible until now_ms + ttl_ms, replacing any entry with the same key and
 * evicting LRU entries to make room. Consumes the caller's reference. Returns 0, or -1 when
 * refused (over a size limit, or ttl_ms == 0): the entry is then freed and any older entry
 * under the same key is left in place. */
int sl_cache_commit(sl_cache_t *c, sl_cache_entry_t *e, uint64_t now_ms, uint64_t ttl_ms);
/* Drops an uncommitted entry (aborted or failed response). Same as unref. */
void sl_cache_entry_abandon(sl_cache_entry_t *e);

/* Returns a new reference to a live entry (moved to the LRU head; counted as a hit), or NULL
 * (a miss; an expired entry found is removed and counted as expired). */
sl_cache_entry_t *sl_cache_lookup(sl_cache_t *c, const sl_cache_key_t *key, uint64_t now_ms);
sl_cache_entry_t *sl_cache_entry_ref(sl_cache_entry_t *e);
/* Releases a reference; the last one frees the entry. NULL is ignored. */
void sl_cache_entry_unref(sl_cache_entry_t *e);

/* Read access for replay. Pointers stay valid while the caller holds its reference. */
uint16_t sl_cache_entry_status(const sl_cache_entry_t *e);
/* Caller-defined bits stored with the entry (how the body was framed, for replay). */
void sl_cache_entry_set_flags(sl_cache_entry_t *e, uint32_t flags);
uint32_t sl_cache_entry_flags(const sl_cache_entry_t *e);
const char *sl_cache_entry_head(const sl_cache_entry_t *e, size_t *len);
size_t sl_cache_entry_body_len(const sl_cache_entry_t *e);
size_t sl_cache_entry_nchunks(const sl_cache_entry_t *e);
/* Chunk i (< nchunks) as it was appended. */
const char *sl_cache_entry_chunk(const sl_cache_entry_t *e, size_t i, size_t *len);
/* Time since commit, and time until expiry (0 once expired); both 0 before commit. */
uint64_t sl_cache_entry_age_ms(const sl_cache_entry_t *e, uint64_t now_ms);
uint64_t sl_cache_entry_ttl_left_ms(const sl_cache_entry_t *e, uint64_t now_ms);
/* The bytes this entry counts against max_bytes (struct, tag, head, body, chunk table and a
 * fixed per-entry overhead for the table slot and allocator headers). */
size_t sl_cache_entry_bytes(const sl_cache_entry_t *e);

/* Purges return the number of entries removed from the table. A NULL tag matches nothing. */
size_t sl_cache_purge_key(sl_cache_t *c, const sl_cache_key_t *key);
size_t sl_cache_purge_tag(sl_cache_t *c, const char *tag);
size_t sl_cache_purge_all(sl_cache_t *c);
/* Removes every expired entry (O(entries); for a periodic timer, since expired entries that are
 * never looked up otherwise wait for LRU eviction). Returns the number removed. */
size_t sl_cache_sweep(sl_cache_t *c, uint64_t now_ms);

typedef struct {
  uint64_t entries, bytes, max_bytes, hits, misses, inserts, evictions, expired, refused, purged;
} sl_cache_stats_t;
void sl_cache_stats(const sl_cache_t *c, sl_cache_stats_t *out);

/* Tests only: walks the table and LRU and checks counts, byte sum and linkage. Returns 0 when
 * consistent, else a negative step number. */
int sl_cache__check(const sl_cache_t *c);

#endif
