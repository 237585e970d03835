/* ws_load.c — WebSocket load generator for bench/ws/run.sh (bench-only tool).
 *
 * One libuv loop, one thread. Opens N WebSocket sessions (GET PATH with an upgrade; the
 * server's Sec-WebSocket-Accept is checked), at most --concurrency handshakes at a time, then:
 *
 *   --mode closed  each session keeps exactly one message in flight: it sends the next as
 *                  soon as the echo of the previous one arrives (maximum messages/s);
 *   --mode open    messages leave at a fixed total --rate, evenly spaced (a timerfd armed for
 *                  each send time), round-robin over the sessions, whatever the replies do;
 *   --mode idle    nothing is sent: prints "ready open=N failed=F" once every handshake is
 *                  done and holds the sessions until SIGTERM/SIGINT.
 *
 * Messages are --size bytes (default 1024), binary: byte 0 is 0xEE (the echo convention),
 * bytes 1..8 the send time (CLOCK_MONOTONIC ns, this process), the rest filler. The round
 * trip of each echo is its receive time minus that send time. Traffic runs --warmup seconds
 * unrecorded, then --duration seconds recorded (messages whose echo arrives inside that
 * window); then sending stops, echoes still in flight are awaited (2 s at most), every
 * session is closed with a close frame (1000), and one summary line of key=value pairs is
 * printed on stdout. In open mode the send time is the actual send time; how late sends were
 * against their schedule is reported as lag_p99_us/lag_max_us (a generator that keeps up
 * shows a few us).
 *
 * --watch NAME=PID (up to 4): CPU time of PID (all its threads, from schedstat) over the
 * recorded window is reported as NAME_cpu_pct and NAME_us_per_msg; busy_cpuN is every CPU's
 * busy % over the same window (wall time minus idle and iowait in /proc/stat), self_cpu_pct
 * this process's own use, others_cpu_pct the CPU time of every other task on the machine
 * (other tenants; from each task's schedstat) and others_top the three biggest of them.
 *
 * usage: ws-load --port P [--host 127.0.0.1] [--path /ws] [--sessions 100] [--size 1024]
 *                [--mode closed|open|idle] [--rate MSGS_PER_S] [--duration 10] [--warmup 2]
 *                [--concurrency 256] [--connect-timeout 30] [--spin 1|0] [--watch NAME=PID]...
 *
 * --spin 1 (the default, open mode only): the loop busy-polls (epoll with a zero timeout)
 * and sends each message when its time comes; this CPU shows 100% busy. --spin 0 sleeps in
 * epoll until a timerfd fires for the next send instead: cheaper in CPU, but on a VM every
 * timer and wake-up costs tens of us and shows up as send lag and round-trip jitter. */
#include "wsb.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <uv.h>
#include <wslay/wslay.h>

enum { S_CONNECTING, S_HANDSHAKE, S_OPEN, S_DONE };
enum { P_CONNECT, P_WARMUP, P_MEASURE, P_DRAIN, P_CLOSE };
enum { M_CLOSED, M_OPEN, M_IDLE };

#define OUT_SKIP (4 * 1024 * 1024) /* open mode: skip a send while this much is unsent */
#define MAX_WATCH 4
#define MAX_CPUS 64

typedef struct sess {
  uv_tcp_t tcp;
  uv_connect_t creq;
  int idx, state;
  char *head;
  size_t head_len;
  char accept[29];
  wslay_event_context_ptr ws;
  const uint8_t *in;
  size_t in_len;
  wsb_buf_t out;
  uint32_t inflight;
  uint64_t recv_meas;
  unsigned we_closed : 1, was_open : 1, closing : 1;
} sess_t;

typedef struct {
  uv_write_t req;
  uv_buf_t buf;
} wreq_t;

typedef struct {
  uint64_t self_ns, wall_ns;
  uint64_t watch_ns[MAX_WATCH];
  uint64_t idle[MAX_CPUS]; /* idle + iowait, USER_HZ ticks */
  int ncpu;
} snap_t;

/* options */
static const char *o_host = "127.0.0.1", *o_path = "/ws";
static int o_port, o_sessions = 100, o_size = 1024, o_mode = M_CLOSED, o_conc = 256;
static double o_rate, o_duration = 10, o_warmup = 2, o_connect_timeout = 30;
static int o_spin = 1; /* open mode: busy-poll instead of a timerfd */
static char *watch_name[MAX_WATCH];
static int watch_pid[MAX_WATCH], n_watch;

