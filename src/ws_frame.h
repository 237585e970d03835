/* WebSocket frame headers (RFC 6455 section 5.2): parsing and encoding, nothing else. The relay
 * (ws.c) forwards payload bytes as they are and only needs to find frame boundaries, check
 * each header, and write the few frames the gateway originates itself. */
#ifndef SL_WS_FRAME_H
#define SL_WS_FRAME_H

#include "common.h"

enum {
  SL_WSF_CONT = 0x0,
  SL_WSF_TEXT = 0x1,
  SL_WSF_BINARY = 0x2,
  SL_WSF_CLOSE = 0x8,
  SL_WSF_PING = 0x9,
  SL_WSF_PONG = 0xA,
};
#define SL_WSF_MAX_HEADER 14
#define SL_WSF_MAX_CONTROL_PAYLOAD 125

typedef struct sl_wsf_hdr {
  uint64_t len; /* payload length */
  uint8_t opcode;
  uint8_t rsv;  /* RSV1-3 as bits 2..0 */
  uint8_t hlen; /* header length, 2..14 */
  bool fin;
  bool masked;
  uint8_t mask[4];
} sl_wsf_hdr_t;

/* Parses the header at p[0..n). Returns its length once complete (h filled), 0 when more bytes
 * are needed, or -1 when the length is not minimally encoded or has its top bit set. */
int sl_wsf_parse(const uint8_t *p, size_t n, sl_wsf_hdr_t *h);

/* Writes a header for a `len`-byte payload; mask = NULL for an unmasked frame. Returns the
 * header length. */
size_t sl_wsf_encode(uint8_t *out, uint8_t opcode, bool fin, uint64_t len, const uint8_t *mask);

/* XORs p[0..n) with the mask, `off` being the position of p[0] within the payload. */
void sl_wsf_mask(uint8_t *p, size_t n, const uint8_t mask[4], uint64_t off);

static inline bool sl_wsf_is_control(uint8_t opcode) { return opcode & 0x8; }
static inline bool sl_wsf_known_opcode(uint8_t op) {
  return op <= SL_WSF_BINARY || (op >= SL_WSF_CLOSE && op <= SL_WSF_PONG);
}
/* Close codes a peer may send (RFC 6455 7.4 and the IANA registry; 3000-4999 for
 * applications). */
bool sl_wsf_valid_close_code(unsigned code);

#endif
