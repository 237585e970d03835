"""Resilience features with the real binaries: the admission queue (bounded, FIFO, with a
wait timeout), retries (connect failures, retryable statuses, never after the response
started, the body cap, the retry budget), circuit breakers (ejection, half-open probes,
escalating ejections, recovery), the fallback pool, panic mode, queue-aware balancing of a
slow endpoint, and the Lua instruction budget / JIT mode.

Every test class runs its own sluice; every test uses its own pools and mocks (breaker
state is per endpoint URL), routed by Host "<pool>.test" so upstreams see the plain mock
paths."""

import os
import re
import shutil
import socket
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


def host_routes(pools):
    return [{"path": "/", "pool": name, "host": name + ".test"} for name in pools]


def dead_url():
    return "http://127.0.0.1:%d" % h.free_port()


def concurrent(port, reqs, stagger=0.0, timeout=10.0):
    """Sends reqs (dicts: pool, path, headers, method, body) each on its own connection,
    request i at t0 + i * stagger, and reads the responses in parallel. Returns the list of
    Response objects (or the exception a request raised), each with .t_sent and .elapsed,
    plus t0."""
    conns = [h.RawConn(port, timeout=timeout) for _ in reqs]
    results = [None] * len(reqs)
    t0 = time.monotonic() + 0.05

    def run(i):
        r = reqs[i]
        c = conns[i]
        wait = t0 + i * stagger - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        method = r.get("method", "GET")
        t = time.monotonic()
        try:
            c.send(h.build_request(method, r.get("path", "/echo"), r.get("headers"), r.get("body"),
                                   host=r["pool"] + ".test"))
            resp = c.read_response(method)
            resp.t_sent = t
            resp.elapsed = resp.t_done - t
            results[i] = resp
        except Exception as e:  # reported by the caller
            e.t_sent = t
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    for c in conns:
        c.close()
    return results, t0


class ResilienceCase(h.SluiceTestCase):
    """Request helpers over one keep-alive connection per pool."""

    def req(self, pool, path="/echo", headers=None, method="GET", body=None, timeout=10.0):
        with h.RawConn(self.port, timeout=timeout) as c:
            t0 = time.monotonic()
            r = c.request(method, path, headers, body, host=pool + ".test")
            r.elapsed = time.monotonic() - t0
            return r

    def seq(self, pool, n, path="/echo", headers=None):
        """n sequential requests on one keep-alive connection; returns the responses."""
        out = []
        c = h.RawConn(self.port, timeout=10)
        try:
            for i in range(n):
                r = c.request("GET", "%s/%d" % (path, i), headers, host=pool + ".test")
                out.append(r)
                if r.has_token("connection", "close"):
                    c.close()
                    c = h.RawConn(self.port, timeout=10)
        finally:
            c.close()
        return out

    def count(self, mock):
        return mock.stats()["requests"]

    def log_lines(self, pattern, start=0):
        rx = re.compile(pattern)
        with self.sluice._cv:
            return [l for l in self.sluice.lines[start:] if rx.search(l)]

    def assertNoErrorsOf(self, results):
        for r in results:
            if isinstance(r, Exception):
                raise AssertionError("a concurrent request failed: %r" % (r,))


# ---------------------------------------------------------------------------------------
# 1, 2: the admission queue


LATENCY_MS = 200


