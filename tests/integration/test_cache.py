"""The response cache (routes[i].cache, src/cache_flow.c): hits and misses, expiry, what the
upstream and the client say with Cache-Control, what goes into the key (tenant,
key_headers, canonical JSON, cache policies), the memory bound, failed and cut responses,
coalescing of identical concurrent misses, byte-exact replay of streamed (SSE) responses,
and the admin endpoints GET/DELETE /cache."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
STATS_KEYS = ("entries", "bytes", "max_bytes", "hits", "misses", "coalesced", "inserts",
              "evictions", "expired", "purged")


class CacheCase(h.SluiceTestCase):
    """Helpers shared by the cache tests. Subclasses set cls.sluice, cls.port, cls.admin."""

    @classmethod
    def start_sluice(cls, cfg):
        cls.sluice = cls.env.sluice(cfg)
        cls.port = cls.sluice.port
        cls.admin = cls.sluice.admin_port()

    def req(self, method, path, headers=None, body=None, host="localhost", version="HTTP/1.1"):
        with h.RawConn(self.port, timeout=10) as c:
            return c.request(method, path, headers, body, version=version, host=host)

    def get(self, path, headers=None, **kw):
        return self.req("GET", path, headers, **kw)

    @staticmethod
    def count(mock):
        return mock.stats()["requests"]

    def cache_stats(self):
        status, _, body = h.http_request(self.admin, "GET", "/cache")
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def purge(self, query=""):
        status, hs, body = h.http_request(self.admin, "DELETE", "/cache" + query)
        return status, hs, body

    # assertions on one response

    def assertXCache(self, r, want):
        self.assertEqual(r.header_all("x-cache"), [want], r)

    def assertMiss(self, r, status=200):
        self.assertEqual(r.status, status, r)
        self.assertXCache(r, "MISS")
        key = r.header_all("x-cache-key")
        self.assertEqual(len(key), 1, r.headers)
        self.assertRegex(key[0], KEY_RE)
        self.assertIsNone(r.header("age"), r.headers)
        return key[0]

    def assertHit(self, r, status=200, result="HIT"):
        self.assertEqual(r.status, status, r)
        self.assertXCache(r, result)
        self.assertRegex(r.header("age", ""), r"^\d+$", r.headers)
        self.assertEqual(len(r.header_all("age")), 1, r.headers)
        self.assertIsNone(r.header("x-cache-key"), r.headers)
        self.assertEqual(len(r.header_all("x-request-id")), 1, r.headers)
        if r.request_method != "HEAD" and r.framing == "length":
            self.assertEqual(r.header("content-length"), str(len(r.body)))
        return r

    def assertBypass(self, r, status=200):
        self.assertEqual(r.status, status, r)
        self.assertXCache(r, "BYPASS")
        self.assertIsNone(r.header("x-cache-key"), r.headers)
        self.assertIsNone(r.header("age"), r.headers)


def fire(port, n, method, path, headers=None, body=None, timeout=20.0):
    """n identical requests on n connections, released together by a barrier once every
    connection is open. Returns the Responses (or the exception a client got), each with
    .elapsed, in client order."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        c = None
        try:
            c = h.RawConn(port, timeout=timeout)
            barrier.wait(15)
            t0 = time.monotonic()
            r = c.request(method, path, headers, body)
            r.elapsed = time.monotonic() - t0
            results[i] = r
        except Exception as e:  # reported by the caller
            results[i] = e
        finally:
            if c:
                c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 20)
    return results


