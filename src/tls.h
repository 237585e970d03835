/* TLS over libuv streams with OpenSSL memory BIOs: the caller feeds ciphertext from the
 * socket in; this module runs the handshake, encrypts and decrypts, and hands the engine's
 * output to the stream (sl_tls_send, sl_tls_writev). */
#ifndef SL_TLS_H
#define SL_TLS_H

#include "buf.h"
#include "io.h"

#include <openssl/ssl.h>

typedef struct sl_tls {
  SSL *ssl;
  BIO *rbio; /* ciphertext from the peer, written by sl_tls_feed */
  BIO *wbio; /* ciphertext for the peer, drained by sl_tls_send */
  bool handshake_done;
  bool failed; /* a protocol error: the session must not be resumed */
} sl_tls_t;

/* A client context: TLS 1.2+, system CA store (or `ca_file`), peer verification unless
 * `verify` is false. Returns NULL with err filled. */
SSL_CTX *sl_tls_client_ctx(const char *ca_file, bool verify, char *err, size_t errlen);

/* A server context for a listener: TLS 1.2+ with OpenSSL's default (modern) ciphers, the
 * certificate chain and key from PEM files, ALPN http/1.1, no renegotiation. Returns NULL with
 * err filled. */
SSL_CTX *sl_tls_server_ctx(const char *cert_file, const char *key_file, char *err, size_t errlen);
sl_tls_t *sl_tls_server_new(SSL_CTX *ctx);
/* Starts a close_notify (its bytes are then in the write BIO). */
void sl_tls_shutdown(sl_tls_t *t);

/* A client connection to `host` (SNI unless host is an IP address; the certificate must
 * match host when the context verifies). *store (may hold NULL) is offered for resumption,
 * and new sessions the server issues on this connection replace it (store must outlive the
 * connection). */
sl_tls_t *sl_tls_client_new(SSL_CTX *ctx, const char *host, SSL_SESSION **store);
void sl_tls_free(sl_tls_t *t);

enum { SL_TLS_OK = 0, SL_TLS_WANT = 1, SL_TLS_ERROR = -1, SL_TLS_CLOSED = -2 };

/* Hands ciphertext received from the peer to the engine. */
void sl_tls_feed(sl_tls_t *t, const char *data, size_t n);
/* Advances the handshake: SL_TLS_OK once done, SL_TLS_WANT for more peer data, or
 * SL_TLS_ERROR (reason in sl_tls_error). */
int sl_tls_handshake(sl_tls_t *t);
/* Decrypts into buf: > 0 bytes, 0 when it needs more ciphertext, SL_TLS_CLOSED on the peer's
 * close_notify, SL_TLS_ERROR on a protocol error. */
int sl_tls_read(sl_tls_t *t, char *buf, size_t cap);
/* Encrypts plaintext (the ciphertext is then in the write BIO). Returns 0 or SL_TLS_ERROR. */
int sl_tls_write(sl_tls_t *t, const char *data, size_t n);
/* Writes the ciphertext pending for the peer (handshake, records, alerts, close_notify) to s.
 * Returns 0 or a negative libuv error. */
int sl_tls_send(sl_tls_t *t, uv_stream_t *s, sl_write_cb cb);
/* Encrypts bufs and writes the records to s. Returns 0 or a negative libuv error. */
int sl_tls_writev(sl_tls_t *t, uv_stream_t *s, const uv_buf_t *bufs, unsigned n, sl_write_cb cb);
/* Why the last operation failed: the verification result when the certificate was refused,
 * else OpenSSL's error queue (cleared). Writes into err. */
void sl_tls_error(sl_tls_t *t, char *err, size_t errlen);

#endif