class QueueTest(ResilienceCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        lat = ["--latency-ms", str(LATENCY_MS)]
        cls.q4 = [env.mock("q4a", lat), env.mock("q4b", lat)]
        cls.q6 = [env.mock("q6a", lat), env.mock("q6b", lat)]
        cls.qt = env.mock("qt")
        cls.ff = env.mock("ff", ["--latency-ms", "100"])
        cls.qa = env.mock("qa")
        pools = {
            "q4": h.make_pool(cls.q4, "least_inflight", max_inflight=1,
                              queue={"max": 2, "timeout_ms": 2000}),
            "q6": h.make_pool(cls.q6, "least_inflight", max_inflight=1,
                              queue={"max": 2, "timeout_ms": 2000}),
            "qt": h.make_pool([cls.qt], max_inflight=1, queue={"max": 4, "timeout_ms": 300}),
            "fifo": h.make_pool([cls.ff], max_inflight=1, queue={"max": 10, "timeout_ms": 3000}),
            "qa": h.make_pool([cls.qa], max_inflight=1, queue={"max": 1, "timeout_ms": 3000}),
        }
        cls.sluice = env.sluice(h.make_config(pools, host_routes(pools)))
        cls.port = cls.sluice.port

    def test_queued_requests_wait_for_a_slot(self):
        results, _ = concurrent(self.port, [{"pool": "q4", "path": "/echo/%d" % i} for i in range(4)])
        self.assertNoErrorsOf(results)
        self.assertEqual([r.status for r in results], [200] * 4, results)
        el = sorted(r.elapsed for r in results)
        lat = LATENCY_MS / 1000.0
        # two served at once, two after waiting for a slot
        self.assertLess(el[1], lat + 0.12, el)
        self.assertGreaterEqual(el[2], 2 * lat - 0.02, el)
        # a freed slot goes to a waiter at once (no polling delay): ~400 ms, not later
        self.assertLess(el[3], 2 * lat + 0.2, el)
        # each endpoint ran one request at a time
        for m in self.q4:
            st = m.stats()
            self.assertEqual(st["requests"], 2, st)
            self.assertEqual(st["max_inflight_seen"], 1, st)

    def test_queue_full_503(self):
        results, _ = concurrent(self.port, [{"pool": "q6", "path": "/echo/%d" % i} for i in range(6)])
        self.assertNoErrorsOf(results)
        statuses = sorted(r.status for r in results)
        self.assertEqual(statuses, [200] * 4 + [503] * 2, results)
        for r in results:
            if r.status == 503:
                err = self.assertJsonError(r, 503, "queue_full")
                self.assertIn("q6", err["message"])
                self.assertTrue(r.header("retry-after"), r.headers)
                self.assertGreaterEqual(int(r.header("retry-after")), 0)
                self.assertLess(r.elapsed, 0.15, "queue_full must be answered at once")
        self.assertEqual(sum(self.count(m) for m in self.q6), 4)

    def test_queue_wait_timeout_503(self):
        with h.RawConn(self.port) as busy:
            busy.send(h.build_request("GET", "/echo/busy", [("x-mock-delay-ms", "900")], host="qt.test"))
            h.wait_for(lambda: self.qt.stats()["inflight"] == 1, 3, what="slot taken")
            r = self.req("qt", "/echo/waiting")
            err = self.assertJsonError(r, 503, "queue_timeout")
            self.assertTrue(r.header("retry-after"), r.headers)
            self.assertIn("300", err["message"])
            self.assertGreaterEqual(r.elapsed, 0.28)
            self.assertLess(r.elapsed, 0.7)
            self.assertEqual(busy.read_response().status, 200)
        # the timed-out request never reached the upstream
        self.assertEqual(self.count(self.qt), 1)

    def test_abandoned_waiter_leaves_the_queue(self):
        # one slot, room for one waiter; the waiter's client goes away: its place is free
        # again and it never reaches the upstream
        with h.RawConn(self.port) as busy:
            busy.send(h.build_request("GET", "/echo/busy", [("x-mock-delay-ms", "500")], host="qa.test"))
            h.wait_for(lambda: self.qa.stats()["inflight"] == 1, 3, what="slot taken")
            gone = h.RawConn(self.port)
            gone.send(h.build_request("GET", "/echo/abandoned", host="qa.test"))
            time.sleep(0.1)
            gone.abort()
            time.sleep(0.1)
            r = self.req("qa", "/echo/next")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["url"], "/echo/next")
            self.assertEqual(busy.read_response().status, 200)
        self.assertEqual(self.count(self.qa), 2)

    def test_queue_is_fifo_and_dispatch_is_immediate(self):
        # one slot, 100 ms per request: requests admitted 30 ms apart finish in admission
        # order, one every ~100 ms
        n = 5
        results, t0 = concurrent(self.port, [{"pool": "fifo", "path": "/echo/fifo-%d" % i}
                                             for i in range(n)], stagger=0.03)
        self.assertNoErrorsOf(results)
        self.assertEqual([r.status for r in results], [200] * n, results)
        self.assertEqual([r.json()["url"] for r in results], ["/echo/fifo-%d" % i for i in range(n)])
        done = [r.t_done - t0 for r in results]
        self.assertEqual(done, sorted(done), "completion order %r is not admission order" % done)
        for k in range(1, n):
            gap = done[k] - done[k - 1]
            self.assertGreater(gap, 0.08, done)
            self.assertLess(gap, 0.17, "slot handed over late: %r" % done)
        self.assertLess(done[-1], n * 0.1 + 0.2, done)
        self.assertEqual(self.ff.stats()["max_inflight_seen"], 1)


# ---------------------------------------------------------------------------------------
# 3-6, 12: retries


