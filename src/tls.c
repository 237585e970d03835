#include "tls.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A session the server issued (TLS 1.3 sends them after the handshake): keep the newest. */
static int on_new_session(SSL *ssl, SSL_SESSION *sess) {
  SSL_SESSION **store = SSL_get_app_data(ssl);
  if (!store) return 0;
  if (*store) SSL_SESSION_free(*store);
  *store = sess;
  return 1; /* we keep the reference */
}

SSL_CTX *sl_tls_client_ctx(const char *ca_file, bool verify, char *err, size_t errlen) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) {
    snprintf(err, errlen, "TLS: cannot create a context");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  /* Resumption: the caller keeps one session per endpoint and offers it on new connections. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  SSL_CTX_set_verify(ctx, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
  int ok = ca_file ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
                   : SSL_CTX_set_default_verify_paths(ctx);
  if (!ok) {
    unsigned long e = ERR_get_error();
    snprintf(err, errlen, "TLS: cannot load CA certificates%s%s: %s", ca_file ? " from " : "",
             ca_file ? ca_file : "", e ? ERR_reason_error_string(e) : "unknown error");
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                   const unsigned char *in, unsigned int inlen, void *arg) {
  static const unsigned char h11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  (void)ssl;
  (void)arg;
  if (SSL_select_next_proto((unsigned char **)out, outlen, h11, sizeof(h11), in, inlen) ==
      OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_OK;
  return SSL_TLSEXT_ERR_NOACK; /* no common protocol: go on without ALPN (HTTP/1.1 anyway) */
}

SSL_CTX *sl_tls_server_ctx(const char *cert_file, const char *key_file, char *err, size_t errlen) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) {
    snprintf(err, errlen, "TLS: cannot create a context");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  static const unsigned char sid[] = "sluice";
  SSL_CTX_set_session_id_context(ctx, sid, sizeof(sid) - 1);
  SSL_CTX_set_alpn_select_cb(ctx, on_alpn, NULL);
  const char *what = NULL;
  if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) what = "certificate";
  else if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) what = "key";
  else if (SSL_CTX_check_private_key(ctx) != 1) what = "key (it does not match the certificate)";
  if (what) {
    unsigned long e = ERR_get_error();
    snprintf(err, errlen, "TLS: cannot load the %s from %s: %s", what,
             strncmp(what, "certificate", 11) == 0 ? cert_file : key_file,
             e ? ERR_reason_error_string(e) : "invalid");
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

static sl_tls_t *tls_new(SSL_CTX *ctx) {
  sl_tls_t *t = sl_calloc(1, sizeof(*t));
  t->ssl = SSL_new(ctx);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio) {
    if (t->ssl) SSL_free(t->ssl);
    BIO_free(t->rbio);
    BIO_free(t->wbio);
    free(t);
    return NULL;
  }
  BIO_set_mem_eof_return(t->rbio, -1); /* empty means "want more", not EOF */
  SSL_set_bio(t->ssl, t->rbio, t->wbio); /* the SSL owns both BIOs now */
  return t;
}

sl_tls_t *sl_tls_server_new(SSL_CTX *ctx) {
  sl_tls_t *t = tls_new(ctx);
  if (t) SSL_set_accept_state(t->ssl);
  return t;
}

/* OpenSSL's error queue is per thread and SSL_get_error() looks at it first: an error left
 * by one connection would make the next connection's harmless WANT_READ read as a failure.
 * Every SSL_* call therefore starts with an empty queue (as nginx does). */
static void clear_errors(void) { ERR_clear_error(); }

void sl_tls_shutdown(sl_tls_t *t) {
  if (!t->handshake_done || t->failed) return;
  clear_errors();
  SSL_shutdown(t->ssl);
}

static bool is_ip(const char *host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

sl_tls_t *sl_tls_client_new(SSL_CTX *ctx, const char *host, SSL_SESSION **store) {
  sl_tls_t *t = tls_new(ctx);
  if (!t) return NULL;
  SSL_set_connect_state(t->ssl);
  if (is_ip(host)) {
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), host);
  } else {
    SSL_set_tlsext_host_name(t->ssl, host);
    SSL_set1_host(t->ssl, host);
  }
  SSL_set_app_data(t->ssl, store);
  if (store && *store) SSL_set_session(t->ssl, *store);
  return t;
}

void sl_tls_free(sl_tls_t *t) {
  if (!t) return;
  /* A connection closed without close_notify would mark its session unresumable; one that
   * worked is just done, so its session stays good for the next connection. */
  if (t->handshake_done && !t->failed) SSL_set_shutdown(t->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  SSL_free(t->ssl);
  free(t);
}

void sl_tls_feed(sl_tls_t *t, const char *data, size_t n) {
  if (n) BIO_write(t->rbio, data, (int)n);
}

int sl_tls_handshake(sl_tls_t *t) {
  if (t->handshake_done) return SL_TLS_OK;
  clear_errors();
  int rc = SSL_do_handshake(t->ssl);
  if (rc == 1) {
    t->handshake_done = true;
    return SL_TLS_OK;
  }
  int e = SSL_get_error(t->ssl, rc);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return SL_TLS_WANT;
  t->failed = true;
  return SL_TLS_ERROR;
}

int sl_tls_read(sl_tls_t *t, char *buf, size_t cap) {
  clear_errors();
  int n = SSL_read(t->ssl, buf, (int)cap);
  if (n > 0) return n;
  int e = SSL_get_error(t->ssl, n);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
  if (e == SSL_ERROR_ZERO_RETURN) return SL_TLS_CLOSED;
  t->failed = true;
  return SL_TLS_ERROR;
}

int sl_tls_write(sl_tls_t *t, const char *data, size_t n) {
  clear_errors();
  while (n) {
    int w = SSL_write(t->ssl, data, (int)SL_MIN(n, (size_t)(1 << 30)));
    if (w <= 0) return SL_TLS_ERROR; /* memory BIOs never block a write */
    data += w;
    n -= (size_t)w;
  }
  return 0;
}

int sl_tls_send(sl_tls_t *t, uv_stream_t *s, sl_write_cb cb) {
  char chunk[16 * 1024]; /* sl_stream_write copies only what the socket does not take */
  int n;
  while ((n = BIO_read(t->wbio, chunk, sizeof(chunk))) > 0) {
    int rc = sl_stream_write(s, chunk, (size_t)n, cb);
    if (rc < 0) return rc;
  }
  return 0;
}

int sl_tls_writev(sl_tls_t *t, uv_stream_t *s, const uv_buf_t *bufs, unsigned n, sl_write_cb cb) {
  for (unsigned i = 0; i < n; i++)
    if (sl_tls_write(t, bufs[i].base, bufs[i].len) != 0) return UV_EPROTO;
  return sl_tls_send(t, s, cb);
}

void sl_tls_error(sl_tls_t *t, char *err, size_t errlen) {
  long v = SSL_get_verify_result(t->ssl);
  if (v != X509_V_OK) {
    snprintf(err, errlen, "certificate verify failed: %s", X509_verify_cert_error_string(v));
    ERR_clear_error();
    return;
  }
  unsigned long e = ERR_get_error();
  char buf[256];
  if (e) ERR_error_string_n(e, buf, sizeof(buf));
  snprintf(err, errlen, "TLS error: %s", e ? buf : "handshake failed");
  ERR_clear_error();
}
