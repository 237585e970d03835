"""Observability with the real binaries: GET /metrics (promtool-valid, every metric of the
docs/metrics.md catalogue present with its documented type and labels, and the figures moving
as the traffic says), metrics defined by policies (sluice.metrics), GET /status (schema and
breaker states), GET /readyz, the admin token, reload counters, and the JSON access log (to a
file and to standard output).

Needs promtool (Debian package `prometheus`, installed by scripts/setup.sh) and Debian's
python3-websockets; fails, never skips, without them."""

import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
import websockets  # noqa: E402  (Debian python3-websockets)

TOKEN = "obs-admin-token-0123456789abcdef"
FAIL503 = ["--fail-rate", "1", "--fail-status", "503"]
LATENCY_BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
                   "30", "60", "+Inf"]


def dead_url():
    return "http://127.0.0.1:%d" % h.free_port()


def host_routes(pools):
    return [{"path": "/", "pool": name, "host": name + ".test"} for name in pools]


def promtool():
    path = shutil.which("promtool")
    if not path:
        raise AssertionError("promtool not found: install Debian's `prometheus` package "
                             "(scripts/setup.sh does)")
    return path


# ---------------------------------------------------------------------------------------
# The Prometheus text format, parsed strictly enough to catch malformed lines.

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}.get(m.group(1), "\\" + m.group(1)), v)


def _parse_labels(text):
    inner = text[1:-1]
    out = {}
    pos = 0
    while pos < len(inner):
        m = _LABEL_RE.match(inner, pos)
        if not m:
            raise AssertionError("malformed label set %r" % text)
        if m.group(1) in out:
            raise AssertionError("label %s twice in %r" % (m.group(1), text))
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return out


class Scrape:
    """One /metrics answer: types, helps and samples {(name, frozenset(labels)): value}."""

    def __init__(self, text):
        self.text = text
        self.types = {}
        self.helps = {}
        self.samples = {}
        self.order = []
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split(" ", 3)
                self.types[name] = typ
                continue
            if line.startswith("# HELP "):
                parts = line.split(" ", 3)
                self.helps[parts[2]] = parts[3] if len(parts) > 3 else ""
                continue
            if line.startswith("#"):
                continue
            m = _SAMPLE_RE.match(line)
            if not m:
                raise AssertionError("malformed sample line %r" % line)
            labels = _parse_labels(m.group(2)) if m.group(2) else {}
            key = (m.group(1), frozenset(labels.items()))
            if key in self.samples:
                raise AssertionError("duplicate sample %r" % line)
            self.samples[key] = float(m.group(3))
            self.order.append(key)

    def family_of(self, name):
        """The family a sample name belongs to (histograms: without _bucket/_sum/_count)."""
        if name in self.types:
            return name
        for suf in ("_bucket", "_sum", "_count"):
            if name.endswith(suf) and self.types.get(name[:-len(suf)]) == "histogram":
                return name[:-len(suf)]
        return None

    def get(self, name, **labels):
        """The value of the sample with exactly these labels, or None."""
        return self.samples.get((name, frozenset(labels.items())))

    def val(self, name, **labels):
        """Like get, but the sample must exist."""
        v = self.get(name, **labels)
        if v is None:
            similar = ["%s%s" % (n, dict(l)) for (n, l) in self.order if n == name][:20]
            raise AssertionError("no sample %s%r in the scrape; %s has: %s"
                                 % (name, labels, name, similar or "nothing"))
        return v

    def series(self, name):
        """The label dicts of every sample called name."""
        return [dict(l) for (n, l) in self.order if n == name]

    def hist(self, name, **labels):
        """{le: cumulative count}, sum, count of one histogram series."""
        buckets = {}
        for (n, l) in self.order:
            if n != name + "_bucket":
                continue
            d = dict(l)
            le = d.pop("le", None)
            if d == labels:
                buckets[le] = self.samples[(n, l)]
        return buckets, self.val(name + "_sum", **labels), self.val(name + "_count", **labels)


# ---------------------------------------------------------------------------------------
# A WebSocket echo upstream on its own asyncio loop.


WsEcho = h.WsEchoUpstream


def ws_session(port, path, messages, hold=0.0, during=None):
    """One WebSocket session through sluice: sends each message, checks its echo, calls
    during() while the session is open, then closes. Returns the client's x-request-id."""

    async def go():
        async with websockets.connect("ws://127.0.0.1:%d%s" % (port, path), max_size=None) as ws:
            rid = ws.response_headers.get("x-request-id")
            for m in messages:
                await ws.send(m)
                echo = await asyncio.wait_for(ws.recv(), 10)
                if echo != m:
                    raise AssertionError("echo %r != sent %r" % (echo[:50], m[:50]))
            if during:
                during()  # blocks this client's loop briefly: nothing else runs on it
            if hold:
                await asyncio.sleep(hold)
            return rid

    return asyncio.run(asyncio.wait_for(go(), 30))


# ---------------------------------------------------------------------------------------
# Shared helpers


class ObsCase(h.SluiceTestCase):
    token = None

    @classmethod
    def start_sluice(cls, cfg):
        cls.sluice = cls.env.sluice(cfg)
        cls.port = cls.sluice.port
        cls.admin = cls.sluice.admin_port()

    def auth(self):
        return {"Authorization": "Bearer " + self.token} if self.token else {}

    def admin_get(self, path, method="GET"):
        return h.http_request(self.admin, method, path, headers=self.auth())

    def scrape(self):
        status, hs, body = self.admin_get("/metrics")
        self.assertEqual(status, 200, body[:300])
        ctype = h.hdr(hs, "content-type", "")
        self.assertTrue(ctype.startswith("text/plain; version=0.0.4"), ctype)
        return Scrape(body.decode("utf-8"))

    def status(self):
        status, hs, body = self.admin_get("/status")
        self.assertEqual(status, 200, body[:300])
        self.assertTrue(h.hdr(hs, "content-type", "").startswith("application/json"), hs)
        return json.loads(body)

    def req(self, host, path="/echo", headers=None, method="GET", body=None, timeout=10.0):
        """One request on its own connection; host is a pool name (Host <pool>.test) or a
        literal Host when it has a dot."""
        with h.RawConn(self.port, timeout=timeout) as c:
            return c.request(method, path, headers, body, host=host if "." in host else host + ".test")

    @staticmethod
    def count(mock):
        return mock.stats()["requests"]

    def scrape_until(self, pred, what, timeout=5.0):
        """Scrapes until pred(scrape) holds; returns that scrape."""
        return h.wait_for(lambda: (lambda s: s if pred(s) else None)(self.scrape()), timeout, what=what)

    def assertDelta(self, before, after, name, want, **labels):
        got = after.val(name, **labels) - before.val(name, **labels)
        self.assertEqual(got, want, "%s%r moved by %s, expected %s" % (name, labels, got, want))


# ---------------------------------------------------------------------------------------
# 1-3: /metrics on a gateway with every kind of pool and route


class MetricsTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.ok = env.mock("ok")
        cls.ok2 = env.mock("ok2")
        cls.bad = env.mock("bad", FAIL503)
        cls.good = env.mock("good")
        cls.slowq = env.mock("slowq")
        cls.q0 = env.mock("q0")
        cls.tmo = env.mock("tmo")
        cls.ws = WsEcho()
        env.upstreams.append(cls.ws)
        cls.dead = dead_url()
        cls.dead_fb = dead_url()
        cls.pools = {
            "main": h.make_pool([cls.ok]),
            "retry": h.make_pool([cls.dead, cls.ok2], "round_robin", retry={"attempts": 3}),
            "brk": h.make_pool([cls.bad, cls.good], "round_robin",
                               breaker={"policy": "consecutive", "failures": 2, "open_ms": 60000}),
            "queue": h.make_pool([cls.slowq], max_inflight=1, queue={"max": 4, "timeout_ms": 400}),
            "noqueue": h.make_pool([cls.q0], max_inflight=1, queue={"max": 0}),
            "timeout": h.make_pool([cls.tmo], timeout_ms={"first_byte": 150}),
            "fb": h.make_pool([cls.dead_fb], breaker={"failures": 1, "open_ms": 60000}, fallback="main"),
            "ws": h.make_pool([cls.ws.url]),
        }
        routes = host_routes([p for p in cls.pools if p != "ws"]) + [
            {"path": "/echo/cached", "pool": "main", "cache": {}},
            {"path": "/ws", "pool": "ws"},
        ]
        cls.start_sluice(h.make_config(cls.pools, routes, watch=False))
        cls.cache_n = 0

    # traffic ---------------------------------------------------------------------------------

    def cache_hit(self):
        """A MISS then a HIT on the cached route; returns the two responses."""
        type(self).cache_n += 1
        path = "/echo/cached/%d-%d" % (os.getpid(), self.cache_n)
        r1 = self.req("localhost", path)
        r2 = self.req("localhost", path)
        self.assertEqual((r1.status, r1.header("x-cache")), (200, "MISS"), r1)
        self.assertEqual((r2.status, r2.header("x-cache")), (200, "HIT"), r2)
        return r1, r2

    def retried(self):
        """Requests to the retry pool (dead endpoint first) until one was retried; every
        one must succeed. Returns how many were sent."""
        s0 = self.scrape()
        n = 0
        while True:
            n += 1
            r = self.req("retry", "/echo/retry")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("x-mock-instance"), "ok2")
            if self.scrape().val("sluice_retries_total", pool="retry") > s0.val("sluice_retries_total", pool="retry"):
                return n
            self.assertLess(n, 4, "round robin never sent a request to the dead endpoint first")

    def traffic(self):
        """A bit of everything: successes, a retry, an upstream error, a 404, a cache hit and
        a WebSocket session."""
        for i in range(3):
            self.assertEqual(self.req("main", "/echo/t%d" % i).status, 200)
        self.retried()
        self.assertEqual(self.req("main", "/echo/err", [("x-mock-status", "500")]).status, 500)
        self.assertEqual(self.req("nowhere.test", "/nothing").status, 404)
        self.cache_hit()
        ws_session(self.port, "/ws", ["hello", b"\x00\x01binary"])

    # 1 ---------------------------------------------------------------------------------------

    def test_promtool_check_metrics(self):
        tool = promtool()
        self.traffic()
        sc = self.scrape()
        # the traffic happened (so the scrape is not trivially valid)
        self.assertGreater(sc.val("sluice_retries_total", pool="retry"), 0)
        self.assertGreater(sum(sc.val("sluice_cache_hits_total", **l) for l in sc.series("sluice_cache_hits_total")), 0)
        self.assertGreater(sc.val("sluice_ws_sessions_total", route="/ws", pool="ws"), 0)
        self.assertGreater(sc.val("sluice_requests_total", route="main.test/", pool="main", code="5xx"), 0)
        p = subprocess.run([tool, "check", "metrics"], input=sc.text.encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(p.returncode, 0, "promtool check metrics:\n%s" % p.stdout.decode(errors="replace"))
        self.assertEqual(p.stdout.decode(errors="replace").strip(), "")

    # 2 ---------------------------------------------------------------------------------------

    def test_every_catalogued_metric_is_exported_as_documented(self):
        cat = h.metrics_catalogue()
        self.traffic()
        sc = self.scrape()
        problems = []
        for name, (typ, labels) in sorted(cat.items()):
            got = sc.types.get(name)
            if got is None:
                problems.append("%s: missing (no # TYPE line)" % name)
                continue
            if got != typ:
                problems.append("%s: type %s, catalogue says %s" % (name, got, typ))
            if not sc.helps.get(name):
                problems.append("%s: no # HELP text" % name)
            names = [name + s for s in ("_bucket", "_sum", "_count")] if typ == "histogram" else [name]
            seen = [(n, dict(l)) for (n, l) in sc.order if n in names]
            if not seen:
                problems.append("%s: no samples" % name)
            for n, l in seen:
                keys = set(l)
                if n.endswith("_bucket") and typ == "histogram":
                    if "le" not in keys:
                        problems.append("%s: bucket without le: %r" % (name, l))
                    keys.discard("le")
                if keys != labels:
                    problems.append("%s: labels %s, catalogue says %s" % (n, sorted(keys), sorted(labels)))
                    break
        # and nothing undocumented (policy-defined metrics aside)
        for name in sc.types:
            if name.startswith("sluice_") and not name.startswith("sluice_policy_") and name not in cat:
                problems.append("%s: exported but not in the catalogue" % name)
        for (n, _l) in sc.order:
            if sc.family_of(n) is None:
                problems.append("sample %s has no # TYPE" % n)
        self.assertEqual(problems, [], "\n".join(problems))

        # histograms use the documented latency buckets, cumulative, +Inf == _count
        for name in ("sluice_request_duration_seconds", "sluice_queue_wait_seconds",
                     "sluice_upstream_ttfb_seconds"):
            for l in sc.series(name + "_count"):
                buckets, _s, count = sc.hist(name, **l)
                self.assertEqual(list(buckets), LATENCY_BUCKETS, name)
                vals = list(buckets.values())
                self.assertEqual(vals, sorted(vals), "%s%r buckets not cumulative" % (name, l))
                self.assertEqual(vals[-1], count, "%s%r: +Inf bucket != _count" % (name, l))

        # process-wide figures agree with /status
        st = self.status()
        self.assertEqual(sc.series("sluice_build_info"), [{"version": st["version"]}])
        self.assertEqual(sc.val("sluice_build_info", version=st["version"]), 1)
        self.assertEqual(sc.val("sluice_config_generation"), st["generation"])

    # 3 ---------------------------------------------------------------------------------------

    def test_requests_and_duration_move_by_n(self):
        n = 7
        s0 = self.scrape()
        for i in range(n):
            r = self.req("main", "/echo/n%d" % i)
            self.assertEqual(r.status, 200, r)
        s1 = self.scrape()
        lab = dict(route="main.test/", pool="main")
        self.assertDelta(s0, s1, "sluice_requests_total", n, code="2xx", **lab)
        for code in ("1xx", "3xx", "4xx", "5xx"):
            self.assertDelta(s0, s1, "sluice_requests_total", 0, code=code, **lab)
        self.assertDelta(s0, s1, "sluice_request_duration_seconds_count", n, **lab)
        self.assertGreater(s1.val("sluice_request_duration_seconds_sum", **lab),
                           s0.val("sluice_request_duration_seconds_sum", **lab))
        ep = dict(pool="main", endpoint=self.ok.url)
        self.assertDelta(s0, s1, "sluice_upstream_ttfb_seconds_count", n, **ep)
        # admitted at once: n observations of exactly 0
        self.assertDelta(s0, s1, "sluice_queue_wait_seconds_count", n, pool="main")
        self.assertDelta(s0, s1, "sluice_queue_wait_seconds_sum", 0, pool="main")
        self.assertDelta(s0, s1, "sluice_queue_wait_seconds_bucket", n, pool="main", le="0.005")
        self.assertEqual(s1.val("sluice_endpoint_inflight", **ep), 0)
        self.assertEqual(s1.val("sluice_pool_inflight", pool="main"), 0)
        self.assertEqual(s1.val("sluice_endpoint_max_inflight", **ep), 0)
        # the admin requests themselves are not counted as traffic
        self.assertDelta(s0, s1, "sluice_requests_total", 0, route="", pool="", code="2xx")

    def test_404_counts_under_empty_route_and_pool(self):
        s0 = self.scrape()
        r = self.req("nowhere.test", "/nothing/here")
        self.assertJsonError(r, 404, "route_not_found")
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="", pool="", code="4xx")
        self.assertDelta(s0, s1, "sluice_request_duration_seconds_count", 1, route="", pool="")

    def test_malformed_request_counts_under_empty_route(self):
        s0 = self.scrape()
        with h.RawConn(self.port) as c:
            c.send(b"GET /echo HTTP/1.1\r\nHost: main.test\r\nNoColonHere\r\n\r\n")
            r = c.read_response()
        self.assertEqual(r.status, 400, r)
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="", pool="", code="4xx")
        self.assertDelta(s0, s1, "sluice_requests_total", 0, route="main.test/", pool="main", code="4xx")

    def test_retry_and_connect_error(self):
        s0 = self.scrape()
        n = self.retried()
        s1 = self.scrape()
        retries = s1.val("sluice_retries_total", pool="retry") - s0.val("sluice_retries_total", pool="retry")
        self.assertGreaterEqual(retries, 1)
        # every retry here follows a refused connection to the dead endpoint, never the live one
        self.assertDelta(s0, s1, "sluice_upstream_connect_errors_total", retries, pool="retry", endpoint=self.dead)
        self.assertDelta(s0, s1, "sluice_upstream_connect_errors_total", 0, pool="retry", endpoint=self.ok2.url)
        # one request each, whatever the number of attempts
        self.assertDelta(s0, s1, "sluice_requests_total", n, route="retry.test/", pool="retry", code="2xx")
        self.assertDelta(s0, s1, "sluice_requests_total", 0, route="retry.test/", pool="retry", code="5xx")
        self.assertDelta(s0, s1, "sluice_upstream_ttfb_seconds_count", n, pool="retry", endpoint=self.ok2.url)

    def test_breaker_opening(self):
        bad = dict(pool="brk", endpoint=self.bad.url)
        good = dict(pool="brk", endpoint=self.good.url)
        s0 = self.scrape()
        self.assertEqual(s0.val("sluice_breaker_state", **bad), 0)
        statuses = []
        while self.count(self.bad) < 2:
            statuses.append(self.req("brk", "/echo/b").status)
            self.assertLess(len(statuses), 8, statuses)
        self.assertEqual(statuses.count(503), 2, statuses)
        s1 = self.scrape()
        self.assertEqual(s1.val("sluice_breaker_state", **bad), 1)
        self.assertEqual(s1.val("sluice_breaker_state", **good), 0)
        self.assertDelta(s0, s1, "sluice_breaker_transitions_total", 1, to="open", **bad)
        self.assertDelta(s0, s1, "sluice_breaker_transitions_total", 0, to="half_open", **bad)
        self.assertDelta(s0, s1, "sluice_breaker_transitions_total", 0, to="open", **good)
        self.assertDelta(s0, s1, "sluice_endpoint_ejections_total", 1, **bad)
        self.assertDelta(s0, s1, "sluice_endpoint_ejections_total", 0, **good)
        self.assertDelta(s0, s1, "sluice_requests_total", 2, route="brk.test/", pool="brk", code="5xx")
        self.assertDelta(s0, s1, "sluice_requests_total", len(statuses) - 2, route="brk.test/", pool="brk",
                         code="2xx")
        # ejected: the next requests all go to the healthy endpoint
        for _ in range(3):
            self.assertEqual(self.req("brk", "/echo/b").header("x-mock-instance"), "good")
        self.assertEqual(self.count(self.bad), 2)

    def test_queue_timeout_and_wait(self):
        ep = dict(pool="queue", endpoint=self.slowq.url)
        s0 = self.scrape()
        with h.RawConn(self.port) as busy:
            busy.send(h.build_request("GET", "/echo/busy", [("x-mock-delay-ms", "1200")], host="queue.test"))
            h.wait_for(lambda: self.slowq.stats()["inflight"] == 1, 5, what="the only slot taken")
            with h.RawConn(self.port) as waiter:
                waiter.send(h.build_request("GET", "/echo/waiting", host="queue.test"))
                # while it waits, the gauges show it
                sc = self.scrape_until(lambda s: s.val("sluice_pool_queued", pool="queue") == 1,
                                       "sluice_pool_queued{pool=queue} == 1", 2)
                self.assertEqual(sc.val("sluice_pool_inflight", pool="queue"), 2)
                self.assertEqual(sc.val("sluice_endpoint_inflight", **ep), 1)
                self.assertEqual(sc.val("sluice_endpoint_max_inflight", **ep), 1)
                r = waiter.read_response()
                self.assertJsonError(r, 503, "queue_timeout")
            self.assertEqual(busy.read_response().status, 200)
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_queue_timeouts_total", 1, pool="queue")
        self.assertDelta(s0, s1, "sluice_queue_rejections_total", 0, pool="queue")
        # two observations: the busy request (0, admitted at once) and the waiter (~0.4 s)
        self.assertDelta(s0, s1, "sluice_queue_wait_seconds_count", 2, pool="queue")
        self.assertDelta(s0, s1, "sluice_queue_wait_seconds_bucket", 1, pool="queue", le="0.25")
        self.assertDelta(s0, s1, "sluice_queue_wait_seconds_bucket", 2, pool="queue", le="1")
        waited = s1.val("sluice_queue_wait_seconds_sum", pool="queue") - s0.val("sluice_queue_wait_seconds_sum", pool="queue")
        self.assertGreaterEqual(waited, 0.38)
        self.assertLess(waited, 1.0)
        self.assertEqual(s1.val("sluice_pool_queued", pool="queue"), 0)
        self.assertEqual(s1.val("sluice_endpoint_inflight", **ep), 0)
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="queue.test/", pool="queue", code="5xx")
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="queue.test/", pool="queue", code="2xx")

    def test_queue_disabled_rejects(self):
        s0 = self.scrape()
        with h.RawConn(self.port) as busy:
            busy.send(h.build_request("GET", "/echo/busy", [("x-mock-delay-ms", "500")], host="noqueue.test"))
            h.wait_for(lambda: self.q0.stats()["inflight"] == 1, 5, what="the only slot taken")
            r = self.req("noqueue", "/echo/refused")
            self.assertJsonError(r, 503, "no_endpoint_available")
            self.assertEqual(busy.read_response().status, 200)
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_queue_rejections_total", 1, pool="noqueue")
        self.assertDelta(s0, s1, "sluice_queue_timeouts_total", 0, pool="noqueue")
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="noqueue.test/", pool="noqueue", code="5xx")
        self.assertEqual(self.count(self.q0), 1)

    def test_upstream_timeout(self):
        ep = dict(pool="timeout", endpoint=self.tmo.url)
        s0 = self.scrape()
        r = self.req("timeout", "/echo/slow", [("x-mock-delay-ms", "600")])
        self.assertJsonError(r, 504, "upstream_timeout")
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_upstream_timeouts_total", 1, **ep)
        self.assertDelta(s0, s1, "sluice_upstream_connect_errors_total", 0, **ep)
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="timeout.test/", pool="timeout", code="5xx")

    def test_fallback_counts_under_the_chosen_pool(self):
        s0 = self.scrape()
        first = self.req("fb", "/echo/fb")
        self.assertJsonError(first, 502, "upstream_connect_failed")
        r = self.req("fb", "/echo/fb")  # the only endpoint is ejected now: the fallback serves it
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-mock-instance"), "ok")
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_fallbacks_total", 1, pool="fb")
        self.assertDelta(s0, s1, "sluice_fallbacks_total", 0, pool="main")
        self.assertDelta(s0, s1, "sluice_upstream_connect_errors_total", 1, pool="fb", endpoint=self.dead_fb)
        self.assertEqual(s1.val("sluice_breaker_state", pool="fb", endpoint=self.dead_fb), 1)
        # docs/metrics.md: the pool label is the pool the route chose, even when a fallback served
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="fb.test/", pool="fb", code="2xx")
        self.assertDelta(s0, s1, "sluice_requests_total", 1, route="fb.test/", pool="fb", code="5xx")

    def test_cache_hit_and_miss(self):
        lab = dict(route="/echo/cached")
        s0 = self.scrape()
        self.cache_hit()
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_cache_misses_total", 1, **lab)
        self.assertDelta(s0, s1, "sluice_cache_hits_total", 1, **lab)
        self.assertDelta(s0, s1, "sluice_cache_coalesced_total", 0, **lab)
        self.assertDelta(s0, s1, "sluice_requests_total", 2, route="/echo/cached", pool="main", code="2xx")
        self.assertDelta(s0, s1, "sluice_request_duration_seconds_count", 2, route="/echo/cached", pool="main")
        self.assertDelta(s0, s1, "sluice_cache_entries", 1)
        self.assertGreater(s1.val("sluice_cache_bytes"), s0.val("sluice_cache_bytes"))
        # a HIT does not go upstream
        self.assertDelta(s0, s1, "sluice_upstream_ttfb_seconds_count", 1, pool="main", endpoint=self.ok.url)
        # the admin API's cache figures agree
        st = self.status()["cache"]
        self.assertEqual(st["hits"], s1.val("sluice_cache_hits_total", **lab))
        self.assertEqual(st["entries"], s1.val("sluice_cache_entries"))

    def test_websocket_session(self):
        lab = dict(route="/ws", pool="ws")
        ep = dict(pool="ws", endpoint=self.ws.url)
        s0 = self.scrape()
        self.assertEqual(s0.val("sluice_ws_sessions_open", **lab), 0)
        during = {}

        def look():
            during["scrape"] = self.scrape()

        msgs = ["one", "two", b"\x00three", "x" * 1000]
        ws_session(self.port, "/ws", msgs, during=look)
        sd = during["scrape"]
        self.assertEqual(sd.val("sluice_ws_sessions_open", **lab), 1)
        self.assertDelta(s0, sd, "sluice_ws_sessions_total", 1, **lab)
        self.assertEqual(sd.val("sluice_endpoint_inflight", **ep), 1)
        # an upgrade counts once, with the class of its 101, when it is answered
        self.assertDelta(s0, sd, "sluice_requests_total", 1, code="1xx", **lab)
        self.assertDelta(s0, sd, "sluice_request_duration_seconds_count", 1, **lab)

        s1 = self.scrape_until(lambda s: s.val("sluice_ws_sessions_open", **lab) == 0,
                               "sluice_ws_sessions_open back to 0")
        self.assertDelta(s0, s1, "sluice_ws_sessions_total", 1, **lab)
        self.assertDelta(s0, s1, "sluice_ws_messages_total", len(msgs), pool="ws", direction="client_to_upstream")
        self.assertDelta(s0, s1, "sluice_ws_messages_total", len(msgs), pool="ws", direction="upstream_to_client")
        self.assertDelta(s0, s1, "sluice_ws_upstream_lost_total", 0, pool="ws")
        self.assertDelta(s0, s1, "sluice_requests_total", 1, code="1xx", **lab)
        self.assertDelta(s0, s1, "sluice_requests_total", 0, code="2xx", **lab)
        self.assertEqual(s1.val("sluice_endpoint_inflight", **ep), 0)
        self.assertEqual(self.status()["websocket"]["sessions_total"], s1.val("sluice_ws_sessions_total", **lab))

    def test_websocket_bytes_are_the_bytes_received_per_leg(self):
        # docs/metrics.md: "Bytes received on each leg of a session, frame headers included".
        # Messages under 126 bytes: a client frame is 2 header bytes + a 4-byte mask + payload,
        # an upstream frame 2 + payload. The session ends with the client's close (code 1000, no
        # reason: 2 + 4 + 2 bytes) and the upstream's answer (2 + 2 bytes); no pings this soon.
        lab = dict(route="/ws", pool="ws")
        s0 = self.scrape()
        msgs = ["0123456789", "abcdefghij", b"\x01" * 10, "x" * 125]
        ws_session(self.port, "/ws", msgs)
        s1 = self.scrape_until(lambda s: s.val("sluice_ws_sessions_open", **lab) == 0, "session closed")
        self.assertDelta(s0, s1, "sluice_ws_bytes_total", sum(6 + len(m) for m in msgs) + 8,
                         pool="ws", direction="client_to_upstream")
        self.assertDelta(s0, s1, "sluice_ws_bytes_total", sum(2 + len(m) for m in msgs) + 4,
                         pool="ws", direction="upstream_to_client")
        self.assertDelta(s0, s1, "sluice_ws_messages_total", len(msgs), pool="ws", direction="client_to_upstream")


