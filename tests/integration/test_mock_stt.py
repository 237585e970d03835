#!/usr/bin/python3
"""Self-test for sluice-mock-stt: starts the binary on ephemeral ports and talks to it
directly, with python3-websockets (10.x asyncio API) and with a raw-socket client that
feeds frames in random chunk sizes.

usage: stt_selftest.py PATH/TO/sluice-mock-stt
Exits 0 when every check passes. Under an ASan build, also fails on sanitizer reports.
"""
import asyncio
import base64
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatusCode

BIN = None
FAILS = []
PASSES = []


def check(cond, what):
    if cond:
        PASSES.append(what)
        print("  ok  ", what)
    else:
        print("  FAIL", what)
        FAILS.append(what)


class Server:
    def __init__(self, *args):
        self.dir = tempfile.mkdtemp(prefix="stt-")
        pf = os.path.join(self.dir, "port")
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        self.proc = subprocess.Popen([BIN, "--port-file", pf, *args], stderr=self.err)
        deadline = time.time() + 10
        while not os.path.exists(pf):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.port = int(open(pf).read())
        self.url = "ws://127.0.0.1:%d" % self.port

    def get(self, path, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r, body

    def stats(self):
        return json.loads(self.get("/stats")[1])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        self.err.seek(0)
        log = self.err.read()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        check(rc == 0, "exit status 0 on SIGTERM (got %s)" % rc)
        check("Sanitizer" not in log, "no sanitizer reports")
        if "Sanitizer" in log:
            print(log[-4000:])
        return log


def connect(url, **kw):
    kw.setdefault("max_size", None)
    kw.setdefault("ping_interval", None)
    kw.setdefault("compression", None)
    return websockets.connect(url, **kw)


async def recv_json(ws, timeout=5):
    """Next text message as JSON, skipping binary echoes (counted in ws.echoes)."""
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, bytes):
            ws.echoes = getattr(ws, "echoes", 0) + 1
            continue
        return json.loads(m)


# ---- websockets-client checks ----

async def t_handshake(s):
    async with connect(s.url + "/v1/listen?x=1", subprotocols=["stt.v1", "other"]) as ws:
        check(ws.subprotocol == "stt.v1", "first offered subprotocol echoed")
        check(ws.response_headers.get("x-mock-instance") == "A", "x-mock-instance on 101")
        await ws.ping()
        pong = ws.ping()
        await asyncio.wait_for(pong, 5)
        check(True, "ping answered with pong")


async def t_partials_and_final(s):
    data = os.urandom(1 << 20)
    frames = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    ee = sum(1 for f in frames if f[0] == 0xEE)
    async with connect(s.url) as ws:
        partials = []

        async def reader():
            out = []
            while True:
                m = await recv_json(ws, 10)
                out.append(m)
                if m["type"] == "final":
                    return out

        task = asyncio.create_task(reader())
        for f in frames:
            await ws.send(f)
        await ws.send('{"type":"end"}')
        msgs = await task
        partials = [m for m in msgs if m["type"] == "partial"]
        final = msgs[-1]
        check([p["frames"] for p in partials] == list(range(5, 257, 5)),
              "a partial every 5 frames (%d partials)" % len(partials))
        check(all(p["instance"] == "A" for p in partials), "partials carry the instance")
        check(final["frames"] == 256 and final["bytes"] == 1 << 20, "final counts 256 frames / 1 MiB")
        check(final["sha256"] == hashlib.sha256(data).hexdigest(), "final sha256 of 1 MiB in 4 KiB frames")
        check(getattr(ws, "echoes", 0) == ee, "one binary echo per frame starting 0xEE (%d)" % ee)
        await asyncio.wait_for(ws.wait_closed(), 5)
        check(ws.close_code == 1000, "server closes with 1000 after end (got %s)" % ws.close_code)


