/* Minimal unit-test helpers: CHECK records a failure and continues; TEST_MAIN runs the listed
 * test functions and exits non-zero if any check failed. */
#ifndef SL_T_H
#define SL_T_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int t_failed, t_checks;

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    t_checks++;                                                                                    \
    if (!(cond)) {                                                                                 \
      t_failed++;                                                                                  \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                     \
    }                                                                                              \
  } while (0)

#define CHECK_EQ_INT(a, b)                                                                         \
  do {                                                                                             \
    long long _a = (long long)(a), _b = (long long)(b);                                            \
    t_checks++;                                                                                    \
    if (_a != _b) {                                                                                \
      t_failed++;                                                                                  \
      fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__, #a, #b, _a,   \
              _b);                                                                                 \
    }                                                                                              \
  } while (0)

#define CHECK_EQ_STR(a, b)                                                                         \
  do {                                                                                             \
    const char *_a = (a), *_b = (b);                                                               \
    t_checks++;                                                                                    \
    if (!_a || !_b || strcmp(_a, _b) != 0) {                                                       \
      t_failed++;                                                                                  \
      fprintf(stderr, "%s:%d: %s == %s failed: \"%s\" != \"%s\"\n", __FILE__, __LINE__, #a, #b,    \
              _a ? _a : "(null)", _b ? _b : "(null)");                                             \
    }                                                                                              \
  } while (0)

typedef struct {
  const char *name;
  void (*fn)(void);
} t_case;

#define TEST_MAIN(...)                                                                             \
  int main(void) {                                                                                 \
    t_case cases[] = {__VA_ARGS__};                                                                \
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {                               \
      int before = t_failed;                                                                       \
      cases[i].fn();                                                                               \
      printf("%s %s\n", t_failed == before ? "ok  " : "FAIL", cases[i].name);                      \
    }                                                                                              \
    printf("%d checks, %d failed\n", t_checks, t_failed);                                          \
    return t_failed ? 1 : 0;                                                                       \
  }
#define T(fn) {#fn, fn}

#endif
