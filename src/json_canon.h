/* Canonical JSON, so that semantically equal request bodies give equal cache keys. Faces
 * untrusted client bodies: strict, depth-bounded, never reads past the input. */
#ifndef SL_JSON_CANON_H
#define SL_JSON_CANON_H

#include "buf.h"

#define SL_JSON_CANON_MAX_DEPTH 64

/* Appends a canonical form of the JSON text in[0..len) to `out`: no insignificant whitespace;
 * object members sorted by key (bytewise on the unescaped key); strings re-escaped one way
 * (\" \\ \b \f \n \r \t, other controls as \u00xx, everything else - valid UTF-8, "/" - as raw
 * bytes; \uXXXX escapes, surrogate pairs included, decoded to UTF-8); numbers copied verbatim;
 * true/false/null. Members of the top-level object whose key is in ignore[0..nignore) are
 * dropped. Returns 0, or -1 (and `out` left as it was) for invalid JSON under strict RFC 8259
 * (incl. invalid UTF-8 and lone surrogates), nesting deeper than SL_JSON_CANON_MAX_DEPTH, or a
 * key repeated in one object (ambiguous: the caller should fall back to the raw body). */
int sl_json_canon(const char *in, size_t len, const char *const *ignore, size_t nignore,
                  sl_buf_t *out);

#endif
