"""Responses stream through sluice as they arrive: SSE, chunked, big bodies under
backpressure, and client aborts reaching the upstream."""

import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

SSE_EVENTS = 5
SSE_INTERVAL_MS = 200
BYTES_PATTERN = bytes(range(251)) * 1100  # > 256 KiB + 251: any recv fits in a window


class StreamingTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.sse = env.mock("sse", ["--sse-events", str(SSE_EVENTS), "--sse-interval-ms", str(SSE_INTERVAL_MS)])
        cls.data = env.mock("data")
        pools = {"sse": h.make_pool([cls.sse]), "data": h.make_pool([cls.data])}
        routes = [{"path": "/v1/chat/completions", "pool": "sse"}, {"path": "/", "pool": "data"}]
        cls.sluice = env.sluice(h.make_config(pools, routes))
        cls.port = cls.sluice.port

    def sse_events(self, resp):
        """[(arrival time relative to the request, event text)] from a streamed body."""
        events = []
        start = 0
        while True:
            end = resp.body.find(b"\n\n", start)
            if end < 0:
                break
            t = resp.time_at(end + 1)
            events.append((t - resp.t_sent, resp.body[start:end].decode()))
            start = end + 2
        return events

    def test_sse_arrives_incrementally(self):
        with h.RawConn(self.port) as c:
            req = h.build_request("POST", "/v1/chat/completions",
                                  [("Content-Type", "application/json"), ("Accept", "text/event-stream")],
                                  b'{"model":"m","stream":true,"messages":[]}')
            t0 = time.monotonic()
            c.send(req)
            r = c.read_head()
            r.t_sent = t0
            c.read_body(r)
        self.assertEqual(r.status, 200)
        self.assertTrue(r.header("content-type", "").startswith("text/event-stream"))
        self.assertEqual(r.framing, "chunked")
        events = self.sse_events(r)
        self.assertEqual(len(events), SSE_EVENTS + 1, events)
        self.assertEqual(events[-1][1], "data: [DONE]")
        for _, ev in events[:-1]:
            self.assertTrue(ev.startswith("data: {"), ev)
        first, last = events[0][0], events[SSE_EVENTS - 1][0]
        self.assertLess(first, 0.150, "first SSE event after %.0f ms" % (first * 1000))
        self.assertGreaterEqual(last, (SSE_EVENTS - 1) * SSE_INTERVAL_MS / 1000.0 - 0.005)
        # each event was relayed when it was produced, not batched with the next one
        for i in range(1, SSE_EVENTS):
            gap = events[i][0] - events[i - 1][0]
            self.assertGreater(gap, SSE_INTERVAL_MS / 1000.0 / 2,
                               "events %d and %d arrived %.0f ms apart" % (i - 1, i, gap * 1000))
        self.assertLess(r.t_head - t0, 0.150)

    def test_chunked_stream_chunks_arrive_one_by_one(self):
        n, interval, size = 6, 100, 33
        with h.RawConn(self.port) as c:
            t0 = time.monotonic()
            c.send(h.build_request("GET", "/stream?chunks=%d&interval_ms=%d&size=%d" % (n, interval, size)))
            r = c.read_head()
            r.t_sent = t0
            c.read_body(r)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.framing, "chunked")
        self.assertEqual(r.body, b"".join(bytes([0x30 + i % 10]) * size for i in range(n)))
        # the time at which the last byte of piece i arrived
        times = [r.time_at((i + 1) * size - 1) - t0 for i in range(n)]
        self.assertLess(times[0], 0.150, times)
        for i in range(1, n):
            self.assertGreater(times[i] - times[i - 1], interval / 1000.0 / 2,
                               "pieces %d and %d not relayed separately: %r" % (i - 1, i, times))
        self.assertGreaterEqual(times[-1], (n - 1) * interval / 1000.0 - 0.005)

    def test_large_body_slow_reader_bounded_memory(self):
        n = 50 * 1000 * 1000
        pid = self.sluice.pid
        base_rss = h.rss_kb(pid)
        peak = [base_rss]
        got = [0]
        bad = []

        def check(data):
            off = got[0]
            k = off % 251
            if data != BYTES_PATTERN[k:k + len(data)]:
                bad.append(off)
            got[0] += len(data)

        with h.RawConn(self.port, timeout=20, rcvbuf=64 * 1024) as c:
            c.send(h.build_request("GET", "/bytes?n=%d" % n))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.header("content-length"), str(n))
            # Read a little, then stop reading for a while: without backpressure sluice
            # would pull the whole 50 MB from the mock into memory meanwhile.
            pieces = 0
            deadline_pause = None

            def on_data(data):
                nonlocal pieces, deadline_pause
                check(data)
                pieces += 1
                if got[0] < 2 * 1024 * 1024:
                    time.sleep(0.002)            # slow reader at the start
                elif deadline_pause is None:
                    deadline_pause = time.monotonic()
                    for _ in range(8):            # then a full stop of ~0.8 s
                        time.sleep(0.1)
                        peak[0] = max(peak[0], h.rss_kb(pid))
                if pieces % 64 == 0:
                    peak[0] = max(peak[0], h.rss_kb(pid))

            c.read_body(r, on_data=on_data, max_recv=64 * 1024)
        self.assertEqual(got[0], n)
        self.assertEqual(bad, [], "body corrupted at offsets %r" % bad[:5])
        growth_mb = (peak[0] - base_rss) / 1024.0
        self.assertLess(growth_mb, 16, "sluice RSS grew by %.1f MB relaying 50 MB (%d kB -> %d kB)"
                        % (growth_mb, base_rss, peak[0]))
        self.assertTrue(self.data.stats()["completed"] >= 1)

    def test_client_abort_mid_stream_aborts_upstream(self):
        self.data.reset_stats()
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/stream?chunks=1000&interval_ms=20&size=10"))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            # read a couple of pieces, then go away
            while len(c.buf) < 40:
                c._fill()
        h.wait_for(lambda: self.data.stats()["aborted"] == 1, 5.0, what="mock aborted == 1")
        st = self.data.stats()
        self.assertEqual(st["inflight"], 0, st)
        self.assertEqual(st["completed"], 0, st)

    def test_client_abort_sse_aborts_upstream(self):
        self.sse.reset_stats()
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/v1/chat/completions", body=b'{"stream":true}'))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            while b"data: " not in c.buf:
                c._fill()
        h.wait_for(lambda: self.sse.stats()["aborted"] == 1, 5.0, what="sse mock aborted == 1")

    def test_client_abort_with_rst_while_waiting_for_head(self):
        self.data.reset_stats()
        c = h.RawConn(self.port)
        c.send(h.build_request("GET", "/echo/wait", [("x-mock-delay-ms", "5000")]))
        h.wait_for(lambda: self.data.stats()["inflight"] == 1, 5.0, what="request reached the mock")
        c.abort()
        h.wait_for(lambda: self.data.stats()["aborted"] == 1, 5.0, what="mock aborted == 1")

    def test_still_streaming_after_aborts(self):
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/stream?chunks=3&interval_ms=1&size=4")
            self.assertEqual(r.body, b"000011112222")


if __name__ == "__main__":
    unittest.main()