# ---------------------------------------------------------------------------------------
# 3 (reloads), series lifetime across reloads


class ReloadMetricsTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.ok = env.mock("ok")
        cls.ok2 = env.mock("extra")
        cls.pools = {"main": h.make_pool([cls.ok]), "extra": h.make_pool([cls.ok2])}
        cls.cfg = h.make_config(cls.pools, host_routes(cls.pools), watch=False)
        cls.start_sluice(cls.cfg)

    def write_config(self, text):
        with open(self.sluice.config_path, "w") as f:
            f.write(text)

    def reload(self):
        return h.http_request(self.admin, "POST", "/reload")

    def test_reload_counters_generation_and_series_lifetime(self):
        s0 = self.scrape()
        g0 = s0.val("sluice_config_generation")
        self.assertEqual(g0, self.status()["generation"])
        self.assertEqual(s0.val("sluice_reloads_total", result="ok"), 0)
        self.assertEqual(s0.val("sluice_reloads_total", result="failed"), 0)
        for i in range(3):
            self.assertEqual(self.req("main", "/echo/%d" % i).status, 200)

        # a good reload
        status, hs, body = self.reload()
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"result": "ok", "generation": g0 + 1})
        s1 = self.scrape()
        self.assertEqual(s1.val("sluice_reloads_total", result="ok"), 1)
        self.assertEqual(s1.val("sluice_reloads_total", result="failed"), 0)
        self.assertEqual(s1.val("sluice_config_generation"), g0 + 1)
        # a series that survives a reload keeps its value
        self.assertEqual(s1.val("sluice_requests_total", route="main.test/", pool="main", code="2xx"), 3)

        # a broken config: 422, the running generation stays
        self.write_config("return { pools = {\n")
        status, hs, body = self.reload()
        self.assertEqual(status, 422, body)
        err = json.loads(body)["error"]
        self.assertEqual(err["type"], "reload_failed")
        s2 = self.scrape()
        self.assertEqual(s2.val("sluice_reloads_total", result="ok"), 1)
        self.assertEqual(s2.val("sluice_reloads_total", result="failed"), 1)
        self.assertEqual(s2.val("sluice_config_generation"), g0 + 1)
        st = self.status()
        self.assertEqual(st["reloads"], {"ok": 1, "failed": 1})
        self.assertEqual(st["generation"], g0 + 1)
        self.assertEqual(self.req("main", "/echo/still").status, 200)

        # a config without pool "extra": its series go away, main's keep counting
        self.assertIsNotNone(s2.get("sluice_pool_inflight", pool="extra"))
        pools = {"main": self.pools["main"]}
        self.write_config(h.config_text(h.make_config(pools, host_routes(pools), watch=False)))
        status, hs, body = self.reload()
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["generation"], g0 + 2)

        def extra_gone():
            s = self.scrape()
            return s if not any("extra" in dict(l).get("pool", "") or "extra" in dict(l).get("route", "")
                                for (_n, l) in s.order) else None

        s3 = h.wait_for(extra_gone, 5, what="series of the removed pool and route to disappear")
        self.assertEqual(s3.val("sluice_reloads_total", result="ok"), 2)
        self.assertEqual(s3.val("sluice_config_generation"), g0 + 2)
        self.assertEqual(s3.val("sluice_requests_total", route="main.test/", pool="main", code="2xx"), 4)
        self.assertEqual(self.req("main", "/echo/after").status, 200)
        self.assertEqual(self.scrape().val("sluice_requests_total", route="main.test/", pool="main", code="2xx"), 5)


