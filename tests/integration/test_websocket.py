"""WebSocket through sluice with a real client (python3-websockets): handshake forwarding and
retry, relay integrity, fragmentation, close codes both ways, upstream loss (1011), message
size limit (1009), many concurrent sessions, and sessions surviving a reload."""

import asyncio
import hashlib
import os
import re
import signal
import sys
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
import websockets  # noqa: E402  (Debian python3-websockets)


def Upstream(refuse=None):
    return h.WsEchoUpstream(refuse=refuse, subprotocols=["stt.v1"])


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class WebSocketTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.up = Upstream()
        cls.up2 = Upstream()
        cls.refusing = Upstream(refuse=503)
        cls.up3 = Upstream()  # own endpoint: max_inflight merges across pools sharing a URL
        cls.dead = h.free_port()
        pools = {
            "stt": h.make_pool([cls.up.url], websocket={"max_message_bytes": 4 * 1024 * 1024}),
            "small": h.make_pool([cls.up.url], websocket={"max_message_bytes": 1024}),
            "retry": h.make_pool([cls.refusing.url, cls.up2.url], balancer="round_robin",
                                 retry={"attempts": 3, "retry_on": ["connect_error", "reset", 503]}),
            "down": h.make_pool([cls.refusing.url, "ws://127.0.0.1:%d" % cls.dead],
                                balancer="round_robin"),
            "kill": h.make_pool([cls.up2.url]),
            "idle": h.make_pool([cls.up.url], websocket={"idle_timeout_ms": 300}),
            "ping": h.make_pool([cls.up.url], websocket={"idle_timeout_ms": 400,
                                                          "ping_interval_ms": 100}),
            "one": h.make_pool([cls.up3.url], max_inflight=1, queue={"max": 4, "timeout_ms": 300}),
        }
        routes = [{"path": "/v1/listen", "pool": "stt"}, {"path": "/small", "pool": "small"},
                  {"path": "/retry", "pool": "retry"}, {"path": "/down", "pool": "down"},
                  {"path": "/kill", "pool": "kill"}, {"path": "/idle", "pool": "idle"},
                  {"path": "/ping", "pool": "ping"}, {"path": "/one", "pool": "one"}]
        cls.s = cls.env.sluice(h.make_config(pools, routes, watch=False))
        cls.admin = cls.s.admin_port()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for u in (cls.up, cls.up2, cls.refusing, cls.up3):
            u.stop()

    def uri(self, path):
        return "ws://127.0.0.1:%d%s" % (self.s.port, path)

    def test_relay_integrity_and_headers(self):
        async def go():
            async with websockets.connect(self.uri("/v1/listen?lang=en"), subprotocols=["stt.v1"],
                                          extra_headers={"Authorization": "Bearer t0k"},
                                          max_size=None) as ws:
                self.assertEqual(ws.subprotocol, "stt.v1")
                self.assertIsNotNone(ws.response_headers.get("x-request-id"))
                await ws.send("hello")
                self.assertEqual(await ws.recv(), "hello")
                blob = os.urandom(1 << 20)
                await ws.send(blob)
                back = await ws.recv()
                self.assertEqual(hashlib.sha256(back).digest(), hashlib.sha256(blob).digest())
                # a fragmented message arrives whole
                await ws.send(iter([b"ab", b"cd", b"ef"]))
                self.assertEqual(await ws.recv(), b"abcdef")
        run(go())
        hdrs = self.up.headers[-1]
        self.assertEqual(hdrs.get("Authorization"), "Bearer t0k")
        self.assertIn("stt.v1", hdrs.get("Sec-WebSocket-Protocol", ""))
        self.assertNotIn("Sec-WebSocket-Extensions", hdrs)  # frames are parsed: no compression
        self.assertIn("X-Request-Id", hdrs)

    def test_close_codes_both_ways(self):
        async def server_closes():
            async with websockets.connect(self.uri("/v1/listen")) as ws:
                await ws.send("close:4001:bye")
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await ws.recv()
                return cm.exception.rcvd

        rcvd = run(server_closes())
        self.assertEqual((rcvd.code, rcvd.reason), (4001, "bye"))

        async def client_closes():
            ws = await websockets.connect(self.uri("/v1/listen"))
            await ws.send("x")
            await ws.recv()
            await ws.close(4002, "client bye")
            return ws.close_code

        self.assertEqual(run(client_closes()), 4002)
        h.wait_for(lambda: 4002 in self.up.close_codes, 5, what="upstream saw close code 4002")

    def test_oversized_message_closes_1009(self):
        async def go():
            async with websockets.connect(self.uri("/small"), max_size=None) as ws:
                await ws.send(b"x" * 2048)
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await ws.recv()
                return cm.exception.rcvd.code
        self.assertEqual(run(go()), 1009)

    def test_handshake_refusal_retried_invisibly(self):
        async def go():
            for _ in range(4):  # round robin: every other attempt starts on the refusing one
                async with websockets.connect(self.uri("/retry")) as ws:
                    await ws.send("ok")
                    self.assertEqual(await ws.recv(), "ok")
        run(go())

    def test_all_endpoints_fail_gives_http_error_not_101(self):
        async def go():
            with self.assertRaises(websockets.InvalidStatusCode) as cm:
                await websockets.connect(self.uri("/down"))
            return cm.exception.status_code
        self.assertIn(run(go()), (502, 503))

    def test_upstream_lost_mid_session_closes_client_1011(self):
        async def go():
            async with websockets.connect(self.uri("/kill")) as ws:
                await ws.send("one")
                self.assertEqual(await ws.recv(), "one")
                self.up2.kill()
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await ws.recv()
                return cm.exception.rcvd
        rcvd = run(go())
        self.assertEqual(rcvd.code, 1011)
        self.assertIn("upstream", rcvd.reason)

    def test_many_concurrent_sessions(self):
        async def one(i):
            async with websockets.connect(self.uri("/v1/listen")) as ws:
                for j in range(3):
                    msg = "s%d-%d" % (i, j)
                    await ws.send(msg)
                    if await ws.recv() != msg:
                        return False
                return True

        async def go():
            return await asyncio.gather(*(one(i) for i in range(200)))
        self.assertTrue(all(run(go(), timeout=60)))

    def test_session_survives_reload(self):
        async def go():
            async with websockets.connect(self.uri("/v1/listen")) as ws:
                await ws.send("before")
                self.assertEqual(await ws.recv(), "before")
                status, _, body = await asyncio.get_running_loop().run_in_executor(
                    None, h.http_request, self.admin, "POST", "/reload")
                self.assertEqual(status, 200, body)
                await ws.send("after")
                self.assertEqual(await ws.recv(), "after")
        run(go())

    def test_idle_session_closed_1001(self):
        async def go():
            async with websockets.connect(self.uri("/idle")) as ws:
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await asyncio.wait_for(ws.recv(), 5)
                return cm.exception.rcvd
        rcvd = run(go())
        self.assertEqual((rcvd.code, rcvd.reason), (1001, "idle timeout"))

    def test_keepalive_pings_keep_a_quiet_session_open(self):
        async def go():
            async with websockets.connect(self.uri("/ping")) as ws:
                await asyncio.sleep(1.2)  # three idle timeouts' worth, pings every 100 ms
                await ws.send("still here")
                return await ws.recv()
        self.assertEqual(run(go()), "still here")

    def test_slow_client_keeps_gateway_memory_bounded(self):
        async def go():
            async with websockets.connect(self.uri("/v1/listen"), max_size=None,
                                          max_queue=1, read_limit=2 ** 16) as ws:
                before = h.rss_kb(self.s.pid)
                await ws.send("flood:1500:65536")  # ~94 MiB toward a client that reads nothing
                await asyncio.sleep(1.5)
                peak = h.rss_kb(self.s.pid)
                n = 0
                while True:
                    m = await ws.recv()
                    if m == "flood-done":
                        break
                    n += 1
                return before, peak, n
        before, peak, n = run(go(), timeout=60)
        self.assertEqual(n, 1500)
        if os.environ.get("SLUICE_SANITIZED") == "1":
            return  # ASan's quarantine keeps freed buffers resident: RSS says nothing here
        self.assertLess(peak - before, 8 * 1024, "sluice buffered the flood: %d -> %d KiB" % (before, peak))

    def test_invalid_frame_closes_1002_and_upstream_cleanly(self):
        import base64
        import socket
        import struct
        key = base64.b64encode(os.urandom(16)).decode()
        n = len(self.up.close_codes)
        with socket.create_connection(("127.0.0.1", self.s.port), timeout=5) as sock:
            sock.sendall(("GET /v1/listen HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n" % key).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
            sock.sendall(b"\x83\x00")  # unmasked frame with reserved opcode 3
            data = head.split(b"\r\n\r\n", 1)[1]
            while len(data) < 4:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.assertEqual(data[0], 0x88, data)  # a close frame...
            self.assertEqual(struct.unpack("!H", data[2:4])[0], 1002)  # ...with 1002
        h.wait_for(lambda: len(self.up.close_codes) > n, 5, what="upstream leg closed")
        self.assertIn(self.up.close_codes[-1], (1001, 1000))

    def test_open_session_holds_an_endpoint_slot(self):
        async def go():
            async with websockets.connect(self.uri("/one")) as ws:
                await ws.send("a")
                await ws.recv()
                # the pool's only slot is taken by this session: a second one waits, then 503
                with self.assertRaises(websockets.InvalidStatusCode) as cm:
                    await websockets.connect(self.uri("/one"))
                self.assertEqual(cm.exception.status_code, 503)
            # the slot is free again once the session ended
            async with websockets.connect(self.uri("/one")) as ws2:
                await ws2.send("b")
                return await ws2.recv()
        self.assertEqual(run(go()), "b")

    def test_malformed_upgrade_is_400(self):
        status, _, body = h.http_request(self.s.port, "GET", "/v1/listen",
                                         {"Connection": "Upgrade", "Upgrade": "websocket",
                                          "Sec-WebSocket-Version": "13"})
        self.assertEqual(status, 400)
        self.assertIn(b"Sec-WebSocket-Key", body)


class WebSocketDrainTest(h.SluiceTestCase):
    """SIGTERM closes open sessions properly (1012 to the client) and exits 0 promptly."""

    @classmethod
    def setUpEnv(cls):
        cls.up = Upstream()
        cls.s = cls.env.sluice(h.make_config({"stt": h.make_pool([cls.up.url])},
                                             [{"path": "/", "pool": "stt"}], watch=False))

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.up.stop()

    def test_sigterm_closes_sessions_with_1012(self):
        async def go():
            async with websockets.connect("ws://127.0.0.1:%d/x" % self.s.port) as ws:
                await ws.send("hi")
                await ws.recv()
                self.s.proc.send_signal(signal.SIGTERM)
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await asyncio.wait_for(ws.recv(), 5)
                return cm.exception.rcvd
        rcvd = run(go())
        self.assertEqual(rcvd.code, 1012)
        self.assertEqual(self.s.wait_exit(5), 0)


if __name__ == "__main__":
    unittest.main()