static uv_loop_t *loop;
static sess_t *S;
static int phase = P_CONNECT;
static int next_connect, pending, n_open, n_ok, n_failed, n_done;
static uint64_t conn_t0;
static uint8_t *tmpl;
static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static char rbuf[256 * 1024];
static struct sockaddr_in dest;

/* counters */
static wsb_hist_t rtt, lag;
static uint64_t sent_meas, recv_meas, sent_total, recv_total, g_inflight, lost, skipped, bad;
static uint64_t close_early, eof_early, close_clean, close_other, err_early;
static int last_early_code = -1;
static snap_t snap0, snap1;
static uint64_t t_meas0, t_meas1, t_phase;
static char first_fail[160];

/* open loop */
static int tfd = -1;
static uv_poll_t tpoll;
static uint64_t sched_t0, sched_j;
static double period_ns;

static uv_timer_t phase_timer, connect_timer;

static void finish(void);

/* ---- CPU accounting -------------------------------------------------------------------- */

/* CPU time of every thread of pid, in ns (/proc/PID/task/TID/schedstat: exact run time; the
 * utime/stime ticks of /proc/PID/stat are sampled at the timer tick, and a process that runs
 * in short bursts between idle periods is charged badly by them). */
static uint64_t proc_run_ns(int pid) {
  char path[96];
  snprintf(path, sizeof(path), "/proc/%d/task", pid);
  DIR *d = opendir(path);
  if (!d) return 0;
  uint64_t sum = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    snprintf(path, sizeof(path), "/proc/%d/task/%.20s/schedstat", pid, e->d_name);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    unsigned long long ns = 0;
    if (fscanf(f, "%llu", &ns) == 1) sum += ns;
    fclose(f);
  }
  closedir(d);
  return sum;
}

/* Run time of every task (thread) on the machine, so the summary can say how much CPU time
 * went to processes other than this one and the watched ones: other tenants of the machine.
 * Tasks that both start and end inside the window are missed. */
typedef struct {
  int tid, tgid;
  uint64_t ns;
  char comm[24];
} task_t;

typedef struct {
  task_t *t;
  size_t n, cap;
} tasks_t;

static tasks_t tasks0, tasks1;

static int task_cmp(const void *a, const void *b) {
  return ((const task_t *)a)->tid - ((const task_t *)b)->tid;
}

static int is_ours(int tgid) {
  if (tgid == getpid()) return 1;
  for (int i = 0; i < n_watch; i++)
    if (tgid == watch_pid[i]) return 1;
  return 0;
}

static void scan_tasks(tasks_t *ts) {
  ts->n = 0;
  DIR *d = opendir("/proc");
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
    int tgid = atoi(e->d_name);
    char path[96];
    snprintf(path, sizeof(path), "/proc/%d/task", tgid);
    DIR *td = opendir(path);
    if (!td) continue;
    struct dirent *te;
    while ((te = readdir(td))) {
      if (te->d_name[0] < '1' || te->d_name[0] > '9') continue;
      task_t t = {.tid = atoi(te->d_name), .tgid = tgid};
      snprintf(path, sizeof(path), "/proc/%d/task/%d/schedstat", tgid, t.tid);
      FILE *f = fopen(path, "r");
      if (!f) continue;
      unsigned long long ns = 0;
      int ok = fscanf(f, "%llu", &ns) == 1;
      fclose(f);
      if (!ok) continue;
      t.ns = ns;
      snprintf(path, sizeof(path), "/proc/%d/task/%d/comm", tgid, t.tid);
      if ((f = fopen(path, "r"))) {
        if (fgets(t.comm, sizeof(t.comm), f)) t.comm[strcspn(t.comm, "\n ")] = 0;
        fclose(f);
      }
      if (ts->n == ts->cap) {
        ts->cap = ts->cap ? ts->cap * 2 : 512;
        ts->t = wsb_xrealloc(ts->t, ts->cap * sizeof(task_t));
      }
      ts->t[ts->n++] = t;
    }
    closedir(td);
  }
  closedir(d);
  qsort(ts->t, ts->n, sizeof(task_t), task_cmp);
}

