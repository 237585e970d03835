"""Seeded fuzzing of the WebSocket relay, against the real gateway over raw sockets.

Each session upgrades through the gateway to a raw-socket echo upstream written here (it echoes
every data frame as a frame with the same opcode, FIN and payload, answers pings, answers a
close with the same code, and checks every frame the gateway relays to it). Then the client
sends a seeded sequence:

- valid: text (valid UTF-8) and binary messages of lengths around the 7/16/64-bit length
  boundaries, fragmented messages with pings and pongs between the fragments, then a close;
- client protocol violations after a valid prefix: RSV bits, reserved opcodes, unmasked
  frames, non-minimal 16- and 64-bit lengths, 64-bit lengths with the top bit set, control
  frames over 125 bytes or fragmented, continuations without a message, a new message inside
  a fragmented one, close frames with a 1-byte payload or an invalid code, messages over the
  pool's limit (whole or in fragments), garbage; and close reasons that are not UTF-8;
- upstream protocol violations (the client asks the upstream to write them);
- a frame cut short: the session's idle timeout closes it, then the frame is completed;
- hundreds of tiny frames at once; ~300 KB each way to a client with a 4 KB receive buffer;
- the client going away (RST or FIN) anywhere, the upstream dropping its connection.

The bytes go out in seeded writes: in the upgrade request's write, one write, one per frame,
random cuts, or a frame header one byte per write. Checked for every session: the gateway
never hangs and keeps running; valid sequences come back payload-identical and in order, the
close included; after a violation the offender gets a close 1002 (1009 for an oversize
message) after a prefix of its echoes, the upstream got exactly the valid frames and then 1001,
and the TCP connection ends; an upstream that breaks the protocol gets 1002 and the client
1001, one that drops its connection gives the client 1011; the upstream never receives an
invalid frame. Afterwards the gateway serves new sessions and HTTP, holds no connection, and
its log has no sanitizer report, nor when it exits.

test_every_header_split cuts every header form (7/16/64-bit lengths, valid and invalid, both
ways) at every byte boundary. test_fuzz_upgrade_requests mutates the upgrade request itself,
with a frame, a pipelined request or garbage in the same write: a 101 with the right accept
and a working session, or a JSON error. test_bug_* are known gateway bugs (expected failures).

Reproducing: SLUICE_FUZZ_SEED=N runs another seed; SLUICE_FUZZ_CASE=I[,J...] runs only those
sessions; SLUICE_FUZZ_CASES=N changes their number."""

import base64
import collections
import concurrent.futures
import hashlib
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
from wsraw import (BINARY, CLOSE, CONT, GUID, PING, PONG, TEXT, RawServer, close_payload,  # noqa: E402
                   encode, parse_frame, read_upgrade)

SEED = int(os.environ.get("SLUICE_FUZZ_SEED", "9157"))
N_CASES = int(os.environ.get("SLUICE_FUZZ_CASES", "1500"))
ONLY = [int(x) for x in os.environ.get("SLUICE_FUZZ_CASE", "").split(",") if x.strip()]

WORKERS = 8
TIMEOUT = 10.0        # any single wait for the gateway
SMALL_MAX = 4096      # max_message_bytes of the /small pool
BIG_MAX = 1 << 20     # the default limit, on /ws
IDLE_MS = 800         # the /idle pool's session idle timeout

DATA_OPS = (TEXT, BINARY)


def valid_close_code(code):
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# ---------------------------------------------------------------------------------------
# Frames


def frame_problem(f, in_msg, masked):
    """What is wrong with a frame a peer got from the gateway, or None."""
    if f.rsv:
        return "RSV bits set"
    if f.op not in (CONT, TEXT, BINARY, CLOSE, PING, PONG):
        return "reserved opcode %d" % f.op
    if (f.key is not None) != masked:
        return "masked" if f.key is not None else "unmasked"
    if f.op >= 8:
        if not f.fin:
            return "fragmented control frame"
        if len(f.payload) > 125:
            return "control frame of %d bytes" % len(f.payload)
        if f.op == CLOSE and (len(f.payload) == 1 or (len(f.payload) >= 2 and not valid_close_code(f.code))):
            return "invalid close payload %r" % f.payload[:8]
    elif f.op == CONT and not in_msg:
        return "continuation without a message"
    elif f.op != CONT and in_msg:
        return "new message inside a fragmented one"
    if f.raw[1] & 0x7F == 126 and len(f.payload) < 126 or f.raw[1] & 0x7F == 127 and len(f.payload) <= 0xFFFF:
        return "non-minimal length"
    return None


# ---------------------------------------------------------------------------------------
# The echo upstream


class UpRecord:
    def __init__(self, path):
        self.path = path
        self.frames = []     # Frame, as received (unmasked payloads)
        self.problems = []   # invalid frames the gateway relayed
        self.done = threading.Event()
        self.eof = False
        self.closing = False  # a close went either way, or the upstream wrote a violation:
                              # the gateway may drop the connection from here on


