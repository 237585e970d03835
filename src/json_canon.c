#include "json_canon.h"

#include <stdlib.h>

/* One object member as first written to out: canonical "key" at [start, kend), canonical value
 * at [kend, vend). The unescaped key (the sort order) is in the keys scratch. */
typedef struct {
  size_t start, kend, vend;
  size_t key_off, key_len;
  const char *key; /* set just before sorting; keys.data may move until then */
  bool drop;
} jc_member_t;

typedef struct {
  const char *p, *end;
  sl_buf_t *out;
  sl_buf_t str;     /* the string being decoded */
  sl_buf_t keys;    /* unescaped keys of the open objects, a stack */
  sl_buf_t tmp;     /* an object's first-pass output while it is rewritten sorted */
  jc_member_t *mem; /* members of the open objects, a stack */
  size_t nmem, capmem;
  const char *const *ignore;
  size_t nignore;
} jc_t;

static int parse_value(jc_t *j, int depth);

static void skip_ws(jc_t *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
    j->p++;
}

static int hex4(const char *p) {
  int v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= c - '0';
    else if (c >= 'a' && c <= 'f')
      v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      v |= c - 'A' + 10;
    else
      return -1;
  }
  return v;
}

static void put_utf8(sl_buf_t *b, uint32_t cp) {
  char u[4];
  size_t n;
  if (cp < 0x80) {
    u[0] = (char)cp;
    n = 1;
  } else if (cp < 0x800) {
    u[0] = (char)(0xc0 | cp >> 6);
    u[1] = (char)(0x80 | (cp & 0x3f));
    n = 2;
  } else if (cp < 0x10000) {
    u[0] = (char)(0xe0 | cp >> 12);
    u[1] = (char)(0x80 | (cp >> 6 & 0x3f));
    u[2] = (char)(0x80 | (cp & 0x3f));
    n = 3;
  } else {
    u[0] = (char)(0xf0 | cp >> 18);
    u[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    u[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    u[3] = (char)(0x80 | (cp & 0x3f));
    n = 4;
  }
  sl_buf_append(b, u, n);
}

/* Length of the well-formed UTF-8 sequence at p (lead byte >= 0x80), or 0 (Unicode table 3-7:
 * no overlongs, no encoded surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
  unsigned char c = p[0], lo = 0x80, hi = 0xbf;
  size_t n;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if ((size_t)(end - p) < n) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < n; i++)
    if (p[i] < 0x80 || p[i] > 0xbf) return 0;
  return n;
}

/* Decodes the string literal at j->p into j->str. */
static int parse_string(jc_t *j) {
  j->str.len = 0;
  j->p++; /* opening quote */
  while (j->p < j->end) {
    const char *run = j->p;
    while (j->p < j->end) {
      unsigned char c = (unsigned char)*j->p;
      if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
      j->p++;
    }
    sl_buf_append(&j->str, run, (size_t)(j->p - run));
    if (j->p >= j->end) return -1;
    unsigned char c = (unsigned char)*j->p;
    if (c == '"') {
      j->p++;
      return 0;
    }
    if (c < 0x20) return -1;
    if (c >= 0x80) {
      size_t n = utf8_seq((const unsigned char *)j->p, (const unsigned char *)j->end);
      if (!n) return -1;
      sl_buf_append(&j->str, j->p, n);
      j->p += n;
      continue;
    }
    /* backslash */
    if (j->end - j->p < 2) return -1;
    char e = j->p[1], d;
    j->p += 2;
    switch (e) {
    case '"': d = '"'; break;
    case '\\': d = '\\'; break;
    case '/': d = '/'; break;
    case 'b': d = '\b'; break;
    case 'f': d = '\f'; break;
    case 'n': d = '\n'; break;
    case 'r': d = '\r'; break;
    case 't': d = '\t'; break;
    case 'u': {
      if (j->end - j->p < 4) return -1;
      int cp = hex4(j->p);
      if (cp < 0) return -1;
      j->p += 4;
      if (cp >= 0xdc00 && cp <= 0xdfff) return -1;
      if (cp >= 0xd800 && cp <= 0xdbff) {
        if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u') return -1;
        int lo = hex4(j->p + 2);
        if (lo < 0xdc00 || lo > 0xdfff) return -1;
        j->p += 6;
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
      }
      put_utf8(&j->str, (uint32_t)cp);
      continue;
    }
    default: return -1;
    }
    sl_buf_append(&j->str, &d, 1);
  }
  return -1;
}

static void emit_string(sl_buf_t *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  sl_buf_append(b, "\"", 1);
  size_t run = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    sl_buf_append(b, s + run, i - run);
    run = i + 1;
    char e[6] = {'\\', 0, 0, 0, 0, 0};
    size_t en = 2;
    switch (c) {
    case '"': e[1] = '"'; break;
    case '\\': e[1] = '\\'; break;
    case '\b': e[1] = 'b'; break;
    case '\f': e[1] = 'f'; break;
    case '\n': e[1] = 'n'; break;
    case '\r': e[1] = 'r'; break;
    case '\t': e[1] = 't'; break;
    default:
      e[1] = 'u';
      e[2] = '0';
      e[3] = '0';
      e[4] = hex[c >> 4];
      e[5] = hex[c & 15];
      en = 6;
    }
    sl_buf_append(b, e, en);
  }
  sl_buf_append(b, s + run, n - run);
  sl_buf_append(b, "\"", 1);
}

static bool is_digit(const jc_t *j) { return j->p < j->end && *j->p >= '0' && *j->p <= '9'; }

static int parse_number(jc_t *j) {
  const char *s = j->p;
  if (*j->p == '-') j->p++;
  if (!is_digit(j)) return -1;
  if (*j->p == '0')
    j->p++;
  else
    while (is_digit(j))
      j->p++;
  if (j->p < j->end && *j->p == '.') {
    j->p++;
    if (!is_digit(j)) return -1;
    while (is_digit(j))
      j->p++;
  }
  if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
    j->p++;
    if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
    if (!is_digit(j)) return -1;
    while (is_digit(j))
      j->p++;
  }
  sl_buf_append(j->out, s, (size_t)(j->p - s));
  return 0;
}

