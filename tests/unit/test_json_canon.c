#include "json_canon.h"
#include "t.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint64_t rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

/* Canonicalizes in[0..len) from an exactly-sized copy (so ASan sees any overread). Returns a
 * NUL-terminated malloc'd result, or NULL on -1. */
static char *canon_n(const char *in, size_t len, const char *const *ign, size_t nign) {
  char *copy = malloc(len ? len : 1);
  memcpy(copy, in, len);
  sl_buf_t out;
  sl_buf_init(&out);
  sl_buf_append(&out, "PFX", 3);
  int rc = sl_json_canon(copy, len, ign, nign, &out);
  free(copy);
  char *res = NULL;
  if (rc == 0) {
    CHECK(out.len >= 3 && memcmp(out.data, "PFX", 3) == 0);
    res = sl_strndup(out.data + 3, out.len - 3);
  } else {
    CHECK(rc == -1 && out.len == 3); /* out untouched on failure */
  }
  sl_buf_free(&out);
  return res;
}

static char *canon(const char *in) { return canon_n(in, strlen(in), NULL, 0); }

#define CHECK_CANON(in, want)                                                                      \
  do {                                                                                             \
    char *_r = canon(in);                                                                          \
    CHECK_EQ_STR(_r, want);                                                                        \
    free(_r);                                                                                      \
  } while (0)

#define CHECK_INVALID(in)                                                                          \
  do {                                                                                             \
    char *_r = canon(in);                                                                          \
    if (_r) fprintf(stderr, "accepted: %s -> %s\n", in, _r);                                       \
    CHECK(_r == NULL);                                                                             \
    free(_r);                                                                                      \
  } while (0)

static void key_order(void) {
  CHECK_CANON("{\"b\":1,\"a\":2}", "{\"a\":2,\"b\":1}");
  CHECK_CANON("{\"a\":2,\"b\":1}", "{\"a\":2,\"b\":1}");
  CHECK_CANON("{\"ab\":1,\"a\":2,\"b\":3,\"\":4}", "{\"\":4,\"a\":2,\"ab\":1,\"b\":3}");
  /* Bytewise on the unescaped key: "\n" (0x0a) sorts first though it prints as \n (0x5c...). */
  CHECK_CANON("{\"a\":1,\"\\n\":2,\"\\u0062\":3}", "{\"\\n\":2,\"a\":1,\"b\":3}");
  /* UTF-8 keys sort after ASCII. */
  CHECK_CANON("{\"\xc3\xa9\":1,\"z\":2}", "{\"z\":2,\"\xc3\xa9\":1}");

  char big[20000];
  size_t n = 0;
  big[n++] = '{';
  for (int i = 999; i >= 0; i--)
    n += (size_t)sprintf(big + n, "%s\"k%04d\":%d", i == 999 ? "" : ",", i, i);
  big[n++] = '}';
  big[n] = '\0';
  char *r = canon(big);
  CHECK(r != NULL);
  CHECK(r && strncmp(r, "{\"k0000\":0,\"k0001\":1,", 21) == 0);
  CHECK(r && strstr(r, "\"k0998\":998,\"k0999\":999}") != NULL);
  free(r);
}

static void nested(void) {
  CHECK_CANON("{\"z\":[{\"y\":1,\"x\":[true,false,null]},2],\"a\":{\"d\":{},\"c\":[]}}",
              "{\"a\":{\"c\":[],\"d\":{}},\"z\":[{\"x\":[true,false,null],\"y\":1},2]}");
  CHECK_CANON("[{\"b\":{\"d\":1,\"c\":2},\"a\":0},{\"b\":1,\"a\":[{\"y\":0,\"x\":0}]}]",
              "[{\"a\":0,\"b\":{\"c\":2,\"d\":1}},{\"a\":[{\"x\":0,\"y\":0}],\"b\":1}]");
  /* Scalars at top level are fine. */
  CHECK_CANON(" \"s\" ", "\"s\"");
  CHECK_CANON("-12.5e+3", "-12.5e+3");
  CHECK_CANON("null", "null");
  CHECK_CANON("[]", "[]");
  CHECK_CANON("{}", "{}");
}

