/* ws_frame: header parsing and encoding (RFC 6455 5.2), masking, close-code validation, and an
 * oracle check of both directions against wslay's frame layer on random frames. */
#include "t.h"
#include "ws_frame.h"

#include <wslay/wslay.h>

static const uint8_t all_ops[] = {SL_WSF_CONT,  SL_WSF_TEXT, SL_WSF_BINARY,
                                  SL_WSF_CLOSE, SL_WSF_PING, SL_WSF_PONG};
static const uint64_t lens[] = {0, 1, 125, 126, 127, 65535, 65536, (1ull << 32) + 5,
                                0x7fffffffffffffffull};

/* Expected header length for a payload length and masking. */
static size_t want_hlen(uint64_t len, bool masked) {
  size_t n = len < 126 ? 2 : len <= 0xffff ? 4 : 10;
  return n + (masked ? 4 : 0);
}

static void round_trips(void) {
  const uint8_t mask[4] = {0xde, 0xad, 0xbe, 0xef};
  for (size_t o = 0; o < sizeof(all_ops); o++)
    for (size_t l = 0; l < sizeof(lens) / sizeof(lens[0]); l++)
      for (int m = 0; m < 2; m++)
        for (int fin = 0; fin < 2; fin++) {
          uint8_t buf[SL_WSF_MAX_HEADER + 4];
          memset(buf, 0xa5, sizeof(buf));
          size_t n = sl_wsf_encode(buf, all_ops[o], fin, lens[l], m ? mask : NULL);
          CHECK_EQ_INT(n, want_hlen(lens[l], m));
          CHECK(buf[n] == 0xa5); /* nothing written past the header */
          sl_wsf_hdr_t h;
          memset(&h, 0x5a, sizeof(h));
          int r = sl_wsf_parse(buf, n, &h);
          CHECK_EQ_INT(r, (int)n);
          CHECK_EQ_INT(h.hlen, n);
          CHECK(h.len == lens[l]);
          CHECK_EQ_INT(h.opcode, all_ops[o]);
          CHECK_EQ_INT(h.fin, fin);
          CHECK_EQ_INT(h.masked, m);
          CHECK_EQ_INT(h.rsv, 0);
          if (m) CHECK(memcmp(h.mask, mask, 4) == 0);
          /* Trailing bytes (the payload) do not change the parse. */
          CHECK_EQ_INT(sl_wsf_parse(buf, n + 4, &h), (int)n);
          /* Every strict prefix of the header needs more bytes. */
          for (size_t k = 0; k < n; k++) CHECK_EQ_INT(sl_wsf_parse(buf, k, &h), 0);
        }
}

static void exact_bytes(void) {
  uint8_t b[SL_WSF_MAX_HEADER];
  CHECK_EQ_INT(sl_wsf_encode(b, SL_WSF_TEXT, true, 5, NULL), 2);
  CHECK(b[0] == 0x81 && b[1] == 0x05);
  CHECK_EQ_INT(sl_wsf_encode(b, SL_WSF_BINARY, false, 126, NULL), 4);
  CHECK(b[0] == 0x02 && b[1] == 126 && b[2] == 0 && b[3] == 126);
  const uint8_t mk[4] = {1, 2, 3, 4};
  CHECK_EQ_INT(sl_wsf_encode(b, SL_WSF_CLOSE, true, 2, mk), 6);
  CHECK(b[0] == 0x88 && b[1] == 0x82 && memcmp(b + 2, mk, 4) == 0);
  CHECK_EQ_INT(sl_wsf_encode(b, SL_WSF_BINARY, true, (1ull << 32) + 5, NULL), 10);
  const uint8_t want[10] = {0x82, 127, 0, 0, 0, 1, 0, 0, 0, 5};
  CHECK(memcmp(b, want, 10) == 0);
}

static void rsv_bits_reported(void) {
  sl_wsf_hdr_t h;
  for (unsigned rsv = 0; rsv < 8; rsv++) {
    uint8_t b[2] = {(uint8_t)(0x80 | rsv << 4 | SL_WSF_TEXT), 3};
    CHECK_EQ_INT(sl_wsf_parse(b, 2, &h), 2);
    CHECK_EQ_INT(h.rsv, rsv);
    CHECK_EQ_INT(h.opcode, SL_WSF_TEXT);
    CHECK(h.fin);
  }
  /* Reserved opcodes parse (the relay rejects them), and known_opcode tells them apart. */
  for (unsigned op = 0; op < 16; op++) {
    uint8_t b[2] = {(uint8_t)(0x80 | op), 0};
    CHECK_EQ_INT(sl_wsf_parse(b, 2, &h), 2);
    CHECK_EQ_INT(h.opcode, op);
    bool known = op <= 2 || (op >= 8 && op <= 10);
    CHECK_EQ_INT(sl_wsf_known_opcode((uint8_t)op), known);
    CHECK_EQ_INT(sl_wsf_is_control((uint8_t)op), op >= 8);
  }
}