class EchoUpstream(RawServer):
    """Raw-socket WebSocket echo server. Frame-level echo: every data frame goes back as a
    frame with the same opcode, FIN and payload; a ping gets its pong; a close is answered
    with the same code and reason (1007 when the reason is not UTF-8), then the write side is
    shut. A text frame "cmd:evil:<hex>" makes it write those bytes instead of an echo;
    "cmd:split:<k>:<0|1>:<hex>" writes them in two writes, cut after k bytes (1: they are a
    protocol violation); "cmd:abort:rst|fin" drops the connection without a close."""

    def __init__(self):
        self.records = {}
        super().__init__()

    def record(self, path, timeout=TIMEOUT):
        with self.cv:
            if not self.cv.wait_for(lambda: path in self.records, timeout):
                return None
            return self.records[path]

    def serve(self, conn):
        rec = None
        try:
            conn.settimeout(60)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got = read_upgrade(conn)
            if got is None:
                return
            method, path, hs, rest = got
            tokens = [t.strip().lower() for t in hs.get("connection", "").split(",")]
            if (method != "GET" or hs.get("upgrade", "").lower() != "websocket" or "upgrade" not in tokens
                    or len(hs.get("sec-websocket-key", "")) != 24 or hs.get("sec-websocket-version") != "13"
                    or "transfer-encoding" in hs):
                # as a real WebSocket server does: no switch without a proper upgrade request
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nX-Echo-Upstream: refused\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            n = int(hs.get("content-length", "0") or 0)  # a body on the upgrade: consumed
            while len(rest) < n:
                data = conn.recv(65536)
                if not data:
                    return
                rest += data
            rest = rest[n:]
            accept = base64.b64encode(hashlib.sha1(hs["sec-websocket-key"].encode() + GUID).digest())
            rec = UpRecord(path)
            with self.cv:
                self.records[path] = rec
                self.cv.notify_all()
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self._relay(conn, bytearray(rest), rec)
        except (OSError, KeyError, IndexError, ValueError) as e:
            if rec is not None and not rec.eof and not rec.closing:
                rec.problems.append("upstream connection error: %r" % (e,))
        finally:
            if rec is not None:
                rec.done.set()
            try:
                conn.close()
            except OSError:
                pass

    def _relay(self, conn, buf, rec):
        in_msg = False
        closed = False
        while True:
            while True:
                got = parse_frame(buf)
                if got is None:
                    break
                f, used = got
                del buf[:used]
                rec.frames.append(f)
                if closed:
                    rec.problems.append("frame after the close: %r" % f)
                    continue
                p = frame_problem(f, in_msg, masked=True)
                if p:
                    rec.problems.append("the gateway relayed an invalid frame (%s): %r" % (p, f))
                if f.op in (TEXT, BINARY, CONT):
                    in_msg = not f.fin
                    if f.op == TEXT and f.fin and f.payload.startswith(b"cmd:evil:"):
                        rec.closing = True
                        conn.sendall(bytes.fromhex(f.payload[9:].decode()))
                    elif f.op == TEXT and f.fin and f.payload.startswith(b"cmd:abort:"):
                        rec.closing = True  # a crashed upstream: gone without a close
                        if f.payload.endswith(b"rst"):
                            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        else:
                            conn.shutdown(socket.SHUT_RDWR)
                        rec.eof = True
                        return
                    elif f.op == TEXT and f.fin and f.payload.startswith(b"cmd:split:"):
                        _, _, k, bad, hexdata = f.payload.split(b":", 4)
                        data = bytes.fromhex(hexdata.decode())
                        if bad == b"1":
                            rec.closing = True  # a violation: the gateway may drop us
                        conn.sendall(data[:int(k)])
                        time.sleep(0.002)  # two reads on the gateway's side
                        conn.sendall(data[int(k):])
                    else:
                        conn.sendall(encode(f.op, f.payload, f.fin))
                elif f.op == PING:
                    conn.sendall(encode(PONG, f.payload))
                elif f.op == CLOSE:
                    rec.closing = True
                    reply = f.payload
                    if len(reply) > 2:
                        try:
                            reply[2:].decode("utf-8")
                        except UnicodeDecodeError:
                            reply = close_payload(1007, b"invalid UTF-8")
                    conn.sendall(encode(CLOSE, reply))
                    closed = True
                    conn.shutdown(socket.SHUT_WR)
            data = conn.recv(1 << 20)
            if not data:
                rec.eof = True
                return
            buf += data


# ---------------------------------------------------------------------------------------
# Session plans


TEXT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:{}\"\n" + "éßñ€中文😀🚀"
SIZES = [0, 1, 2, 5, 17, 60, 124, 125, 126, 127, 128, 200, 500, 1000, 4000, 65535, 65536, 70000]
SIZE_W = [6, 6, 4, 8, 8, 8, 4, 6, 6, 4, 4, 6, 4, 3, 2, 1, 1, 1]


def rand_payload(rng, op, n):
    if op == TEXT:  # valid UTF-8 of exactly n bytes
        out = []
        size = 0
        while size < n:
            ch = rng.choice(TEXT_CHARS)
            if size + len(ch.encode()) > n:
                ch = "a"
            out.append(ch)
            size += len(ch.encode())
        return "".join(out).encode()
    return rng.getrandbits(8 * n).to_bytes(n, "big") if n else b""


class Plan:
    def __init__(self, idx, kind, route):
        self.idx, self.kind, self.route = idx, kind, route
        self.stream = []        # [(bytes, split_hint)] the client sends, in order
        self.echo = []          # (op, fin, payload) the client must get back, in order
        self.up_frames = []     # (op, fin, payload) the upstream must get, in order
        self.close_codes = ()   # acceptable codes of the close frame that ends the client's view
        self.prefix_ok = False  # echo may be cut short by the close (a violation)
        self.up_close = ()      # acceptable codes of the gateway's close to the upstream
        self.up_close_alt = False  # the upstream may instead get the client's own close
        self.reply_close = False   # the client answers the close it gets
        self.after_close = b""     # bytes the client sends once it got the close
        self.note = ""
        self.slow = False          # a client with a tiny receive buffer, reading slowly
        self.abort = None          # ("rst" | "fin", delay_s): the client goes away instead


class Client:
    """Frame builder for the client side: masked with seeded keys."""

    def __init__(self, rng):
        self.rng = rng

    def key(self):
        return self.rng.getrandbits(32).to_bytes(4, "big")

    def frame(self, op, payload=b"", fin=True, rsv=0, masked=True, form=None, length=None):
        return encode(op, payload, fin, self.key() if masked else None, rsv, length, form)


def valid_messages(rng, c, plan, limit, budget=150000):
    """Appends valid frames (complete messages and control frames) to the plan; returns
    nothing. Each message stays under `limit`; the whole sequence under `budget` bytes."""
    total = 0
    count = rng.choice((0, 1, 2, 3, 4, 6, 10)) if plan.kind != "many" else rng.randint(100, 600)
    for _ in range(count):
        if plan.kind == "many":  # tiny frames: many per read, past the relay's iovec batch
            op = rng.choice((TEXT, BINARY, PING, PONG))
            p = rand_payload(rng, op if op == TEXT else BINARY, rng.choice((0, 1, 3, 10)))
            fin = op >= 8 or rng.random() < 0.5
            if op < 8:
                # a fragmented message: this frame opens or continues it, the next one ends it
                plan.stream.append((c.frame(op, p, fin=fin), "frame"))
                plan.echo.append((op, fin, p))
                plan.up_frames.append((op, fin, p))
                if not fin:
                    plan.stream.append((c.frame(CONT, b"e", fin=True), "frame"))
                    plan.echo.append((CONT, True, b"e"))
                    plan.up_frames.append((CONT, True, b"e"))
            else:
                plan.stream.append((c.frame(op, p), "frame"))
                plan.up_frames.append((op, True, p))
                if op == PING:
                    plan.echo.append((PONG, True, p))
            continue
        r = rng.random()
        if r < 0.15:  # a ping: its pong comes back
            p = rand_payload(rng, BINARY, rng.choice((0, 1, 9, 60, 125)))
            plan.stream.append((c.frame(PING, p), "frame"))
            plan.echo.append((PONG, True, p))
            plan.up_frames.append((PING, True, p))
            continue
        if r < 0.22:  # an unsolicited pong: relayed, not answered
            p = rand_payload(rng, BINARY, rng.choice((0, 4, 125)))
            plan.stream.append((c.frame(PONG, p), "frame"))
            plan.up_frames.append((PONG, True, p))
            continue
        op = rng.choice(DATA_OPS)
        n = rng.choices(SIZES, SIZE_W)[0]
        n = min(n, limit, max(0, budget - total))
        total += n
        payload = rand_payload(rng, op, n)
        nfrag = rng.choice((1, 1, 1, 2, 3, 5))
        cuts = sorted(rng.randint(0, len(payload)) for _ in range(nfrag - 1))
        pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        for k, piece in enumerate(pieces):
            fop = op if k == 0 else CONT
            fin = k == len(pieces) - 1
            plan.stream.append((c.frame(fop, piece, fin), "frame"))
            plan.echo.append((fop, fin, piece))
            plan.up_frames.append((fop, fin, piece))
            if not fin and rng.random() < 0.4:  # control frames between fragments
                cop = rng.choice((PING, PING, PONG))
                p = rand_payload(rng, BINARY, rng.choice((0, 3, 125)))
                plan.stream.append((c.frame(cop, p), "frame"))
                plan.up_frames.append((cop, True, p))
                if cop == PING:
                    plan.echo.append((PONG, True, p))


