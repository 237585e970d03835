/* Per-tenant request quotas for the embedding example: a fixed window of `limit` requests per
 * `window_ms` for each tenant, kept by the host and shared by all of sluice's worker threads
 * (the functions lock). Tenants are strings; the table grows as tenants appear. */
#ifndef EMBED_QUOTA_H
#define EMBED_QUOTA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct quota quota_t;

quota_t *quota_new(uint32_t limit, uint64_t window_ms);
void quota_free(quota_t *q);
/* Takes one request from the tenant's window at time now_ms. Returns true when allowed;
 * *remaining is what is left in the window, *reset_ms the time until it refills. */
bool quota_take(quota_t *q, const char *tenant, size_t len, uint64_t now_ms, uint32_t *remaining,
                uint64_t *reset_ms);
/* Requests left in the tenant's window without taking one. */
uint32_t quota_peek(quota_t *q, const char *tenant, size_t len, uint64_t now_ms);

#endif