class RetryTest(ResilienceCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        fail503 = ["--fail-rate", "1", "--fail-status", "503"]
        cls.rc = env.mock("rc")
        cls.fa, cls.fb = env.mock("fa", fail503), env.mock("fb")
        cls.fa2, cls.fb2 = env.mock("fa2", fail503), env.mock("fb2")
        cls.pa, cls.pb = env.mock("pa"), env.mock("pb")
        cls.bc = env.mock("bc")
        cls.nb = env.mock("nb")

        def busy(secs):
            def handler(up, conn, n, req):
                body = b'{"error":{"type":"overloaded","message":"busy"}}'
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (secs, len(body), body))
                return True
            return handler

        cls.ra1, cls.rb1 = env.scripted(busy(b"1")), env.mock("rb1")
        cls.ra5, cls.rb5 = env.scripted(busy(b"5")), env.mock("rb5")
        cls.slow, cls.quick = env.mock("slow", ["--latency-ms", "1500"]), env.mock("quick")
        cls.storm = env.mock("storm", ["--latency-ms", "400"])
        pools = {
            "connfail": h.make_pool([dead_url(), cls.rc], "round_robin", retry={"attempts": 3}),
            "r503": h.make_pool([cls.fa, cls.fb], "round_robin", retry={}),
            "r503off": h.make_pool([cls.fa2, cls.fb2], "round_robin", retry=False),
            "partial": h.make_pool([cls.pa, cls.pb], "round_robin", retry={"attempts": 3}),
            "bodycap": h.make_pool([dead_url(), cls.bc], "round_robin", retry={"max_body_bytes": 10}),
            "nobudget": h.make_pool([dead_url(), cls.nb], "round_robin",
                                    retry={"budget_ratio": 0, "budget_min": 0}),
            "ra1": h.make_pool([cls.ra1.url, cls.rb1], "round_robin", retry={}),
            "ra5": h.make_pool([cls.ra5.url, cls.rb5], "round_robin", retry={}),
            "storm": h.make_pool([dead_url(), cls.storm], "round_robin",
                                 retry={"attempts": 2, "base_ms": 200, "max_ms": 200,
                                        "budget_ratio": 0.2, "budget_min": 1}),
            "pertry": h.make_pool([cls.slow, cls.quick], "round_robin",
                                  retry={"per_try_timeout_ms": 200, "retry_on": ["timeout"]}),
        }
        cls.sluice = env.sluice(h.make_config(pools, host_routes(pools)))
        cls.port = cls.sluice.port

    def test_connect_failure_is_retried_on_another_endpoint(self):
        mark = self.sluice.log_mark()
        rs = self.seq("connfail", 20)
        self.assertEqual([r.status for r in rs], [200] * 20, [r for r in rs if r.status != 200][:2])
        for r in rs:
            self.assertEqual(r.header("x-mock-instance"), "rc")
        self.assertEqual(self.count(self.rc), 20)
        # the dead endpoint was tried (round robin) and each failure retried
        self.assertIsNotNone(self.sluice.wait_log(
            r"attempt 1 on http://127\.0\.0\.1:\d+ failed .*retrying in \d+ ms", 5, mark),
            self.sluice.log_text()[-2000:])

    def test_503_is_retried_on_the_other_endpoint(self):
        rs = self.seq("r503", 20)
        self.assertEqual([r.status for r in rs], [200] * 20, [r for r in rs if r.status != 200][:2])
        self.assertEqual(self.count(self.fb), 20)
        a = self.count(self.fa)
        self.assertGreaterEqual(a, 1)
        self.assertLessEqual(a, 20)

    def test_503_relayed_when_retry_is_off(self):
        rs = self.seq("r503off", 10)
        bad = [r for r in rs if r.status == 503]
        self.assertTrue(bad, rs)
        self.assertEqual(len(bad) + len([r for r in rs if r.status == 200]), 10, rs)
        for r in bad:
            # the upstream's own response, relayed as it is
            self.assertEqual(r.header("x-mock-instance"), "fa2", r)
            self.assertEqual(r.json()["error"]["type"], "server_error")
        self.assertEqual(self.count(self.fa2) + self.count(self.fb2), 10)

    def test_not_retried_after_the_response_started(self):
        with h.RawConn(self.port, timeout=5) as c:
            c.send(h.build_request("GET", "/echo", [("x-mock-action", "partial")], host="partial.test"))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            with self.assertRaises(h.IncompleteResponse):
                c.read_body(r)
        time.sleep(0.1)
        self.assertEqual(self.count(self.pa) + self.count(self.pb), 1)

    def test_big_body_not_retried(self):
        # round robin alternates between the dead endpoint and the mock: within 4 requests
        # one goes to the dead endpoint first and must not be retried
        seen_502 = 0
        served = 0
        for i in range(4):
            r = self.req("bodycap", "/echo/big", method="POST", body=b"x" * 100)
            if r.status == 200:
                served += 1
                continue
            err = self.assertJsonError(r, 502, "upstream_connect_failed")
            self.assertIn("not retried", err["message"])
            self.assertIn("max_body_bytes", err["message"])
            self.assertIn("100 bytes", err["message"])
            seen_502 += 1
        self.assertGreaterEqual(seen_502, 1)
        self.assertEqual(self.count(self.bc), served)
        # a body within the cap is retried
        self.bc.reset_stats()
        for i in range(4):
            r = self.req("bodycap", "/echo/small", method="POST", body=b"y" * 10)
            self.assertEqual(r.status, 200, r)
        self.assertEqual(self.count(self.bc), 4)

    def test_retry_after_is_the_backoff(self):
        # round robin starts with the first endpoint: 503 + Retry-After: 1 -> retried on the
        # other endpoint one second later
        r = self.req("ra1", "/echo/ra")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-mock-instance"), "rb1")
        self.assertGreaterEqual(r.elapsed, 0.95)
        self.assertLess(r.elapsed, 1.6)
        self.assertEqual(self.ra1.requests, 1)

    def test_retry_after_beyond_the_limit_is_relayed(self):
        # Retry-After: 5 s > retry_after_max_ms (2 s): no retry, the 503 goes to the client
        r = self.req("ra5", "/echo/ra")
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.header("retry-after"), "5")
        self.assertEqual(r.json()["error"]["type"], "overloaded")
        self.assertLess(r.elapsed, 0.5)
        self.assertEqual(self.count(self.rb5), 0)

    def test_per_try_timeout_retries_elsewhere(self):
        r = self.req("pertry", "/echo/pt")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-mock-instance"), "quick")
        self.assertGreaterEqual(r.elapsed, 0.18)
        self.assertLess(r.elapsed, 0.8)
        self.assertEqual(self.count(self.slow), 1)
        h.wait_for(lambda: self.slow.stats()["aborted"] == 1, 3, what="the slow attempt abandoned")

    def test_retry_budget_holds_for_simultaneous_failures(self):
        # A retry storm: 20 requests at once, round robin sends 10 to a dead endpoint and 10
        # to a slow one (400 ms), so ~20 are active while the 10 connect failures are
        # decided. Budget: max(budget_min 1, 0.2 x active 20) = 4 requests past their first
        # attempt. Requests already granted a retry and waiting out their backoff are past
        # their first attempt too: at most 4 of the 10 may be retried.
        results, _ = concurrent(self.port, [{"pool": "storm", "path": "/echo/s%d" % i} for i in range(20)])
        self.assertNoErrorsOf(results)
        ok = [r for r in results if r.status == 200]
        failed = [r for r in results if r.status == 502]
        self.assertEqual(len(ok) + len(failed), 20, results)
        retried = len(ok) - 10
        self.assertEqual(self.count(self.storm), len(ok))
        self.assertLessEqual(retried, 4, "%d of 10 simultaneous failures were retried: the retry budget "
                                         "does not count requests waiting in backoff" % retried)
        self.assertGreaterEqual(retried, 1)

    def test_zero_retry_budget_means_no_retries(self):
        failed = 0
        served = 0
        for i in range(6):
            r = self.req("nobudget", "/echo/%d" % i)
            if r.status == 200:
                served += 1
                continue
            err = self.assertJsonError(r, 502, "upstream_connect_failed")
            self.assertNotIn("after", err["message"])  # "(after N attempts)" means it retried
            self.assertLess(r.elapsed, 0.5)
            failed += 1
        self.assertGreaterEqual(failed, 2)
        self.assertEqual(self.count(self.nb), served)