# ---------------------------------------------------------------------------------------
# 3 (policy errors), 4: metrics defined by policies


COUNTING = r'''
-- Round robin that counts its picks in policy-defined metrics. Endpoint URLs come from
-- balancer_options: a policy cannot turn ep.url (a const char *) into a string itself.
local M = {}
local metrics = sluice.metrics

local picks, err = metrics.counter("picks_total", "Endpoints picked.", { "endpoint" })
if not picks then error("defining picks_total failed: " .. tostring(err)) end
if metrics.counter("picks_total", "Endpoints picked.", { "endpoint" }) == nil then
  error("an identical redefinition of picks_total was refused")
end

-- refusals are nil + message, never an exception
local function refused(what, m, msg, pattern)
  if m ~= nil or type(msg) ~= "string" or msg == "" or (pattern and not msg:find(pattern)) then
    error(what .. " was not refused with nil + message: got " .. tostring(m) .. ", " .. tostring(msg))
  end
end
refused("name with a colon", metrics.counter("bad:name", "x", {}))
refused("name starting with a digit", metrics.counter("9lives", "x", {}), "invalid metric name")
refused("name with a dash", metrics.gauge("bad-name", "x"))
refused("redefinition as another type", metrics.gauge("picks_total", "x", { "endpoint" }))
refused("redefinition with other labels", metrics.counter("picks_total", "x", { "ep" }))
refused("reserved label name", metrics.counter("reserved_label_total", "x", { "__x" }))
refused("histogram label le", metrics.histogram("le_hist", "x", { "le" }))

local index = assert(metrics.histogram("pick_index", "Index picked.", {}, { 1, 2, 3 }))
local last = assert(metrics.gauge("last_index", "Last index picked."))

function M.pick(pool, req)
  local st, n = pool.state, pool.n
  for k = 1, n do
    local i = ((st.next or 0) + k - 1) % n + 1
    if pool.endpoints[i].available then
      st.next = i
      picks:inc(1, pool.options.urls[i])
      index:observe(i)
      last:set(i)
      return i
    end
  end
  return nil
end
return M
'''

