/* Internal definitions shared by every module of libsluice. Not part of the public API. */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>

#define SL_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define SL_MIN(a, b) ((a) < (b) ? (a) : (b))
#define SL_MAX(a, b) ((a) > (b) ? (a) : (b))
#define SL_CONTAINER_OF(ptr, type, field) ((type *)((char *)(ptr) - offsetof(type, field)))
#define SL_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define SL_LIKELY(x) __builtin_expect(!!(x), 1)

/* Allocation failure is not recoverable in a proxy that has promised memory bounds elsewhere;
 * these abort with a message instead of returning NULL. */
void *sl_malloc(size_t n);
void *sl_calloc(size_t n, size_t size);
void *sl_realloc(void *p, size_t n);
char *sl_strndup(const char *s, size_t n);
char *sl_strdup(const char *s);

/* Case-insensitive comparison of a length-delimited string with a NUL-terminated literal. */
bool sl_strieq(const char *s, size_t len, const char *lit);

/* Doubly-linked intrusive list (circular, sentinel head). */
typedef struct sl_list {
  struct sl_list *prev, *next;
} sl_list_t;

static inline void sl_list_init(sl_list_t *h) { h->prev = h->next = h; }
static inline bool sl_list_empty(const sl_list_t *h) { return h->next == h; }
static inline void sl_list_insert_tail(sl_list_t *h, sl_list_t *n) {
  n->prev = h->prev;
  n->next = h;
  h->prev->next = n;
  h->prev = n;
}
static inline void sl_list_insert_head(sl_list_t *h, sl_list_t *n) {
  n->next = h->next;
  n->prev = h;
  h->next->prev = n;
  h->next = n;
}
static inline void sl_list_remove(sl_list_t *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = n;
}

#endif