def split_raw(raw):
    """(status line, [(name, value)], body bytes exactly as received) of a raw response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(x.strip() for x in l.split(":", 1)) for l in lines[1:]]
    return lines[0], headers, body


def dechunk(body):
    out, i = b"", 0
    while True:
        j = body.index(b"\r\n", i)
        n = int(body[i:j], 16)
        if n == 0:
            return out
        out += body[j + 2:j + 2 + n]
        assert body[j + 2 + n:j + 4 + n] == b"\r\n"
        i = j + 4 + n


# ---------------------------------------------------------------------------------------
# Hits, misses, expiry, Cache-Control, keys, failed responses


class CacheBehaviourTest(CacheCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.m = env.mock("m")
        cls.up_counts = {}
        cls.up_lock = threading.Lock()

        # sluice-mock never sends Cache-Control (except no-cache on event streams),
        # Set-Cookie or Vary: these responses come from the harness's scripted upstream.
        extras = {
            "/up/plain": "",
            "/up/max-age-0": "Cache-Control: max-age=0\r\n",
            "/up/s-maxage-0": "Cache-Control: max-age=60, s-maxage=0\r\n",
            "/up/no-store": "Cache-Control: no-store\r\n",
            "/up/private": "Cache-Control: private, max-age=60\r\n",
            "/up/no-cache": "Cache-Control: no-cache\r\n",
            "/up/set-cookie": "Set-Cookie: s=1\r\n",
            "/up/max-age-1": "Cache-Control: public, max-age=1\r\n",
            "/up/vary/covered": "Vary: X-Tenant\r\n",
            "/up/vary/other": "Vary: Accept-Language\r\n",
            "/up/vary/star": "Vary: *\r\n",
            "/up/age": "Age: 100\r\n",
            "/up/etag": ('ETag: "v1"\r\nLast-Modified: Tue, 24 Nov 2026 10:00:00 GMT\r\n'
                         "Cache-Control: max-age=600\r\nX-Other: kept-on-200\r\n"),
            "/up/weak": 'ETag: W/"w7"\r\n',
        }

        def handler(up, conn, n, req):
            method, target, headers, body = req
            path = target.split("?", 1)[0]
            with cls.up_lock:
                k = cls.up_counts.get(path, 0) + 1
                cls.up_counts[path] = k
            payload = ("%s response #%d" % (path, k)).encode()
            conn.sendall(("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
                          % (len(payload), extras.get(path, ""))).encode() + payload)
            return True

        cls.up = env.scripted(handler)
        pools = {"m": h.make_pool([cls.m]), "up": h.make_pool([cls.up.url])}
        routes = [
            {"path": "/echo/basic", "pool": "m", "cache": {}},
            {"path": "/echo/nocache", "pool": "m"},
            {"path": "/echo/ttl", "pool": "m", "cache": {"ttl_s": 1}},
            {"path": "/echo/cc", "pool": "m", "cache": {}},
            {"path": "/echo/tenant", "pool": "m", "cache": {}},
            {"path": "/echo/shared", "pool": "m", "cache": {"authorization": False}},
            {"path": "/echo/kh", "pool": "m", "cache": {"key_headers": ["X-Tenant"]}},
            {"path": "/echo/canon", "pool": "m",
             "cache": {"methods": ["POST"], "json": {"canonical": True, "ignore": ["user"]}}},
            {"path": "/echo/fail", "pool": "m", "cache": {}},
            {"path": "/echo/st404", "pool": "m", "cache": {"statuses": [200, 404]}},
            {"path": "/bytes", "pool": "m", "cache": {}},
            {"path": "/up", "pool": "up", "cache": {}},
            {"path": "/up/vary", "pool": "up", "cache": {"key_headers": ["x-tenant"]}},
        ]
        cls.start_sluice(h.make_config(pools, routes))

    def up_count(self, path):
        with self.up_lock:
            return self.up_counts.get(path, 0)

    # --- hit and miss -----------------------------------------------------------------------

    def test_hit_after_miss(self):
        n0 = self.count(self.m)
        r1 = self.get("/echo/basic/1", [("X-Request-Id", "first-1")])
        key = self.assertMiss(r1)
        self.assertEqual(self.count(self.m), n0 + 1)
        self.assertEqual(r1.header_all("x-request-id"), ["first-1"])
        self.assertEqual(r1.json()["url"], "/echo/basic/1")

        r2 = self.get("/echo/basic/1", [("X-Request-Id", "second-2")])
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 1, "a HIT went upstream")
        # the replayed head is the upstream's, with this request's id (not the stored one)
        self.assertEqual(r2.header_all("x-request-id"), ["second-2"])
        self.assertEqual(r2.header("content-type"), "application/json")
        self.assertEqual(r2.header("x-mock-instance"), "m")
        self.assertEqual(r2.header("content-length"), str(len(r1.body)))

        # a different target is a different entry; the same key for the same request
        r3 = self.get("/echo/basic/1?x=1")
        self.assertNotEqual(self.assertMiss(r3), key)
        self.assertEqual(self.count(self.m), n0 + 2)

    def test_hits_on_one_keepalive_connection(self):
        n0 = self.count(self.m)
        with h.RawConn(self.port) as c:
            r1 = c.request("GET", "/echo/basic/ka")
            self.assertMiss(r1)
            for i in range(3):
                r = c.request("GET", "/echo/basic/ka")
                self.assertHit(r)
                self.assertEqual(r.body, r1.body)
                self.assertFalse(r.has_token("connection", "close"))
            # the connection still proxies normally after replays
            r = c.request("GET", "/echo/nocache/after")
            self.assertEqual(r.json()["url"], "/echo/nocache/after")
            self.assertEqual(c.buf, b"")
        self.assertEqual(self.count(self.m), n0 + 2)

    def test_hit_for_http10_client(self):
        r1 = self.get("/echo/basic/h10")
        self.assertMiss(r1)
        r2 = self.req("GET", "/echo/basic/h10", version="HTTP/1.0")
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(r2.framing, "length")

    def test_large_body_replayed_intact(self):
        n = 3 * 1024 * 1024 + 7
        expected = (bytes(range(251)) * (n // 251 + 1))[:n]
        r1 = self.get("/bytes?n=%d" % n)
        self.assertMiss(r1)
        c0 = self.count(self.m)
        with h.RawConn(self.port, timeout=20, rcvbuf=64 * 1024) as c:
            for _ in range(2):
                c.send(h.build_request("GET", "/bytes?n=%d" % n))
                r = c.read_response(pause=0.001)  # a slow reader: the replay cannot go out at once
                self.assertHit(r)
                self.assertEqual(len(r.body), n)
                self.assertTrue(r.body == expected, "replayed body differs from the /bytes pattern")
        self.assertEqual(self.count(self.m), c0)

    def test_head_answered_from_get_entry(self):
        r1 = self.get("/echo/basic/head")
        self.assertMiss(r1)
        n = self.count(self.m)
        with h.RawConn(self.port) as c:
            c.send(h.build_request("HEAD", "/echo/basic/head"))
            r2 = c.read_response("HEAD")
            self.assertHit(r2)
            self.assertEqual(r2.body, b"")
            self.assertEqual(r2.header("content-length"), str(len(r1.body)))
            self.assertIsNone(r2.header("transfer-encoding"))
            # no stray body bytes: the next response on the connection parses
            r3 = c.request("GET", "/echo/basic/head")
            self.assertHit(r3)
            self.assertEqual(r3.body, r1.body)
            self.assertEqual(c.buf, b"")
        self.assertEqual(self.count(self.m), n)

    def test_head_first_does_not_store_an_empty_body(self):
        n0 = self.count(self.m)
        with h.RawConn(self.port) as c:
            c.send(h.build_request("HEAD", "/echo/basic/head-first"))
            r = c.read_response("HEAD")
            self.assertMiss(r)
            self.assertEqual(r.body, b"")
        r1 = self.get("/echo/basic/head-first")
        self.assertMiss(r1)
        self.assertEqual(r1.json()["method"], "GET")
        r2 = self.get("/echo/basic/head-first")
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 2)

    def test_route_without_cache_has_no_cache_headers(self):
        n0 = self.count(self.m)
        for _ in range(2):
            r = self.get("/echo/nocache/x")
            self.assertEqual(r.status, 200)
            self.assertIsNone(r.header("x-cache"), r.headers)
            self.assertIsNone(r.header("x-cache-key"), r.headers)
        self.assertEqual(self.count(self.m), n0 + 2)

    def test_method_not_cached_bypasses(self):
        n0 = self.count(self.m)
        for _ in range(2):
            r = self.req("POST", "/echo/basic/post", body=b"same")
            self.assertBypass(r)
        self.assertEqual(self.count(self.m), n0 + 2)

    # --- expiry -----------------------------------------------------------------------------------

    def test_ttl_expiry(self):
        t0 = time.monotonic()
        r1 = self.get("/echo/ttl/a")
        self.assertMiss(r1)
        n = self.count(self.m)
        self.assertHit(self.get("/echo/ttl/a"))
        self.assertEqual(self.count(self.m), n)

        def expired():
            r = self.get("/echo/ttl/a")
            if r.header("x-cache") == "HIT":
                self.assertEqual(r.body, r1.body)
                return None
            return r

        r = h.wait_for(expired, 5.0, 0.05, what="the 1 s entry to expire")
        elapsed = time.monotonic() - t0
        self.assertMiss(r)
        self.assertGreaterEqual(elapsed, 0.8, "entry with ttl_s = 1 expired after %.2f s" % elapsed)
        self.assertNotEqual(r.body, r1.body)  # a fresh upstream response (new request id)
        self.assertEqual(self.count(self.m), n + 1)
        self.assertHit(self.get("/echo/ttl/a"))  # the refreshed entry is served

    def test_upstream_max_age_shortens_ttl(self):
        r1 = self.get("/up/max-age-1")
        self.assertMiss(r1)
        self.assertHit(self.get("/up/max-age-1"))
        self.assertEqual(self.up_count("/up/max-age-1"), 1)

        def expired():
            r = self.get("/up/max-age-1")
            return r if r.header("x-cache") == "MISS" else None

        # the route's ttl is 60 s: only the upstream's max-age=1 can expire it this soon
        h.wait_for(expired, 5.0, 0.05, what="the max-age=1 entry to expire")
        self.assertEqual(self.up_count("/up/max-age-1"), 2)

    # --- what the upstream says ----------------------------------------------------------------

    def test_upstream_control_plain_is_stored(self):
        r1 = self.get("/up/plain")
        self.assertMiss(r1)
        r2 = self.get("/up/plain")
        self.assertHit(r2)
        self.assertEqual(r2.body, b"/up/plain response #1")
        self.assertEqual(self.up_count("/up/plain"), 1)

    def test_upstream_cache_control_and_set_cookie_not_stored(self):
        for path in ("/up/max-age-0", "/up/s-maxage-0", "/up/no-store", "/up/private",
                     "/up/no-cache", "/up/set-cookie"):
            with self.subTest(path=path):
                before = self.up_count(path)
                r1 = self.get(path)
                self.assertMiss(r1)
                r2 = self.get(path)
                self.assertMiss(r2)
                self.assertEqual(r2.body, ("%s response #%d" % (path, before + 2)).encode())
                self.assertEqual(self.up_count(path), before + 2)

    def test_upstream_vary(self):
        # Vary naming only headers that are in the key: stored
        self.assertMiss(self.get("/up/vary/covered", [("X-Tenant", "t1")]))
        r = self.get("/up/vary/covered", [("X-Tenant", "t1")])
        self.assertHit(r)
        self.assertEqual(r.header("vary"), "X-Tenant")
        self.assertMiss(self.get("/up/vary/covered", [("X-Tenant", "t2")]))
        self.assertEqual(self.up_count("/up/vary/covered"), 2)
        # Vary naming anything else (or *): not stored
        for path in ("/up/vary/other", "/up/vary/star"):
            with self.subTest(path=path):
                self.assertMiss(self.get(path, [("X-Tenant", "t1")]))
                self.assertMiss(self.get(path, [("X-Tenant", "t1")]))
                self.assertEqual(self.up_count(path), 2)

    def test_upstream_age_header_not_duplicated_on_hit(self):
        r1 = self.get("/up/age")
        self.assertXCache(r1, "MISS")  # the upstream's own Age is relayed on a miss
        self.assertEqual(r1.header_all("age"), ["100"])
        r2 = self.get("/up/age")
        self.assertXCache(r2, "HIT")
        self.assertEqual(len(r2.header_all("age")), 1, "HIT with several Age headers: %r" % r2.headers)
        self.assertGreaterEqual(int(r2.header("age")), 100)  # upstream age + time stored

    # --- what the client says --------------------------------------------------------------------

    def test_client_no_store_bypasses(self):
        path = "/echo/cc/no-store"
        n0 = self.count(self.m)
        for _ in range(2):
            self.assertBypass(self.get(path, [("Cache-Control", "no-store")]))
        self.assertEqual(self.count(self.m), n0 + 2)
        r1 = self.get(path)
        self.assertMiss(r1)  # nothing was stored by the no-store requests
        self.assertEqual(self.count(self.m), n0 + 3)
        # with an entry present, no-store still goes upstream and does not replace it
        r = self.get(path, [("Cache-Control", "no-store")])
        self.assertBypass(r)
        self.assertNotEqual(r.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 4)
        r2 = self.get(path)
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)

    def test_client_no_cache_refreshes(self):
        for name, hs in (("cache-control", [("Cache-Control", "no-cache")]),
                         ("pragma", [("Pragma", "no-cache")])):
            with self.subTest(header=name):
                path = "/echo/cc/no-cache-" + name
                r1 = self.get(path)
                self.assertMiss(r1)
                n = self.count(self.m)
                r2 = self.get(path, hs)
                self.assertMiss(r2)
                self.assertEqual(self.count(self.m), n + 1)
                self.assertNotEqual(r2.body, r1.body)
                r3 = self.get(path)
                self.assertHit(r3)
                self.assertEqual(r3.body, r2.body, "no-cache did not refresh the entry")
                self.assertEqual(self.count(self.m), n + 1)

    def test_client_max_age(self):
        path = "/echo/cc/max-age"
        r1 = self.get(path)
        self.assertMiss(r1)
        n = self.count(self.m)
        # a generous max-age is satisfied by the entry
        r = self.get(path, [("Cache-Control", "max-age=3600")])
        self.assertHit(r)
        self.assertEqual(r.body, r1.body)
        # The cache clock has millisecond resolution and an entry of age 0 ms satisfies
        # "age <= max-age": make sure the entry is older than that (see also
        # test_client_max_age_0_right_after_store).
        time.sleep(0.01)
        r = self.get(path, [("Cache-Control", "max-age=0")])
        self.assertMiss(r)
        self.assertEqual(self.count(self.m), n + 1)
        self.assertNotEqual(r.body, r1.body)

    def test_client_max_age_0_right_after_store(self):
        # Pipelined: the second request is handled in the loop iteration that stored the
        # first response, so the entry's age is 0 ms (deterministically). max-age=0 must
        # still not be answered from the cache.
        path = "/echo/cc/max-age-0-pipelined"
        n0 = self.count(self.m)
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", path) +
                   h.build_request("GET", path, [("Cache-Control", "max-age=0")]))
            r1 = c.read_response()
            r2 = c.read_response()
        self.assertMiss(r1)
        self.assertEqual(r2.header("x-cache"), "MISS", "max-age=0 served from the cache: %r" % r2.headers)
        self.assertEqual(self.count(self.m), n0 + 2)

    # --- conditional requests answered from storage (RFC 9111 4.3.2) --------------------------

    def test_if_none_match_answered_304_from_the_cache(self):
        path = "/up/etag"
        stored = self.get(path)
        self.assertEqual(stored.status, 200)
        n = self.up_count(path)
        for inm in ('"v1"', 'W/"v1"', '"other", "v1"', "*", '"a,b", W/"v1"'):
            with self.subTest(inm=inm):
                r = self.get(path, [("If-None-Match", inm)])
                self.assertEqual(r.status, 304, r)
                self.assertXCache(r, "HIT")
                self.assertEqual(r.body, b"")
                self.assertEqual(r.header("etag"), '"v1"')
                self.assertEqual(r.header("cache-control"), "max-age=600")
                self.assertIsNone(r.header("x-other"), "a 304 carries only validators and cache headers")
                self.assertIsNone(r.header("content-length"))
        r = self.req("HEAD", path, [("If-None-Match", '"v1"')])
        self.assertEqual(r.status, 304, r)
        for inm in ('"v2"', '"V1"', "v1", 'W/"v2", "x"'):
            with self.subTest(inm=inm):
                r = self.get(path, [("If-None-Match", inm)])
                self.assertEqual(r.status, 200, r)
                self.assertHit(r)
                self.assertEqual(r.body, stored.body)
        self.assertEqual(self.up_count(path), n, "conditional hits went upstream")
        # keep-alive goes on after a 304
        with h.RawConn(self.port, timeout=5) as c:
            self.assertEqual(c.request("GET", path, [("If-None-Match", '"v1"')]).status, 304)
            self.assertEqual(c.request("GET", path).body, stored.body)

    def test_weak_stored_etag_matches_weakly(self):
        self.get("/up/weak")
        self.assertEqual(self.get("/up/weak", [("If-None-Match", '"w7"')]).status, 304)
        self.assertEqual(self.get("/up/weak", [("If-None-Match", 'W/"w7"')]).status, 304)

    def test_if_modified_since_exact_match(self):
        path = "/up/etag"
        self.get(path)
        lm = "Tue, 24 Nov 2026 10:00:00 GMT"
        self.assertEqual(self.get(path, [("If-Modified-Since", lm)]).status, 304)
        self.assertEqual(self.get(path, [("If-Modified-Since", "Tue, 24 Nov 2026 11:00:00 GMT")]).status, 200)
        # If-None-Match takes precedence (RFC 9110 13.1.3)
        r = self.get(path, [("If-None-Match", '"nope"'), ("If-Modified-Since", lm)])
        self.assertEqual(r.status, 200)

    def test_conditional_without_validator_gets_the_full_response(self):
        self.get("/up/novalidator")
        r = self.get("/up/novalidator", [("If-None-Match", '"v1"'), ("If-Modified-Since", "Tue, 24 Nov 2026 10:00:00 GMT")])
        self.assertEqual(r.status, 200)
        self.assertHit(r)

    # --- what goes into the key -------------------------------------------------------------------

    def test_tenant_isolation(self):
        path = "/echo/tenant/x"
        n0 = self.count(self.m)
        ra = self.get(path, [("Authorization", "Bearer A")])
        rb = self.get(path, [("Authorization", "Bearer B")])
        self.assertNotEqual(self.assertMiss(ra), self.assertMiss(rb))
        self.assertEqual(self.count(self.m), n0 + 2)
        for token, first in (("Bearer A", ra), ("Bearer B", rb)):
            r = self.get(path, [("Authorization", token)])
            self.assertHit(r)
            self.assertEqual(r.body, first.body)
            self.assertEqual(h.echo_header_all(r.json(), "authorization"), [token])
        # no Authorization at all is a third tenant
        r = self.get(path)
        self.assertMiss(r)
        self.assertEqual(h.echo_header_all(r.json(), "authorization"), [])
        self.assertHit(self.get(path))
        self.assertEqual(self.count(self.m), n0 + 3)

    def test_authorization_false_shares_entries(self):
        path = "/echo/shared/x"
        n0 = self.count(self.m)
        ra = self.get(path, [("Authorization", "Bearer A")])
        self.assertMiss(ra)
        rb = self.get(path, [("Authorization", "Bearer B")])
        self.assertHit(rb)
        self.assertEqual(rb.body, ra.body)
        self.assertHit(self.get(path))
        self.assertEqual(self.count(self.m), n0 + 1)

    def test_key_headers(self):
        path = "/echo/kh/x"
        n0 = self.count(self.m)
        r1 = self.get(path, [("X-Tenant", "t1")])
        r2 = self.get(path, [("X-Tenant", "t2")])
        self.assertNotEqual(self.assertMiss(r1), self.assertMiss(r2))
        self.assertEqual(self.count(self.m), n0 + 2)
        self.assertEqual(self.get(path, [("X-Tenant", "t1")]).body, r1.body)
        self.assertHit(self.get(path, [("x-tenant", "t2")]))
        # a header that is not listed does not split entries
        r = self.get(path, [("X-Tenant", "t1"), ("X-Other", "zzz")])
        self.assertHit(r)
        self.assertEqual(r.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 2)
        # absent and present-but-empty are two more entries
        r_absent = self.get(path)
        r_empty = self.get(path, [("X-Tenant", "")])
        self.assertNotEqual(self.assertMiss(r_absent), self.assertMiss(r_empty))
        self.assertHit(self.get(path))
        self.assertHit(self.get(path, [("X-Tenant", "")]))
        self.assertEqual(self.count(self.m), n0 + 4)

    def test_canonical_json(self):
        path = "/echo/canon"
        ct = [("Content-Type", "application/json")]
        b1 = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"user":"alice"}'
        b2 = b'{ "user" : "bob", "messages" : [ {"content":"hi", "role":"user"} ], "model" : "m1" }'
        b3 = b'{"model":"m2","messages":[{"role":"user","content":"hi"}],"user":"alice"}'
        n0 = self.count(self.m)
        r1 = self.req("POST", path, ct, b1)
        self.assertMiss(r1)
        self.assertEqual(r1.json()["body_sha256"], h.sha256(b1))
        r2 = self.req("POST", path, ct, b2)
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 1)
        # a field that is not ignored changes the key
        r3 = self.req("POST", path, ct, b3)
        self.assertMiss(r3)
        self.assertEqual(r3.json()["body_sha256"], h.sha256(b3))
        self.assertEqual(self.count(self.m), n0 + 2)
        # valid JSON is keyed canonically whatever its Content-Type (curl -d sends a form type)
        for hs in ([("Content-Type", "application/x-www-form-urlencoded")], []):
            with self.subTest(headers=hs):
                r4 = self.req("POST", path, hs, b2)
                self.assertHit(r4)
                self.assertEqual(r4.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 2)
        # a chunked request body is keyed like the same body with a Content-Length
        r5 = self.req("POST", path, ct + [("Transfer-Encoding", "chunked")], h.chunked(b1, [5, 11]))
        self.assertHit(r5)
        self.assertEqual(r5.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 2)
        # GET is not among the route's methods
        self.assertBypass(self.get(path))

    def test_invalid_json_keyed_on_raw_bytes(self):
        path = "/echo/canon"
        ct = [("Content-Type", "application/json")]
        bad1, bad2 = b'{"model": "m1", oops', b'{"model":"m1", oops'
        n0 = self.count(self.m)
        r1 = self.req("POST", path, ct, bad1)
        self.assertMiss(r1)
        self.assertEqual(r1.json()["body_sha256"], h.sha256(bad1))
        r2 = self.req("POST", path, ct, bad1)
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        r3 = self.req("POST", path, ct, bad2)
        self.assertMiss(r3)
        self.assertEqual(r3.json()["body_sha256"], h.sha256(bad2))
        self.assertEqual(self.count(self.m), n0 + 2)

    # --- failed responses -------------------------------------------------------------------------

    def test_error_status_not_stored(self):
        path = "/echo/fail/status"
        n0 = self.count(self.m)
        for _ in range(2):
            r = self.get(path, [("x-mock-status", "500")])
            self.assertMiss(r, status=500)
        self.assertEqual(self.count(self.m), n0 + 2)
        # the same key (x-mock-* headers are not in it) then gets the real answer
        r1 = self.get(path)
        self.assertMiss(r1)
        r2 = self.get(path)
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 3)

    def test_statuses_list(self):
        path = "/echo/st404/x"
        r1 = self.get(path, [("x-mock-status", "404")])
        self.assertMiss(r1, status=404)
        n = self.count(self.m)
        r2 = self.get(path)  # the 404 is stored for this route and served
        self.assertHit(r2, status=404)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(self.count(self.m), n)

    def test_response_cut_mid_body_not_stored(self):
        path = "/echo/fail/partial"
        n0 = self.count(self.m)
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", path, [("x-mock-action", "partial")]))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            self.assertXCache(r, "MISS")
            with self.assertRaises(h.IncompleteResponse):
                c.read_body(r)
        self.assertEqual(self.count(self.m), n0 + 1)
        r1 = self.get(path)
        self.assertMiss(r1)
        self.assertEqual(r1.json()["url"], path)  # complete and parseable
        self.assertEqual(self.count(self.m), n0 + 2)
        self.assertHit(self.get(path))
        self.assertEqual(self.count(self.m), n0 + 2)

    def test_upstream_reset_not_stored(self):
        path = "/echo/fail/reset"
        n0 = self.count(self.m)
        r = self.get(path, [("x-mock-action", "reset")])
        self.assertEqual(r.status, 502, r)
        self.assertIsNone(r.header("x-cache"), r.headers)  # the gateway's own error
        # a reset on a reused upstream connection is re-sent once on a fresh one
        self.assertIn(self.count(self.m) - n0, (1, 2))
        n0 = self.count(self.m) - 1
        r1 = self.get(path)
        self.assertMiss(r1)
        self.assertEqual(r1.json()["url"], path)
        self.assertEqual(self.count(self.m), n0 + 2)
        self.assertHit(self.get(path))


# ---------------------------------------------------------------------------------------
# The memory bound


class CacheMemoryBoundTest(CacheCase):
    MAX_BYTES = 64 * 1024

    @classmethod
    def setUpEnv(cls):
        cls.m = cls.env.mock("m")
        pools = {"m": h.make_pool([cls.m])}
        routes = [{"path": "/bytes", "pool": "m", "cache": {}},
                  {"path": "/echo", "pool": "m", "cache": {}}]
        cls.start_sluice(h.make_config(pools, routes, cache={"max_bytes": cls.MAX_BYTES}))

    def test_bytes_stay_under_max_bytes(self):
        n = 120
        size = 4096
        with h.RawConn(self.port) as c:
            for i in range(n):
                r = c.request("GET", "/bytes?n=%d&i=%d" % (size, i))
                self.assertMiss(r)
                self.assertEqual(len(r.body), size)
                if i % 10 == 0:
                    st = self.cache_stats()
                    self.assertLessEqual(st["bytes"], self.MAX_BYTES, st)
        st = self.cache_stats()
        self.assertEqual(st["max_bytes"], self.MAX_BYTES)
        self.assertLessEqual(st["bytes"], self.MAX_BYTES, st)
        self.assertGreater(st["evictions"], 0, st)
        self.assertGreater(st["entries"], 0, st)
        self.assertLess(st["entries"], n, st)
        self.assertGreaterEqual(st["inserts"], n, st)
        # the most recent response is still there, the oldest was evicted
        self.assertHit(self.get("/bytes?n=%d&i=%d" % (size, n - 1)))
        self.assertMiss(self.get("/bytes?n=%d&i=0" % size))
        # healthy
        self.assertTrue(self.sluice.alive())
        status, _, body = h.http_request(self.admin, "GET", "/healthz")
        self.assertEqual(status, 200)
        r = self.get("/echo/after")
        self.assertEqual(r.json()["url"], "/echo/after")

    def test_entry_over_max_entry_bytes_not_stored(self):
        # max_entry_bytes defaults to max_bytes / 8
        n0 = self.count(self.m)
        for _ in range(2):
            r = self.get("/bytes?n=%d" % (self.MAX_BYTES // 8 + 1))
            self.assertMiss(r)
            self.assertEqual(len(r.body), self.MAX_BYTES // 8 + 1)
        self.assertEqual(self.count(self.m), n0 + 2)
        st = self.cache_stats()
        self.assertLessEqual(st["bytes"], self.MAX_BYTES, st)


# ---------------------------------------------------------------------------------------
# Coalescing


class CacheCoalesceTest(CacheCase):
    LATENCY_MS = 500

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.slow = env.mock("slow", ["--latency-ms", str(cls.LATENCY_MS)])
        cls.failing = env.mock("fail", ["--latency-ms", "300", "--fail-rate", "1", "--fail-status", "503"])
        cls.quick = env.mock("quick")
        pools = {"slow": h.make_pool([cls.slow]), "fail": h.make_pool([cls.failing]),
                 "quick": h.make_pool([cls.quick])}
        routes = [
            {"path": "/echo/coal", "pool": "slow", "cache": {}},
            {"path": "/echo/nocoal", "pool": "slow", "cache": {"coalesce": False}},
            {"path": "/echo/uncacheable", "pool": "slow", "cache": {"statuses": [201]}},
            {"path": "/echo/leaderfail", "pool": "fail", "cache": {}},
            {"path": "/echo/wait", "pool": "quick", "cache": {"coalesce_wait_ms": 100}},
            {"path": "/echo/cut", "pool": "quick", "cache": {}},
            {"path": "/echo/leave", "pool": "quick", "cache": {}},
            {"path": "/echo/abort", "pool": "quick", "cache": {}},
            {"path": "/echo/marker", "pool": "slow"},
        ]
        cls.start_sluice(h.make_config(pools, routes))

    def results_ok(self, results):
        errors = [r for r in results if not isinstance(r, h.Response)]
        self.assertEqual(errors, [], "clients failed")
        return results

    def test_identical_concurrent_misses_make_one_upstream_request(self):
        self.slow.reset_stats()
        before = self.cache_stats()
        n = 100
        rs = self.results_ok(fire(self.port, n, "GET", "/echo/coal/100"))
        self.assertEqual(self.count(self.slow), 1, "identical misses were not coalesced")
        kinds = [r.header("x-cache") for r in rs]
        self.assertEqual(kinds.count("MISS"), 1, kinds)
        self.assertEqual(kinds.count("COALESCED") + kinds.count("HIT"), n - 1, kinds)
        self.assertGreater(kinds.count("COALESCED"), 0, kinds)
        bodies = {r.body for r in rs}
        self.assertEqual(len(bodies), 1, "coalesced responses differ")
        for r in rs:
            self.assertEqual(r.status, 200)
            if r.header("x-cache") != "MISS":
                self.assertHit(r, result=r.header("x-cache"))
        ids = {r.header("x-request-id") for r in rs}
        self.assertEqual(len(ids), n, "request ids repeat across coalesced responses")
        after = self.cache_stats()
        self.assertEqual(after["coalesced"] - before["coalesced"], kinds.count("COALESCED"))
        self.assertEqual(after["misses"] - before["misses"], 1)

    def test_coalesce_false(self):
        self.slow.reset_stats()
        n = 10
        rs = self.results_ok(fire(self.port, n, "GET", "/echo/nocoal/x"))
        self.assertEqual(self.count(self.slow), n)
        self.assertEqual([r.header("x-cache") for r in rs], ["MISS"] * n)
        self.assertHit(self.get("/echo/nocoal/x"))

    def test_uncacheable_leader_releases_waiters(self):
        # statuses = {201}: the leader's 200 is not stored, so the waiters go upstream
        # themselves, after having waited for it.
        self.slow.reset_stats()
        n = 20
        rs = self.results_ok(fire(self.port, n, "GET", "/echo/uncacheable/x"))
        self.assertEqual(self.count(self.slow), n)
        for r in rs:
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["url"], "/echo/uncacheable/x")
            self.assertXCache(r, "MISS")
        waited = [r for r in rs if r.elapsed >= 1.8 * self.LATENCY_MS / 1000.0]
        self.assertGreater(len(waited), 0, "no request waited for the leader: %r"
                           % sorted(round(r.elapsed, 3) for r in rs))

    def test_failed_leader_does_not_fail_waiters(self):
        # every response of this mock is a 503: each client gets the upstream's own answer
        self.failing.reset_stats()
        n = 20
        rs = self.results_ok(fire(self.port, n, "GET", "/echo/leaderfail/x"))
        self.assertEqual(self.count(self.failing), n)
        for r in rs:
            self.assertEqual(r.status, 503, r)
            self.assertEqual(r.header("x-mock-instance"), "fail", r.headers)
            self.assertEqual(r.json()["error"]["type"], "server_error")
            self.assertXCache(r, "MISS")
        # the waiters had waited for the leader (300 ms) before going upstream (300 ms)
        waited = [r for r in rs if r.elapsed >= 0.54]
        self.assertGreater(len(waited), 0, "no request waited for the leader: %r"
                           % sorted(round(r.elapsed, 3) for r in rs))

    def start_leader(self, mock, path, headers):
        """Sends the leader and returns its connection once the mock has it in flight."""
        mock.reset_stats()
        c = h.RawConn(self.port, timeout=10)
        c.send(h.build_request("GET", path, headers))
        h.wait_for(lambda: mock.stats()["inflight"] == 1, 5.0, what="the leader at the mock")
        return c

    def settle(self):
        """A round trip through the gateway on a new connection: requests written before it
        on other connections (already in the gateway's socket buffers) have been read and
        parsed by the time it is answered, since the answer takes at least one more turn of
        the gateway's event loop (an upstream exchange) than reading them."""
        r = self.get("/echo/marker", [("x-mock-delay-ms", "0")])
        self.assertEqual(r.status, 200, r)

    def followers(self, n, path):
        """Sends n identical requests on n connections. Returns (threads that read the
        responses into out when started, out)."""
        out = [None] * n
        conns = [h.RawConn(self.port, timeout=10) for _ in range(n)]
        for c in conns:
            c.send(h.build_request("GET", path))

        def read(i):
            try:
                out[i] = conns[i].read_response()
            except Exception as e:
                out[i] = e
            finally:
                conns[i].close()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
        return threads, out

    def test_waiters_stop_waiting_after_coalesce_wait_ms(self):
        path = "/echo/wait/x"
        leader = self.start_leader(self.quick, path, [("x-mock-delay-ms", "1500")])
        mark = self.sluice.log_mark()
        threads, out = self.followers(5, path)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - t0
        self.results_ok(out)
        for r in out:
            self.assertMiss(r)
            self.assertEqual(r.json()["url"], path)
        # they went upstream on their own after 100 ms instead of waiting ~1.5 s
        self.assertLess(elapsed, 1.2, "waiters took %.2f s" % elapsed)
        self.assertEqual(self.count(self.quick), 6)
        self.assertIsNotNone(self.sluice.wait_log(r"waited 100 ms for an identical request", 2, mark))
        lr = leader.read_response()
        leader.close()
        self.assertMiss(lr)
        self.assertHit(self.get(path))

    def test_leader_cut_mid_body_releases_waiters(self):
        path = "/echo/cut/x"
        leader = self.start_leader(self.quick, path,
                                   [("x-mock-action", "partial"), ("x-mock-delay-ms", "800")])
        threads, out = self.followers(5, path)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        lr = leader.read_head()
        self.assertEqual(lr.status, 200)
        with self.assertRaises(h.IncompleteResponse):
            leader.read_body(lr)
        leader.close()
        for t in threads:
            t.join(10)
        self.results_ok(out)
        for r in out:
            self.assertMiss(r)
            self.assertEqual(r.json()["url"], path)
            # they were answered after the leader's 800 ms, having waited for it
            self.assertGreater(r.t_done - t0, 0.5)
        self.assertEqual(self.count(self.quick), 6)
        self.assertHit(self.get(path))
        self.assertEqual(self.count(self.quick), 6)

    def test_waiters_that_leave_do_not_disturb_the_others(self):
        path = "/echo/leave/x"
        leader = self.start_leader(self.quick, path, [("x-mock-delay-ms", "800")])
        quitters = [h.RawConn(self.port) for _ in range(3)]
        for q in quitters:
            q.send(h.build_request("GET", path))
        threads, out = self.followers(3, path)
        self.settle()  # the quitters are waiting now
        for i, q in enumerate(quitters):
            if i % 2:
                q.abort()
            else:
                q.close()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        self.results_ok(out)
        lr = leader.read_response()
        leader.close()
        self.assertMiss(lr)
        for r in out:
            self.assertHit(r, result="COALESCED")
            self.assertEqual(r.body, lr.body)
        self.assertEqual(self.count(self.quick), 1)
        self.assertTrue(self.sluice.alive())

    def test_leader_client_abort_releases_waiters(self):
        path = "/echo/abort/x"
        leader = self.start_leader(self.quick, path, [("x-mock-delay-ms", "5000")])
        threads, out = self.followers(4, path)
        for t in threads:
            t.start()
        self.settle()  # the followers are waiting for the leader now
        t_abort = time.monotonic()
        leader.abort()
        h.wait_for(lambda: self.quick.stats()["aborted"] == 1, 5.0, what="the leader's upstream request aborted")
        for t in threads:
            t.join(10)
        self.results_ok(out)
        for r in out:
            self.assertMiss(r)
            self.assertEqual(r.json()["url"], path)
            self.assertGreater(r.t_head, t_abort, "a follower was answered before the leader went away")
        self.assertEqual(self.count(self.quick), 5)
        self.assertHit(self.get(path))
        self.assertTrue(self.sluice.alive())


# ---------------------------------------------------------------------------------------
# Streamed (SSE) responses


class CacheStreamTest(CacheCase):

    @classmethod
    def setUpEnv(cls):
        cls.sse = cls.env.mock("sse", ["--sse-events", "5", "--sse-interval-ms", "20"])
        pools = {"sse": h.make_pool([cls.sse])}
        routes = [
            {"path": "/v1/chat/completions", "host": "stream.test", "pool": "sse",
             "cache": {"methods": ["POST"], "stream": True}},
            {"path": "/v1/chat/completions", "host": "nostream.test", "pool": "sse",
             "cache": {"methods": ["POST"]}},
            {"path": "/stream", "host": "stream.test", "pool": "sse", "cache": {"stream": True}},
            {"path": "/stream", "host": "nostream.test", "pool": "sse", "cache": {}},
        ]
        cls.start_sluice(h.make_config(pools, routes))

    BODY = b'{"model":"m-sse","stream":true,"messages":[{"role":"user","content":"hi"}]}'

    def raw(self, method, path, host, body=None, version="HTTP/1.1"):
        with h.RawConn(self.port, timeout=10) as c:
            c.send(h.build_request(method, path, [("Content-Type", "application/json"),
                                                  ("Connection", "close")], body,
                                   version=version, host=host))
            return split_raw(c.read_all_until_close(10))

    def test_sse_replayed_byte_for_byte(self):
        self.sse.reset_stats()
        s1, h1, b1 = self.raw("POST", "/v1/chat/completions", "stream.test", self.BODY)
        s2, h2, b2 = self.raw("POST", "/v1/chat/completions", "stream.test", self.BODY)
        self.assertEqual(s1, "HTTP/1.1 200 OK")
        self.assertEqual(s2, s1)
        self.assertEqual(h.hdr(h1, "x-cache"), "MISS")
        self.assertEqual(h.hdr(h2, "x-cache"), "HIT")
        self.assertRegex(h.hdr(h2, "age", ""), r"^\d+$")
        self.assertEqual(self.count(self.sse), 1)
        self.assertEqual(h.hdr(h1, "transfer-encoding"), "chunked")
        self.assertTrue(h.hdr(h2, "content-type", "").startswith("text/event-stream"))
        self.assertTrue(b1.endswith(b"0\r\n\r\n"), b1[-40:])
        self.assertGreater(b1.count(b"\r\n"), 6)  # several chunks, not one
        self.assertEqual(b2, b1, "replayed body bytes (framing included) differ")
        events = dechunk(b1)
        self.assertEqual(events.count(b"data: "), 6)
        self.assertTrue(events.endswith(b"data: [DONE]\n\n"))
        # the heads differ only in the cache's own lines and the request id
        own = {"x-cache", "x-cache-key", "age", "x-request-id"}
        self.assertEqual([x for x in h1 if x[0].lower() not in own],
                         [x for x in h2 if x[0].lower() not in own])

    def test_sse_hit_for_http10_client(self):
        body = self.BODY.replace(b"m-sse", b"m-sse-10")
        s1, h1, b1 = self.raw("POST", "/v1/chat/completions", "stream.test", body)
        self.assertEqual(h.hdr(h1, "x-cache"), "MISS")
        s2, h2, b2 = self.raw("POST", "/v1/chat/completions", "stream.test", body, version="HTTP/1.0")
        self.assertEqual(h.hdr(h2, "x-cache"), "HIT")
        self.assertIsNone(h.hdr(h2, "transfer-encoding"))
        self.assertEqual(h.hdr(h2, "content-length"), str(len(b2)))
        self.assertEqual(b2, dechunk(b1))

    def test_sse_not_stored_without_stream(self):
        self.sse.reset_stats()
        for _ in range(2):
            s, hs, b = self.raw("POST", "/v1/chat/completions", "nostream.test", self.BODY)
            self.assertEqual(h.hdr(hs, "x-cache"), "MISS")
            self.assertTrue(dechunk(b).endswith(b"data: [DONE]\n\n"))
        self.assertEqual(self.count(self.sse), 2)
        # a plain JSON completion on the same route is stored
        plain = b'{"model":"m-plain","messages":[]}'
        r1 = self.req("POST", "/v1/chat/completions", [("Content-Type", "application/json")], plain,
                      host="nostream.test")
        self.assertMiss(r1)
        r2 = self.req("POST", "/v1/chat/completions", [("Content-Type", "application/json")], plain,
                      host="nostream.test")
        self.assertHit(r2)
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(self.count(self.sse), 3)

    def test_chunked_stream(self):
        path = "/stream?chunks=4&interval_ms=5&size=7"
        self.sse.reset_stats()
        s1, h1, b1 = self.raw("GET", path, "stream.test")
        s2, h2, b2 = self.raw("GET", path, "stream.test")
        self.assertEqual((h.hdr(h1, "x-cache"), h.hdr(h2, "x-cache")), ("MISS", "HIT"))
        self.assertEqual(b2, b1)
        self.assertEqual(dechunk(b1), b"0000000111111122222223333333")
        self.assertEqual(self.count(self.sse), 1)
        for _ in range(2):  # stream = false: not stored
            s, hs, b = self.raw("GET", path, "nostream.test")
            self.assertEqual(h.hdr(hs, "x-cache"), "MISS")
        self.assertEqual(self.count(self.sse), 3)


# ---------------------------------------------------------------------------------------
# Admin: GET / DELETE /cache


class CacheAdminTest(CacheCase):

    @classmethod
    def setUpEnv(cls):
        cls.m = cls.env.mock("m")
        pools = {"m": h.make_pool([cls.m])}
        routes = [{"path": "/echo/pa", "pool": "m", "cache": {}},
                  {"path": "/echo/pb", "pool": "m", "cache": {}},
                  {"path": "/echo/plain", "pool": "m"}]
        cls.start_sluice(h.make_config(pools, routes))

    def setUp(self):
        self.purge()

    def purge_json(self, query=""):
        status, hs, body = self.purge(query)
        self.assertEqual(status, 200, body)
        self.assertTrue(h.hdr(hs, "content-type", "").startswith("application/json"))
        return json.loads(body)

    def test_stats(self):
        st0 = self.cache_stats()
        for k in STATS_KEYS:
            self.assertIsInstance(st0[k], int, (k, st0))
        self.assertEqual(st0["entries"], 0)
        self.assertEqual(st0["bytes"], 0)
        self.assertEqual(st0["max_bytes"], 64 * 1024 * 1024)  # the default
        self.assertMiss(self.get("/echo/pa/stats"))
        self.assertHit(self.get("/echo/pa/stats"))
        self.assertHit(self.get("/echo/pa/stats"))
        st = self.cache_stats()
        self.assertEqual(st["entries"], 1)
        self.assertGreater(st["bytes"], 0)
        self.assertEqual(st["hits"] - st0["hits"], 2)
        self.assertEqual(st["misses"] - st0["misses"], 1)
        self.assertEqual(st["inserts"] - st0["inserts"], 1)
        self.assertEqual(st["coalesced"], st0["coalesced"])

    def test_purge_by_key(self):
        r1 = self.get("/echo/pa/k")
        key = self.assertMiss(r1)
        self.assertMiss(self.get("/echo/pa/other"))
        self.assertHit(self.get("/echo/pa/k"))
        self.assertEqual(self.purge_json("?key=" + key), {"purged": 1})
        self.assertEqual(self.purge_json("?key=" + key), {"purged": 0})
        r2 = self.get("/echo/pa/k")
        self.assertEqual(self.assertMiss(r2), key)  # the same request, the same key
        self.assertNotEqual(r2.body, r1.body)
        self.assertHit(self.get("/echo/pa/other"))  # untouched
        # upper-case hex names the same key
        self.assertEqual(self.purge_json("?key=" + key.upper()), {"purged": 1})
        self.assertMiss(self.get("/echo/pa/k"))

    def test_purge_by_route(self):
        for p in ("/echo/pa/1", "/echo/pa/2", "/echo/pb/1"):
            self.assertMiss(self.get(p))
        self.assertEqual(self.purge_json("?route=/echo/pa"), {"purged": 2})
        self.assertEqual(self.purge_json("?route=%2Fecho%2Fpa"), {"purged": 0})
        self.assertMiss(self.get("/echo/pa/1"))
        self.assertMiss(self.get("/echo/pa/2"))
        self.assertHit(self.get("/echo/pb/1"))
        self.assertEqual(self.purge_json("?route=%2Fecho%2Fpb"), {"purged": 1})  # percent-decoded
        self.assertMiss(self.get("/echo/pb/1"))
        self.assertEqual(self.purge_json("?route=/no/such/route"), {"purged": 0})

    def test_purge_all(self):
        for p in ("/echo/pa/1", "/echo/pa/2", "/echo/pb/1"):
            self.assertMiss(self.get(p))
        self.assertEqual(self.cache_stats()["entries"], 3)
        self.assertEqual(self.purge_json(), {"purged": 3})
        st = self.cache_stats()
        self.assertEqual((st["entries"], st["bytes"]), (0, 0))
        for p in ("/echo/pa/1", "/echo/pa/2", "/echo/pb/1"):
            self.assertMiss(self.get(p))

    def test_bad_requests(self):
        for query in ("?key=xyz", "?key=" + "0" * 63, "?key=" + "g" * 64, "?key=" + "0" * 65,
                      "?key=", "?foo=bar"):
            with self.subTest(query=query):
                status, hs, body = self.purge(query)
                self.assertEqual(status, 400, body)
                self.assertTrue(h.hdr(hs, "content-type", "").startswith("application/json"))
                err = json.loads(body)["error"]
                self.assertEqual(err["type"], "bad_request")
                self.assertIsInstance(err["message"], str)
        status, hs, body = h.http_request(self.admin, "POST", "/cache", body=b"")
        self.assertEqual(status, 405, body)
        self.assertEqual(json.loads(body)["error"]["type"], "method_not_allowed")
        # nothing was purged by the bad requests
        self.assertMiss(self.get("/echo/pa/bad"))
        self.purge("?key=nothex")
        self.assertHit(self.get("/echo/pa/bad"))


# ---------------------------------------------------------------------------------------
# Cache policies


class CachePolicyTest(CacheCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.m = env.mock("m")
        os.makedirs(env.path("policies/balancer"))
        os.makedirs(env.path("policies/cache"))
        shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", "round_robin.lua"), env.path("policies/balancer"))
        shutil.copy(os.path.join(h.POLICIES_DIR, "cache", "normalize_query.lua"), env.path("policies/cache"))
        env.write("policies/cache/boom.lua", 'return { key = function(req) error("boom") end }\n')
        env.write("policies/cache/badret.lua", "return { key = function(req) return 42 end }\n")
        pools = {"m": h.make_pool([cls.m])}
        routes = [
            {"path": "/echo/nq", "pool": "m", "cache": {"policy": "normalize_query"}},
            {"path": "/echo/boom", "pool": "m", "cache": {"policy": "boom"}},
            {"path": "/echo/badret", "pool": "m", "cache": {"policy": "badret"}},
            {"path": "/echo/ok", "pool": "m"},
        ]
        cls.start_sluice(h.make_config(pools, routes, policies=env.path("policies")))

    def test_normalized_queries_share_an_entry(self):
        n0 = self.count(self.m)
        r1 = self.get("/echo/nq/a?b=2&a=1&utm_source=x")
        self.assertMiss(r1)
        self.assertEqual(r1.json()["url"], "/echo/nq/a?b=2&a=1&utm_source=x")  # sent as is
        for q in ("a=1&b=2", "utm_medium=y&b=2&gclid=z&a=1&fbclid=w"):
            with self.subTest(query=q):
                r = self.get("/echo/nq/a?" + q)
                self.assertHit(r)
                self.assertEqual(r.body, r1.body)
        self.assertEqual(self.count(self.m), n0 + 1)
        self.assertMiss(self.get("/echo/nq/a?a=1&b=3"))
        self.assertMiss(self.get("/echo/nq/b?a=1&b=2"))  # the path is part of the key
        self.assertEqual(self.count(self.m), n0 + 3)

    def test_nocache_bypasses(self):
        n0 = self.count(self.m)
        for q in ("nocache=1", "nocache=1", "a=1&nocache=1"):
            self.assertBypass(self.get("/echo/nq/nc?" + q))
        self.assertEqual(self.count(self.m), n0 + 3)
        # nocache=0 is an ordinary parameter
        self.assertMiss(self.get("/echo/nq/nc?nocache=0"))
        self.assertHit(self.get("/echo/nq/nc?nocache=0"))

    def test_no_query_uses_the_default_key(self):
        n0 = self.count(self.m)
        r1 = self.get("/echo/nq/plain")
        self.assertMiss(r1)
        self.assertHit(self.get("/echo/nq/plain"))
        self.assertEqual(self.count(self.m), n0 + 1)

    def test_failing_policy_is_500_and_process_lives(self):
        n0 = self.count(self.m)
        mark = self.sluice.log_mark()
        with h.RawConn(self.port) as c:
            for path in ("/echo/boom/x", "/echo/badret/x", "/echo/boom/y"):
                with self.subTest(path=path):
                    r = c.request("GET", path, [("X-Request-Id", "pol-err")])
                    err = self.assertJsonError(r, 500, "policy_error")
                    self.assertEqual(err["request_id"], "pol-err")
                    self.assertIsNone(r.header("x-mock-instance"))
                    # the keep-alive connection goes on
                    self.assertEqual(c.request("GET", "/echo/ok").status, 200)
        self.assertEqual(self.count(self.m), n0 + 3)  # only the /echo/ok requests
        self.assertTrue(self.sluice.alive())
        self.assertIsNotNone(self.sluice.wait_log(r"boom\.lua:1", 2, start=mark), self.sluice.log_text())
        self.assertIsNotNone(self.sluice.wait_log(r"number", 2, start=mark), self.sluice.log_text())


class CacheCheckConfigTest(unittest.TestCase):
    """sluice --check validates routes[i].cache and the cache policy it names."""

    CONFIG = """\
return {
  listen = { "127.0.0.1:0" },
  admin = "127.0.0.1:0",
  policies = "policies",
  pools = {
    llm = { endpoints = { "http://127.0.0.1:9" }, balancer = "round_robin" },
  },
  routes = {
    { path = "/a", pool = "llm" },
    { path = "/b", pool = "llm", cache = {
        ttl_s = 30,
        policy = "POLICY",
      },
    },
  },
}
"""

    @classmethod
    def setUpClass(cls):
        cls.env = h.Env()
        os.makedirs(cls.env.path("cfg", "policies", "balancer"))
        os.makedirs(cls.env.path("cfg", "policies", "cache"))
        shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", "round_robin.lua"),
                    cls.env.path("cfg", "policies", "balancer"))
        shutil.copy(os.path.join(h.POLICIES_DIR, "cache", "normalize_query.lua"),
                    cls.env.path("cfg", "policies", "cache"))
        cls.env.write("cfg/policies/cache/nokey.lua", "return { other = function() end }\n")

    @classmethod
    def tearDownClass(cls):
        cls.env.close()

    def check(self, text, name):
        path = self.env.write("cfg/" + name, text)
        p = subprocess.run([h.SLUICE_BIN, "--check", "-c", path], cwd="/", stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
        return path, p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    @staticmethod
    def line_of(text, needle):
        for i, line in enumerate(text.splitlines(), 1):
            if needle in line:
                return i
        raise AssertionError(needle)

    def test_good_policy(self):
        path, rc, out, err = self.check(self.CONFIG.replace("POLICY", "normalize_query"), "good.lua")
        self.assertEqual(rc, 0, (out, err))

    def test_missing_policy(self):
        text = self.CONFIG.replace("POLICY", "no_such_cache_policy")
        path, rc, out, err = self.check(text, "missing.lua")
        self.assertEqual(rc, 1, (out, err))
        first = err.strip().splitlines()[0]
        prefix = "%s:%d: routes[2].cache.policy: " % (path, self.line_of(text, "no_such_cache_policy"))
        self.assertTrue(first.startswith(prefix), "expected %r..., got %r" % (prefix, err))
        self.assertIn("no_such_cache_policy", first[len(prefix):])

    def test_policy_without_key(self):
        text = self.CONFIG.replace("POLICY", "nokey")
        path, rc, out, err = self.check(text, "nokey.lua")
        self.assertEqual(rc, 1, (out, err))
        self.assertIn("routes[2].cache.policy", err)
        self.assertIn("key", err.split("routes[2].cache.policy", 1)[1])

    def test_bad_cache_field(self):
        text = self.CONFIG.replace("ttl_s = 30", "ttl_s = 0").replace("POLICY", "normalize_query")
        path, rc, out, err = self.check(text, "badttl.lua")
        self.assertEqual(rc, 1, (out, err))
        self.assertIn("routes[2].cache.ttl_s", err)


if __name__ == "__main__":
    unittest.main()