async def t_echo(s):
    async with connect(s.url) as ws:
        await ws.send("echo:hello ☃")
        check(await asyncio.wait_for(ws.recv(), 5) == "echo:hello ☃", "text echo")
        blob = b"\xee" + os.urandom(200000)
        t0 = time.monotonic()
        await ws.send(blob)
        back = await asyncio.wait_for(ws.recv(), 5)
        check(back == blob, "binary 0xEE echo intact (200 kB, %.1f ms)" % ((time.monotonic() - t0) * 1000))
        await ws.send(b"\x01abc")  # plain audio: no echo
        await ws.send("echo:after")
        check(await asyncio.wait_for(ws.recv(), 5) == "echo:after", "plain audio not echoed")


async def t_client_close(s):
    async with connect(s.url) as ws:
        for i in range(7):
            await ws.send(bytes([i]) * 100)
        await ws.close(4001, "bye")
        check(ws.close_code == 4001 and ws.close_reason == "bye",
              "client close 4001 'bye' echoed (got %s %r)" % (ws.close_code, ws.close_reason))
        msgs = []
        try:
            while True:
                msgs.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
        types = [m["type"] for m in msgs]
        check(types == ["partial", "final"], "partial then final before the close echo (%s)" % types)
        check(msgs[-1]["frames"] == 7 and msgs[-1]["bytes"] == 700, "final counts on client close")
        want = hashlib.sha256(b"".join(bytes([i]) * 100 for i in range(7))).hexdigest()
        check(msgs[-1]["sha256"] == want, "final sha256 on client close")


async def t_server_close(s):
    async with connect(s.url) as ws:
        await ws.send("close:4002:server says bye")
        await asyncio.wait_for(ws.wait_closed(), 5)
        check(ws.close_code == 4002 and ws.close_reason == "server says bye",
              "close:4002:REASON → server close (got %s %r)" % (ws.close_code, ws.close_reason))
    async with connect(s.url) as ws:
        await ws.send("close:1005")
        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
        check(m["type"] == "error", "close: with an unsendable code answers an error")


async def t_refuse_header(s):
    try:
        async with connect(s.url, extra_headers={"x-mock-refuse": "429"}):
            check(False, "x-mock-refuse refuses")
    except InvalidStatusCode as e:
        check(e.status_code == 429, "x-mock-refuse: 429 → HTTP 429")


async def t_refuse_flag(s):
    try:
        async with connect(s.url):
            check(False, "--refuse-handshake refuses")
    except InvalidStatusCode as e:
        check(e.status_code == 503, "--refuse-handshake 503 → HTTP 503")


async def t_drop(s):
    async with connect(s.url) as ws:
        try:
            for i in range(3):
                await ws.send(b"\x00" * 1000)
            await asyncio.wait_for(ws.recv(), 5)
            check(False, "--drop-after drops the connection")
        except ConnectionClosed:
            check(ws.close_code == 1006, "--drop-after 3 → abnormal closure 1006 (got %s)" % ws.close_code)


async def t_latency(s):
    async with connect(s.url) as ws:
        t0 = time.monotonic()
        for i in range(5):
            await ws.send(b"\x01" * 10)
        await ws.send("echo:fast")
        first = await asyncio.wait_for(ws.recv(), 5)
        t1 = time.monotonic() - t0
        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
        t2 = time.monotonic() - t0
        check(first == "echo:fast" and t1 < 0.15, "echo not delayed by --latency-ms (%.0f ms)" % (t1 * 1000))
        check(m["type"] == "partial" and t2 >= 0.29, "partial delayed by --latency-ms 300 (%.0f ms)" % (t2 * 1000))
        await ws.send(b"\x02" * 10)
        await ws.close(4003, "late")
        check(ws.close_code == 4003, "client close echoed after the delayed final")
        msgs = []
        try:
            while True:
                msgs.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
        check([m["type"] for m in msgs] == ["final"] and msgs[0]["frames"] == 6,
              "delayed final arrives before the close echo")