/* CPU ns of other tasks between the two scans; the three biggest into top. */
static uint64_t others_ns(char *top, size_t toplen) {
  uint64_t sum = 0;
  task_t best[3] = {{0}};
  uint64_t bestd[3] = {0};
  for (size_t i = 0; i < tasks1.n; i++) {
    task_t *t = &tasks1.t[i];
    if (is_ours(t->tgid)) continue;
    task_t *o = bsearch(t, tasks0.t, tasks0.n, sizeof(task_t), task_cmp);
    uint64_t d = o ? (t->ns >= o->ns ? t->ns - o->ns : 0) : t->ns;
    sum += d;
    for (int k = 0; k < 3; k++)
      if (d > bestd[k]) {
        for (int j = 2; j > k; j--) {
          bestd[j] = bestd[j - 1];
          best[j] = best[j - 1];
        }
        bestd[k] = d;
        best[k] = *t;
        break;
      }
  }
  top[0] = 0;
  size_t off = 0;
  for (int k = 0; k < 3 && bestd[k]; k++) {
    int n = snprintf(top + off, toplen - off, "%s%s/%d:%.0fms", k ? "," : "", best[k].comm,
                     best[k].tgid, (double)bestd[k] / 1e6);
    if (n < 0 || (size_t)n >= toplen - off) break;
    off += (size_t)n;
  }
  if (!top[0]) snprintf(top, toplen, "-");
  return sum;
}

/* Busy time per CPU is the wall time minus idle and iowait from /proc/stat: on a tickless
 * kernel those two are measured at idle entry and exit, whereas user/system there are
 * sampled at the tick like a process's utime/stime. */
static void take_snap(snap_t *s) {
  s->self_ns = proc_run_ns(getpid());
  s->wall_ns = wsb_now_ns();
  for (int i = 0; i < n_watch; i++) s->watch_ns[i] = proc_run_ns(watch_pid[i]);
  s->ncpu = 0;
  FILE *f = fopen("/proc/stat", "r");
  if (!f) return;
  char line[512];
  while (fgets(line, sizeof(line), f)) {
    int cpu;
    unsigned long long v[5] = {0};
    if (strncmp(line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9') continue;
    if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu", &cpu, &v[0], &v[1], &v[2], &v[3],
               &v[4]) < 5)
      continue;
    if (cpu < 0 || cpu >= MAX_CPUS) continue;
    s->idle[cpu] = v[3] + v[4];
    if (cpu + 1 > s->ncpu) s->ncpu = cpu + 1;
  }
  fclose(f);
}

/* ---- output ---------------------------------------------------------------------------- */

static void sess_close(sess_t *s);

static void on_write(uv_write_t *r, int status) {
  wreq_t *w = (wreq_t *)r;
  free(w->buf.base);
  free(w);
}

static void flush(sess_t *s) {
  if (!s->out.len) return;
  if (s->closing) {
    s->out.len = 0;
    return;
  }
  uv_stream_t *st = (uv_stream_t *)&s->tcp;
  size_t off = 0;
  if (uv_stream_get_write_queue_size(st) == 0) {
    uv_buf_t b = uv_buf_init((char *)s->out.data, (unsigned)s->out.len);
    int n = uv_try_write(st, &b, 1);
    if (n > 0) off = (size_t)n;
    else if (n != UV_EAGAIN && n != UV_ENOSYS) {
      s->out.len = 0;
      sess_close(s);
      return;
    }
  }
  if (off < s->out.len) {
    wreq_t *w = wsb_xmalloc(sizeof(*w));
    size_t rest = s->out.len - off;
    w->buf = uv_buf_init(wsb_xmalloc(rest), (unsigned)rest);
    memcpy(w->buf.base, s->out.data + off, rest);
    if (uv_write(&w->req, st, &w->buf, 1, on_write) != 0) {
      free(w->buf.base);
      free(w);
      s->out.len = 0;
      sess_close(s);
      return;
    }
  }
  s->out.len = 0;
}

/* Sends what wslay has queued, then writes it. */
static void pump(sess_t *s) {
  if (s->state != S_OPEN || s->closing) return;
  if (wslay_event_want_write(s->ws) && wslay_event_send(s->ws) != 0) {
    s->out.len = 0;
    if (!s->we_closed) err_early++;
    sess_close(s);
    return;
  }
  flush(s);
  if (!s->closing && wslay_event_get_close_received(s->ws) &&
      wslay_event_get_close_sent(s->ws) && !wslay_event_want_write(s->ws))
    sess_close(s);
}