BAD_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


def client_violation(rng, c, plan):
    """Appends an offending frame; returns the close code the client must get."""
    kind = rng.randrange(16)
    if kind == 0:
        plan.note = "rsv"
        op = rng.choice((TEXT, BINARY, PING, CLOSE))
        return c.frame(op, b"x" * rng.randint(0, 20), rsv=rng.randint(1, 7)), 1002
    if kind == 1:
        plan.note = "reserved opcode"
        return c.frame(rng.choice((3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)), b"y" * rng.randint(0, 20)), 1002
    if kind == 2:
        plan.note = "unmasked"
        return c.frame(rng.choice((TEXT, BINARY, PING, CLOSE, CONT)), b"plain", masked=False), 1002
    if kind == 3:
        plan.note = "control > 125"
        n = rng.choice((126, 127, 200, 1000, 70000))
        return c.frame(rng.choice((PING, PONG, CLOSE)), b"\x03\xe8" + b"p" * (n - 2)), 1002
    if kind == 4:
        plan.note = "fragmented control"
        return c.frame(rng.choice((PING, PONG, CLOSE)), b"", fin=False), 1002
    if kind == 5:
        plan.note = "continuation without a message"  # (the valid prefix ends every message)
        return c.frame(CONT, b"orphan", fin=rng.random() < 0.5), 1002
    if kind == 6:
        plan.note = "new message inside a fragmented one"
        first = c.frame(rng.choice(DATA_OPS), b"part", fin=False)
        plan.stream.append((first, "frame"))
        plan.echo.append((first[0] & 0xF, False, b"part"))
        plan.up_frames.append((first[0] & 0xF, False, b"part"))
        return c.frame(rng.choice(DATA_OPS), b"second"), 1002
    if kind == 7:
        plan.note = "non-minimal 16-bit length"
        return c.frame(rng.choice((TEXT, BINARY, PING)), b"hello"[:rng.randint(0, 5)], form=16), 1002
    if kind == 8:
        plan.note = "non-minimal 64-bit length"
        n = rng.choice((0, 5, 125, 126, 65535))
        return c.frame(rng.choice((TEXT, BINARY)), rand_payload(rng, BINARY, n), form=64), 1002
    if kind == 9:
        plan.note = "64-bit length with the top bit"
        return c.frame(rng.choice((TEXT, BINARY, CONT)), b"", length=rng.choice(
            (1 << 63, (1 << 63) | 5, (1 << 64) - 1)), form=64) + b"\x00" * rng.randint(0, 30), 1002
    if kind == 10:
        plan.note = "close with a 1-byte payload"
        return c.frame(CLOSE, bytes([rng.randrange(256)])), 1002
    if kind == 11:
        code = rng.choice(BAD_CLOSE_CODES)
        plan.note = "close code %d" % code
        return c.frame(CLOSE, close_payload(code, rng.choice((b"", b"bye")))), 1002
    if kind == 12:
        plan.note = "message over the limit in one frame"
        limit = SMALL_MAX if plan.route == "small" else BIG_MAX
        n = rng.choice((limit + 1, limit + 1000, 1 << 40, (1 << 62) + 3))
        body = b"z" * rng.randint(0, 50)
        return c.frame(rng.choice(DATA_OPS), body, length=n, form=64 if n > 0xFFFF else 16), 1009
    if kind == 13 and plan.route == "small":
        plan.note = "message over the limit in fragments"
        op = rng.choice(DATA_OPS)
        parts = [3000, 1000]
        for k, n in enumerate(parts):
            p = rand_payload(rng, BINARY, n) if op == BINARY else b"t" * n
            plan.stream.append((c.frame(op if k == 0 else CONT, p, fin=False), "frame"))
            plan.echo.append((op if k == 0 else CONT, False, p))
            plan.up_frames.append((op if k == 0 else CONT, False, p))
        return c.frame(CONT, b"u" * rng.randint(97, 500), fin=rng.random() < 0.5), 1009
    if kind == 14:
        plan.note = "garbage"
        # at least 14 bytes: a whole header whatever its form, so the gateway can judge it
        g = bytearray(rng.getrandbits(8) for _ in range(rng.randint(14, 300)))
        g[0] = (g[0] & 0x8F) | (rng.randint(1, 7) << 4)  # RSV bits: invalid from the first byte
        return bytes(g), 1002
    plan.note = "rsv on a continuation"
    return c.frame(CONT, b"c", rsv=rng.randint(1, 7)), 1002


def upstream_violation(rng, plan):
    """Bytes the upstream writes (valid frames, then an offending one) and the code the
    gateway must close the upstream leg with."""
    valid = []
    for _ in range(rng.randint(0, 3)):
        op = rng.choice(DATA_OPS)
        p = rand_payload(rng, op, rng.choice((0, 5, 126, 300)))
        valid.append(encode(op, p))
        plan.echo.append((op, True, p))
    kind = rng.randrange(11)
    key = rng.getrandbits(32).to_bytes(4, "big")
    if kind == 0:
        plan.note = "upstream: masked frame"
        bad, code = encode(rng.choice(DATA_OPS), b"masked!", key=key), 1002
    elif kind == 1:
        plan.note = "upstream: rsv"
        bad, code = encode(rng.choice((TEXT, PING)), b"r", rsv=rng.randint(1, 7)), 1002
    elif kind == 2:
        plan.note = "upstream: reserved opcode"
        bad, code = encode(rng.choice((3, 7, 0xB, 0xF)), b"o"), 1002
    elif kind == 3:
        plan.note = "upstream: control > 125"
        bad, code = encode(rng.choice((PING, PONG, CLOSE)), b"\x03\xe8" + b"c" * 200), 1002
    elif kind == 4:
        plan.note = "upstream: fragmented control"
        bad, code = encode(PING, b"f", fin=False), 1002
    elif kind == 5:
        plan.note = "upstream: continuation without a message"
        bad, code = encode(CONT, b"orphan"), 1002
    elif kind == 6:
        plan.note = "upstream: new message inside a fragmented one"
        valid.append(encode(TEXT, b"open", fin=False))
        plan.echo.append((TEXT, False, b"open"))
        bad, code = encode(BINARY, b"second"), 1002
    elif kind == 7:
        plan.note = "upstream: invalid close"
        bad, code = encode(CLOSE, rng.choice((b"\x03", close_payload(1005), close_payload(999)))), 1002
    elif kind == 8:
        plan.note = "upstream: non-minimal length"
        bad, code = encode(BINARY, b"abc", form=rng.choice((16, 64))), 1002
    elif kind == 9:
        plan.note = "upstream: 64-bit length with the top bit"
        bad, code = encode(BINARY, b"", length=(1 << 63) | 7, form=64), 1002
    else:
        plan.note = "upstream: message over the limit"
        limit = SMALL_MAX if plan.route == "small" else BIG_MAX
        bad, code = encode(BINARY, b"", length=limit + 1, form=64 if limit + 1 > 0xFFFF else 16), 1009
    return b"".join(valid) + bad, code