static void ignore_list(void) {
  static const char *const ign[] = {"stream", "user"};
  const char *in = "{\"user\":\"x\",\"model\":\"m\",\"nested\":{\"user\":\"keep\"},\"stream\":true,"
                   "\"arr\":[{\"user\":1}]}";
  char *r = canon_n(in, strlen(in), ign, 2);
  CHECK_EQ_STR(r, "{\"arr\":[{\"user\":1}],\"model\":\"m\",\"nested\":{\"user\":\"keep\"}}");
  free(r);
  r = canon_n("{\"stream\":false}", 16, ign, 2);
  CHECK_EQ_STR(r, "{}");
  free(r);
  /* Matched on the unescaped key. */
  r = canon_n("{\"\\u0075ser\":1,\"a\":2}", 21, ign, 2);
  CHECK_EQ_STR(r, "{\"a\":2}");
  free(r);
  /* An ignored key still may not repeat. */
  r = canon_n("{\"user\":1,\"user\":2}", 19, ign, 2);
  CHECK(r == NULL);
  free(r);
  /* A top-level array is not an object: nothing to ignore. */
  r = canon_n("[{\"user\":1}]", 12, ign, 2);
  CHECK_EQ_STR(r, "[{\"user\":1}]");
  free(r);
}

static void whitespace(void) {
  const char *want = "{\"a\":[1,2,{\"b\":null}],\"c\":\"d e\"}";
  CHECK_CANON("{\"a\":[1,2,{\"b\":null}],\"c\":\"d e\"}", want);
  CHECK_CANON(" \t\n\r{ \"c\" : \"d e\" ,\n\t\"a\" :[ 1 ,2, { \"b\" : null } ] }\r\n ", want);
  CHECK_CANON("{\"a\"\n:\n[\n1\n,\n2\n,\n{\n\"b\"\n:\nnull\n}\n]\n,\n\"c\"\n:\n\"d e\"\n}", want);
  CHECK_INVALID("{\"a\":1}\f"); /* not JSON whitespace */
  CHECK_INVALID("\xc2\xa0[1]"); /* nor is NBSP */
}

static void escapes(void) {
  CHECK_CANON("\"\\u0041\"", "\"A\"");
  CHECK_CANON("\"\\/\"", "\"/\"");
  CHECK_CANON("\"a/b\"", "\"a/b\"");
  CHECK_CANON("\"\\u00e9\"", "\"\xc3\xa9\"");
  CHECK_CANON("\"\\u00E9\"", "\"\xc3\xa9\"");
  CHECK_CANON("\"\xc3\xa9\"", "\"\xc3\xa9\"");
  CHECK_CANON("\"\\u20ac\"", "\"\xe2\x82\xac\"");
  CHECK_CANON("\"\\u000a\\u000D\\u0009\\u0008\\u000c\"", "\"\\n\\r\\t\\b\\f\"");
  CHECK_CANON("\"\\u001F\\u0001\"", "\"\\u001f\\u0001\"");
  CHECK_CANON("\"\\u0000\"", "\"\\u0000\"");
  CHECK_CANON("\"\\\"\\\\\"", "\"\\\"\\\\\"");
  CHECK_CANON("\"\\u0022\\u005c\"", "\"\\\"\\\\\"");
  CHECK_CANON("\"\x7f\"", "\"\x7f\"");
  /* Equal after escapes means equal keys. */
  CHECK_INVALID("{\"a\":1,\"\\u0061\":2}");
}