# ---------------------------------------------------------------------------------------
# 7, 8: circuit breakers


class BreakerTest(ResilienceCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        fail503 = ["--fail-rate", "1", "--fail-status", "503"]
        cls.ba, cls.bb = env.mock("ba", fail503), env.mock("bb")
        cls.ra, cls.rb = env.mock("ra", fail503), env.mock("rb")
        cls.wa, cls.wb = env.mock("wa", fail503), env.mock("wb")
        pools = {
            "brk": h.make_pool([cls.ba, cls.bb], "round_robin",
                               breaker={"policy": "consecutive", "failures": 3, "open_ms": 500,
                                        "half_open_probes": 1}),
            "rec": h.make_pool([cls.ra, cls.rb], "round_robin",
                               breaker={"policy": "consecutive", "failures": 2, "open_ms": 400}),
            "wake": h.make_pool([cls.wa, cls.wb], "round_robin", max_inflight=1,
                                queue={"max": 4, "timeout_ms": 3000},
                                breaker={"failures": 1, "open_ms": 300, "max_ejected_share": 1}),
        }
        cls.sluice = env.sluice(h.make_config(pools, host_routes(pools)))
        cls.port = cls.sluice.port

    def open_line(self, url, ms, n):
        return r"breaker open: %s \(pool \w+\) for %d ms, ejection %d" % (re.escape(url), ms, n)

    def test_ejection_probe_and_longer_ejection(self):
        a, b = self.ba, self.bb
        mark = self.sluice.log_mark()
        # round robin: a gets every other request; its 3rd failure opens the breaker
        statuses = []
        with h.RawConn(self.port) as c:
            while self.count(a) < 3:
                statuses.append(c.request("GET", "/echo/warm", host="brk.test").status)
                self.assertLess(len(statuses), 12, "a never got 3 requests")
            t_open = time.monotonic()
        self.assertEqual(statuses.count(503), 3, statuses)
        self.assertIsNotNone(self.sluice.wait_log(self.open_line(a.url, 500, 1), 2, start=mark),
                             self.sluice.log_text()[-2000:])

        # ejected: the next 20 requests all go to b
        rs = self.seq("brk", 20)
        self.assertLess(time.monotonic() - t_open, 0.45, "too slow to observe the ejection")
        self.assertEqual([r.status for r in rs], [200] * 20)
        self.assertEqual(self.count(a), 3)

        # after open_ms: exactly one half-open probe reaches a; it fails, a is out for 1000 ms
        time.sleep(max(0, t_open + 0.55 - time.monotonic()))
        rs = self.seq("brk", 10)
        t_reopen = time.monotonic()
        self.assertEqual(self.count(a), 4)
        self.assertEqual(sorted(r.status for r in rs), [200] * 9 + [503])
        self.assertIsNotNone(self.sluice.wait_log(r"breaker half-open: %s" % re.escape(a.url), 2, start=mark))
        self.assertIsNotNone(self.sluice.wait_log(self.open_line(a.url, 1000, 2), 2, start=mark),
                             self.sluice.log_text()[-2000:])

        # the second ejection is longer: nothing at 0.6 s (the first one's length) ...
        time.sleep(0.6)
        rs = self.seq("brk", 10)
        self.assertEqual([r.status for r in rs], [200] * 10)
        self.assertEqual(self.count(a), 4)
        # ... one probe after 1 s, then 1500 ms
        time.sleep(max(0, t_reopen + 1.05 - time.monotonic()))
        self.seq("brk", 10)
        self.assertEqual(self.count(a), 5)
        self.assertIsNotNone(self.sluice.wait_log(self.open_line(a.url, 1500, 3), 2, start=mark),
                             self.sluice.log_text()[-2000:])
        # b never failed
        self.assertEqual(self.log_lines(r"breaker open: %s" % re.escape(b.url)), [])

    def test_half_open_endpoint_takes_a_queued_request(self):
        # a is ejected for 300 ms (and meanwhile replaced by a healthy instance), b is busy
        # for 1.5 s: a request queued meanwhile must go to a as its probe once a turns
        # half-open, not wait for b's slot
        a, b = self.wa, self.wb
        mark = self.sluice.log_mark()
        self.assertEqual(self.req("wake", "/echo/first").status, 503)
        t_open = time.monotonic()
        self.assertIsNotNone(self.sluice.wait_log(self.open_line(a.url, 300, 1), 2, start=mark))
        a.args = []
        a.restart()
        with h.RawConn(self.port) as busy:
            busy.send(h.build_request("GET", "/echo/busy", [("x-mock-delay-ms", "1500")], host="wake.test"))
            h.wait_for(lambda: b.stats()["inflight"] == 1, 3, what="b busy")
            r = self.req("wake", "/echo/queued")
            waited = time.monotonic() - t_open
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("x-mock-instance"), "wa",
                             "the queued request waited %.2f s for b instead of probing a" % waited)
            self.assertLess(waited, 0.9)
            self.assertEqual(busy.read_response().status, 200)

    def test_recovery_after_the_endpoint_heals(self):
        a, b = self.ra, self.rb
        mark = self.sluice.log_mark()
        with h.RawConn(self.port) as c:
            for _ in range(8):
                c.request("GET", "/echo/warm", host="rec.test")
                if self.count(a) >= 2:
                    break
        t_open = time.monotonic()
        self.assertIsNotNone(self.sluice.wait_log(self.open_line(a.url, 400, 1), 2, start=mark),
                             self.sluice.log_text()[-2000:])
        # the instance is replaced by a healthy one on the same address
        a.args = []
        a.restart()
        time.sleep(max(0, t_open + 0.45 - time.monotonic()))
        # the probe succeeds and closes the breaker
        rs = self.seq("rec", 4)
        self.assertEqual([r.status for r in rs], [200] * 4, rs)
        self.assertIsNotNone(self.sluice.wait_log(r"breaker closed: %s \(pool rec\)" % re.escape(a.url), 2,
                                                  start=mark), self.sluice.log_text()[-2000:])
        # and a takes its share of traffic again
        before = self.count(a)
        rs = self.seq("rec", 10)
        self.assertEqual([r.status for r in rs], [200] * 10)
        self.assertGreaterEqual(self.count(a) - before, 4)


