#include "ws_frame.h"

int sl_wsf_parse(const uint8_t *p, size_t n, sl_wsf_hdr_t *h) {
  if (n < 2) return 0;
  size_t need = 2;
  uint64_t len = p[1] & 0x7f;
  if (len == 126) need += 2;
  else if (len == 127) need += 8;
  bool masked = p[1] & 0x80;
  if (masked) need += 4;
  if (n < need) return 0;
  if (len == 126) {
    len = (uint64_t)p[2] << 8 | p[3];
    if (len < 126) return -1;
  } else if (len == 127) {
    len = 0;
    for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
    if (len >> 63 || len <= 0xffff) return -1;
  }
  h->len = len;
  h->fin = p[0] & 0x80;
  h->rsv = (p[0] >> 4) & 0x7;
  h->opcode = p[0] & 0xf;
  h->masked = masked;
  h->hlen = (uint8_t)need;
  if (masked) memcpy(h->mask, p + need - 4, 4);
  return (int)need;
}

size_t sl_wsf_encode(uint8_t *out, uint8_t opcode, bool fin, uint64_t len, const uint8_t *mask) {
  size_t n = 2;
  out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0xf));
  uint8_t m = mask ? 0x80 : 0;
  if (len < 126) {
    out[1] = (uint8_t)(m | len);
  } else if (len <= 0xffff) {
    out[1] = m | 126;
    out[2] = (uint8_t)(len >> 8);
    out[3] = (uint8_t)len;
    n = 4;
  } else {
    out[1] = m | 127;
    for (int i = 0; i < 8; i++) out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    n = 10;
  }
  if (mask) {
    memcpy(out + n, mask, 4);
    n += 4;
  }
  return n;
}

void sl_wsf_mask(uint8_t *p, size_t n, const uint8_t mask[4], uint64_t off) {
  for (size_t i = 0; i < n; i++) p[i] ^= mask[(off + i) & 3];
}

bool sl_wsf_valid_close_code(unsigned code) {
  if (code >= 3000 && code <= 4999) return true;
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014);
}