BOOM = "local M = {}\nfunction M.pick(pool, req)\n  error('boom')\nend\nreturn M\n"
BADRET = "local M = {}\nfunction M.pick(pool, req)\n  return 99\nend\nreturn M\n"


class PolicyMetricsTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a, cls.b = env.mock("a"), env.mock("b")
        env.write("policies/balancer/counting.lua", COUNTING)
        env.write("policies/balancer/boom.lua", BOOM)
        env.write("policies/balancer/badret.lua", BADRET)
        urls = [cls.a.url, cls.b.url]
        pools = {
            "count": h.make_pool(urls, "counting", balancer_options={"urls": urls}),
            "boom": h.make_pool([cls.a], "boom"),
            "badret": h.make_pool([cls.a], "badret"),
        }
        cls.start_sluice(h.make_config(pools, host_routes(pools), policies=env.path("policies"), watch=False))

    def test_policy_counter_histogram_gauge(self):
        n = 6
        a0, b0 = self.count(self.a), self.count(self.b)
        s0 = self.scrape()
        for i in range(n):
            self.assertEqual(self.req("count", "/echo/%d" % i).status, 200)
        s1 = self.scrape()
        self.assertEqual(s1.types.get("sluice_policy_picks_total"), "counter")
        self.assertEqual(s1.helps.get("sluice_policy_picks_total"), "Endpoints picked.")
        self.assertEqual(s1.types.get("sluice_policy_pick_index"), "histogram")
        self.assertEqual(s1.types.get("sluice_policy_last_index"), "gauge")
        got_a = s1.val("sluice_policy_picks_total", endpoint=self.a.url) - (s0.get("sluice_policy_picks_total", endpoint=self.a.url) or 0)
        got_b = s1.val("sluice_policy_picks_total", endpoint=self.b.url) - (s0.get("sluice_policy_picks_total", endpoint=self.b.url) or 0)
        self.assertEqual(got_a, self.count(self.a) - a0)
        self.assertEqual(got_b, self.count(self.b) - b0)
        self.assertEqual(got_a + got_b, n)
        self.assertEqual((got_a, got_b), (n / 2, n / 2))
        self.assertEqual(sorted(l["endpoint"] for l in s1.series("sluice_policy_picks_total")),
                         sorted([self.a.url, self.b.url]))
        buckets, hsum, hcount = s1.hist("sluice_policy_pick_index")
        self.assertEqual(list(buckets), ["1", "2", "3", "+Inf"])
        c0 = s0.get("sluice_policy_pick_index_count") or 0
        self.assertEqual(hcount - c0, n)
        self.assertEqual(hsum - (s0.get("sluice_policy_pick_index_sum") or 0), 1 * n / 2 + 2 * n / 2)
        self.assertIn(s1.val("sluice_policy_last_index"), (1, 2))

        # the same definitions after a reload: the same metrics, still counting
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        self.assertEqual(status, 200, body)
        self.assertEqual(self.req("count", "/echo/after").status, 200)
        s2 = self.scrape()
        total = sum(s2.val("sluice_policy_picks_total", **l) for l in s2.series("sluice_policy_picks_total"))
        before = sum(s0.val("sluice_policy_picks_total", **l) for l in s0.series("sluice_policy_picks_total"))
        self.assertEqual(total - before, n + 1)

        # the exposition stays valid with policy metrics in it
        p = subprocess.run([promtool(), "check", "metrics"], input=s2.text.encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout.decode(errors="replace"))

    def test_balancer_errors_are_counted(self):
        s0 = self.scrape()
        st0 = self.status()["policy_errors"]
        for _ in range(2):
            self.assertJsonError(self.req("boom", "/echo"), 500, "policy_error")
        self.assertJsonError(self.req("badret", "/echo"), 500, "policy_error")
        s1 = self.scrape()
        self.assertDelta(s0, s1, "sluice_policy_errors_total", 2, policy="balancer/boom")
        self.assertDelta(s0, s1, "sluice_policy_errors_total", 1, policy="balancer/badret")
        self.assertDelta(s0, s1, "sluice_policy_errors_total", 0, policy="balancer/counting")
        self.assertDelta(s0, s1, "sluice_requests_total", 2, route="boom.test/", pool="boom", code="5xx")
        self.assertEqual(self.status()["policy_errors"] - st0, 3)


