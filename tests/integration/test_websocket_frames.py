"""WebSocket relay at the frame level: a raw-socket client and a raw-socket upstream (both
written here with the standard library) look at the exact bytes sluice forwards.

Data frames must be relayed verbatim (headers, masking keys and payload bytes untouched, in
order, however TCP splits them); control frames are checked and relayed whole, or answered or
swallowed; protocol violations close the offending leg with 1002 (1009 for a message over the
pool's limit) and the other leg with 1001; frames the gateway originates (closes, keepalive
pings) only ever go out between relayed frames."""

import base64
import hashlib
import os
import select
import socket
import struct
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
from wsraw import (BINARY, CLOSE, CONT, GUID, PING, PONG, TEXT, RawServer, close_payload,  # noqa: E402
                   encode, mask, parse_frame, read_upgrade)

KA = b"sluice-ka"  # payload of the gateway's keepalive pings
TIMEOUT = 5.0


class Peer:
    """One end of a WebSocket connection over a raw socket: reads frames (keeping every byte
    received in .raw) and sends raw bytes or frames (masked when this is the client)."""

    def __init__(self, sock, buf=b"", client=True):
        self.sock = sock
        self.buf = bytearray(buf)
        self.raw = bytearray(buf)
        self.client = client
        self.eof = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)
        return data

    def frame(self, op, payload=b"", fin=True, rsv=0):
        return encode(op, payload, fin, os.urandom(4) if self.client else None, rsv)

    def send_frame(self, op, payload=b"", fin=True, rsv=0):
        return self.send(self.frame(op, payload, fin, rsv))

    def send_bytewise(self, data, pace=0.001):
        """One byte per send (Nagle is off): every split of header and payload reaches the
        gateway in its own read. Nothing to wait for in between, so a short pace keeps the
        kernel from coalescing the segments."""
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])
            time.sleep(pace)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(left)
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
            raise EOFError("connection closed (%d bytes pending)" % len(self.buf))
        self.buf += data
        self.raw += data

    def need(self, n, timeout=TIMEOUT):
        """Waits until at least n bytes are buffered (not consumed)."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline)

    def read_frame(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            f = self._parse()
            if f:
                return f
            self._fill(deadline)

    def _parse(self):
        got = parse_frame(self.buf)
        if not got:
            return None
        del self.buf[:got[1]]
        return got[0]

    def read_eof(self, timeout=TIMEOUT):
        """Waits for the peer to close the TCP connection; returns the bytes that came
        first. Raises on timeout."""
        deadline = time.monotonic() + timeout
        start = len(self.buf)
        try:
            while True:
                self._fill(deadline)
        except EOFError:
            return bytes(self.buf[start:])
        except ConnectionResetError:
            raise AssertionError("connection reset instead of closed")

    def drain_now(self):
        """Consumes whatever already sits in the socket buffer (no waiting)."""
        while True:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return
            data = self.sock.recv(1 << 20)
            if not data:
                self.eof = True
                return
            self.buf += data
            self.raw += data


class RawUpstream(RawServer):
    """A WebSocket upstream on a raw socket. Each connection does the opening handshake (any
    bytes in .early[path] are written right after the 101, in the same send) and is then
    handed to the test as a Peer, looked up by request path."""

    def __init__(self):
        self.peers = {}
        self.heads = {}
        self.early = {}
        super().__init__(backlog=64)

    def serve(self, conn):
        try:
            conn.settimeout(TIMEOUT)
            got = read_upgrade(conn)
            if got is None:
                return
            _, path, headers, rest = got
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
            with self.cv:
                early = self.early.get(path, b"")
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + early)
            peer = Peer(conn, rest, client=False)
            with self.cv:
                self.heads[path] = headers
                self.peers[path] = peer
                self.cv.notify_all()
        except (OSError, KeyError, IndexError, ValueError):
            conn.close()

    def peer(self, path, timeout=TIMEOUT):
        with self.cv:
            if not self.cv.wait_for(lambda: path in self.peers, timeout):
                raise AssertionError("the upstream got no WebSocket connection for %s" % path)
            return self.peers.pop(path)


class WebSocketFramesTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.up = RawUpstream()
        url = cls.up.url
        pools = {
            "main": h.make_pool([url]),
            "small": h.make_pool([url], websocket={"max_message_bytes": 1000}),
            "ka": h.make_pool([url], websocket={"ping_interval_ms": 100, "idle_timeout_ms": 600}),
        }
        routes = [{"path": "/ws", "pool": "main"}, {"path": "/small", "pool": "small"},
                  {"path": "/ka", "pool": "ka"}]
        cls.s = cls.env.sluice(h.make_config(pools, routes, watch=False))
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            cls.up.close()

    def session(self, prefix="/ws", first=b""):
        """Opens a session: (client Peer, upstream Peer). `first` is sent in the same write
        as the upgrade request."""
        type(self).n += 1
        path = "%s/%s-%d" % (prefix, self._testMethodName, self.n)
        key = base64.b64encode(os.urandom(16))
        sock = socket.create_connection(("127.0.0.1", self.s.port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
                     b"\r\nSec-WebSocket-Version: 13\r\n\r\n" + first)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            self.assertTrue(data, "connection closed during the handshake: %r" % buf)
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        want = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.assertIn(b"\r\nSec-WebSocket-Accept: " + want, head)
        c = Peer(sock, rest, client=True)
        u = self.up.peer(path)
        self.addCleanup(u.close)
        return c, u

    # helpers -------------------------------------------------------------------------------

    def assertClose(self, f, code, masked, reason=None):
        self.assertEqual(f.op, CLOSE, f)
        self.assertTrue(f.fin, f)
        self.assertEqual(f.masked, masked, f)
        self.assertEqual(f.code, code, f)
        if reason is not None:
            self.assertIn(reason, f.reason)

    def finish(self, c, u):
        """After the gateway closed both legs: the upstream answers its close, and both TCP
        connections end."""
        u.send_frame(CLOSE, close_payload(1000))
        self.assertEqual(u.read_eof(), b"")
        self.assertEqual(c.read_eof(), b"")

    def expect_violation(self, c, u, offending, code=1002, relayed=b""):
        """The client sent `offending` (after the frames `relayed`): the client gets `code`,
        the upstream gets exactly `relayed` and then 1001 naming the client, and the session
        ends once the upstream answers."""
        f = c.read_frame()
        self.assertClose(f, code, masked=False)
        if relayed:
            u.need(len(relayed))
            self.assertEqual(bytes(u.buf[:len(relayed)]), relayed)
            del u.buf[:len(relayed)]
        g = u.read_frame()
        self.assertClose(g, 1001, masked=True, reason="client closed with %d" % code)
        self.finish(c, u)
        self.assertEqual(len(u.raw), len(relayed) + len(g.raw), "upstream got more: %r" % bytes(u.raw))
        self.assertNotIn(offending, bytes(u.raw))

    # relaying ------------------------------------------------------------------------------

    def test_fragments_with_interleaved_ping_relayed_verbatim(self):
        c, u = self.session()
        sent = [c.send_frame(TEXT, b"frag-one|", fin=False),
                c.send_frame(PING, b"are you there"),
                c.send_frame(CONT, b"frag-two|", fin=False),
                c.send_frame(CONT, b"frag-three", fin=True)]
        frames = [u.read_frame() for _ in sent]
        self.assertEqual([(f.op, f.fin, f.masked, f.payload) for f in frames],
                         [(TEXT, False, True, b"frag-one|"), (PING, True, True, b"are you there"),
                          (CONT, False, True, b"frag-two|"), (CONT, True, True, b"frag-three")])
        self.assertEqual(bytes(u.raw), b"".join(sent))  # masking keys and all
        pong = u.send_frame(PONG, b"are you there")
        f = c.read_frame()
        self.assertEqual((f.op, f.masked, f.payload, f.raw), (PONG, False, b"are you there", pong))

        # and the other way, the upstream's ping inside its fragmented message
        back = [u.send_frame(BINARY, b"\x00\x01", fin=False), u.send_frame(PING, b"p"),
                u.send_frame(CONT, b"\x02", fin=True)]
        got = [c.read_frame() for _ in back]
        self.assertEqual([f.raw for f in got], back)
        c.send_frame(PONG, b"p")
        f = u.read_frame()
        self.assertEqual((f.op, f.payload), (PONG, b"p"))

    def test_byte_at_a_time_relayed_intact(self):
        c, u = self.session()
        payload = os.urandom(300)  # 16-bit length, masked: an 8-byte header
        frame = c.frame(BINARY, payload)
        ping = c.frame(PING, b"tick")
        c.send_bytewise(frame + ping)
        f = u.read_frame()
        self.assertEqual((f.op, f.fin, f.payload, f.raw), (BINARY, True, payload, frame))
        f = u.read_frame()
        self.assertEqual((f.op, f.raw), (PING, ping))

        # upstream to client, split everywhere too
        payload = os.urandom(200)
        frame = u.frame(TEXT, payload, fin=False) + u.frame(PONG, b"tock") + u.frame(CONT, b"end")
        u.send_bytewise(frame)
        got = b"".join(c.read_frame().raw for _ in range(3))
        self.assertEqual(got, frame)

        # a 64-bit length header arriving one byte at a time, then the rest at once
        payload = os.urandom(70000)
        frame = c.frame(BINARY, payload)
        c.send_bytewise(frame[:20])
        c.send(frame[20:])
        f = u.read_frame()
        self.assertEqual(len(f.raw), 14 + 70000)
        self.assertEqual(f.raw, frame)

    def test_many_small_frames_in_one_write_both_ways(self):
        c, u = self.session()
        import random
        rnd = random.Random(1234)

        def stream(peer, n):
            out = []
            for i in range(n):
                if rnd.random() < 0.3:  # a fragmented message, with a control frame inside
                    out.append(peer.frame(TEXT, b"m%d-a" % i, fin=False))
                    out.append(peer.frame(PING, b"%d" % i))
                    out.append(peer.frame(CONT, os.urandom(rnd.randrange(0, 200)), fin=False))
                    out.append(peer.frame(CONT, b"", fin=True))
                else:
                    out.append(peer.frame(rnd.choice((TEXT, BINARY)), os.urandom(rnd.randrange(0, 300))))
            return out

        up_frames = stream(c, 300)
        c.send(b"".join(up_frames))
        for want in up_frames:
            self.assertEqual(u.read_frame().raw, want)
        self.assertEqual(bytes(u.raw), b"".join(up_frames))

        down_frames = stream(u, 300)
        u.send(b"".join(down_frames))
        for want in down_frames:
            self.assertEqual(c.read_frame().raw, want)
        self.assertEqual(bytes(c.raw), b"".join(down_frames))

    def test_64bit_length_frames_both_ways(self):
        c, u = self.session()
        blob = os.urandom(70000)
        c.send_frame(BINARY, blob)
        f = u.read_frame()
        self.assertEqual(f.raw[1], 0x80 | 127)  # masked, 64-bit length
        self.assertEqual(hashlib.sha256(f.payload).hexdigest(), hashlib.sha256(blob).hexdigest())
        blob2 = os.urandom(70001)
        u.send_frame(TEXT, blob2)
        f = c.read_frame()
        self.assertEqual((f.op, f.masked, f.raw[1]), (TEXT, False, 127))
        self.assertEqual(hashlib.sha256(f.payload).hexdigest(), hashlib.sha256(blob2).hexdigest())

    def test_frames_right_after_the_handshake(self):
        """Client frames in the same write as the upgrade request, and upstream frames in the
        same write as its 101, are relayed."""
        first = encode(TEXT, b"early bird", key=b"\x01\x02\x03\x04")
        path_n = self.n + 1
        self.up.early["/ws/%s-%d" % (self._testMethodName, path_n)] = encode(BINARY, b"early up")
        c, u = self.session(first=first)
        f = u.read_frame()
        self.assertEqual(f.raw, first)
        f = c.read_frame()
        self.assertEqual((f.op, f.payload), (BINARY, b"early up"))

    # protocol violations -------------------------------------------------------------------

    def test_masked_frame_from_upstream(self):
        c, u = self.session()
        bad = encode(TEXT, b"should not be masked", key=b"abcd")
        u.send(bad)
        f = u.read_frame()
        self.assertClose(f, 1002, masked=True)
        f = c.read_frame()
        self.assertClose(f, 1001, masked=False, reason="upstream")
        self.assertIn("1002", f.reason)
        self.assertNotIn(b"should not", bytes(c.raw))
        c.send_frame(CLOSE, close_payload(1001))  # the client answers; the upstream leg failed
        self.assertEqual(c.read_eof(), b"")
        self.assertEqual(u.read_eof(), b"")

    def test_invalid_close_payloads(self):
        for name, payload in (("1005", close_payload(1005)), ("999", close_payload(999)),
                              ("1015", close_payload(1015)), ("5000", close_payload(5000)),
                              ("one byte", b"\x03")):
            with self.subTest(close=name):
                c, u = self.session()
                bad = c.frame(CLOSE, payload)
                c.send(bad)
                self.expect_violation(c, u, bad)

    def test_header_violations(self):
        cases = [
            ("continuation without a message", lambda c: c.frame(CONT, b"orphan"), b""),
            ("RSV1", lambda c: c.frame(TEXT, b"compressed?", rsv=4), b""),
            ("RSV3", lambda c: c.frame(BINARY, b"x", rsv=1), b""),
            ("126-byte ping", lambda c: c.frame(PING, b"p" * 126), b""),
            ("fragmented ping", lambda c: c.frame(PING, b"p", fin=False), b""),
            ("reserved opcode 3", lambda c: c.frame(3, b"x"), b""),
            ("reserved opcode 0xB", lambda c: c.frame(0xB, b""), b""),
            ("unmasked client frame", lambda c: encode(TEXT, b"plain"), b""),
            ("non-minimal 16-bit length", lambda c: b"\x81\xfe\x00\x05abcd" + mask(b"hello", b"abcd"), b""),
            ("non-minimal 64-bit length",
             lambda c: b"\x82\xff" + struct.pack("!Q", 5) + b"abcd" + mask(b"hello", b"abcd"), b""),
        ]
        for name, make, _ in cases:
            with self.subTest(violation=name):
                c, u = self.session()
                bad = make(c)
                c.send(bad)
                self.expect_violation(c, u, bad)

    def test_new_message_inside_a_fragmented_one(self):
        c, u = self.session()
        first = c.frame(TEXT, b"part one", fin=False)
        bad = c.frame(TEXT, b"a second message")
        c.send(first + bad)
        self.expect_violation(c, u, bad, relayed=first)

    def test_frames_before_an_invalid_close_go_out_before_the_gateway_close(self):
        """Frames that preceded a violation in the same read reach the upstream before the
        gateway's close 1001, as with a header violation."""
        c, u = self.session()
        good = c.frame(TEXT, b"before")
        bad = c.frame(CLOSE, close_payload(1005))
        c.send(good + bad)
        self.expect_violation(c, u, bad, relayed=good)

    def test_upstream_frames_before_an_invalid_close_go_out_first(self):
        c, u = self.session()
        good = u.frame(TEXT, b"before")
        u.send(good + u.frame(CLOSE, close_payload(1005)))
        self.assertEqual(c.read_frame().raw, good)
        self.assertClose(c.read_frame(), 1001, masked=False, reason="upstream closed with 1002")
        self.assertClose(u.read_frame(), 1002, masked=True)

    def test_frames_before_a_bad_header_go_out_first(self):
        c, u = self.session()
        good = c.frame(TEXT, b"before") + c.frame(PING, b"x")
        bad = c.frame(TEXT, b"y", rsv=2)
        c.send(good + bad)
        self.expect_violation(c, u, bad, relayed=good)

    def test_message_over_the_limit_in_small_fragments(self):
        # under the limit (1000) in fragments: relayed
        c, u = self.session("/small")
        ok = [c.frame(TEXT, b"a" * 400, fin=False), c.frame(CONT, b"b" * 400, fin=False),
              c.frame(CONT, b"c" * 200, fin=True)]
        c.send(b"".join(ok))
        self.assertEqual([u.read_frame().raw for _ in ok], ok)
        # each fragment under the limit, the message over it: 1009
        parts = [c.frame(BINARY, b"x" * 400, fin=False), c.frame(CONT, b"y" * 400, fin=False)]
        bad = c.frame(CONT, b"z" * 201, fin=True)
        c.send(b"".join(parts))
        for want in parts:
            self.assertEqual(u.read_frame().raw, want)
        u.raw = bytearray()  # expect_violation accounts from here
        c.send(bad)
        self.expect_violation(c, u, bad, code=1009)

    def test_message_over_the_limit_from_upstream(self):
        c, u = self.session("/small")
        u.send(u.frame(TEXT, b"a" * 600, fin=False))
        self.assertEqual(len(c.read_frame().payload), 600)
        u.send(u.frame(CONT, b"b" * 600))
        f = u.read_frame()
        self.assertClose(f, 1009, masked=True)
        f = c.read_frame()
        self.assertClose(f, 1001, masked=False, reason="upstream closed with 1009")
        c.send_frame(CLOSE, close_payload(1001))
        self.assertEqual(c.read_eof(), b"")
        self.assertEqual(u.read_eof(), b"")

    def test_gateway_close_waits_for_the_frame_in_flight(self):
        """A violation by the client while an upstream frame is half relayed to it: the close
        1002 goes out only after that frame's last byte."""
        c, u = self.session()
        payload = os.urandom(1000)
        frame = u.frame(BINARY, payload)
        u.send(frame[:300])
        c.need(300)  # the first part reached the client
        c.send(c.frame(TEXT, b"bad", rsv=4))
        g = u.read_frame()  # the upstream leg is closed at once
        self.assertClose(g, 1001, masked=True, reason="client closed with 1002")
        u.send(frame[300:])
        f = c.read_frame()
        self.assertEqual(f.raw, frame)
        self.assertClose(c.read_frame(), 1002, masked=False)
        self.finish(c, u)

    # close handshake -----------------------------------------------------------------------

    def test_close_handshake_client_first(self):
        c, u = self.session()
        sent = c.send_frame(CLOSE, close_payload(4000, b"bye"))
        f = u.read_frame()
        self.assertEqual((f.op, f.code, f.reason, f.raw), (CLOSE, 4000, "bye", sent))
        # the upstream may still send data before its close; then it answers
        u.send_frame(TEXT, b"last words")
        reply = u.send_frame(CLOSE, close_payload(4000, b"bye"))
        f = c.read_frame()
        self.assertEqual((f.op, f.payload), (TEXT, b"last words"))
        f = c.read_frame()
        self.assertEqual((f.op, f.code, f.reason, f.raw), (CLOSE, 4000, "bye", reply))
        self.assertEqual(c.read_eof(), b"")
        self.assertEqual(u.read_eof(), b"")

    def test_close_handshake_upstream_first(self):
        c, u = self.session()
        sent = u.send_frame(CLOSE, close_payload(4001, b"up-bye"))
        f = c.read_frame()
        self.assertEqual(f.raw, sent)
        reply = c.send_frame(CLOSE, close_payload(4001))
        f = u.read_frame()
        self.assertEqual(f.raw, reply)
        self.assertEqual(c.read_eof(), b"")
        self.assertEqual(u.read_eof(), b"")

    def test_empty_close_is_valid(self):
        c, u = self.session()
        sent = c.send_frame(CLOSE)
        self.assertEqual(u.read_frame().raw, sent)
        reply = u.send_frame(CLOSE)
        self.assertEqual(c.read_frame().raw, reply)
        self.assertEqual(c.read_eof(), b"")

    # keepalive -----------------------------------------------------------------------------

    def test_keepalive_pongs_are_swallowed_and_keep_the_session_open(self):
        c, u = self.session("/ka")
        # an ordinary pong is relayed (so the absence of the keepalive one below means something)
        c.send_frame(PONG, b"unsolicited")
        f = u.read_frame()
        self.assertEqual((f.op, f.payload), (PONG, b"unsolicited"))
        # three idle timeouts' worth of silence but for the answers to the gateway's pings
        pings = 0
        end = time.monotonic() + 1.8
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                f = c.read_frame(timeout=left)
            except socket.timeout:
                break
            self.assertEqual((f.op, f.fin, f.masked, f.payload), (PING, True, False, KA), f)
            c.send_frame(PONG, KA)
            pings += 1
        self.assertGreaterEqual(pings, 5)
        c.send_frame(TEXT, b"sentinel")
        up_pings = 0
        while True:
            f = u.read_frame()
            if f.op == TEXT:
                break
            self.assertEqual((f.op, f.masked, f.payload), (PING, True, KA), f)
            up_pings += 1
        self.assertEqual(f.payload, b"sentinel")
        self.assertGreaterEqual(up_pings, 5)
        u.send_frame(TEXT, b"still open")
        while True:
            f = c.read_frame()
            if f.op != PING:
                break
            c.send_frame(PONG, KA)
        self.assertEqual((f.op, f.payload), (TEXT, b"still open"))

    def test_unanswered_keepalive_ends_in_idle_timeout(self):
        c, u = self.session("/ka")
        t0 = time.monotonic()
        while True:
            f = c.read_frame()
            if f.op != PING:
                break
            self.assertEqual(f.payload, KA)
        self.assertClose(f, 1001, masked=False, reason="idle timeout")
        self.assertGreaterEqual(time.monotonic() - t0, 0.5)
        while True:
            g = u.read_frame()
            if g.op != PING:
                break
        self.assertClose(g, 1001, masked=True, reason="idle timeout")
        c.send_frame(CLOSE, close_payload(1001))
        u.send_frame(CLOSE, close_payload(1001))
        self.assertEqual(c.read_eof(), b"")
        self.assertEqual(u.read_eof(), b"")

    def test_keepalive_ping_waits_for_the_frame_in_flight(self):
        c, u = self.session("/ka")
        payload = os.urandom(1000)
        frame = u.frame(BINARY, payload)
        u.send(frame[:500])
        c.need(500)  # relayed that far: the client leg is now mid-frame
        u.drain_now()  # pings sent before this point are in the buffer already: skip them
        while True:
            f = u._parse()
            if f is None:
                break
            self.assertEqual((f.op, f.payload), (PING, KA))
        f = u.read_frame()  # a ping sent from here on: a keepalive tick while mid-frame
        self.assertEqual((f.op, f.payload), (PING, KA))
        u.send(frame[500:])
        f = c.read_frame()
        self.assertEqual(f.raw, frame)  # no ping inside it
        f = c.read_frame()  # pings resume after the frame
        self.assertEqual((f.op, f.payload), (PING, KA))


if __name__ == "__main__":
    unittest.main()