static void non_minimal_lengths_rejected(void) {
  sl_wsf_hdr_t h;
  /* 16-bit length field holding < 126 */
  for (unsigned v = 0; v < 126; v++) {
    uint8_t b[4] = {0x82, 126, 0, (uint8_t)v};
    CHECK_EQ_INT(sl_wsf_parse(b, 4, &h), -1);
  }
  uint8_t ok16[4] = {0x82, 126, 0, 126};
  CHECK_EQ_INT(sl_wsf_parse(ok16, 4, &h), 4);
  CHECK(h.len == 126);
  /* ...also when masked */
  uint8_t m16[8] = {0x82, 0x80 | 126, 0, 125, 1, 2, 3, 4};
  CHECK_EQ_INT(sl_wsf_parse(m16, 8, &h), -1);
  CHECK_EQ_INT(sl_wsf_parse(m16, 7, &h), 0); /* incomplete comes first */

  /* 64-bit length field holding <= 0xffff */
  const uint64_t small[] = {0, 1, 125, 126, 0xffff};
  for (size_t i = 0; i < sizeof(small) / sizeof(small[0]); i++) {
    uint8_t b[14] = {0x82, 127};
    for (int k = 0; k < 8; k++) b[2 + k] = (uint8_t)(small[i] >> (56 - 8 * k));
    CHECK_EQ_INT(sl_wsf_parse(b, 10, &h), -1);
    b[1] |= 0x80;
    CHECK_EQ_INT(sl_wsf_parse(b, 14, &h), -1);
  }
  uint8_t ok64[10] = {0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0};
  CHECK_EQ_INT(sl_wsf_parse(ok64, 10, &h), 10);
  CHECK(h.len == 0x10000);

  /* top bit set */
  uint8_t top[10] = {0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0};
  CHECK_EQ_INT(sl_wsf_parse(top, 10, &h), -1);
  uint8_t top2[10] = {0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  CHECK_EQ_INT(sl_wsf_parse(top2, 10, &h), -1);
  uint8_t max63[10] = {0x82, 127, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  CHECK_EQ_INT(sl_wsf_parse(max63, 10, &h), 10);
  CHECK(h.len == 0x7fffffffffffffffull);
}

static void masking_with_offsets(void) {
  const uint8_t mask[4] = {0x12, 0x34, 0x56, 0x78};
  uint8_t orig[257], once[257], parts[257];
  for (size_t i = 0; i < sizeof(orig); i++) orig[i] = (uint8_t)(i * 7 + 3);
  memcpy(once, orig, sizeof(orig));
  sl_wsf_mask(once, sizeof(once), mask, 0);
  for (size_t i = 0; i < sizeof(orig); i++) CHECK(once[i] == (orig[i] ^ mask[i % 4]));
  for (size_t cut = 0; cut <= sizeof(orig); cut++) {
    memcpy(parts, orig, sizeof(orig));
    sl_wsf_mask(parts, cut, mask, 0);
    sl_wsf_mask(parts + cut, sizeof(orig) - cut, mask, cut);
    CHECK(memcmp(parts, once, sizeof(once)) == 0);
  }
  /* three pieces, and an offset beyond 32 bits */
  memcpy(parts, orig, sizeof(orig));
  sl_wsf_mask(parts, 5, mask, 0);
  sl_wsf_mask(parts + 5, 100, mask, 5);
  sl_wsf_mask(parts + 105, 152, mask, 105);
  CHECK(memcmp(parts, once, sizeof(once)) == 0);
  uint8_t big[8] = {0};
  sl_wsf_mask(big, 8, mask, (1ull << 32) + 2);
  const uint8_t want[8] = {0x56, 0x78, 0x12, 0x34, 0x56, 0x78, 0x12, 0x34};
  CHECK(memcmp(big, want, 8) == 0);
  /* masking twice restores */
  sl_wsf_mask(once, sizeof(once), mask, 0);
  CHECK(memcmp(once, orig, sizeof(orig)) == 0);
  sl_wsf_mask(NULL, 0, mask, 0); /* zero bytes: a no-op */
}

static void close_codes(void) {
  static const struct {
    unsigned code;
    bool ok;
  } cases[] = {
      {0, false},     {999, false},  {1000, true},  {1001, true},  {1002, true},
      {1003, true},   {1004, false}, {1005, false}, {1006, false}, {1007, true},
      {1008, true},   {1010, true},  {1011, true},  {1012, true},  {1013, true},
      {1014, true},   {1015, false}, {1016, false}, {2999, false}, {3000, true},
      {4000, true},   {4999, true},  {5000, false}, {65535, false},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    bool got = sl_wsf_valid_close_code(cases[i].code);
    if (got != cases[i].ok) fprintf(stderr, "close code %u\n", cases[i].code);
    CHECK_EQ_INT(got, cases[i].ok);
  }
}

/* Oracle: wslay's frame layer ------------------------------------------------------------- */

typedef struct {
  uint8_t buf[4096];
  size_t n;
  uint8_t mask[4];
  uint64_t rng;
} capture_t;

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static ssize_t cap_send(const uint8_t *data, size_t len, int flags, void *ud) {
  (void)flags;
  capture_t *c = ud;
  if (c->n + len > sizeof(c->buf)) return -1;
  memcpy(c->buf + c->n, data, len);
  c->n += len;
  return (ssize_t)len;
}

static int cap_genmask(uint8_t *buf, size_t len, void *ud) {
  capture_t *c = ud;
  for (size_t i = 0; i < len; i++) buf[i] = (uint8_t)xorshift(&c->rng);
  if (len == 4) memcpy(c->mask, buf, 4);
  return 0;
}

static uint64_t random_len(uint64_t *s) {
  switch (xorshift(s) % 8) {
  case 0: return 0;
  case 1: return xorshift(s) % 126; /* 7-bit */
  case 2: return 125 + xorshift(s) % 3; /* the 7/16-bit boundary */
  case 3: return 126 + xorshift(s) % (0xffff - 126 + 1); /* 16-bit */
  case 4: return 0xfffe + xorshift(s) % 3; /* the 16/64-bit boundary */
  case 5: return 0x10000 + xorshift(s) % (1ull << 32); /* 64-bit */
  case 6: return (xorshift(s) >> 1) | 0x10000; /* anywhere in 63 bits */
  default: return 0x7fffffffffffffffull - xorshift(s) % 4;
  }
}

static void wslay_oracle(void) {
  capture_t cap;
  memset(&cap, 0, sizeof(cap));
  cap.rng = 0x9e3779b97f4a7c15ull;
  uint64_t s = 0x2545f4914f6cdd1dull;
  struct wslay_frame_callbacks cb = {cap_send, NULL, cap_genmask};
  uint8_t payload[64];
  int frames = 0, mismatches = 0;
  unsigned seen_hlen[15] = {0};
  for (int it = 0; it < 4000; it++) {
    uint8_t op = all_ops[xorshift(&s) % sizeof(all_ops)];
    bool ctl = sl_wsf_is_control(op);
    bool fin = ctl ? true : (xorshift(&s) & 1);
    bool masked = xorshift(&s) & 1;
    uint64_t len = ctl ? xorshift(&s) % 126 : random_len(&s);
    size_t data_len = (size_t)(len < sizeof(payload) ? len : sizeof(payload));
    for (size_t i = 0; i < data_len; i++) payload[i] = (uint8_t)xorshift(&s);

    wslay_frame_context_ptr ctx;
    if (wslay_frame_context_init(&ctx, &cb, &cap) != 0) {
      CHECK(!"wslay_frame_context_init");
      return;
    }
    cap.n = 0;
    struct wslay_frame_iocb io = {.fin = fin, .rsv = 0, .opcode = op, .payload_length = len,
                                  .mask = masked, .data = payload, .data_length = data_len};
    ssize_t sent = wslay_frame_send(ctx, &io);
    wslay_frame_context_free(ctx);
    if (sent < 0) {
      fprintf(stderr, "wslay_frame_send failed (%zd) op %u len %llu\n", sent, op,
              (unsigned long long)len);
      CHECK(sent >= 0);
      continue;
    }
    frames++;

    size_t want = want_hlen(len, masked);
    sl_wsf_hdr_t h;
    int r = sl_wsf_parse(cap.buf, cap.n, &h);
    bool ok = r == (int)want && h.hlen == want && h.len == len && h.opcode == op &&
              h.fin == fin && h.masked == masked && h.rsv == 0 &&
              (!masked || memcmp(h.mask, cap.mask, 4) == 0) && cap.n == want + (size_t)sent;
    /* Every strict prefix of wslay's header needs more bytes. */
    for (size_t k = 0; ok && k < want; k++) ok = sl_wsf_parse(cap.buf, k, &h) == 0;
    /* The payload wslay wrote unmasks (in two pieces) to what was given. */
    if (ok && sent > 0) {
      uint8_t p[sizeof(payload)];
      size_t cut = (size_t)sent / 3;
      memcpy(p, cap.buf + want, (size_t)sent);
      if (masked) {
        sl_wsf_mask(p, cut, cap.mask, 0);
        sl_wsf_mask(p + cut, (size_t)sent - cut, cap.mask, cut);
      }
      ok = memcmp(p, payload, (size_t)sent) == 0;
    }
    /* Our encoding of the same fields is byte-identical. */
    uint8_t mine[SL_WSF_MAX_HEADER];
    size_t mn = sl_wsf_encode(mine, op, fin, len, masked ? cap.mask : NULL);
    if (ok) ok = mn == want && memcmp(mine, cap.buf, want) == 0;
    if (!ok && mismatches++ < 10)
      fprintf(stderr, "oracle mismatch: op %u fin %d masked %d len %llu parse %d hlen %zu\n", op,
              fin, masked, (unsigned long long)len, r, want);
    if (ok) seen_hlen[want]++;
  }
  CHECK_EQ_INT(mismatches, 0);
  CHECK(frames >= 3900);
  /* Every header size was exercised. */
  const size_t sizes[] = {2, 4, 10, 6, 8, 14};
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) CHECK(seen_hlen[sizes[i]] > 50);
}

/* Parsing a stream of wslay-made frames fed in random pieces, the way the relay sees them,
 * recovers every frame at its boundary. */
static void wslay_stream_split(void) {
  static capture_t cap;
  memset(&cap, 0, sizeof(cap));
  cap.rng = 7;
  uint64_t s = 0x1234567;
  struct wslay_frame_callbacks cb = {cap_send, NULL, cap_genmask};
  wslay_frame_context_ptr ctx;
  CHECK(wslay_frame_context_init(&ctx, &cb, &cap) == 0);
  struct {
    uint8_t op;
    bool fin, masked;
    uint64_t len;
  } want[64];
  int nf = 0;
  uint8_t payload[300];
  for (size_t i = 0; i < sizeof(payload); i++) payload[i] = (uint8_t)i;
  while (nf < 64) {
    uint8_t op = all_ops[xorshift(&s) % sizeof(all_ops)];
    bool fin = sl_wsf_is_control(op) || (xorshift(&s) & 1);
    bool masked = xorshift(&s) & 1;
    uint64_t len = xorshift(&s) % (sl_wsf_is_control(op) ? 126 : 300);
    if (cap.n + len + 14 > sizeof(cap.buf)) break;
    struct wslay_frame_iocb io = {.fin = fin, .opcode = op, .payload_length = len,
                                  .mask = masked, .data = payload, .data_length = len};
    ssize_t sent = wslay_frame_send(ctx, &io);
    CHECK(sent == (ssize_t)len);
    want[nf].op = op;
    want[nf].fin = fin;
    want[nf].masked = masked;
    want[nf].len = len;
    nf++;
  }
  wslay_frame_context_free(ctx);
  CHECK(nf > 10);

  /* Walk the stream offering the parser only `avail` bytes at a time. */
  size_t pos = 0;
  int got = 0;
  while (pos < cap.n && got < nf) {
    sl_wsf_hdr_t h;
    size_t avail = 1;
    int r;
    while ((r = sl_wsf_parse(cap.buf + pos, avail, &h)) == 0) {
      CHECK(avail < SL_WSF_MAX_HEADER);
      if (avail >= SL_WSF_MAX_HEADER) return;
      avail += 1 + xorshift(&s) % 3;
      if (pos + avail > cap.n) avail = cap.n - pos;
    }
    CHECK(r > 0);
    if (r <= 0) return;
    CHECK_EQ_INT(h.opcode, want[got].op);
    CHECK_EQ_INT(h.fin, want[got].fin);
    CHECK_EQ_INT(h.masked, want[got].masked);
    CHECK(h.len == want[got].len);
    pos += (size_t)r + h.len;
    got++;
  }
  CHECK_EQ_INT(got, nf);
  CHECK_EQ_INT(pos, cap.n);
}

TEST_MAIN(T(round_trips), T(exact_bytes), T(rsv_bits_reported), T(non_minimal_lengths_rejected),
          T(masking_with_offsets), T(close_codes), T(wslay_oracle), T(wslay_stream_split))