static int queue_msg(sess_t *s, uint64_t now) {
  if (s->state != S_OPEN || s->closing || wslay_event_get_close_sent(s->ws) ||
      wslay_event_get_close_received(s->ws))
    return -1;
  memcpy(tmpl + 1, &now, 8);
  struct wslay_event_msg m = {WSLAY_BINARY_FRAME, tmpl, (size_t)o_size};
  if (wslay_event_queue_msg(s->ws, &m) != 0) return -1;
  s->inflight++;
  g_inflight++;
  sent_total++;
  if (phase == P_MEASURE) sent_meas++;
  return 0;
}

/* ---- session lifecycle ----------------------------------------------------------------- */

static void check_all_connected(void);
static void check_closed(void);
static void start_more(void);

static void on_closed(uv_handle_t *h) {
  sess_t *s = h->data;
  s->state = S_DONE;
  n_done++;
  if (s->inflight) {
    lost += s->inflight;
    g_inflight -= s->inflight;
    s->inflight = 0;
  }
  if (s->ws) {
    wslay_event_context_free(s->ws);
    s->ws = NULL;
  }
  free(s->head);
  s->head = NULL;
  wsb_buf_free(&s->out);
  if (phase == P_CLOSE) check_closed();
}

static void sess_close(sess_t *s) {
  if (s->closing) return;
  s->closing = 1;
  if (s->state == S_OPEN) n_open--;
  uv_close((uv_handle_t *)&s->tcp, on_closed);
}

static void handshake_failed(sess_t *s, const char *why) {
  if (!first_fail[0]) snprintf(first_fail, sizeof(first_fail), "%s", why);
  n_failed++;
  pending--;
  sess_close(s);
  start_more();
  check_all_connected();
}

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *ud) {
  sess_t *s = ud;
  if (!s->in_len) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  size_t n = len < s->in_len ? len : s->in_len;
  memcpy(buf, s->in, n);
  s->in += n;
  s->in_len -= n;
  return (ssize_t)n;
}

static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *ud) {
  sess_t *s = ud;
  wsb_buf_add(&s->out, data, len);
  return (ssize_t)len;
}

static int ws_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *ud) {
  for (size_t i = 0; i < len; i += 8) {
    uint64_t r = wsb_rand(&rng);
    memcpy(buf + i, &r, len - i < 8 ? len - i : 8);
  }
  return 0;
}

static void ws_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
                   void *ud) {
  sess_t *s = ud;
  if (a->opcode == WSLAY_BINARY_FRAME) {
    if (a->msg_length != (size_t)o_size || a->msg[0] != 0xEE || !s->inflight) {
      bad++;
      return;
    }
    uint64_t ts, now = wsb_now_ns();
    memcpy(&ts, a->msg + 1, 8);
    s->inflight--;
    g_inflight--;
    recv_total++;
    if (phase == P_MEASURE) {
      wsb_hist_add(&rtt, now > ts ? now - ts : 0);
      recv_meas++;
      s->recv_meas++;
    }
    if (o_mode == M_CLOSED && (phase == P_WARMUP || phase == P_MEASURE)) queue_msg(s, now);
  } else if (a->opcode == WSLAY_TEXT_FRAME) {
    bad++;
  } else if (a->opcode == WSLAY_CONNECTION_CLOSE) {
    if (!s->we_closed) {
      close_early++;
      last_early_code = a->status_code;
    } else if (a->status_code == 1000) {
      close_clean++;
    } else {
      close_other++;
    }
  }
}

static const struct wslay_event_callbacks ws_cbs = {.recv_callback = ws_recv,
                                                    .send_callback = ws_send,
                                                    .genmask_callback = ws_genmask,
                                                    .on_msg_recv_callback = ws_msg};

static void feed(sess_t *s, const uint8_t *p, size_t n) {
  s->in = p;
  s->in_len = n;
  int rc = wslay_event_recv(s->ws);
  s->in_len = 0;
  if (rc != 0) {
    if (!s->we_closed) err_early++;
    sess_close(s);
    return;
  }
  pump(s);
}