def make_plan(idx):
    rng = random.Random(SEED * 1000003 + idx)
    c = Client(rng)
    r = rng.random()
    kind = ("valid" if r < 0.28 else "many" if r < 0.32 else "slowread" if r < 0.35
            else "client_bad" if r < 0.67 else "upstream_bad" if r < 0.81
            else "close_utf8" if r < 0.85 else "truncated" if r < 0.89
            else "client_abort" if r < 0.95 else "upstream_abort")
    route = "idle" if kind == "truncated" else rng.choice(("ws", "small"))
    plan = Plan(idx, kind, route)
    limit = SMALL_MAX if route == "small" else 70000
    if kind == "slowread":  # ~300 KB each way to a client with a tiny receive buffer
        plan.route = route = "ws"
        plan.slow = True
        for _ in range(rng.randint(3, 6)):
            op = rng.choice(DATA_OPS)
            p = rand_payload(rng, op, rng.choice((20000, 65536, 70000, 100000)))
            plan.stream.append((c.frame(op, p), "frame"))
            plan.echo.append((op, True, p))
            plan.up_frames.append((op, True, p))
    else:
        valid_messages(rng, c, plan, limit)
    if kind in ("valid", "many", "slowread"):
        code = rng.choice((1000, 1000, 1001, 3000, 4999))
        reason = rand_payload(rng, TEXT, rng.choice((0, 10, 120)))
        p = b"" if rng.random() < 0.2 else close_payload(code, reason)
        plan.stream.append((c.frame(CLOSE, p), "frame"))
        plan.up_frames.append((CLOSE, True, p))
        plan.echo.append((CLOSE, True, p))
        plan.close_codes = (code if p else None,)
        if rng.random() < 0.3:  # frames after the close: the gateway drops them
            plan.stream.append((c.frame(TEXT, b"after close") + c.frame(PING, b"x"), "frame"))
    elif kind == "client_abort":
        # the client goes away (RST or FIN) after its frames, maybe inside one
        if rng.random() < 0.5:
            f = c.frame(rng.choice(DATA_OPS), rand_payload(rng, BINARY, rng.choice((10, 3000, 70000))))
            plan.stream.append((f[:rng.randint(1, len(f) - 1)], "bad"))
        plan.abort = (rng.choice(("rst", "fin")), rng.choice((0, 0, 1, 5, 20)) / 1000.0)
        plan.prefix_ok = True
        plan.note = "client %s after %.0f ms" % (plan.abort[0], plan.abort[1] * 1000)
    elif kind == "upstream_abort":
        how = rng.choice((b"rst", b"fin"))
        cmd = b"cmd:abort:" + how
        plan.stream.append((c.frame(TEXT, cmd), "frame"))
        plan.up_frames.append((TEXT, True, cmd))
        plan.close_codes = (1011,)
        plan.reply_close = True
        # a reset may discard echoes the upstream wrote last (unsent, or unread by the
        # gateway): only a prefix is owed then; a FIN delivers them all
        plan.prefix_ok = how == b"rst"
        plan.note = "upstream %s" % how.decode()
    elif kind == "client_bad":
        bad, code = client_violation(rng, c, plan)
        plan.stream.append((bad, "bad"))
        if rng.random() < 0.3:  # more after it: ignored
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
            plan.stream.append((c.frame(TEXT, b"after") + junk, "frame"))
        plan.close_codes = (code,)
        plan.prefix_ok = True
        plan.up_close = (1001,)
    elif kind == "close_utf8":
        # close with a reason that is not UTF-8: the gateway may refuse it (1002) or relay it
        # (then this upstream, as RFC 6455 8.1 wants, fails it with 1007)
        code = rng.choice((1000, 1001, 3000))
        reason = rng.choice((b"\xff", b"\xc3", b"ok\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"a\x80b"))
        bad = close_payload(code, reason)
        plan.stream.append((c.frame(CLOSE, bad), "bad"))
        plan.close_codes = (1002, 1007)
        plan.prefix_ok = True
        plan.up_close = (1001,)
        plan.up_close_alt = bad
        plan.note = "close reason not UTF-8"
    elif kind == "upstream_bad":
        # the prefix must end outside a fragmented message for the command to be a message
        if plan.up_frames and [f for f in plan.up_frames if f[0] < 8] and \
                not [f for f in plan.up_frames if f[0] < 8][-1][1]:
            plan.stream.append((c.frame(CONT, b"", fin=True), "frame"))
            plan.echo.append((CONT, True, b""))
            plan.up_frames.append((CONT, True, b""))
        evil, code = upstream_violation(rng, plan)
        cmd = b"cmd:evil:" + evil.hex().encode()
        plan.stream.append((c.frame(TEXT, cmd), "frame"))
        plan.up_frames.append((TEXT, True, cmd))
        # the echo list now holds the upstream's valid frames; they come after the echoes of
        # the prefix, which were appended before them
        plan.close_codes = (1001,)
        plan.up_close = (code,)
        plan.reply_close = True
    else:  # truncated: a frame cut short; the idle timeout closes; then it is completed
        op = rng.choice(DATA_OPS)
        p = rand_payload(rng, BINARY, rng.choice((10, 300, 70000)))
        whole = c.frame(op, p)
        cut = rng.randint(1, len(whole) - 1)
        plan.stream.append((whole[:cut], "bad"))
        plan.after_close = whole[cut:] + c.frame(CLOSE, close_payload(1000))
        hlen = len(whole) - len(p)
        if cut >= hlen:
            # the header got through: the gateway relays the frame as it comes and holds its
            # close to the upstream until the frame is complete
            plan.up_frames.append((op, True, p))
        # else the upstream gets its close at once and the frame is dropped
        plan.close_codes = (1001,)
        plan.up_close = (1001,)
        plan.note = "frame cut at %d of %d" % (cut, len(whole))
    return plan, rng


def header_split_plans():
    """[(plan, cut)]: for each frame below, every cut from 1 to its header length (the
    payload, if any, all in the second write)."""
    rng = random.Random(SEED ^ 0x5EED)
    c = Client(rng)
    out = []

    def hlen(frame):
        n = frame[1] & 0x7F
        return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if frame[1] & 0x80 else 0)

    # client -> upstream, valid: echoed, then the close comes back
    for name, op, payload in (("text 7-bit", TEXT, b"hello"),
                              ("binary 16-bit", BINARY, rand_payload(rng, BINARY, 300)),
                              ("binary 64-bit", BINARY, rand_payload(rng, BINARY, 70000)),
                              ("ping", PING, b"p" * 20), ("empty text", TEXT, b"")):
        f = c.frame(op, payload)
        close = c.frame(CLOSE, close_payload(1000))
        for cut in range(1, hlen(f) + 1):
            plan = Plan(len(out), "split", "ws")
            plan.note = "client %s" % name
            plan.stream = [(f, "bad"), (close, "frame")]
            plan.echo = [(PONG if op == PING else op, True, payload), (CLOSE, True, close_payload(1000))]
            plan.up_frames = [(op, True, payload), (CLOSE, True, close_payload(1000))]
            plan.close_codes = (1000,)
            out.append((plan, cut))
    # client -> upstream, violations
    for name, route, f, code in (
            ("rsv", "ws", c.frame(TEXT, b"x", rsv=4), 1002),
            ("unmasked 16-bit", "ws", c.frame(BINARY, b"u" * 200, masked=False), 1002),
            ("non-minimal 64-bit", "ws", c.frame(BINARY, b"abc", form=64), 1002),
            ("64-bit top bit", "ws", c.frame(BINARY, b"", length=1 << 63, form=64), 1002),
            ("ping of 126", "ws", c.frame(PING, b"q" * 126), 1002),
            ("close of 1 byte", "ws", c.frame(CLOSE, b"\x03"), 1002),
            ("over the limit", "small", c.frame(BINARY, b"", length=SMALL_MAX + 1, form=16), 1009),
            ("over the limit, 64-bit", "small", c.frame(TEXT, b"", length=1 << 40, form=64), 1009)):
        for cut in range(1, hlen(f) + 1):
            plan = Plan(len(out), "split", route)
            plan.note = "client %s" % name
            plan.stream = [(f, "bad")]
            plan.close_codes = (code,)
            plan.prefix_ok = True
            plan.up_close = (1001,)
            out.append((plan, cut))
    # upstream -> client: the upstream writes a frame in two pieces
    for name, f, code in (("text 7-bit", encode(TEXT, b"hello"), None),
                          ("binary 16-bit", encode(BINARY, rand_payload(rng, BINARY, 300)), None),
                          ("binary 64-bit", encode(BINARY, rand_payload(rng, BINARY, 70000)), None),
                          ("ping", encode(PING, b"up-ping"), None),
                          ("masked", encode(TEXT, b"masked", key=b"abcd"), 1002),
                          ("64-bit top bit", encode(BINARY, b"", length=(1 << 63) | 1, form=64), 1002),
                          ("non-minimal 16-bit", encode(TEXT, b"hi", form=16), 1002)):
        for cut in range(1, hlen(f) + 1):
            plan = Plan(len(out), "split", "ws")
            plan.note = "upstream %s" % name
            cmd = b"cmd:split:%d:%d:%s" % (cut, code is not None, f.hex().encode())
            got = parse_frame(f)
            if code is None:
                close = c.frame(CLOSE, close_payload(1000))
                plan.stream = [(c.frame(TEXT, cmd), "frame"), (close, "frame")]
                plan.echo = [got[0].sig(), (CLOSE, True, close_payload(1000))]
                plan.up_frames = [(TEXT, True, cmd), (CLOSE, True, close_payload(1000))]
                plan.close_codes = (1000,)
            else:
                plan.stream = [(c.frame(TEXT, cmd), "frame")]
                plan.up_frames = [(TEXT, True, cmd)]
                plan.close_codes = (1001,)
                plan.up_close = (code,)
                plan.reply_close = True
            out.append((plan, 0))
    return out


def upgrade_case(idx):
    """(request bytes with whatever follows them in the same write, the key sent)."""
    rng = random.Random(SEED * 7919 + idx)
    key = base64.b64encode(rng.getrandbits(128).to_bytes(16, "big"))
    hs = [b"Host: localhost", b"Upgrade: websocket", b"Connection: Upgrade",
          b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: 13"]
    variants = {
        "Upgrade": [b"WebSocket", b"websocket, h2c", b"h2c", b"", b"websocket\x00", b"web socket"],
        "Connection": [b"keep-alive, Upgrade", b"upgrade", b"Upgrade, close", b"close", b"",
                       b"Upgrade, Sec-WebSocket-Key", b"Upgrade, Host"],
        "Sec-WebSocket-Key": [key[:-1], key + b"=", b"", key + b", " + key, b"\x80" * 24, b" " * 24],
        "Sec-WebSocket-Version": [b"8", b"13, 8", b"", b"013", b"13 "],
    }
    line = b"GET /ws/up-%d-%d HTTP/1.1" % (SEED, idx)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        r = rng.random()
        if r < 0.5:
            name = rng.choice(list(variants))
            v = rng.choice(variants[name])
            hs = [x for x in hs if not x.lower().startswith(name.lower().encode() + b":")] + \
                [name.encode() + b": " + v]
        elif r < 0.6:
            hs.append(rng.choice(hs))  # a duplicate
        elif r < 0.7 and len(hs) > 1:
            hs.pop(rng.randrange(len(hs)))
        elif r < 0.8:
            line = rng.choice([b"POST /ws/up-%d-%d HTTP/1.1" % (SEED, idx),
                               b"GET /ws/up-%d-%d HTTP/1.0" % (SEED, idx),
                               b"HEAD /ws/up-%d-%d HTTP/1.1" % (SEED, idx), b"GET /ws HTTP/1.1"])
        elif r < 0.9:
            hs.append(rng.choice([b"Content-Length: 5", b"Transfer-Encoding: chunked",
                                  b"Sec-WebSocket-Extensions: permessage-deflate",
                                  b"Sec-WebSocket-Protocol: chat, x",
                                  b"Expect: 100-continue", b"Origin: http://evil.example"]))
        else:  # a byte-level mutation of a header
            i = rng.randrange(len(hs))
            b = bytearray(hs[i])
            j = rng.randrange(len(b))
            b[j:j + rng.randint(0, 2)] = rng.choice([b"\r", b"\n", b"\x00", b" ", b":", b"\t",
                                                     bytes([rng.randrange(256)])])
            hs[i] = bytes(b)
    req = line + b"\r\n" + b"\r\n".join(hs) + b"\r\n\r\n"
    if any(x.startswith(b"Content-Length: 5") for x in hs):
        req += b"hello"
    if any(x.startswith(b"Transfer-Encoding") for x in hs):
        req += b"5\r\nhello\r\n0\r\n\r\n"
    garbage = bytearray(rng.getrandbits(8) for _ in range(20))
    garbage[0] |= 0x40  # RSV1: invalid from its first byte (random bytes could also start a
    #                     frame that just waits for its payload, as it should)
    tail = rng.choice([b"", b"", encode(TEXT, b"early", key=b"\x01\x02\x03\x04"),
                       b"GET /echo/pipelined HTTP/1.1\r\nHost: x\r\n\r\n", bytes(garbage)])
    return req + tail, key


def split_stream(rng, plan):
    """The client's writes: [(bytes, pause_s)]."""
    data = b"".join(b for b, _ in plan.stream)
    mode = rng.random()
    if mode < 0.08 and data and not plan.slow:
        return [], "in the upgrade request's write"
    if mode < 0.3 or not data:
        return [(data, 0)], "one write"
    if mode < 0.5:
        return [(b, 0.001) for b, _ in plan.stream], "a write per frame"
    if mode < 0.75:
        cuts = []
        if len(data) > 1:
            cuts = sorted(set(rng.randint(1, len(data) - 1) for _ in range(rng.randint(1, 8))))
        return [(data[a:b], 0.001) for a, b in zip([0] + cuts, cuts + [len(data)])], "random cuts"
    # one frame's header, one byte per write (the offending one when there is one)
    idx = [i for i, (_, hint) in enumerate(plan.stream) if hint == "bad"]
    k = idx[0] if idx else rng.randrange(len(plan.stream))
    start = sum(len(b) for b, _ in plan.stream[:k])
    hlen = min(14, len(plan.stream[k][0]))
    out = [(data[:start], 0.001)] if start else []
    out += [(data[i:i + 1], 0.001) for i in range(start, start + hlen)]
    if start + hlen < len(data):
        out.append((data[start + hlen:], 0))
    return out, "header of frame %d byte by byte" % k


# ---------------------------------------------------------------------------------------
# The test


class FuzzWebSocketTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.up = EchoUpstream()
        cls.env.upstreams.append(cls.up)
        cls.mock = cls.env.mock("m")
        url = cls.up.url
        pools = {
            "ws": h.make_pool([url]),
            "small": h.make_pool([url], websocket={"max_message_bytes": SMALL_MAX}),
            "idle": h.make_pool([url], websocket={"idle_timeout_ms": IDLE_MS}),
            "http": h.make_pool([cls.mock]),
        }
        routes = [{"path": "/ws", "pool": "ws"}, {"path": "/small", "pool": "small"},
                  {"path": "/idle", "pool": "idle"}, {"path": "/echo", "pool": "http"}]
        limits = {"idle_timeout_ms": 500, "header_timeout_ms": 2000}
        cls.sluice = cls.env.sluice(h.make_config(pools, routes, limits=limits, watch=False))
        cls.port = cls.sluice.port

    def status(self):
        return self.sluice.status()

    # one session ---------------------------------------------------------------------------

    def open_session(self, path, rng, first=b"", rcvbuf=None):
        key = base64.b64encode(rng.getrandbits(128).to_bytes(16, "big"))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                     b"\r\nSec-WebSocket-Version: 13\r\n\r\n" + first)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise AssertionError("connection closed during the handshake: %r" % buf)
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        want = base64.b64encode(hashlib.sha1(key + GUID).digest())
        if not head.startswith(b"HTTP/1.1 101 ") or b"\r\nSec-WebSocket-Accept: " + want not in head:
            raise AssertionError("bad handshake answer %r" % head)
        return sock, bytearray(rest)

    def run_session(self, idx):
        """Runs session idx; returns (problems, plan, how it was written)."""
        plan, rng = make_plan(idx)
        writes, how = split_stream(rng, plan)
        path = "/%s/fz-%d-%05d" % (plan.route, SEED, idx)
        return self.play(plan, writes, how, path, rng)

    def play(self, plan, writes, how, path, rng):
        probs = []
        got = []        # frames from the gateway, in order
        after = []      # frames after the close
        state = "open"
        first = b"".join(b for b, _ in plan.stream) if not writes else b""
        try:
            sock, buf = self.open_session(path, rng, first, rcvbuf=4096 if plan.slow else None)
        except (OSError, AssertionError) as e:
            return ["handshake failed: %r" % (e,)], plan, how

        def write_all():
            try:
                for data, pause in writes:
                    sock.sendall(data)
                    if pause:
                        time.sleep(pause)
                if plan.abort:
                    time.sleep(plan.abort[1])
                    if plan.abort[0] == "rst":
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        sock.close()
                    else:
                        sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the gateway may close before the rest (after a violation)
        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        if plan.abort:
            return self.check_abort(plan, writer, sock, path), plan, how
        try:
            deadline = time.monotonic() + TIMEOUT * (3 if plan.slow else 1)
            close = None
            while True:
                f = None
                got_f = parse_frame(buf)
                if got_f:
                    f, used = got_f
                    del buf[:used]
                if f is not None:
                    if close is None:
                        got.append(f)
                        if f.op == CLOSE:
                            close = f
                            writer.join(TIMEOUT)
                            try:
                                if plan.after_close:
                                    sock.sendall(plan.after_close)
                                if plan.reply_close:
                                    sock.sendall(encode(CLOSE, close_payload(1001), key=b"\x01\x02\x03\x04"))
                            except OSError:
                                pass
                    else:
                        after.append(f)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    state = "hang"
                    break
                sock.settimeout(left)
                try:
                    data = sock.recv(1 << 20 if not plan.slow else rng.choice((512, 4096)))
                    if plan.slow and rng.random() < 0.05:
                        time.sleep(0.001)
                except socket.timeout:
                    state = "hang"
                    break
                except ConnectionResetError:
                    state = "reset"
                    break
                if not data:
                    state = "eof"
                    break
                buf += data
        finally:
            writer.join(TIMEOUT)
            sock.close()

        # what the client saw
        if state == "hang":
            probs.append("no end within %.0fs (got %r, %d bytes pending)" % (TIMEOUT, got[-5:], len(buf)))
        if state == "reset" and plan.kind == "valid":
            probs.append("connection reset")
        if buf:
            probs.append("%d bytes after the last whole frame: %r" % (len(buf), bytes(buf[:40])))
        for f in got:
            p = frame_problem(f, False, masked=False) if f.op >= 8 else None
            if f.rsv or f.key is not None or p:
                probs.append("invalid frame to the client: %r (%s)" % (f, p))
        close = got[-1] if got and got[-1].op == CLOSE else None
        data = [f.sig() for f in got if f.op != CLOSE]
        if close is None:
            probs.append("no close frame; got %r" % (got[-5:],))
        else:
            code = close.code if len(close.payload) >= 2 else None
            if code not in plan.close_codes:
                probs.append("closed with %r (%r), expected %r" % (code, close.payload[2:60], plan.close_codes))
            if plan.kind == "valid" and close.sig() != plan.echo[-1]:
                probs.append("the close came back as %r, sent %r" % (close.sig(), plan.echo[-1]))
        want = [e for e in plan.echo if e[0] != CLOSE]
        if plan.prefix_ok:
            if data != want[:len(data)]:
                probs.append("echoes differ from a prefix of the expected ones: got %s, want %s"
                             % (summ(data), summ(want)))
        elif data != want:
            probs.append("echoes differ: got %s, want %s" % (summ(data), summ(want)))
        if after:
            probs.append("frames after the close: %r" % (after[:5],))

        # what the upstream saw
        rec = self.up.record(path, 2)
        if rec is None:
            probs.append("the upstream got no session")
        else:
            if not rec.done.wait(TIMEOUT):
                probs.append("the upstream connection did not end")
            probs.extend(rec.problems)
            frames = list(rec.frames)
            sigs = [f.sig() for f in frames]
            n = len(plan.up_frames)
            if sigs[:n] != plan.up_frames:
                probs.append("the upstream got %s, want %s" % (summ(sigs), summ(plan.up_frames)))
            elif plan.up_close:
                rest = frames[n:]
                if plan.up_close_alt and len(rest) == 1 and rest[0].sig() == (CLOSE, True, plan.up_close_alt):
                    pass  # the close with the non-UTF-8 reason was relayed
                elif len(rest) != 1 or rest[0].op != CLOSE or rest[0].code not in plan.up_close:
                    probs.append("after the valid frames the upstream got %r, want one close %r"
                                 % (rest[:4], plan.up_close))
            elif len(frames) != n:
                probs.append("the upstream got more than sent: %r" % (frames[n:n + 4],))
        return probs, plan, how

    def check_abort(self, plan, writer, sock, path):
        """The client went away: the gateway must end the upstream leg (a close 1001, or the
        connection dropped mid-frame) and relay nothing that was not sent."""
        probs = []
        writer.join(TIMEOUT)
        if plan.abort[0] == "fin":  # reading on: the gateway ends the connection
            deadline = time.monotonic() + TIMEOUT
            try:
                while time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    if not sock.recv(1 << 20):
                        break
                else:
                    probs.append("the client's connection stayed open after its FIN")
            except socket.timeout:
                probs.append("the client's connection stayed open after its FIN")
            except OSError:
                pass
        sock.close()
        rec = self.up.record(path, 2)
        if rec is None:
            return probs  # gone before the upstream connection was made: fine
        if not rec.done.wait(TIMEOUT):
            probs.append("the upstream connection did not end after the client went away")
        # A clean close (1001 to the upstream) is owed when the client left between frames
        # with a FIN. Inside a frame it cannot be given (the gateway drops the upstream
        # connection, ws.c queue_close), and a reset may surface as a failed write first.
        mid_frame = any(hint == "bad" for _, hint in plan.stream)
        clean = plan.abort[0] == "fin" and not mid_frame
        if clean:
            probs.extend(rec.problems)
            if not [f for f in rec.frames if f.op == CLOSE]:
                probs.append("the upstream got no close after the client's FIN between frames")
        else:
            probs.extend(p for p in rec.problems if not p.startswith("upstream connection error"))
        sigs = [f.sig() for f in rec.frames]
        data = [x for x in sigs if not (x[0] == CLOSE)]
        if data != plan.up_frames[:len(data)]:
            probs.append("the upstream got %s, not a prefix of %s" % (summ(data), summ(plan.up_frames)))
        closes = [f for f in rec.frames if f.op == CLOSE]
        if closes and (closes[0].code not in (1001,) or len(closes) > 1 or rec.frames[-1].op != CLOSE):
            probs.append("the upstream got closes %r" % (closes,))
        return probs

    def run_all(self, jobs):
        """jobs: {case id: callable returning (problems, plan, how)}. Returns failures."""
        failures = []
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
            futs = {ex.submit(fn): i for i, fn in jobs.items()}
            for fut in concurrent.futures.as_completed(futs):
                i = futs[fut]
                try:
                    probs, plan, how = fut.result()
                except Exception as e:  # noqa: BLE001 - reported with the case
                    probs, plan, how = ["exception %r" % (e,)], Plan(i, "?", "?"), "?"
                if probs:
                    failures.append("seed=%d case=%s kind=%s route=/%s %s; writes: %s\n    stream: %r"
                                    "\n    -> %s" % (SEED, i, plan.kind, plan.route, plan.note, how,
                                       b"".join(b for b, _ in plan.stream)[:300], "\n    -> ".join(probs)))
                if not self.sluice.alive():
                    break
        if not self.sluice.alive():
            self.fail("sluice died (rc %s):\n%s" % (self.sluice.proc.returncode,
                                                    h.sanitizer_report(self.sluice.log_text())
                                                    or "\n".join(self.sluice.lines[-40:])))
        return failures

    def test_every_header_split(self):
        """Every cut inside every header form, both ways: a frame written as two pieces, the
        first ending anywhere from the header's first byte to its last."""
        plans = header_split_plans()
        jobs = {}
        for i, (plan, cut) in enumerate(plans):
            data = b"".join(b for b, _ in plan.stream)
            writes = [(data[:cut], 0.002), (data[cut:], 0)] if cut else [(data, 0)]
            path = "/%s/split-%d-%04d" % (plan.route, SEED, i)
            jobs[i] = (lambda plan=plan, writes=writes, path=path, i=i:
                       self.play(plan, writes, "cut after %d bytes" % cut if cut else plan.note,
                                 path, random.Random(i)))
        failures = self.run_all(jobs)
        sys.stderr.write("fuzz_ws: %d header-split sessions\n" % len(plans))
        if failures:
            self.fail("%d split session(s) failed:\n\n%s" % (len(failures), "\n\n".join(sorted(failures)[:12])))

    def test_fuzz_upgrade_requests(self):
        """Mutated upgrade requests on a WebSocket route, with a frame, a pipelined request or
        garbage in the same write: a 101 with the right accept key and a working session, or
        the gateway's JSON error (4xx; 502 when the upstream refused); never a hang."""
        outcomes = collections.Counter()

        def one(i):
            data, key = upgrade_case(i)
            probs = []
            method = data.split(b" ", 1)[0].decode("latin-1")
            with h.RawConn(self.port, timeout=TIMEOUT) as c:
                c.send(data)
                try:
                    r = c.read_head(method)
                except (AssertionError, h.IncompleteResponse, socket.timeout) as e:
                    return ["no valid response head: %r" % (e,)], data
                outcomes[(r.status, "upstream" if r.header("x-echo-upstream") or r.header("x-mock-instance")
                          else "gateway")] += 1
                if r.status == 101:
                    keys = re.findall(rb"\r\nSec-WebSocket-Key: ([^\r\n]*)", data)
                    acc = r.header("sec-websocket-accept")
                    want = base64.b64encode(hashlib.sha1(keys[0] + GUID).digest()).decode() if keys else None
                    if acc != want:
                        probs.append("101 with accept %r, want %r" % (acc, want))
                    buf = bytearray(c.buf)
                    c.send(encode(TEXT, b"hi", key=b"abcd") + encode(CLOSE, close_payload(1000), key=b"abcd"))
                    frames = []
                    deadline = time.monotonic() + TIMEOUT
                    while time.monotonic() < deadline:
                        got = parse_frame(buf)
                        if got:
                            frames.append(got[0])
                            del buf[:got[1]]
                            continue
                        c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                        try:
                            d = c.sock.recv(65536)
                        except socket.timeout:
                            probs.append("session did not end")
                            break
                        except ConnectionResetError:
                            probs.append("session reset")
                            break
                        if not d:
                            break
                        buf += d
                    if not frames or frames[-1].op != CLOSE or buf:
                        probs.append("session ended with %r + %r" % (frames[-3:], bytes(buf[:20])))
                    for f in frames:
                        if f.key is not None or f.rsv:
                            probs.append("invalid frame %r" % f)
                    return probs, data
                try:
                    c.read_body(r)
                except (AssertionError, h.IncompleteResponse) as e:
                    return ["bad response body: %r" % (e,)], data
                if r.header("x-echo-upstream") == "refused":
                    pass  # the upstream refused what the gateway forwarded as plain HTTP
                elif r.header("x-mock-instance") is None and method == "HEAD":
                    if not (400 <= r.status < 500 or r.status == 505):  # no body to say more
                        probs.append("gateway answered %d to a HEAD upgrade" % r.status)
                elif r.header("x-mock-instance") is None:  # the gateway's own answer
                    try:
                        err = r.json()["error"]
                        etype = err["type"]
                    except (ValueError, KeyError, TypeError):
                        return ["gateway %d without a JSON error: %r" % (r.status, r.body[:200])], data
                    if not (400 <= r.status < 500 or r.status == 505 or
                            (r.status == 502 and etype == "upstream_handshake_failed")):
                        probs.append("gateway answered %d %s: %r" % (r.status, etype, err.get("message")))
                try:
                    c.read_all_until_close(TIMEOUT)
                except (AssertionError, OSError) as e:
                    probs.append("connection not ended: %r" % (e,))
            return probs, data

        n = 300 if not ONLY else 0
        failures = []
        statuses = collections.Counter()
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
            for i, (probs, data) in enumerate(ex.map(one, range(n))):
                if probs:
                    failures.append("seed=%d upgrade case=%d\n    sent: %r\n    -> %s"
                                    % (SEED, i, data[:400], "\n    -> ".join(probs)))
        self.assertTrue(self.sluice.alive())
        sys.stderr.write("fuzz_ws: %d upgrade requests: %s\n" % (n, dict(sorted(outcomes.items()))))
        if failures:
            self.fail("%d upgrade case(s) failed:\n\n%s" % (len(failures), "\n\n".join(failures[:12])))

    def test_unsolicited_101_is_502_and_connection_dropped(self):
        """An upstream 101 to a request that asked for no upgrade (as a lax WebSocket server
        may send when a client sent Sec-WebSocket-Key without "Connection: Upgrade": the
        gateway forwards those as plain HTTP) is an invalid response: 502, and that upstream
        connection, now in another protocol, is closed instead of going back to the pool."""
        seen = []

        def handler(up, conn, n, req):
            seen.append(n)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            return True
        up = self.env.scripted(handler)
        s = self.env.sluice(h.make_config({"p": h.make_pool([up.url], retry=False)},
                                          [{"path": "/", "pool": "p"}], watch=False))
        for i in range(2):
            with h.RawConn(s.port, timeout=5) as c:
                c.send(b"GET /plain-%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                r = c.read_response()
                self.assertJsonError(r, 502, "upstream_protocol_error")
                self.assertIn("101 Switching Protocols", r.json()["error"]["message"])
        self.assertEqual(seen, [1, 1], "requests per upstream connection: the second reused the first's")

    def test_fuzz_sessions(self):
        idxs = ONLY or list(range(N_CASES))
        t0 = time.monotonic()
        kinds = collections.Counter(make_plan(i)[0].kind for i in idxs)
        failures = self.run_all({i: (lambda i=i: self.run_session(i)) for i in idxs})
        elapsed = time.monotonic() - t0
        sys.stderr.write("fuzz_ws: seed %d, %d sessions %s in %.1fs\n"
                         % (SEED, len(idxs), dict(kinds), elapsed))
        if failures:
            failures.sort(key=lambda s: int(re.search(r"case=(\d+)", s).group(1)))
            self.fail("%d session(s) failed (seed %d); first ones:\n\n%s"
                      % (len(failures), SEED, "\n\n".join(failures[:12])))

        # still serving: a clean session, and HTTP; nothing held; no sanitizer report
        rng = random.Random(1)
        sock, buf = self.open_session("/ws/after-fuzz", rng)
        try:
            c = Client(rng)
            sock.sendall(c.frame(TEXT, "still here é".encode()) + c.frame(CLOSE, close_payload(1000)))
            deadline = time.monotonic() + TIMEOUT
            frames = []
            while len(frames) < 2 and time.monotonic() < deadline:
                got_f = parse_frame(buf)
                if got_f:
                    frames.append(got_f[0])
                    del buf[:got_f[1]]
                    continue
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
            self.assertEqual([f.sig() for f in frames],
                             [(TEXT, True, "still here é".encode()), (CLOSE, True, close_payload(1000))])
        finally:
            sock.close()
        st, _, body = h.http_request(self.port, "POST", "/echo/after-ws-fuzz", body=b"ok")
        self.assertEqual(st, 200, body)
        st = self.assertSettled(self.sluice)
        self.assertGreaterEqual(st["websocket"]["sessions_total"], len(idxs))


def summ(sigs):
    out = []
    for op, fin, p in sigs[:12]:
        out.append("%d%s:%d:%s" % (op, "" if fin else "+", len(p), hashlib.sha1(p).hexdigest()[:6]))
    if len(sigs) > 12:
        out.append("...(%d)" % len(sigs))
    return "[" + " ".join(out) + "]"


if __name__ == "__main__":
    unittest.main()