# ---------------------------------------------------------------------------------------
# 5: /status


INT = "int"
NUM = "number"
STR = "str"
BOOL = "bool"

STATUS_SCHEMA = {"version": STR, "generation": INT, "config": STR, "connections": INT,
                 "draining": BOOL, "pools": list, "cache": dict, "websocket": dict,
                 "reloads": dict, "policy_errors": INT}
POOL_SCHEMA = {"name": STR, "balancer": STR, "active": INT, "queued": INT, "retrying": INT,
               "ejected": INT, "queue_max": INT, "fallback": (STR, None), "endpoints": list}
EP_SCHEMA = {"url": STR, "inflight": INT, "max_inflight": INT, "queued": INT, "weight": INT,
             "available": BOOL, "ewma_ms": NUM, "reported_load": NUM, "successes": INT,
             "failures": INT, "breaker": STR, "consecutive_failures": INT, "ejections": INT,
             "idle_connections": INT}
CACHE_SCHEMA = {k: INT for k in ("entries", "bytes", "max_bytes", "hits", "misses", "coalesced", "evictions")}
WS_SCHEMA = {"sessions_total": INT, "upstream_lost": INT}
RELOADS_SCHEMA = {"ok": INT, "failed": INT}


def type_ok(v, t):
    if isinstance(t, tuple):
        return any(type_ok(v, x) for x in t)
    if t is None:
        return v is None
    if t == INT:
        return type(v) is int
    if t == NUM:
        return type(v) in (int, float)
    if t == STR:
        return type(v) is str
    if t == BOOL:
        return type(v) is bool
    return type(v) is t


class StatusTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.h1 = env.mock("h1")
        cls.dead = dead_url()
        cls.pools = {
            "healthy": h.make_pool([{"url": cls.h1.url, "weight": 3}], "round_robin", max_inflight=3,
                                   queue={"max": 7, "timeout_ms": 1000}),
            "doomed": h.make_pool([cls.dead], breaker={"failures": 1, "open_ms": 60000}, fallback="healthy"),
            "lagging": h.make_pool([dead_url()], breaker={"failures": 1, "open_ms": 60000}),
        }
        routes = host_routes(cls.pools) + [{"path": "/echo/cached", "pool": "healthy", "cache": {}}]
        cls.start_sluice(h.make_config(cls.pools, routes, watch=False))

    def check_schema(self, obj, schema, where):
        for k, t in schema.items():
            self.assertIn(k, obj, "%s: no %r in %r" % (where, k, obj))
            self.assertTrue(type_ok(obj[k], t), "%s.%s = %r is not %s" % (where, k, obj[k], t))

    def test_status_schema_and_ejected_endpoint(self):
        for i in range(3):
            self.assertEqual(self.req("healthy", "/echo/%d" % i).status, 200)
        self.assertEqual(self.req("localhost", "/echo/cached/x").header("x-cache"), "MISS")
        self.assertEqual(self.req("localhost", "/echo/cached/x").header("x-cache"), "HIT")
        self.assertJsonError(self.req("doomed", "/echo"), 502, "upstream_connect_failed")
        st = self.status()

        self.check_schema(st, STATUS_SCHEMA, "status")
        self.check_schema(st["cache"], CACHE_SCHEMA, "status.cache")
        self.check_schema(st["websocket"], WS_SCHEMA, "status.websocket")
        self.check_schema(st["reloads"], RELOADS_SCHEMA, "status.reloads")
        self.assertEqual(sorted(p.get("name") for p in st["pools"]), sorted(self.pools))
        for p in st["pools"]:
            self.check_schema(p, POOL_SCHEMA, "pool %s" % p.get("name"))
            self.assertTrue(p["endpoints"], p)
            for e in p["endpoints"]:
                self.check_schema(e, EP_SCHEMA, "pool %s endpoint %s" % (p["name"], e.get("url")))
                self.assertIn(e["breaker"], ("closed", "open", "half_open"), e)

        self.assertEqual(st["config"], self.sluice.config_path)
        self.assertIs(st["draining"], False)
        self.assertGreaterEqual(st["generation"], 1)
        self.assertRegex(st["version"], r"^\d+\.\d+")
        self.assertEqual(st["reloads"], {"ok": 0, "failed": 0})
        self.assertEqual((st["cache"]["hits"], st["cache"]["misses"]), (1, 1))
        self.assertGreaterEqual(st["cache"]["entries"], 1)
        self.assertGreater(st["cache"]["bytes"], 0)
        self.assertGreater(st["cache"]["max_bytes"], 0)

        pools = {p["name"]: p for p in st["pools"]}
        hp, dp = pools["healthy"], pools["doomed"]
        self.assertEqual((hp["balancer"], hp["queue_max"], hp["fallback"], hp["ejected"]),
                         ("round_robin", 7, None, 0))
        self.assertEqual((hp["active"], hp["queued"], hp["retrying"]), (0, 0, 0))
        he = hp["endpoints"][0]
        self.assertEqual(he["url"], self.h1.url)
        self.assertEqual((he["weight"], he["max_inflight"], he["inflight"], he["queued"]), (3, 3, 0, 0))
        self.assertEqual((he["breaker"], he["available"], he["failures"], he["ejections"]),
                         ("closed", True, 0, 0))
        self.assertEqual(he["successes"], 4)  # 3 + the cache MISS
        self.assertGreaterEqual(he["ewma_ms"], 0)
        self.assertEqual(he["idle_connections"], 1)  # kept alive after the sequential requests

        self.assertEqual(dp["fallback"], "healthy")
        # (dp["ejected"]: see test_pool_ejected_count_is_current)
        de = dp["endpoints"][0]
        self.assertEqual(de["url"], self.dead)
        self.assertEqual((de["breaker"], de["available"], de["ejections"], de["failures"],
                          de["consecutive_failures"], de["successes"]),
                         ("open", False, 1, 1, 1, 0))
        # /metrics says the same
        sc = self.scrape()
        self.assertEqual(sc.val("sluice_breaker_state", pool="doomed", endpoint=self.dead), 1)
        self.assertEqual(sc.val("sluice_breaker_state", pool="healthy", endpoint=self.h1.url), 0)
        self.assertEqual(sc.val("sluice_build_info", version=st["version"]), 1)


    def test_pool_ejected_count_is_current(self):
        self.assertJsonError(self.req("lagging", "/echo"), 502, "upstream_connect_failed")
        pool = [p for p in self.status()["pools"] if p["name"] == "lagging"][0]
        self.assertEqual(pool["endpoints"][0]["breaker"], "open", pool)
        self.assertEqual(pool["ejected"], 1, pool)


# ---------------------------------------------------------------------------------------
# 6: /readyz


class ReadyzTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.m1, cls.m2 = env.mock("m1"), env.mock("m2")
        cls.dead1, cls.dead2 = dead_url(), dead_url()
        brk = {"failures": 1, "open_ms": 60000}
        pools = {
            "up": h.make_pool([cls.m1]),
            "half": h.make_pool([cls.dead1, cls.m2], "round_robin", breaker=brk),
            "doomed": h.make_pool([cls.dead2], breaker=brk),
        }
        cls.start_sluice(h.make_config(pools, host_routes(pools), watch=False))

    def readyz(self):
        with h.RawConn(self.admin) as c:
            return c.request("GET", "/readyz")

    def test_readyz_follows_ejections(self):
        r = self.readyz()
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("content-type", "").startswith("application/json"), r.headers)
        self.assertEqual(r.json(), {"status": "ready"})

        # one of two endpoints ejected: still ready
        statuses = []
        while self.scrape().val("sluice_breaker_state", pool="half", endpoint=self.dead1) != 1:
            statuses.append(self.req("half", "/echo").status)
            self.assertLess(len(statuses), 4, statuses)
        self.assertIn(502, statuses)
        r = self.readyz()
        self.assertEqual(r.status, 200, r)

        # every endpoint of "doomed" ejected: not ready, and the error names that pool only
        self.assertJsonError(self.req("doomed", "/echo"), 502, "upstream_connect_failed")
        self.assertEqual(self.scrape().val("sluice_breaker_state", pool="doomed", endpoint=self.dead2), 1)
        r = self.readyz()
        err = self.assertJsonError(r, 503, "not_ready")
        self.assertIn("doomed", err["message"])
        self.assertNotIn("half", err["message"])
        self.assertNotRegex(err["message"], r"\bup\b")
        # liveness is not readiness
        status, _, body = h.http_request(self.admin, "GET", "/healthz")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))


class ReadyzRecoveryTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        cls.m = cls.env.mock("m")
        cls.dead = dead_url()
        pools = {"up": h.make_pool([cls.m]),
                 "brief": h.make_pool([cls.dead], breaker={"failures": 1, "open_ms": 200})}
        cls.start_sluice(h.make_config(pools, host_routes(pools), watch=False))

    def test_readyz_recovers_after_open_ms_without_traffic(self):
        self.assertJsonError(self.req("brief", "/echo"), 502, "upstream_connect_failed")
        r = self.readyz()
        self.assertEqual(r.status, 503, r)
        h.wait_for(lambda: self.readyz().status == 200, 2.0, 0.05,
                   what="/readyz 200 once the breaker's open_ms (200 ms) is over")
        self.assertEqual(self.scrape().val("sluice_breaker_state", pool="brief", endpoint=self.dead), 2)

    def readyz(self):
        with h.RawConn(self.admin) as c:
            return c.request("GET", "/readyz")


# ---------------------------------------------------------------------------------------
# 7: the admin token


class AdminTokenTest(ObsCase):
    token = TOKEN

    @classmethod
    def setUpEnv(cls):
        cls.m = cls.env.mock("m")
        pools = {"p": h.make_pool([cls.m])}
        cfg = h.make_config(pools, [{"path": "/", "pool": "p", "cache": {}}], watch=False)
        cfg["admin"] = {"addr": "127.0.0.1:0", "token": TOKEN}
        cls.start_sluice(cfg)

    def call(self, method, path, authorization=None):
        headers = [("Authorization", authorization)] if authorization is not None else []
        with h.RawConn(self.admin) as c:
            return c.request(method, path, headers)

    PROTECTED = [("GET", "/metrics"), ("GET", "/status"), ("POST", "/reload"), ("GET", "/cache"),
                 ("DELETE", "/cache")]

    def test_protected_endpoints_need_the_token(self):
        wrong = [None, "", "Bearer", "Bearer ", "Bearer wrong-token-0123456789abcd",
                 "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "Bearer  " + TOKEN,
                 "Basic " + TOKEN, TOKEN]
        for method, path in self.PROTECTED:
            for auth in wrong:
                with self.subTest(method=method, path=path, authorization=auth):
                    r = self.call(method, path, auth)
                    self.assertJsonError(r, 401, "unauthorized")
                    self.assertEqual(r.header_all("www-authenticate"), ["Bearer"], r.headers)
            with self.subTest(method=method, path=path, authorization="the token"):
                r = self.call(method, path, "Bearer " + TOKEN)
                self.assertEqual(r.status, 200, r)
                self.assertIsNone(r.header("www-authenticate"))
                if path == "/reload":
                    self.assertEqual(r.json()["result"], "ok")
                if path == "/metrics":
                    self.assertIn("sluice_requests_total", r.body.decode())
        # the scheme is case-insensitive (RFC 9110 11.1)
        self.assertEqual(self.call("GET", "/status", "bearer " + TOKEN).status, 200)

    def test_health_probes_need_no_token(self):
        for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
            for auth in (None, "Bearer nope"):
                r = self.call("GET", path, auth)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.json(), body)

    def test_client_listener_is_not_guarded(self):
        # the token guards the admin API only; proxied traffic needs none
        self.assertEqual(self.req("localhost", "/echo/x").status, 200)


# ---------------------------------------------------------------------------------------
# 8: the access log


TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LOG_FIELDS = {"time": str, "request_id": str, "client": str, "method": str, "path": str,
              "route": (str, type(None)), "pool": (str, type(None)), "endpoints": list,
              "attempts": int, "status": int, "bytes": int, "queue_wait_ms": int,
              "upstream_ttfb_ms": int, "duration_ms": (int, float), "cache": (str, type(None))}