static int parse_literal(jc_t *j, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0) return -1;
  j->p += n;
  sl_buf_append(j->out, lit, n);
  return 0;
}

static int parse_array(jc_t *j, int depth) {
  j->p++;
  sl_buf_append(j->out, "[", 1);
  skip_ws(j);
  if (j->p < j->end && *j->p == ']') {
    j->p++;
    sl_buf_append(j->out, "]", 1);
    return 0;
  }
  for (;;) {
    if (parse_value(j, depth + 1) < 0) return -1;
    skip_ws(j);
    if (j->p >= j->end) return -1;
    char c = *j->p++;
    if (c == ']') break;
    if (c != ',') return -1;
    sl_buf_append(j->out, ",", 1);
  }
  sl_buf_append(j->out, "]", 1);
  return 0;
}

static bool ignored(const jc_t *j, const char *k, size_t n) {
  for (size_t i = 0; i < j->nignore; i++)
    if (strlen(j->ignore[i]) == n && memcmp(j->ignore[i], k, n) == 0) return true;
  return false;
}

static int cmp_member(const void *a, const void *b) {
  const jc_member_t *x = a, *y = b;
  size_t n = SL_MIN(x->key_len, y->key_len);
  int r = n ? memcmp(x->key, y->key, n) : 0;
  if (r) return r;
  return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

/* Members are written to out as they come, then sorted and rewritten in place. Nested objects
 * finish (and pop their members and keys) before the enclosing one sorts. */
static int parse_object(jc_t *j, int depth) {
  size_t base = j->nmem, keys_base = j->keys.len, obj = j->out->len;
  j->p++;
  skip_ws(j);
  if (j->p < j->end && *j->p == '}') {
    j->p++;
    sl_buf_append(j->out, "{}", 2);
    return 0;
  }
  for (;;) {
    jc_member_t m = {0};
    skip_ws(j);
    if (j->p >= j->end || *j->p != '"') return -1;
    if (parse_string(j) < 0) return -1;
    m.start = j->out->len;
    m.key_off = j->keys.len;
    m.key_len = j->str.len;
    m.drop = depth == 0 && ignored(j, j->str.data, j->str.len);
    sl_buf_append(&j->keys, j->str.data, j->str.len);
    emit_string(j->out, j->str.data, j->str.len);
    m.kend = j->out->len;
    skip_ws(j);
    if (j->p >= j->end || *j->p != ':') return -1;
    j->p++;
    if (parse_value(j, depth + 1) < 0) return -1;
    m.vend = j->out->len;
    if (j->nmem == j->capmem) {
      j->capmem = j->capmem ? j->capmem * 2 : 16;
      j->mem = sl_realloc(j->mem, j->capmem * sizeof(*j->mem));
    }
    j->mem[j->nmem++] = m;
    skip_ws(j);
    if (j->p >= j->end) return -1;
    char c = *j->p++;
    if (c == '}') break;
    if (c != ',') return -1;
  }

  jc_member_t *ms = j->mem + base;
  size_t n = j->nmem - base;
  for (size_t i = 0; i < n; i++)
    ms[i].key = j->keys.data + ms[i].key_off;
  qsort(ms, n, sizeof(*ms), cmp_member);
  for (size_t i = 1; i < n; i++)
    if (cmp_member(&ms[i - 1], &ms[i]) == 0) return -1;

  j->tmp.len = 0;
  sl_buf_append(&j->tmp, j->out->data + obj, j->out->len - obj);
  j->out->len = obj;
  sl_buf_append(j->out, "{", 1);
  bool first = true;
  for (size_t i = 0; i < n; i++) {
    if (ms[i].drop) continue;
    if (!first) sl_buf_append(j->out, ",", 1);
    first = false;
    sl_buf_append(j->out, j->tmp.data + (ms[i].start - obj), ms[i].kend - ms[i].start);
    sl_buf_append(j->out, ":", 1);
    sl_buf_append(j->out, j->tmp.data + (ms[i].kend - obj), ms[i].vend - ms[i].kend);
  }
  sl_buf_append(j->out, "}", 1);
  j->nmem = base;
  j->keys.len = keys_base;
  return 0;
}

/* depth = containers open around this value. */
static int parse_value(jc_t *j, int depth) {
  skip_ws(j);
  if (j->p >= j->end) return -1;
  switch (*j->p) {
  case '{':
    if (depth >= SL_JSON_CANON_MAX_DEPTH) return -1;
    return parse_object(j, depth);
  case '[':
    if (depth >= SL_JSON_CANON_MAX_DEPTH) return -1;
    return parse_array(j, depth);
  case '"':
    if (parse_string(j) < 0) return -1;
    emit_string(j->out, j->str.data, j->str.len);
    return 0;
  case 't': return parse_literal(j, "true");
  case 'f': return parse_literal(j, "false");
  case 'n': return parse_literal(j, "null");
  default:
    if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9')) return parse_number(j);
    return -1;
  }
}

int sl_json_canon(const char *in, size_t len, const char *const *ignore, size_t nignore,
                  sl_buf_t *out) {
  size_t orig = out->len;
  if (!in) in = ""; /* len is 0: keeps in + len defined */
  jc_t j = {.p = in, .end = in + len, .out = out, .ignore = ignore, .nignore = nignore};
  sl_buf_init(&j.str);
  sl_buf_init(&j.keys);
  sl_buf_init(&j.tmp);
  /* Non-NULL from the start: empty keys and strings are pointed into it. */
  sl_buf_reserve(&j.str, 64);
  sl_buf_reserve(&j.keys, 64);
  int rc = parse_value(&j, 0);
  if (rc == 0) {
    skip_ws(&j);
    if (j.p != j.end) rc = -1;
  }
  sl_buf_free(&j.str);
  sl_buf_free(&j.keys);
  sl_buf_free(&j.tmp);
  free(j.mem);
  if (rc < 0) out->len = orig;
  return rc;
}