async def t_max_message(s):
    async with connect(s.url) as ws:
        await ws.send(b"\x00" * 2000)
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed:
            pass
        check(ws.close_code == 1009, "message over --max-message → close 1009 (got %s)" % ws.close_code)


async def one_session(s, i):
    payload = [os.urandom(1024).replace(b"\xee", b"\x00") for _ in range(20)]
    async with connect(s.url) as ws:
        for p in payload:
            await ws.send(p)
        await ws.send('{"type": "end"}')
        while True:
            m = await recv_json(ws, 30)
            if m["type"] == "final":
                break
        await ws.wait_closed()
        return (m["frames"] == 20 and m["sha256"] == hashlib.sha256(b"".join(payload)).hexdigest()
                and ws.close_code == 1000)


async def t_concurrent(s, n=200):
    before = s.stats()
    res = await asyncio.gather(*(one_session(s, i) for i in range(n)))
    check(all(res), "%d concurrent sessions: finals and sha256 correct (%d ok)" % (n, sum(res)))
    st = s.stats()
    check(st["sessions_total"] - before["sessions_total"] == n and st["sessions_open"] == 0,
          "/stats sessions_total +%d, sessions_open back to 0" % n)
    check(st["frames"] - before["frames"] == 20 * n, "/stats frames counted")


# ---- raw-socket checks ----

def raw_handshake(port, extra=b"", key=None):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = key or base64.b64encode(os.urandom(16))
    s.sendall(b"GET /raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n" + extra + b"\r\n")
    return s, key


def read_head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            break
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode(), rest


def frame(opcode, payload, fin=True):
    mask = os.urandom(4)
    n = len(payload)
    h = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        h += bytes([0x80 | n])
    elif n < 65536:
        h += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        h += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return h + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse_frames(data):
    out = []
    while len(data) >= 2:
        op, n = data[0] & 0x0F, data[1] & 0x7F
        off = 2
        if n == 126:
            n, off = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, off = struct.unpack("!Q", data[2:10])[0], 10
        out.append((op, data[off:off + n]))
        data = data[off + n:]
    return out


def t_raw_chunked(s):
    """Frames (fragmented messages, a ping, the close) sent in random small chunks."""
    rnd = random.Random(7)
    for trial in range(20):
        sock, key = raw_handshake(s.port)
        head, rest = read_head(sock)
        acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        if trial == 0:
            check(head.startswith("HTTP/1.1 101") and ("sec-websocket-accept: " + acc) in head,
                  "raw handshake: 101 with the right Sec-WebSocket-Accept")
        audio = [os.urandom(rnd.randint(1, 3000)).replace(b"\xee", b"\x01") for _ in range(6)]
        wire = b""
        for i, a in enumerate(audio):
            if i == 2:  # a fragmented message with a ping in between
                wire += frame(2, a[:10], fin=False) + frame(9, b"pp") + frame(0, a[10:])
            else:
                wire += frame(2, a)
        wire += frame(1, "echo:zz".encode()) + frame(8, struct.pack("!H", 4444) + b"chunky")
        pos = 0
        while pos < len(wire):
            n = rnd.randint(1, 40)
            sock.sendall(wire[pos:pos + n])
            pos += n
            if rnd.random() < 0.1:
                time.sleep(0.001)
        data = rest
        while True:
            d = sock.recv(65536)
            if not d:
                break
            data += d
        sock.close()
        fr = parse_frames(data)
        ops = [f[0] for f in fr]
        texts = [json.loads(f[1]) for f in fr if f[0] == 1 and f[1][:1] == b"{"]
        ok = (ops == [1, 10, 1, 1, 8] or ops == [10, 1, 1, 1, 8]) and fr[-1][1] == struct.pack("!H", 4444) + b"chunky"
        ok = ok and texts[-1]["type"] == "final" and texts[-1]["frames"] == 6
        ok = ok and texts[-1]["sha256"] == hashlib.sha256(b"".join(audio)).hexdigest()
        if not ok:
            print("   trial", trial, ops, texts)
            check(False, "raw chunked trial %d" % trial)
            return
    check(True, "20 trials of frames in random 1-40 byte chunks: pong, echo, partial, final, close echo")


