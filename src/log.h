/* Leveled logging to stderr, one line per call. Thread-safe (stdio locking). */
#ifndef SL_LOG_H
#define SL_LOG_H

enum sl_log_level { SL_LOG_ERROR = 0, SL_LOG_WARN, SL_LOG_INFO, SL_LOG_DEBUG };

extern int sl_log_level;

/* Parses "error" | "warn" | "info" | "debug"; returns -1 when unknown. */
int sl_log_level_parse(const char *name);
const char *sl_log_level_name(int level);

void sl_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define sl_log_enabled(level) ((level) <= sl_log_level)
#define SL_ERROR(...) sl_log(SL_LOG_ERROR, __VA_ARGS__)
#define SL_WARN(...) sl_log(SL_LOG_WARN, __VA_ARGS__)
#define SL_INFO(...) sl_log(SL_LOG_INFO, __VA_ARGS__)
#define SL_DEBUG(...)                                                                              \
  do {                                                                                             \
    if (sl_log_enabled(SL_LOG_DEBUG)) sl_log(SL_LOG_DEBUG, __VA_ARGS__);                           \
  } while (0)

#endif