static void surrogates(void) {
  CHECK_CANON("\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\"");
  CHECK_CANON("\"\\uD83D\\uDE00\"", "\"\xf0\x9f\x98\x80\"");
  CHECK_CANON("\"\xf0\x9f\x98\x80\"", "\"\xf0\x9f\x98\x80\"");
  CHECK_CANON("\"\\udbff\\udfff\"", "\"\xf4\x8f\xbf\xbf\"");
  CHECK_CANON("\"\\ud800\\udc00\"", "\"\xf0\x90\x80\x80\"");
  CHECK_INVALID("\"\\ud83d\"");
  CHECK_INVALID("\"\\ud83dx\"");
  CHECK_INVALID("\"\\ud83d\\u0041\"");
  CHECK_INVALID("\"\\ude00\"");
  CHECK_INVALID("\"\\ude00\\ud83d\"");
  CHECK_INVALID("\"\\ud83d\\ud83d\"");
  CHECK_INVALID("\"\\ud83d\\");
  CHECK_INVALID("\"\\ud83d\\ude0\"");
}

static void invalid_inputs(void) {
  static const char *bad[] = {
      "", " ", "{", "}", "[", "]", "{,}", "[,]", "{\"a\":1,}", "[1,]", "[1,,2]", "{\"a\" 1}",
      "{\"a\":}", "{a:1}", "{'a':1}", "['a']", "{\"a\":1 \"b\":2}", "[1 2]", "01", "-01", "00",
      "1.", ".5", "-", "+1", "1e", "1e+", "1.e5", "0x10", "Infinity", "NaN", "-Infinity", "tru",
      "True", "nul", "nulll", "falsee", "[1] x", "{} {}", "[1]]", "\"abc", "\"\\x\"", "\"\\u12\"",
      "\"\\u12g4\"", "\"\\'\"", "\"a\tb\"", "\"a\nb\"", "\"\x01\"", "\"\x1f\"", "/* c */ 1",
      "[1] // c", "{\"a\":1,\"a\":1}", "{\"b\":{\"x\":1,\"x\":2}}",
      /* bad UTF-8: stray continuation, overlong, encoded surrogate, > U+10FFFF, truncated */
      "\"\x80\"", "\"\xc0\xaf\"", "\"\xc1\xbf\"", "\"\xe0\x80\xaf\"", "\"\xed\xa0\x80\"",
      "\"\xf0\x80\x80\xaf\"", "\"\xf4\x90\x80\x80\"", "\"\xf5\x80\x80\x80\"", "\"\xff\"",
      "\"\xc3\"", "\"\xe2\x82\"", "\"\xf0\x9f\x98\"", "\"\xc3\x28\"", "[\"\xe2\x28\xa1\"]",
      "\xef\xbb\xbf{}", /* BOM */
  };
  for (size_t i = 0; i < SL_ARRAY_SIZE(bad); i++)
    CHECK_INVALID(bad[i]);

  /* An embedded NUL is not whitespace, inside or after a value. */
  char *r = canon_n("[1]\0", 4, NULL, 0);
  CHECK(r == NULL);
  free(r);
  r = canon_n("\"a\0b\"", 5, NULL, 0);
  CHECK(r == NULL);
  free(r);
}

static char *nest(int depth, char open, char close, const char *inner) {
  size_t n = strlen(inner);
  char *s = malloc((size_t)depth * 6 + n + 1), *p = s;
  for (int i = 0; i < depth; i++) {
    if (open == '{') {
      memcpy(p, "{\"k\":", 5);
      p += 5;
    } else {
      *p++ = open;
    }
  }
  memcpy(p, inner, n);
  p += n;
  for (int i = 0; i < depth; i++)
    *p++ = close;
  *p = '\0';
  return s;
}

static void depth_limit(void) {
  char *s = nest(64, '[', ']', "1");
  char *r = canon(s);
  CHECK(r != NULL && strcmp(r, s) == 0);
  free(r);
  free(s);
  s = nest(65, '[', ']', "1");
  CHECK_INVALID(s);
  free(s);
  s = nest(64, '{', '}', "1");
  r = canon(s);
  CHECK(r != NULL && strcmp(r, s) == 0);
  free(r);
  free(s);
  s = nest(65, '{', '}', "1");
  CHECK_INVALID(s);
  free(s);
  s = nest(64, '[', ']', "{}");
  CHECK_INVALID(s);
  free(s);
  s = nest(100000, '[', ']', "");
  CHECK_INVALID(s);
  free(s);
}