def t_raw_frames_with_request(s):
    """WebSocket frames in the same segment as the upgrade request."""
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n" +
                 frame(1, b"echo:early") + frame(8, struct.pack("!H", 1000)))
    data = b""
    while True:
        d = sock.recv(65536)
        if not d:
            break
        data += d
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    fr = parse_frames(rest)
    check([f[0] for f in fr] == [1, 1, 8] and fr[0][1] == b"echo:early",
          "frames pipelined behind the upgrade request are handled")


def t_http(s):
    r, b = s.get("/healthz")
    check(r.status == 200 and b == b"ok" and r.getheader("x-mock-instance") == "A", "GET /healthz → 200 ok")
    r, b = s.get("/stats")
    st = json.loads(b)
    check(r.status == 200 and set(st) == {"sessions_open", "sessions_total", "frames", "bytes", "handshakes_refused"},
          "GET /stats → JSON with the five counters")
    r, b = s.get("/nowhere")
    check(r.status == 400, "plain GET elsewhere → 400")
    for extra, what in [(b"Sec-WebSocket-Version: 8\r\n", "version 8"),
                        (b"", "missing key")]:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" if what != "missing key" else b""
        ver = extra or b"Sec-WebSocket-Version: 13\r\n"
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + ver + key + b"\r\n")
        head, _ = read_head(sock)
        sock.close()
        check(head.startswith("HTTP/1.1 400"), "invalid upgrade (%s) → 400" % what)
    # keep-alive: two requests on one connection
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    c.request("GET", "/healthz")
    r1 = c.getresponse().read()
    c.request("GET", "/stats")
    r2 = c.getresponse().read()
    c.close()
    check(r1 == b"ok" and b"sessions_total" in r2, "keep-alive HTTP requests")


async def main_async():
    s = Server("--name", "A", "--quiet")
    try:
        t_http(s)
        await t_handshake(s)
        await t_partials_and_final(s)
        await t_echo(s)
        await t_client_close(s)
        await t_server_close(s)
        await t_refuse_header(s)
        t_raw_chunked(s)
        t_raw_frames_with_request(s)
        await t_concurrent(s)
        st = s.stats()
        check(st["handshakes_refused"] == 1, "/stats handshakes_refused counts x-mock-refuse")
    finally:
        s.stop()

    s = Server("--refuse-handshake", "503", "--quiet")
    try:
        await t_refuse_flag(s)
        check(s.stats()["handshakes_refused"] == 1, "/stats handshakes_refused counts --refuse-handshake")
    finally:
        s.stop()

    s = Server("--drop-after", "3")
    try:
        await t_drop(s)
    finally:
        log = s.stop()
        check("dropped" in log, "session log line (not --quiet)")

    s = Server("--latency-ms", "300", "--quiet")
    try:
        await t_latency(s)
    finally:
        s.stop()

    s = Server("--max-message", "1000", "--quiet")
    try:
        await t_max_message(s)
    finally:
        s.stop()

    # SIGTERM with sessions open
    s = Server("--quiet")
    try:
        conns = [await connect(s.url) for _ in range(5)]
        for ws in conns:
            await ws.send(b"\x00" * 100)
        await asyncio.sleep(0.1)
    finally:
        s.stop()
    check(True, "SIGTERM with 5 sessions open")


def main():
    global BIN
    BIN = os.path.abspath(os.environ.get("SLUICE_MOCK_STT_BIN") or sys.argv[1])
    asyncio.run(main_async())
    print("%d passed, %d failed" % (len(PASSES), len(FAILS)))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