def read_json_lines(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8")
    # only whole lines: a flush in progress may leave a partial last one
    return [json.loads(l) for l in text.split("\n")[:-1]]


class AccessLogTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.ok = env.mock("ok")
        cls.ok2 = env.mock("ok2")
        cls.ws = WsEcho()
        env.upstreams.append(cls.ws)
        cls.dead, cls.dead2 = dead_url(), dead_url()
        pools = {
            "main": h.make_pool([cls.ok]),
            "dead": h.make_pool([cls.dead]),
            "retry": h.make_pool([cls.dead2, cls.ok2], "round_robin", retry={"attempts": 3}),
            "ws": h.make_pool([cls.ws.url]),
        }
        routes = host_routes(["main", "dead", "retry"]) + [
            {"path": "/echo/cached", "pool": "main", "cache": {}},
            {"path": "/ws", "pool": "ws"},
        ]
        cls.start_sluice(h.make_config(pools, routes, access_log="access.log", watch=False))
        cls.log_path = os.path.join(cls.sluice.dir, "access.log")

    def raw_exchange(self, host, path):
        """A request with Connection: close; returns (every byte received, Response)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            s.sendall(h.build_request("GET", path, [("Connection", "close")], host=host))
            raw = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                raw += d
        finally:
            s.close()
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        r = h.Response()
        r.status = int(head[0].split(" ")[1])
        r.headers = [tuple(x.strip() for x in l.split(":", 1)) for l in head[1:]]
        return raw, r

    def test_one_line_per_request_with_the_client_request_id(self):
        expect = {}  # request id -> expected fields

        def add(r, **fields):
            rid = r.header("x-request-id")
            self.assertTrue(rid, r)
            self.assertNotIn(rid, expect)
            expect[rid] = fields
            return rid

        # earlier tests of this class waited for their own lines: the file is settled
        skip = len(read_json_lines(self.log_path))
        t0 = time.time()
        raw, r = self.raw_exchange("main.test", "/echo/raw")
        self.assertEqual(r.status, 200)
        add(r, method="GET", path="/echo/raw", route="/", pool="main", endpoints=[self.ok.url],
            attempts=1, status=200, cache=None, bytes=len(raw))
        r = self.req("main", "/echo/mine", [("X-Request-Id", "client-chosen-id-42")])
        self.assertEqual(r.header("x-request-id"), "client-chosen-id-42")
        add(r, method="GET", path="/echo/mine", status=200, route="/", pool="main")
        r = self.req("main", "/echo/post", method="POST", body=b"x" * 100)
        add(r, method="POST", path="/echo/post", status=200, endpoints=[self.ok.url], attempts=1)
        r = self.req("main", "/echo/err", [("x-mock-status", "503")])
        self.assertEqual(r.status, 503)
        add(r, status=503, pool="main", endpoints=[self.ok.url], attempts=1)
        r = self.req("dead", "/echo/dead")
        self.assertJsonError(r, 502, "upstream_connect_failed")
        add(r, status=502, route="/", pool="dead", endpoints=[self.dead], attempts=1, cache=None, local=True)
        r = self.req("retry", "/echo/retry")
        self.assertEqual(r.status, 200, r)
        # fresh round robin state: the dead endpoint first, then the live one
        add(r, status=200, pool="retry", endpoints=[self.dead2, self.ok2.url], attempts=2)
        r = self.req("nowhere.test", "/nothing")
        self.assertEqual(r.status, 404)
        add(r, status=404, path="/nothing", route=None, pool=None, endpoints=[], attempts=0, local=True)
        r = self.req("localhost", "/echo/cached/1")
        self.assertEqual(r.header("x-cache"), "MISS")
        add(r, status=200, route="/echo/cached", pool="main", cache="MISS", endpoints=[self.ok.url], attempts=1)
        r = self.req("localhost", "/echo/cached/1")
        self.assertEqual(r.header("x-cache"), "HIT")
        add(r, status=200, route="/echo/cached", pool="main", cache="HIT", endpoints=[], attempts=0)
        tw = time.monotonic()
        ws_rid = ws_session(self.port, "/ws", ["hi", "there"], hold=0.3)
        ws_elapsed = (time.monotonic() - tw) * 1000
        self.assertTrue(ws_rid)
        expect[ws_rid] = dict(status=101, websocket=True, route="/ws", pool="ws", endpoints=[self.ws.url],
                              attempts=1, method="GET", path="/ws", cache=None)

        def all_there():
            lines = read_json_lines(self.log_path)[skip:]
            return lines if {l.get("request_id") for l in lines} >= set(expect) else None

        lines = h.wait_for(all_there, 5, what="an access log line for every request")
        t1 = time.time()
        ids = [l["request_id"] for l in lines]
        self.assertEqual(sorted(ids), sorted(expect), "one line per request, nothing else")
        for line in lines:
            rid = line["request_id"]
            with self.subTest(request_id=rid):
                for k, t in LOG_FIELDS.items():
                    self.assertIn(k, line)
                    self.assertIsInstance(line[k], t, "%s = %r" % (k, line[k]))
                    if t is int:
                        self.assertNotIsInstance(line[k], bool, k)
                self.assertRegex(line["time"], TIME_RE)
                ts = datetime.datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=datetime.timezone.utc).timestamp()
                self.assertGreaterEqual(ts, t0 - 1)
                self.assertLessEqual(ts, t1 + 1)
                self.assertEqual(line["client"], "127.0.0.1")
                self.assertGreaterEqual(line["duration_ms"], 0)
                self.assertGreaterEqual(line["queue_wait_ms"], 0)
                self.assertGreaterEqual(line["bytes"], 0)
                self.assertEqual(line["attempts"], len(line["endpoints"]))
                want = dict(expect[rid])
                local = want.pop("local", False)  # answered by sluice itself: see test_error_lines_count_bytes
                for k, v in want.items():
                    self.assertEqual(line.get(k), v, "%s: %r, expected %r in %r" % (k, line.get(k), v, line))
                if want["status"] != 101:
                    self.assertNotIn("websocket", line)
                    if not local:
                        self.assertGreater(line["bytes"], 0)
        ws_line = [l for l in lines if l["request_id"] == ws_rid][0]
        # the session's duration, not the handshake's
        self.assertGreaterEqual(ws_line["duration_ms"], 300)
        self.assertLessEqual(ws_line["duration_ms"], ws_elapsed + 1000)  # milliseconds, not us

    def test_error_lines_count_bytes(self):
        rids = [self.req("nowhere.test", "/nothing").header("x-request-id"),
                self.req("dead", "/echo/dead").header("x-request-id")]
        lines = h.wait_for(lambda: (lambda ls: ls if len(ls) == 2 else None)(
            [l for l in read_json_lines(self.log_path) if l["request_id"] in rids]), 5, what="the two lines")
        self.assertEqual(sorted(l["status"] for l in lines), [404, 502])
        for l in lines:
            self.assertGreater(l["bytes"], 0, l)

    def test_websocket_line_counts_bytes(self):
        rid = ws_session(self.port, "/ws", ["0123456789"])
        line = h.wait_for(lambda: [l for l in read_json_lines(self.log_path) if l["request_id"] == rid],
                          5, what="the session's line")[0]
        self.assertGreater(line["bytes"], 0, line)


class AccessLogReloadTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        cls.m = cls.env.mock("m")
        cls.start_sluice(h.make_config({"p": h.make_pool([cls.m])}, [{"path": "/", "pool": "p"}],
                                       access_log="a.log", watch=False))

    def test_failed_reload_keeps_the_access_log(self):
        bad = h.make_config({"p": h.make_pool([self.m], "no_such_policy")}, [{"path": "/", "pool": "p"}],
                            access_log="b.log", watch=False)
        with open(self.sluice.config_path, "w") as f:
            f.write(h.config_text(bad))
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        self.assertEqual(status, 422, body)
        rid = self.req("localhost", "/echo/after").header("x-request-id")
        paths = [os.path.join(self.sluice.dir, n) for n in ("a.log", "b.log")]
        h.wait_for(lambda: any(rid in l["request_id"] for p in paths for l in read_json_lines(p)), 5,
                   what="the request's access log line")
        self.assertEqual([l["request_id"] for l in read_json_lines(paths[0])], [rid])
        self.assertFalse(os.path.exists(paths[1]), "a failed reload switched the access log to b.log")


class AccessLogStdoutTest(ObsCase):

    @classmethod
    def setUpEnv(cls):
        cls.m = cls.env.mock("m")
        cls.start_sluice(h.make_config({"p": h.make_pool([cls.m])}, [{"path": "/", "pool": "p"}],
                                       access_log=True, watch=False))

    def test_access_log_true_writes_to_stdout(self):
        # the harness sends sluice's stdout to <sluice dir>/stdout.log
        path = os.path.join(self.sluice.dir, "stdout.log")
        rids = []
        for i in range(3):
            r = self.req("localhost", "/echo/%d" % i)
            self.assertEqual(r.status, 200)
            rids.append(r.header("x-request-id"))
        lines = h.wait_for(lambda: (lambda ls: ls if len(ls) >= 3 else None)(read_json_lines(path)), 5,
                           what="three access log lines on stdout")
        self.assertEqual([l["request_id"] for l in lines], rids)
        self.assertEqual([l["path"] for l in lines], ["/echo/0", "/echo/1", "/echo/2"])
        self.assertEqual({l["status"] for l in lines}, {200})
        # and nothing went to a file named "true" or similar next to the config
        self.assertEqual(sorted(os.listdir(self.sluice.dir)), ["sluice.lua", "stdout.log"])


if __name__ == "__main__":
    unittest.main()
