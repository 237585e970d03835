#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

int sl_log_level = SL_LOG_INFO;

static size_t sl_log_min(size_t a, size_t b) { return a < b ? a : b; }

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int sl_log_level_parse(const char *name) {
  for (int i = 0; i < 4; i++)
    if (strcasecmp(name, level_names[i]) == 0) return i;
  return -1;
}

const char *sl_log_level_name(int level) {
  return level >= 0 && level < 4 ? level_names[level] : "?";
}

void sl_log(int level, const char *fmt, ...) {
  if (level > sl_log_level) return;
  struct timespec ts;
  struct tm tm;
  char stamp[32];
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);

  char line[2048];
  int n = snprintf(line, sizeof(line), "%s.%03ldZ [%s] ", stamp, ts.tv_nsec / 1000000,
                   sl_log_level_name(level));
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
  va_end(ap);
  size_t len = (size_t)n + (m < 0 ? 0 : sl_log_min((size_t)m, sizeof(line) - (size_t)n - 2));
  line[len++] = '\n';
  fwrite(line, 1, len, stderr);
}