static void on_handshake(sess_t *s, size_t head_end) {
  if (s->head_len < 12 || memcmp(s->head, "HTTP/1.1 101", 12) != 0) {
    char why[160];
    size_t l = 0;
    while (l < s->head_len && l < 100 && s->head[l] != '\r') l++;
    snprintf(why, sizeof(why), "status line: %.*s", (int)l, s->head);
    handshake_failed(s, why);
    return;
  }
  size_t n = 0;
  const char *acc = wsb_header(s->head, head_end, "sec-websocket-accept", &n);
  if (!acc || n != 28 || memcmp(acc, s->accept, 28) != 0) {
    handshake_failed(s, "missing or wrong Sec-WebSocket-Accept");
    return;
  }
  if (wslay_event_context_client_init(&s->ws, &ws_cbs, s) != 0) {
    handshake_failed(s, "wslay init");
    return;
  }
  wslay_event_config_set_max_recv_msg_length(s->ws, 16 * 1024 * 1024);
  s->state = S_OPEN;
  s->was_open = 1;
  n_open++;
  n_ok++;
  pending--;
  size_t rest = s->head_len - head_end;
  char *head = s->head;
  s->head = NULL;
  if (rest) feed(s, (const uint8_t *)head + head_end, rest);
  free(head);
  start_more();
  check_all_connected();
}

static void on_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
  *b = uv_buf_init(rbuf, sizeof(rbuf));
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  sess_t *s = st->data;
  if (n == 0 || s->closing) return;
  if (n < 0) {
    if (s->state == S_HANDSHAKE) {
      char why[128];
      snprintf(why, sizeof(why), "connection lost during the handshake: %s", uv_strerror((int)n));
      handshake_failed(s, why);
      return;
    }
    if (!s->we_closed) eof_early++;
    sess_close(s);
    return;
  }
  if (s->state == S_OPEN) {
    feed(s, (const uint8_t *)b->base, (size_t)n);
    return;
  }
  if (s->state != S_HANDSHAKE) return;
  if (s->head_len + (size_t)n > 8192) {
    handshake_failed(s, "response head too large");
    return;
  }
  memcpy(s->head + s->head_len, b->base, (size_t)n);
  s->head_len += (size_t)n;
  char *end = memmem(s->head, s->head_len, "\r\n\r\n", 4);
  if (end) on_handshake(s, (size_t)(end + 4 - s->head));
}

static void on_connect(uv_connect_t *r, int status) {
  sess_t *s = r->data;
  if (s->closing) return;
  if (status < 0) {
    char why[128];
    snprintf(why, sizeof(why), "connect: %s", uv_strerror(status));
    handshake_failed(s, why);
    return;
  }
  uv_tcp_nodelay(&s->tcp, 1);
  s->state = S_HANDSHAKE;
  uint8_t raw[16];
  for (int i = 0; i < 16; i += 8) {
    uint64_t x = wsb_rand(&rng);
    memcpy(raw + i, &x, 8);
  }
  char key[32];
  EVP_EncodeBlock((unsigned char *)key, raw, 16); /* 24 chars */
  wsb_accept_key(key, 24, s->accept);
  char req[512];
  int len = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     o_path, o_host, o_port, key);
  s->head = wsb_xmalloc(8192);
  s->head_len = 0;
  wsb_buf_add(&s->out, req, (size_t)len);
  uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read);
  flush(s);
}

static int stop_connecting;
static void start_more(void) {
  while (!stop_connecting && pending < o_conc && next_connect < o_sessions) {
    sess_t *s = &S[next_connect];
    s->idx = next_connect++;
    s->state = S_CONNECTING;
    uv_tcp_init(loop, &s->tcp);
    s->tcp.data = s;
    s->creq.data = s;
    pending++;
    int rc = uv_tcp_connect(&s->creq, &s->tcp, (const struct sockaddr *)&dest, on_connect);
    if (rc != 0) {
      char why[128];
      snprintf(why, sizeof(why), "connect: %s", uv_strerror(rc));
      handshake_failed(s, why);
    }
  }
}

/* ---- phases ---------------------------------------------------------------------------- */

static void begin_close(void);

static void on_drain_tick(uv_timer_t *t) {
  if (g_inflight == 0 || wsb_now_ns() - t_phase > 2000000000ULL) {
    uv_timer_stop(t);
    begin_close();
  }
}

static void on_close_tick(uv_timer_t *t) {
  if (wsb_now_ns() - t_phase > 3000000000ULL) finish();
}

static void check_closed(void) {
  if (n_done >= next_connect) finish();
}

