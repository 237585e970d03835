/* Admission: which endpoints may take a request now (slots under max_inflight, breaker state,
 * panic threshold, endpoints already tried by this request), the balancer call over that
 * view, the pool's bounded FIFO queue for requests that found no free slot, and the breaker
 * bookkeeping that follows each attempt. */
#ifndef SL_ADMISSION_H
#define SL_ADMISSION_H

#include "policy.h"
#include "worker.h"

struct sl_exchange;

typedef enum {
  SL_PICK_OK,    /* *ep chosen */
  SL_PICK_BUSY,  /* endpoints exist but none has a free slot: wait in the queue */
  SL_PICK_DOWN,  /* every endpoint is ejected by its breaker: fallback pool or fail fast */
  SL_PICK_ERROR, /* the balancer failed; err says how */
} sl_pick_result_t;

/* Chooses an endpoint for an attempt. Endpoints in `tried` are hidden from the balancer while
 * any untried endpoint is available. */
sl_pick_result_t sl_admission_pick(sl_worker_t *w, sl_pool_t *pool, const sl_http_req_t *req,
                                   const char *request_id, uint32_t attempt,
                                   sl_endpoint_t *const *tried, uint32_t ntried,
                                   sl_endpoint_t **ep, uint32_t *idx, char *err, size_t errlen);

/* Takes a slot on ep for an attempt (inflight, half-open probe). Returns whether the attempt is
 * a half-open probe. */
bool sl_admission_take(sl_endpoint_t *ep);
/* Gives the slot back and feeds the outcome to the pool's breaker; wakes queued requests. */
void sl_admission_release(sl_worker_t *w, sl_pool_t *pool, uint32_t idx, bool probe,
                          const sl_outcome_t *o);

/* Queues x at the tail of its pool's queue. Returns false when the queue is full. */
bool sl_admission_enqueue(sl_worker_t *w, sl_pool_t *pool, struct sl_exchange *x);
void sl_admission_dequeue(sl_pool_t *pool, struct sl_exchange *x);
/* Arranges for queued requests to be offered freed slots after this loop iteration's I/O. */
void sl_admission_wake(sl_worker_t *w);

void sl_admission_init(sl_worker_t *w);
void sl_admission_close(sl_worker_t *w);

#endif
