#include "endpoint.h"

#include <openssl/ssl.h>

#include "upstream.h"
#include "worker.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>

static int resolve(sl_endpoint_t *ep, char *err, size_t errlen) {
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  char port[8];
  snprintf(port, sizeof(port), "%u", ep->port);
  /* Resolution happens when a generation is built (start-up, reload), never per request. */
  int rc = getaddrinfo(ep->host, port, &hints, &res);
  if (rc != 0 || !res) {
    snprintf(err, errlen, "%s: cannot resolve %s: %s", ep->url, ep->host, gai_strerror(rc));
    return -1;
  }
  memcpy(&ep->addr, res->ai_addr, res->ai_addrlen);
  ep->addrlen = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}

sl_endpoint_t *sl_endpoint_get(sl_worker_t *w, const char *url, const char *host, uint16_t port,
                               const char *path, bool tls, bool websocket, char *err,
                               size_t errlen) {
  for (sl_list_t *l = w->endpoints.next; l != &w->endpoints; l = l->next) {
    sl_endpoint_t *ep = SL_CONTAINER_OF(l, sl_endpoint_t, link);
    if (strcmp(ep->url, url) == 0) {
      ep->refs++;
      return ep;
    }
  }
  sl_endpoint_t *ep = sl_calloc(1, sizeof(*ep));
  ep->url = sl_strdup(url);
  ep->view.url = ep->url;
  ep->host = sl_strdup(host);
  ep->port = port;
  ep->path_prefix = sl_strdup(path ? path : "");
  ep->tls = tls;
  ep->websocket = websocket;
  bool default_port = port == (tls ? 443 : 80);
  bool v6 = strchr(host, ':') != NULL;
  size_t alen = strlen(host) + 16;
  ep->authority = sl_malloc(alen);
  if (default_port)
    snprintf(ep->authority, alen, v6 ? "[%s]" : "%s", host);
  else
    snprintf(ep->authority, alen, v6 ? "[%s]:%u" : "%s:%u", host, port);
  sl_list_init(&ep->idle);
  ep->worker = w;
  ep->view.weight = 1;
  ep->view.reported_load = -1;
  ep->max_idle = 64;
  ep->idle_timeout_ms = 60000;
  if (resolve(ep, err, errlen) != 0) {
    free(ep->url);
    free(ep->host);
    free(ep->path_prefix);
    free(ep->authority);
    free(ep);
    return NULL;
  }
  ep->refs = 1;
  sl_endpoint_update(ep);
  sl_list_insert_tail(&w->endpoints, &ep->link);
  return ep;
}

void sl_endpoint_close_idle(sl_endpoint_t *ep) {
  while (!sl_list_empty(&ep->idle)) {
    sl_upconn_t *u = SL_CONTAINER_OF(ep->idle.next, sl_upconn_t, link);
    sl_upconn_close(u);
  }
}

void sl_endpoint_unref(sl_endpoint_t *ep) {
  if (--ep->refs > 0) return;
  sl_endpoint_close_idle(ep);
  sl_list_remove(&ep->link);
  /* Busy upstream connections keep a pointer to the endpoint until they close; the endpoint is
   * freed when the last one goes (sl_upconn's close callback calls sl_endpoint_conn_gone). */
  if (ep->nconns == 0) sl_endpoint_free(ep);
}

void sl_endpoint_free(sl_endpoint_t *ep) {
  if (ep->tls_session) SSL_SESSION_free(ep->tls_session);
  if (ep->tls_ctx) SSL_CTX_free(ep->tls_ctx);
  free(ep->tls_ca);
  free(ep->url);
  free(ep->host);
  free(ep->path_prefix);
  free(ep->authority);
  free(ep);
}

void sl_endpoint_conn_gone(sl_endpoint_t *ep) {
  if (--ep->nconns == 0 && ep->refs == 0) sl_endpoint_free(ep);
}

bool sl_endpoint_has_slot(const sl_endpoint_t *ep) {
  const sl_ep_view_t *v = &ep->view;
  return v->max_inflight == 0 || v->inflight < v->max_inflight;
}

bool sl_endpoint_breaker_allows(const sl_endpoint_t *ep) {
  switch (ep->view.state) {
  case SL_EP_CLOSED: return true;
  case SL_EP_HALF_OPEN: return ep->probes < ep->probes_max;
  default: return false;
  }
}

void sl_endpoint_update(sl_endpoint_t *ep) {
  ep->view.available = sl_endpoint_breaker_allows(ep) && sl_endpoint_has_slot(ep);
}

void sl_endpoint_record_ttfb(sl_endpoint_t *ep, double ms) {
  /* EWMA with alpha 0.2: smooth enough to ignore one outlier, quick enough to follow a slowdown
   * within a handful of requests. */
  double e = ep->view.ewma_ms;
  ep->view.ewma_ms = e == 0 ? (ms > 0 ? ms : 0.001) : e + 0.2 * (ms - e);
}