static void begin_close(void) {
  phase = P_CLOSE;
  t_phase = wsb_now_ns();
  for (int i = 0; i < next_connect; i++) {
    sess_t *s = &S[i];
    if (s->state != S_OPEN || s->closing) continue;
    s->we_closed = 1;
    if (!wslay_event_get_close_sent(s->ws)) wslay_event_queue_close(s->ws, 1000, NULL, 0);
    pump(s);
  }
  check_closed();
  uv_timer_start(&phase_timer, on_close_tick, 50, 50);
}

static void end_measure(uv_timer_t *t) {
  t_meas1 = wsb_now_ns();
  take_snap(&snap1);
  scan_tasks(&tasks1);
  phase = P_DRAIN;
  t_phase = t_meas1;
  if (tfd >= 0) uv_poll_stop(&tpoll);
  uv_timer_start(&phase_timer, on_drain_tick, 5, 5);
}

static void begin_measure(uv_timer_t *t) {
  phase = P_MEASURE;
  memset(&rtt, 0, sizeof(rtt));
  memset(&lag, 0, sizeof(lag));
  sent_meas = recv_meas = 0;
  for (int i = 0; i < next_connect; i++) S[i].recv_meas = 0;
  scan_tasks(&tasks0);
  take_snap(&snap0);
  t_meas0 = wsb_now_ns();
  uv_timer_start(&phase_timer, end_measure, (uint64_t)(o_duration * 1000 + 0.5), 0);
}