# ---------------------------------------------------------------------------------------
# 9, 10: fallback pool and panic mode


class FallbackPanicTest(ResilienceCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        fail503 = ["--fail-rate", "1", "--fail-status", "503"]
        brk = {"policy": "consecutive", "failures": 1, "open_ms": 60000}
        cls.prim = [env.mock("pa", fail503), env.mock("pb", fail503)]
        cls.bk = env.mock("backup")
        cls.prim1 = [env.mock("xa", fail503), env.mock("xb", fail503)]
        cls.bk1 = env.mock("backup1")
        cls.single = env.mock("single", fail503)
        cls.bk2 = env.mock("backup2")
        cls.nofb = [env.mock("na", fail503), env.mock("nb", fail503)]
        cls.nofb1 = [env.mock("ma", fail503), env.mock("mb", fail503)]
        cls.panic = [env.mock("k%d" % i, fail503) for i in range(3)] + [env.mock("k3")]
        cls.nopanic = [env.mock("n%d" % i, fail503) for i in range(2)] + [env.mock("n2"), env.mock("n3")]
        share1 = dict(brk, max_ejected_share=1)
        pools = {
            # default max_ejected_share (0.5)
            "prim": h.make_pool(cls.prim, "round_robin", breaker=brk, fallback="backup"),
            "backup": h.make_pool([cls.bk]),
            # panic mode out of the way
            "prim1": h.make_pool(cls.prim1, "round_robin", breaker=share1, fallback="backup1"),
            "backup1": h.make_pool([cls.bk1]),
            # one endpoint and a fallback
            "single": h.make_pool([cls.single], breaker=brk, fallback="backup2"),
            "backup2": h.make_pool([cls.bk2]),
            "nofb": h.make_pool(cls.nofb, "round_robin", breaker=brk),
            "nofb1": h.make_pool(cls.nofb1, "round_robin", breaker=share1),
            "panic": h.make_pool(cls.panic, "round_robin", breaker=dict(brk, max_ejected_share=0.5)),
            "nopanic": h.make_pool(cls.nopanic, "round_robin", breaker=dict(brk, max_ejected_share=0.5)),
        }
        cls.sluice = env.sluice(h.make_config(pools, host_routes(pools)))
        cls.port = cls.sluice.port

    def eject_all(self, pool, mocks):
        """Sends requests until every mock has failed once (failures = 1: ejected)."""
        with h.RawConn(self.port) as c:
            for _ in range(4 * len(mocks)):
                if all(self.count(m) >= 1 for m in mocks):
                    break
                c.request("GET", "/echo/warm", host=pool + ".test")
        for m in mocks:
            self.assertIsNotNone(self.sluice.wait_log(r"breaker open: %s \(pool %s\)" % (re.escape(m.url), pool), 2),
                                 self.sluice.log_text()[-2000:])

    def check_fallback(self, pool, mocks, backup, backup_name):
        self.eject_all(pool, mocks)
        before = [self.count(m) for m in mocks]
        rs = self.seq(pool, 10)
        self.assertEqual([r.header("x-mock-instance") for r in rs], [backup_name] * 10,
                         "every endpoint of %s is ejected, yet requests do not go to the fallback "
                         "pool (panic mode taking over?): %r" % (pool, rs[:2]))
        self.assertEqual([r.status for r in rs], [200] * 10, rs[:2])
        self.assertEqual(self.count(backup), 10)
        self.assertEqual([self.count(m) for m in mocks], before, "ejected endpoints got traffic")
        # the line was written before the responses, but stderr is read by another thread
        self.assertIsNotNone(self.sluice.wait_log(
            r"every endpoint of pool %s is ejected; using fallback pool %s" % (pool, backup_name), 5))

    def test_fallback_pool_when_every_endpoint_is_ejected(self):
        # DESIGN.md: "When every endpoint is open, fail fast (503) or use the fallback pool."
        self.check_fallback("prim", self.prim, self.bk, "backup")

    def test_fallback_pool_without_panic_mode(self):
        self.check_fallback("prim1", self.prim1, self.bk1, "backup1")

    def test_fallback_for_a_single_endpoint_pool(self):
        self.check_fallback("single", [self.single], self.bk2, "backup2")

    def check_fail_fast(self, pool, mocks):
        self.eject_all(pool, mocks)
        before = [self.count(m) for m in mocks]
        for i in range(5):
            r = self.req(pool, "/echo/%d" % i)
            self.assertIsNone(r.header("x-mock-instance"),
                              "every endpoint of %s is ejected, yet the request reached one (panic "
                              "mode taking over?): %r" % (pool, r))
            err = self.assertJsonError(r, 503, "no_endpoint_available")
            self.assertIn(pool, err["message"])
            self.assertTrue(r.header("retry-after"), r.headers)
            self.assertLess(r.elapsed, 0.2, "must fail fast, not wait for a timeout")
        self.assertEqual([self.count(m) for m in mocks], before)

    def test_fail_fast_without_fallback(self):
        # DESIGN.md: "When every endpoint is open, fail fast (503) or use the fallback pool."
        self.check_fail_fast("nofb", self.nofb)

    def test_fail_fast_without_fallback_or_panic_mode(self):
        self.check_fail_fast("nofb1", self.nofb1)

    def test_panic_mode_spreads_over_ejected_endpoints(self):
        failing, healthy = self.panic[:3], self.panic[3]
        self.eject_all("panic", failing)
        for m in self.panic:
            m.reset_stats()
        rs = self.seq("panic", 20)
        for m in failing:
            self.assertGreaterEqual(self.count(m), 2, "ejected endpoint %s got no traffic in panic mode" % m.name)
        self.assertGreaterEqual(self.count(healthy), 2)
        self.assertEqual(sum(self.count(m) for m in self.panic), 20)
        self.assertEqual(len([r for r in rs if r.status == 200]), self.count(healthy))

    def test_no_panic_below_max_ejected_share(self):
        failing, healthy = self.nopanic[:2], self.nopanic[2:]
        self.eject_all("nopanic", failing)
        for m in self.nopanic:
            m.reset_stats()
        rs = self.seq("nopanic", 20)
        self.assertEqual([r.status for r in rs], [200] * 20)
        self.assertEqual([self.count(m) for m in failing], [0, 0])
        self.assertEqual(sum(self.count(m) for m in healthy), 20)


# ---------------------------------------------------------------------------------------
# 11: a slow endpoint and queue/latency-aware balancers


class SlowEndpointTest(ResilienceCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.lq = [env.mock("lq-slow", ["--latency-ms", "300"]), env.mock("lq-fast", ["--latency-ms", "10"])]
        cls.ew = [env.mock("ew-slow", ["--latency-ms", "300"]), env.mock("ew-fast", ["--latency-ms", "10"])]
        pools = {
            "lq": h.make_pool(cls.lq, "least_queue"),
            "ew": h.make_pool(cls.ew, "ewma"),
        }
        cls.sluice = env.sluice(h.make_config(pools, host_routes(pools)))
        cls.port = cls.sluice.port

    def check(self, pool, mocks):
        slow, fast = mocks
        # waves of 5 requests, 15 ms apart within a wave, 4 waves
        for wave in range(4):
            results, _ = concurrent(self.port, [{"pool": pool, "path": "/echo/%d-%d" % (wave, i)}
                                                for i in range(5)], stagger=0.015)
            self.assertNoErrorsOf(results)
            self.assertEqual([r.status for r in results], [200] * 5)
        s, f = self.count(slow), self.count(fast)
        self.assertEqual(s + f, 20)
        self.assertGreaterEqual(f, 14, "fast endpoint got %d of 20, slow %d" % (f, s))

    def test_least_queue_prefers_the_fast_endpoint(self):
        self.check("lq", self.lq)

    def test_ewma_prefers_the_fast_endpoint(self):
        self.check("ew", self.ew)


# ---------------------------------------------------------------------------------------
# 13: instruction budget, and JIT mode


class InstructionBudgetTest(ResilienceCase):
    stuck_sluice_ok = True

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.mock = env.mock("ib")
        env.write("policies/balancer/spin.lua", "local M = {}\nfunction M.pick(pool, req)\n  while true do end\nend\nreturn M\n")
        shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", "round_robin.lua"), env.path("policies/balancer"))
        pools = {"spin": h.make_pool([cls.mock], "spin"), "ok": h.make_pool([cls.mock], "round_robin")}
        cls.sluice = env.sluice(h.make_config(pools, host_routes(pools), policies=env.path("policies")))
        cls.port = cls.sluice.port


    def test_runaway_balancer_is_stopped_and_named(self):
        for i in range(2):
            mark = self.sluice.log_mark()
            try:
                r = self.req("spin", "/echo", timeout=3)
            except socket.timeout:
                self.fail("a policy looping forever hangs the gateway")
            self.assertJsonError(r, 500, "policy_error")
            self.assertLess(r.elapsed, 1.0)
            # the log names the policy file and line and says what stopped it (the default
            # budget is 1000000 instructions)
            m = self.sluice.wait_log(r"policy error \(pool spin", 2, start=mark)
            self.assertIsNotNone(m, self.sluice.log_text()[-2000:])
            line = m.string
            self.assertRegex(line, r"spin\.lua:\d+:")
            self.assertRegex(line, r"instruction budget of 1000000 exceeded")
            r = self.req("ok", "/echo/after")
            self.assertEqual(r.status, 200)


class JitModeTest(ResilienceCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.mocks = [env.mock("j1"), env.mock("j2")]
        env.write("policies/balancer/boom.lua", "local M = {}\nfunction M.pick(pool, req)\n  error('boom')\nend\nreturn M\n")
        for name in ("least_queue", "round_robin"):
            shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", name + ".lua"), env.path("policies/balancer"))
        shutil.copytree(os.path.join(h.POLICIES_DIR, "retry"), env.path("policies/retry"))
        shutil.copytree(os.path.join(h.POLICIES_DIR, "breaker"), env.path("policies/breaker"))
        pools = {
            "jit": h.make_pool(cls.mocks, "least_queue", retry={}, breaker={"failures": 3}),
            "boom": h.make_pool(cls.mocks, "boom"),
        }
        cfg = h.make_config(pools, host_routes(pools), policies=env.path("policies"), lua={"jit": True})
        cls.sluice = env.sluice(cfg)
        cls.port = cls.sluice.port

    def test_jit_on_serves_requests(self):
        before = sum(self.count(m) for m in self.mocks)
        mark = self.sluice.log_mark()
        rs = self.seq("jit", 50)
        self.assertEqual([r.status for r in rs], [200] * 50)
        self.assertEqual(sum(self.count(m) for m in self.mocks) - before, 50)
        self.assertEqual(self.log_lines(r"\[error\]", mark), [])

    def test_jit_on_policy_errors_still_contained(self):
        mark = self.sluice.log_mark()
        r = self.req("boom", "/echo")
        self.assertJsonError(r, 500, "policy_error")
        self.assertIsNotNone(self.sluice.wait_log(r"boom\.lua:3: boom", 2, start=mark), self.sluice.log_text())
        self.assertEqual(self.req("jit", "/echo/after").status, 200)



class CompiledCodeTest(ResilienceCase):
    """With lua.jit off (the default) sluice's own unmodified policies are compiled, while user
    code, a modified copy of a shipped policy included, stays interpreted under the budget; the
    budget is the configured one on every worker thread."""

    stuck_sluice_ok = True

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.mock = env.mock("cc")
        src = open(os.path.join(h.POLICIES_DIR, "balancer", "round_robin.lua")).read()
        env.write("policies/balancer/round_robin.lua", src)  # an unmodified copy
        # The shipped source with a runaway pick: trust must follow the content, not the name.
        tail = src.rindex("return M")
        env.write("policies/balancer/rr_spin.lua", src[:tail]
                  + "function M.pick(pool, req)\n  local n = 0\n  while true do n = n + 1 end\nend\n"
                  + src[tail:])
        env.write("policies/balancer/mine.lua", "local M = {}\nfunction M.pick(pool, req) return 1 end\nreturn M\n")
        pools = {"rr": h.make_pool([cls.mock], "round_robin"),
                 "spin": h.make_pool([cls.mock], "rr_spin"),
                 "mine": h.make_pool([cls.mock], "mine"),
                 "lq": h.make_pool([cls.mock], "least_queue")}  # from the bundled directory
        cfg = h.make_config(pools, host_routes(pools), policies=env.path("policies"),
                            log_level="debug", workers=2, lua={"instruction_budget": 50000})
        cls.sluice = env.sluice(cfg)
        cls.port = cls.sluice.port


    def test_load_says_what_is_compiled(self):
        log = self.sluice.log_text()
        pol = re.escape(self.env.path("policies/balancer/"))
        self.assertRegex(log, pol + r"round_robin\.lua: sluice's own source, compiled")
        self.assertRegex(log, r"balancer/least_queue\.lua: sluice's own source, compiled")
        self.assertRegex(log, pol + r"rr_spin\.lua: interpreted under the instruction budget")
        self.assertRegex(log, pol + r"mine\.lua: interpreted under the instruction budget")
        self.assertNotRegex(log, r"(rr_spin|mine)\.lua: .*compiled")

    def test_shipped_and_user_policies_serve(self):
        for pool in ("rr", "mine", "lq"):
            rs = self.seq(pool, 20)
            self.assertEqual([r.status for r in rs], [200] * 20, pool)

    def test_modified_shipped_policy_is_stopped_on_every_worker(self):
        # 40 connections: SO_REUSEPORT spreads them over both workers (all on one: 2^-39).
        mark = self.sluice.log_mark()
        for i in range(40):
            try:
                r = self.req("spin", "/echo/%d" % i, timeout=5)
            except socket.timeout:
                self.fail("a runaway loop in a modified copy of a shipped policy hangs a worker")
            self.assertJsonError(r, 500, "policy_error")
        # the workers log on their own threads: wait for all 40 lines
        h.wait_for(lambda: len(self.log_lines(r"policy error \(pool spin", mark)) >= 40, 5,
                   what="40 policy error lines")
        lines = self.log_lines(r"policy error \(pool spin", mark)
        self.assertEqual(len(lines), 40, lines[:3])
        for line in lines:
            self.assertRegex(line, r"rr_spin\.lua:\d+: instruction budget of 50000 exceeded")
        self.assertEqual(self.req("rr", "/echo/after").status, 200)


if __name__ == "__main__":
    unittest.main()