static const char doc[] =
    "{\"model\": \"gpt-x\", \"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\\n\"},"
    " {\"role\": \"user\", \"content\": \"caf\\u00e9 \xe2\x82\xac \\ud83d\\ude00 \\\"q\\\" "
    "a\\/b\"}],"
    " \"temperature\": 0.7, \"max_tokens\": 256, \"stop\": [\"\\n\\n\", \"END\"],"
    " \"n\": -1.5e-3, \"logit_bias\": {\"50256\": -100, \"1\": 0}, \"stream\": false,"
    " \"tools\": [], \"meta\": {}, \"x\": null, \"y\": true}";

static void truncated_prefixes(void) {
  size_t len = sizeof(doc) - 1;
  char *full = canon_n(doc, len, NULL, 0);
  CHECK(full != NULL);
  for (size_t i = 0; i < len; i++) {
    char *r = canon_n(doc, i, NULL, 0);
    if (r) fprintf(stderr, "prefix %zu accepted\n", i);
    CHECK(r == NULL);
    free(r);
  }
  /* The canonical form is itself canonical. */
  char *again = full ? canon(full) : NULL;
  CHECK(again && full && strcmp(again, full) == 0);
  free(again);
  free(full);
}

static void fuzz(void) {
  static const char alphabet[] = "{}[]\",:\\/ \t\n0123456789-+.eEtrufalsn\x80\xc3\xa9\xed\xf0ud8";
  size_t dlen = sizeof(doc) - 1;
  char *buf = malloc(dlen * 4);
  int ok = 0, bad_idem = 0;
  for (int it = 0; it < 20000; it++) {
    size_t len = dlen;
    memcpy(buf, doc, dlen);
    int nmut = 1 + (int)(rnd() % 4);
    for (int m = 0; m < nmut && len > 0; m++) {
      size_t at = (size_t)(rnd() % len);
      switch (rnd() % 5) {
      case 0: buf[at] = (char)rnd(); break;
      case 1: buf[at] = alphabet[rnd() % (sizeof(alphabet) - 1)]; break;
      case 2: /* delete */
        memmove(buf + at, buf + at + 1, len - at - 1);
        len--;
        break;
      case 3: /* insert */
        if (len + 1 < dlen * 4) {
          memmove(buf + at + 1, buf + at, len - at);
          buf[at] = alphabet[rnd() % (sizeof(alphabet) - 1)];
          len++;
        }
        break;
      case 4: { /* duplicate a span */
        size_t n = (size_t)(rnd() % 32);
        n = SL_MIN(n, len - at);
        if (len + n < dlen * 4) {
          memmove(buf + at + n, buf + at, len - at);
          len += n;
        }
        break;
      }
      }
    }
    size_t cut = (size_t)(rnd() % (len + 8)) + len / 2; /* sometimes truncated */
    len = SL_MIN(len, cut);
    char *r = canon_n(buf, len, NULL, 0);
    if (r) {
      ok++;
      char *r2 = canon(r);
      if (!r2 || strcmp(r, r2) != 0) bad_idem++;
      free(r2);
    }
    free(r);
  }
  free(buf);
  CHECK_EQ_INT(bad_idem, 0);
  CHECK(ok > 100); /* the mutations leave some documents valid */
  printf("fuzz: %d of 20000 mutants valid\n", ok);
}

TEST_MAIN(T(key_order), T(nested), T(ignore_list), T(whitespace), T(escapes), T(surrogates),
          T(invalid_inputs), T(depth_limit), T(truncated_prefixes), T(fuzz))