static void arm_at(uint64_t t) {
  struct itimerspec its;
  memset(&its, 0, sizeof(its));
  its.it_value.tv_sec = (time_t)(t / 1000000000u);
  its.it_value.tv_nsec = (long)(t % 1000000000u);
  if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
  timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static uint64_t sched_at(uint64_t j) { return sched_t0 + (uint64_t)((double)j * period_ns); }

/* Sends every message due by now; returns the time the next one is due. */
static uint64_t send_due(void) {
  uint64_t now = wsb_now_ns();
  int batch = 0;
  while (sched_at(sched_j) <= now && batch < 4096) {
    uint64_t due = sched_at(sched_j);
    sess_t *s = &S[sched_j % (uint64_t)next_connect];
    sched_j++;
    batch++;
    if (s->state != S_OPEN || s->closing ||
        uv_stream_get_write_queue_size((uv_stream_t *)&s->tcp) > OUT_SKIP ||
        queue_msg(s, now) != 0) {
      skipped++;
      continue;
    }
    if (phase == P_MEASURE) wsb_hist_add(&lag, now - due);
    pump(s);
    if (batch % 64 == 0) now = wsb_now_ns();
  }
  return sched_at(sched_j);
}

static void on_tick(uv_poll_t *p, int status, int events) {
  uint64_t x;
  while (read(tfd, &x, sizeof(x)) > 0) {
  }
  if (phase != P_WARMUP && phase != P_MEASURE) return;
  arm_at(send_due());
}

static void start_traffic(void) {
  phase = P_WARMUP;
  uint64_t now = wsb_now_ns();
  if (o_mode == M_CLOSED) {
    for (int i = 0; i < next_connect; i++) {
      if (queue_msg(&S[i], wsb_now_ns()) == 0) pump(&S[i]);
    }
  } else {
    period_ns = 1e9 / o_rate;
    sched_t0 = now + 1000000; /* first send 1 ms from now */
    sched_j = 0;
    if (o_spin) goto phases; /* main() polls the loop and calls send_due() */
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (tfd < 0) {
      perror("timerfd_create");
      exit(1);
    }
    uv_poll_init(loop, &tpoll, tfd);
    uv_poll_start(&tpoll, UV_READABLE, on_tick);
    arm_at(sched_t0);
  }
phases:
  if (o_warmup > 0)
    uv_timer_start(&phase_timer, begin_measure, (uint64_t)(o_warmup * 1000 + 0.5), 0);
  else
    begin_measure(&phase_timer);
}

/* Handshakes still unanswered after --connect-timeout seconds count as failed, and so do
 * sessions not started yet. */
static void on_connect_timeout(uv_timer_t *t) {
  if (phase != P_CONNECT) return;
  stop_connecting = 1;
  if (!first_fail[0]) snprintf(first_fail, sizeof(first_fail), "handshake timed out");
  n_failed += o_sessions - next_connect;
  for (int i = 0; i < next_connect; i++) {
    sess_t *s = &S[i];
    if (!s->closing && (s->state == S_CONNECTING || s->state == S_HANDSHAKE)) {
      s->state = S_CONNECTING; /* so that on_connect ignores it */
      handshake_failed(s, "handshake timed out");
    }
  }
  check_all_connected();
}

static void check_all_connected(void) {
  if (phase != P_CONNECT || n_ok + n_failed < o_sessions) return;
  double secs = (double)(wsb_now_ns() - conn_t0) / 1e9;
  uv_timer_stop(&connect_timer);
  fprintf(stderr, "ws-load: %d sessions open, %d failed in %.2f s%s%s\n", n_open, n_failed, secs,
          first_fail[0] ? "; first failure: " : "", first_fail);
  if (o_mode == M_IDLE) {
    printf("ready open=%d failed=%d secs=%.2f\n", n_open, n_failed, secs);
    fflush(stdout);
    phase = P_WARMUP; /* nothing more to do: hold until a signal */
    return;
  }
  if (n_open == 0) {
    printf("error=no_sessions failed=%d first_failure=\"%s\"\n", n_failed, first_fail);
    fflush(stdout);
    exit(1);
  }
  start_traffic();
}

/* ---- summary --------------------------------------------------------------------------- */

static void finish(void) {
  double secs = (double)(t_meas1 - t_meas0) / 1e9;
  if (secs <= 0) secs = 1e-9;
  int stalled = 0, not_closed = 0;
  for (int i = 0; i < next_connect; i++) {
    if (S[i].was_open && S[i].recv_meas == 0) stalled++;
    if (S[i].state != S_DONE) not_closed++;
  }
  printf("mode=%s sessions=%d open=%d failed=%d size=%d", o_mode == M_CLOSED ? "closed" : "open",
         o_sessions, o_sessions - n_failed, n_failed, o_size);
  if (o_mode == M_OPEN) printf(" rate=%.0f", o_rate);
  printf(" secs=%.3f sent=%llu recv=%llu msgs_per_s=%.1f", secs, (unsigned long long)sent_meas,
         (unsigned long long)recv_meas, (double)recv_meas / secs);
  printf(" p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f mean_us=%.1f",
         wsb_hist_q(&rtt, 0.50) / 1e3, wsb_hist_q(&rtt, 0.90) / 1e3, wsb_hist_q(&rtt, 0.99) / 1e3,
         wsb_hist_q(&rtt, 0.999) / 1e3, (double)rtt.max / 1e3,
         rtt.n ? (double)rtt.sum / (double)rtt.n / 1e3 : 0.0);
  if (o_mode == M_OPEN)
    printf(" lag_p99_us=%.1f lag_max_us=%.1f skipped=%llu", wsb_hist_q(&lag, 0.99) / 1e3,
           (double)lag.max / 1e3, (unsigned long long)skipped);
  printf(" bad=%llu lost=%llu stalled=%d close_early=%llu early_code=%d eof_early=%llu "
         "err_early=%llu close_clean=%llu close_other=%llu not_closed=%d",
         (unsigned long long)bad, (unsigned long long)(lost + g_inflight), stalled,
         (unsigned long long)close_early, last_early_code, (unsigned long long)eof_early,
         (unsigned long long)err_early, (unsigned long long)close_clean,
         (unsigned long long)close_other, not_closed);
  double wall = (double)(snap1.wall_ns - snap0.wall_ns) / 1e9;
  double hz = (double)sysconf(_SC_CLK_TCK);
  if (wall > 0) {
    printf(" self_cpu_pct=%.1f", (double)(snap1.self_ns - snap0.self_ns) / 1e9 / wall * 100);
    for (int i = 0; i < n_watch; i++) {
      double cs = (double)(snap1.watch_ns[i] - snap0.watch_ns[i]) / 1e9;
      printf(" %s_cpu_pct=%.1f %s_us_per_msg=%.2f", watch_name[i], cs / wall * 100,
             watch_name[i], recv_meas ? cs * 1e6 / (double)recv_meas : 0.0);
    }
    char top[160];
    uint64_t other = others_ns(top, sizeof(top));
    printf(" others_cpu_pct=%.1f others_top=%s", (double)other / 1e9 / wall * 100, top);
    for (int c = 0; c < snap1.ncpu; c++) {
      double idle = (double)(snap1.idle[c] - snap0.idle[c]) / hz / wall * 100;
      printf(" busy_cpu%d=%.1f", c, idle > 100 ? 0.0 : 100 - idle);
    }
  }
  printf("\n");
  fflush(stdout);
  exit(0);
}

static void on_signal(uv_signal_t *h, int sig) {
  if (o_mode == M_IDLE)
    fprintf(stderr, "ws-load idle: %d of %d sessions still open; lost meanwhile: close frames %llu "
            "(last code %d), EOF/reset %llu, errors %llu\n", n_open, n_ok,
            (unsigned long long)close_early, last_early_code, (unsigned long long)eof_early,
            (unsigned long long)err_early);
  exit(o_mode == M_IDLE ? 0 : 1);
}

static void usage(void) {
  fprintf(stderr, "usage: ws-load --port P [--host 127.0.0.1] [--path /ws] [--sessions 100] "
                  "[--size 1024] [--mode closed|open|idle] [--rate R] [--duration 10] "
                  "[--warmup 2] [--concurrency 256] [--connect-timeout 30] [--spin 1|0] "
                  "[--watch NAME=PID]...\n");
  exit(2);
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) usage();
    i++;
    if (!strcmp(a, "--host")) o_host = v;
    else if (!strcmp(a, "--port")) o_port = atoi(v);
    else if (!strcmp(a, "--path")) o_path = v;
    else if (!strcmp(a, "--sessions")) o_sessions = atoi(v);
    else if (!strcmp(a, "--size")) o_size = atoi(v);
    else if (!strcmp(a, "--rate")) o_rate = atof(v);
    else if (!strcmp(a, "--duration")) o_duration = atof(v);
    else if (!strcmp(a, "--warmup")) o_warmup = atof(v);
    else if (!strcmp(a, "--concurrency")) o_conc = atoi(v);
    else if (!strcmp(a, "--spin")) o_spin = atoi(v);
    else if (!strcmp(a, "--connect-timeout")) o_connect_timeout = atof(v);
    else if (!strcmp(a, "--mode")) {
      if (!strcmp(v, "closed")) o_mode = M_CLOSED;
      else if (!strcmp(v, "open")) o_mode = M_OPEN;
      else if (!strcmp(v, "idle")) o_mode = M_IDLE;
      else usage();
    } else if (!strcmp(a, "--watch")) {
      const char *eq = strchr(v, '=');
      if (!eq || n_watch >= MAX_WATCH) usage();
      watch_name[n_watch] = strndup(v, (size_t)(eq - v));
      watch_pid[n_watch++] = atoi(eq + 1);
    } else usage();
  }
  if (o_port <= 0 || o_sessions <= 0 || o_size < 9 || o_conc <= 0 ||
      (o_mode == M_OPEN && o_rate <= 0))
    usage();
  signal(SIGPIPE, SIG_IGN);
  loop = uv_default_loop();
  if (uv_ip4_addr(o_host, o_port, &dest) != 0) {
    fprintf(stderr, "ws-load: bad host %s\n", o_host);
    return 2;
  }
  rng ^= (uint64_t)getpid() << 17 ^ wsb_now_ns();
  tmpl = wsb_xmalloc((size_t)o_size);
  for (int i = 0; i < o_size; i++) tmpl[i] = (uint8_t)('a' + i % 26);
  tmpl[0] = 0xEE;
  S = calloc((size_t)o_sessions, sizeof(*S));
  if (!S) abort();
  uv_timer_init(loop, &phase_timer);
  uv_signal_t s1, s2;
  uv_signal_init(loop, &s1);
  uv_signal_init(loop, &s2);
  uv_signal_start(&s1, on_signal, SIGTERM);
  uv_signal_start(&s2, on_signal, SIGINT);
  conn_t0 = wsb_now_ns();
  uv_timer_init(loop, &connect_timer);
  uv_timer_start(&connect_timer, on_connect_timeout, (uint64_t)(o_connect_timeout * 1000), 0);
  uv_unref((uv_handle_t *)&connect_timer);
  start_more();
  if (o_mode != M_OPEN || !o_spin) {
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
  }
  /* Open loop, busy-polling: no timer to program and no sleep to wake from, so sends leave
   * on time and echoes are read as they arrive (this CPU is 100% busy, by design). */
  for (;;) {
    uv_run(loop, UV_RUN_NOWAIT);
    if (phase == P_WARMUP || phase == P_MEASURE) send_due();
  }
}
