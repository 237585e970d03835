"""Seeded fuzzing of the upstream (response) side, against the real gateway over raw sockets.

A scripted upstream written here answers every request with the response planned for it: the
request target carries a per-request tag (/u/<tag>), and the plan for that tag says which bytes
to send, cut into seeded random writes with small pauses between them, and what to do after
(keep the connection, keep it open but watch it, close it with a FIN and linger, reset it, or
close it when no request follows soon). The plans cover, valid and mutated:

- Content-Length bodies (0, small, 256 KiB), chunked bodies with random chunk sizes, chunk
  extensions and trailers, SSE streams (events cut across chunk boundaries), close-delimited
  bodies, HEAD answers, 204/304 with and without Content-Length, 1xx interim responses (100,
  102, 103, several in a row) before the final one, HTTP/1.0 answers with and without
  keep-alive, Connection: close in its spellings, many and large headers around the 256 KiB
  limit, answers sent before the request body was read;
- duplicate/conflicting/odd Content-Length, Content-Length with Transfer-Encoding, codings other
  than chunked, invalid status lines, bare LF, header names with spaces, control characters in
  values, obs-fold, bad chunk framing, a 101 to a plain request, garbage after a complete
  response (random bytes, CRLFs, a whole second response, body bytes after HEAD/204/304);
- premature closes (FIN or RST) before any byte, in the status line, in the headers, after an
  interim response, right after the head, in the body, in a chunk size, in chunk data, before
  the last chunk and in the trailers;
- random byte mutations of valid responses (after the X-Tag line; weak oracle).

Several client connections run at once through the gateway (one pool over the upstream, no
retries, no breaker, keep-alive pooling on), each sending a few requests sequentially or
pipelined, GET/HEAD/POST; a few are HTTP/1.0 keep-alive clients, a few read slowly through a
4 KiB receive buffer (the gateway then pauses its upstream reads), a few go away (RST or FIN)
part-way into a response. Checked per request:
 (a) a valid planned response arrives with its status, the same end-to-end headers in order
     (hop-by-hop ones dropped, framing redone, one x-request-id added) and the identical body
     (none for HEAD/204/304);
 (b) an invalid one becomes a 502 JSON error of the planned type when it is detected before
     anything was relayed, or the client connection is cut (a strict prefix of the body, never
     a complete-looking response) when the head had been relayed; where RFC 9112 lets a
     recipient accept or refuse (bare LF, obs-fold, a tab around Content-Length, odd status
     codes), either a 502 or the faithful relay;
 (c) no cross-talk: every upstream answer the client gets carries its own request's tag (the
     X-Tag header, the body), and requests queued behind a cut response never reach the
     upstream;
 (d) the upstream counts its connections and requests: a connection whose response was
     invalid, misframed, followed by garbage, a 101, or said Connection: close (or HTTP/1.0
     without keep-alive) never carries another request; a request is attempted once, and a
     request lost with a reused connection that closed before any response byte gets a 502
     unless it was replayable (then one re-send, on another connection);
 (e) nothing hangs, the gateway keeps serving, /status shows no request in flight, and its log
     has no sanitizer report (nor when it exits).

FoundByFuzzTest keeps a minimal reproducer of each gateway bug this found: regression tests for
those fixed since (the re-send after a stale pooled connection written nowhere when it landed
on another idle one, status codes below 100 taken for interim responses, trailers counted
against the 256 KiB header limit, the connection reused after an HTTP/1.0 response with
Transfer-Encoding, options of all but the last Connection line ignored, a header line with
an empty name relayed).

Reproducing: SLUICE_FUZZ_SEED=N runs another seed; SLUICE_FUZZ_CASE=I[,J...] runs only those
client connections (same plans, same writes); SLUICE_FUZZ_CASES=N changes their number."""

import collections
import concurrent.futures
import fcntl
import json
import os
import random
import re
import socket
import struct
import sys
import termios
import time
import unittest
import zlib

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

SEED = int(os.environ.get("SLUICE_FUZZ_SEED", "6143"))
N_CASES = int(os.environ.get("SLUICE_FUZZ_CASES", "2000"))
ONLY = [int(x) for x in os.environ.get("SLUICE_FUZZ_CASE", "").split(",") if x.strip()]

CONCURRENCY = 10
WAIT_S = 15.0            # longest wait for any single thing from the gateway (a hang beyond)
HEAD_LIMIT = 256 * 1024  # the gateway's limit on a response's header names + values
BIG = 256 * 1024
POOL_TIMEOUTS = {"connect": 2000, "first_byte": 8000, "total": 12000}



def tag_of(case, k):
    return "u%04d-%02d-%04x" % (case, k, zlib.crc32(b"sluice-up-%d-%d-%d" % (SEED, case, k)) & 0xFFFF)


# ---------------------------------------------------------------------------------------
# Response plans

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"te", b"upgrade",
       b"proxy-connection", b"proxy-authenticate", b"content-length", b"x-request-id"}

E2E_POOL = [
    (b"Content-Type", b"application/json"), (b"Content-Type", b"text/plain; charset=utf-8"),
    (b"Cache-Control", b"no-store"), (b"ETag", b'"v1-abc"'), (b"Set-Cookie", b"a=b; Path=/"),
    (b"Set-Cookie", b"c=d; HttpOnly"), (b"Vary", b"Accept-Encoding"), (b"X-Empty", b""),
    (b"X-Tab", b"a\tb"), (b"X-Obs-Text", b"caf\xe9 \xff"), (b"Server", b"fuzz/1.0"),
    (b"Date", b"Tue, 15 Nov 1994 08:12:31 GMT"), (b"Link", b"</a.css>; rel=preload"),
    (b"WWW-Authenticate", b'Basic realm="x"'), (b"Content-Encoding", b"identity"),
    (b"x-lower", b"v"), (b"X-MiXeD-CaSe", b"V"), (b"X-Commas", b"a, b,, c"),
    (b"Location", b"/elsewhere?x=1"), (b"X-Quote", b'"q" \\ x'), (b"Retry-After", b"1"),
    (b"X-Load", b"0.5"), (b"Access-Control-Allow-Origin", b"*"), (b"Age", b"0"),
]
# hop-by-hop headers a valid response may carry (the gateway drops them)
HOP_POOL = [
    [(b"Keep-Alive", b"timeout=5, max=100")], [(b"Connection", b"keep-alive")],
    [(b"Proxy-Connection", b"keep-alive")], [(b"Connection", b"X-Hop"), (b"X-Hop", b"dropped")],
    [(b"X-Hop2", b"dropped"), (b"Connection", b"keep-alive, x-hop2")], [(b"TE", b"trailers")],
    [(b"X-Request-Id", b"from-upstream")], [(b"Upgrade", b"h2c")],
]
REASONS = [b"OK", b"OK", b"Fine", b"", b"A Long Reason Phrase", b"Gr\xfc\xdfe", b"ok ok"]
STATUSES = [200] * 8 + [201, 202, 203, 206, 301, 302, 400, 401, 403, 404, 410, 418, 429, 500,
                        502, 503]
SAFE_EXT = [b";a=b", b";name", b';x="q v"', b";e;f=2", b";n=1"]


class Plan:
    """What the upstream sends for one request, and what the client must then see."""

    def __init__(self, kind, note=""):
        self.kind = kind
        self.note = note
        self.method = "GET"
        self.req_body = None      # POST body (None: no body)
        self.keyed = False        # the POST carries an Idempotency-Key (replayable)
        self.writes = []          # [(pause_ms, bytes)]
        self.end = "keep"         # keep | poison (open, watched) | close (FIN, linger) | rst
        self.early = False        # answer before reading the request body
        self.outcome = "valid"    # valid | error | trunc | either | lenient | zero | loose
        self.status = 200
        self.headers = []         # [(name, value)] as sent, X-Tag first
        self.body = b""           # the body as the client must get it (de-chunked)
        self.cl = None            # Content-Length the upstream sent (int) or None
        self.framing = "cl"       # cl | chunked | close | none
        self.err_types = ("upstream_protocol_error",)
        self.loose_names = set()  # header names whose values are not compared
        self.raw = b""            # the response bytes, for messages
        self.retry = None         # "zero": the answer to the re-send

    def describe(self):
        return "%s/%s%s" % (self.kind, self.outcome, (" [" + self.note + "]") if self.note else "")


def hdr_block(status_line, headers):
    return status_line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


def make_body(rng, tag, n):
    """n bytes that carry the tag (at the start, and at the end when there is room)."""
    t = b"[" + tag.encode() + b"]"
    if n <= len(t):
        return t[:n]
    if n <= 2 * len(t):
        return t + rng.randbytes(n - len(t))
    return t + rng.randbytes(n - 2 * len(t)) + t


def rand_size(rng):
    r = rng.random()
    if r < 0.12:
        return 0
    if r < 0.45:
        return rng.randint(1, 64)
    if r < 0.75:
        return rng.randint(65, 4096)
    if r < 0.93:
        return rng.randint(4097, 70000)
    return BIG


def e2e_headers(rng, hop_ok=True):
    hs = [rng.choice(E2E_POOL) for _ in range(rng.choice((0, 1, 2, 3, 5)))]
    if hop_ok and rng.random() < 0.3:
        hs += rng.choice(HOP_POOL)
    rng.shuffle(hs)
    return hs


def chunk_encode(rng, body, ext=False, trailers=(), maxchunk=None):
    out = []
    i = 0
    maxchunk = max(maxchunk or rng.choice((1, 7, 100, 1000, 8192, 70000)), len(body) // 1000)
    while i < len(body):
        n = rng.randint(1, max(1, min(len(body) - i, maxchunk)))
        r = rng.random()
        size = b"%x" % n if r < 0.6 else b"%X" % n if r < 0.85 else b"00%x" % n
        if ext and rng.random() < 0.4:
            size += rng.choice(SAFE_EXT)
        out.append(size + b"\r\n" + body[i:i + n] + b"\r\n")
        i += n
    last = b"0" + (rng.choice(SAFE_EXT) if ext and rng.random() < 0.3 else b"") + b"\r\n"
    out.append(last + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")
    return b"".join(out)


def chunk_layout(wire):
    """[(size line start, size line end incl. CRLF, data start, data end)] of a chunked body,
    the last chunk included (its data empty)."""
    out = []
    i = 0
    while True:
        e = wire.index(b"\r\n", i)
        n = int(wire[i:e].split(b";")[0], 16)
        out.append((i, e + 2, e + 2, e + 2 + n))
        if n == 0:
            return out
        i = e + 2 + n + 2


def split_writes(rng, data, bytewise_ok=True):
    """Seeded cuts of data into writes: [(pause_ms, bytes)]."""
    if not data:
        return []
    mode = rng.random()
    if mode < 0.3 or len(data) == 1:
        cuts = []
    elif mode < 0.6:
        cuts = rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8)))
    elif mode < 0.75:  # at line breaks, and inside CRLF
        cuts = [m.start() + rng.choice((0, 1, 2)) for m in re.finditer(b"\n", data)]
    elif mode < 0.83 and bytewise_ok and len(data) <= 160:
        cuts = list(range(1, len(data)))
    else:
        step = max(1, len(data) // rng.randint(6, 40))
        cuts = list(range(step, len(data), step))
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    if len(cuts) > 60:
        cuts = sorted(rng.sample(cuts, 60))
    out = []
    last = 0
    for c in cuts + [len(data)]:
        out.append((rng.choice((0, 0, 0, 1, 1, 2)) if out else 0, data[last:c]))
        last = c
    return out


def with_tail(writes, tail):
    """tail goes out in the same write as the last bytes (so it arrives with them)."""
    if not writes:
        return [(0, tail)]
    p, d = writes[-1]
    return writes[:-1] + [(p, d + tail)]


class Resp:
    """A valid response under construction."""

    def __init__(self, rng, tag, framing=None, status=None, size=None, version=b"HTTP/1.1",
                 headers=None, hop_ok=True, ext=None, trailers=None):
        self.tag = tag
        self.framing = framing or rng.choice(("cl", "cl", "chunked"))
        self.status = status if status is not None else rng.choice(STATUSES)
        self.version = version
        self.reason = rng.choice(REASONS)
        n = size if size is not None else rand_size(rng)
        self.body = make_body(rng, tag, n)
        hs = headers if headers is not None else e2e_headers(rng, hop_ok)
        self.headers = [(b"X-Tag", tag.encode())] + hs
        self.trailers = []
        if self.framing == "cl":
            self.headers.insert(rng.randint(1, len(self.headers)),
                                (rng.choice((b"Content-Length", b"content-length", b"CONTENT-LENGTH")),
                                 b"%d" % len(self.body)))
            self.wire_body = self.body
        elif self.framing == "chunked":
            self.headers.insert(rng.randint(1, len(self.headers)),
                                (rng.choice((b"Transfer-Encoding", b"transfer-encoding")),
                                 rng.choice((b"chunked", b"chunked", b"Chunked"))))
            if trailers is None:
                trailers = [(b"X-Trailer", b"t1"), (b"X-Sum", b"%d" % len(self.body))] \
                    if rng.random() < 0.25 else []
            self.trailers = trailers
            if trailers and rng.random() < 0.6:
                self.headers.append((b"Trailer", b", ".join(n for n, _ in trailers)))
            self.wire_body = chunk_encode(rng, self.body, ext=rng.random() < 0.3 if ext is None else ext,
                                          trailers=trailers)
        else:  # close-delimited
            self.wire_body = self.body

    def status_line(self):
        return b"%s %d %s" % (self.version, self.status, self.reason)

    def head(self):
        return hdr_block(self.status_line(), self.headers)

    def wire(self):
        return self.head() + self.wire_body

    def into(self, p, method="GET"):
        """Fills the expectations of plan p for this response."""
        p.status = self.status
        p.headers = list(self.headers)
        p.framing = self.framing
        p.cl = len(self.body) if self.framing == "cl" else None
        no_body = method == "HEAD" or self.status in (204, 304)
        p.body = b"" if no_body else self.body
        return p


# --- generators: each returns a Plan with writes, end, outcome and expectations -----------

def g_length(rng, tag):
    r = Resp(rng, tag, framing="cl", size=rng.choice((0, None, None, None, BIG)))
    p = r.into(Plan("length", "%d bytes" % len(r.body)))
    p.writes = split_writes(rng, r.wire())
    return p


def g_chunked(rng, tag):
    r = Resp(rng, tag, framing="chunked")
    p = r.into(Plan("chunked", "%d bytes%s" % (len(r.body), ", trailers" if r.trailers else "")))
    p.writes = split_writes(rng, r.wire())
    return p


def g_sse(rng, tag):
    events = []
    for i in range(rng.randint(1, 30)):
        data = "%s event %d %s" % (tag, i, "x" * rng.randint(0, 200))
        ev = "id: %d\nevent: %s\ndata: %s\n\n" % (i, rng.choice(("msg", "delta", "ping")), data)
        if rng.random() < 0.2:
            ev = ": comment\n" + ev
        events.append(ev.encode())
    body = b"".join(events)
    hs = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")]
    r = Resp(rng, tag, framing="chunked", status=200, size=0, headers=hs, trailers=[], ext=False)
    r.body = body
    r.wire_body = chunk_encode(rng, body, maxchunk=rng.choice((5, 17, 64, 300)))
    p = r.into(Plan("sse", "%d events" % len(events)))
    # events cut across chunks, chunks across writes
    p.writes = split_writes(rng, r.wire(), bytewise_ok=False)
    return p


def g_close_delimited(rng, tag):
    version = rng.choice((b"HTTP/1.1", b"HTTP/1.0"))
    hs = e2e_headers(rng, hop_ok=False)
    if rng.random() < 0.6:  # the close is what ends the body either way
        hs.append((b"Connection", rng.choice((b"close", b"Close"))))
    r = Resp(rng, tag, framing="close", version=version, headers=hs,
             status=rng.choice((200, 200, 404, 500)))
    p = r.into(Plan("close-delimited", version.decode()))
    p.writes = split_writes(rng, r.wire())
    p.end = "close"
    return p


def g_head(rng, tag):
    framing = rng.choice(("cl", "cl", "chunked"))
    r = Resp(rng, tag, framing=framing, status=rng.choice((200, 200, 404)), trailers=[])
    p = r.into(Plan("head", framing), method="HEAD")
    p.method = "HEAD"
    p.writes = split_writes(rng, r.head())
    return p


def g_nobody(rng, tag):
    status = rng.choice((204, 304))
    hs = e2e_headers(rng)
    if status == 304:
        hs.append((b"ETag", b'"v1"'))
    r = Resp(rng, tag, framing="none", status=status, headers=hs, size=0)
    cl = rng.choice((None, 0, 5, 1234)) if status == 304 else rng.choice((None, 0, 40))
    if cl is not None:
        r.headers.insert(rng.randint(1, len(r.headers)), (b"Content-Length", b"%d" % cl))
    elif rng.random() < 0.3:  # no body whatever the framing headers say (RFC 9112 6.3)
        r.headers.insert(rng.randint(1, len(r.headers)), (b"Transfer-Encoding", b"chunked"))
    p = r.into(Plan("no-body", "%d cl=%s" % (status, cl)))
    p.framing = "none"
    p.cl = cl
    p.writes = split_writes(rng, r.head())
    return p


def g_interim(rng, tag):
    pre = []
    for _ in range(rng.randint(1, 4)):
        st = rng.choice((100, 102, 103, 103))
        hs = []
        if st == 103:
            hs = [(b"Link", b"</style.css>; rel=preload; as=style")] * rng.randint(1, 3)
        if rng.random() < 0.2:
            hs.append((b"X-Interim", tag.encode()))
        pre.append(hdr_block(b"HTTP/1.1 %d %s" % (st, rng.choice((b"Continue", b"Processing",
                                                                   b"Early Hints", b"X"))), hs))
    head = rng.random() < 0.2
    r = Resp(rng, tag, trailers=[] if head else None)
    p = r.into(Plan("interim", "%d interim%s" % (len(pre), " HEAD" if head else "")),
               method="HEAD" if head else "GET")
    if head:
        p.method = "HEAD"
    p.writes = split_writes(rng, b"".join(pre) + (r.head() if head else r.wire()))
    return p


def g_http10(rng, tag):
    v = rng.choice(("close", "close", "keep-alive", "close-delimited", "chunked", "chunked-ka"))
    if v == "close-delimited":
        r = Resp(rng, tag, framing="close", version=b"HTTP/1.0")
        p = r.into(Plan("http10", v))
        p.end = "close"
    elif v in ("chunked", "chunked-ka"):
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; it may
        # be relayed, but the connection must be closed after it
        r = Resp(rng, tag, framing="chunked", version=b"HTTP/1.0", trailers=[], hop_ok=False)
        if v == "chunked-ka":
            r.headers.insert(1, (b"Connection", b"keep-alive"))
        p = r.into(Plan("http10", v))
        p.end = "poison"
    else:
        hs = e2e_headers(rng, hop_ok=False)
        if v == "keep-alive":
            hs.insert(0, (b"Connection", rng.choice((b"keep-alive", b"Keep-Alive"))))
        r = Resp(rng, tag, framing="cl", version=b"HTTP/1.0", headers=hs)
        p = r.into(Plan("http10", v))
        p.end = "keep" if v == "keep-alive" else rng.choice(("poison", "close"))
    p.writes = split_writes(rng, r.wire())
    return p


def g_conn_close(rng, tag):
    v = rng.choice((b"close", b"Close", b"keep-alive, close", b"X-Gone, close", b"CLOSE"))
    r = Resp(rng, tag, framing=rng.choice(("cl", "chunked")), hop_ok=False)
    r.headers.insert(rng.randint(1, len(r.headers)), (b"Connection", v))
    if b"X-Gone" in v:
        r.headers.append((b"X-Gone", b"hop-by-hop"))
    if rng.random() < 0.2:  # a second Connection header
        r.headers.append((b"Connection", b"keep-alive"))
    p = r.into(Plan("conn-close", v.decode()))
    p.writes = split_writes(rng, r.wire())
    p.end = rng.choice(("poison", "close"))  # the upstream may leave it open: never reused
    return p


def fill_headers(rng, total, big_values):
    """Headers (after X-Tag and framing) whose names + values add up to `total` bytes."""
    hs = []
    left = total
    i = 0
    while left > 0:
        name = b"X-F%d" % i
        i += 1
        if left < len(name) + 1:  # top up the last value
            n, v = hs.pop()
            hs.append((n, v + b"p" * left))
            break
        want = rng.randint(5000, 60000) if big_values else rng.randint(1, 80)
        vlen = min(want, left - len(name))
        hs.append((name, b"v" * vlen))
        left -= len(name) + vlen
    return hs


def g_big_headers(rng, tag):
    v = rng.choice(("near", "near", "exact", "over", "over", "way-over", "many-small",
                    "trailer-over"))
    body = make_body(rng, tag, rng.randint(0, 100))
    xt = (b"X-Tag", tag.encode())
    if v == "trailer-over":
        # a head under the limit, then trailers that take the sum over it
        te = (b"Transfer-Encoding", b"chunked")
        fixed = len(xt[0]) + len(xt[1]) + len(te[0]) + len(te[1])
        gap = rng.randint(1, 30)
        hs = [xt] + fill_headers(rng, HEAD_LIMIT - gap - fixed, True) + [te]
        trailers = [(b"X-Trailer", b"t" * (gap + 5))]
        wire = hdr_block(b"HTTP/1.1 200 OK", hs) + chunk_encode(rng, body, trailers=trailers)
        p = Plan("big-headers", "%s gap %d" % (v, gap))
        p.status, p.headers, p.body, p.framing = 200, hs, body, "chunked"
        p.writes = split_writes(rng, wire, bytewise_ok=False)
        p.raw = wire
        return p
    cl = (b"Content-Length", b"%d" % len(body))
    fixed = len(xt[0]) + len(xt[1]) + len(cl[0]) + len(cl[1])
    total = {"near": HEAD_LIMIT - rng.randint(1, 2000), "exact": HEAD_LIMIT,
             "over": HEAD_LIMIT + rng.randint(1, 64), "way-over": HEAD_LIMIT + rng.randint(10000, 200000),
             "many-small": rng.randint(20000, HEAD_LIMIT)}[v]
    hs = fill_headers(rng, total - fixed, big_values=v not in ("many-small",) and rng.random() < 0.7)
    hs = [xt] + hs
    hs.insert(rng.randint(1, len(hs)), cl)
    wire = hdr_block(b"HTTP/1.1 200 OK", hs) + body
    p = Plan("big-headers", "%s %d bytes in %d headers" % (v, total, len(hs)))
    p.status, p.headers, p.body, p.cl = 200, hs, body, len(body)
    p.writes = split_writes(rng, wire, bytewise_ok=False)
    if v in ("over", "way-over"):
        p.outcome = "error"
        p.end = "poison"
    p.raw = wire
    return p


def invalid_head_plan(p, wire, rng, end=None, outcome="error"):
    p.outcome = outcome
    p.writes = split_writes(rng, wire)
    p.end = end or rng.choice(("poison", "poison", "close"))
    p.raw = wire
    return p


def g_bad_length(rng, tag):
    """Content-Length trouble: conflicting, duplicated, malformed, or with Transfer-Encoding."""
    body = make_body(rng, tag, rng.randint(2, 40))
    n = len(body)
    xt = (b"X-Tag", tag.encode())
    v = rng.randrange(12)
    te = (b"Transfer-Encoding", b"chunked")
    chunked_body = chunk_encode(rng, body, trailers=[])
    if v == 0:
        hs, wb, note = [xt, (b"Content-Length", b"%d" % n), (b"Content-Length", b"%d" % (n + 3))], body, "two differing"
    elif v == 1:
        hs, wb, note = [xt, (b"Content-Length", b"%d" % n), (b"content-length", b"%d" % n)], body, "two equal"
    elif v == 2:
        hs, wb, note = [xt, (b"Content-Length", b"%d, %d" % (n, n))], body, "list"
    elif v == 3:
        bad = rng.choice((b"+%d" % n, b"-%d" % n, b"0x%x" % n, b"", b"%d %d" % (n, n), b"%d;" % n,
                          b"99999999999999999999999", b"%d\x0b" % n, b"%da" % n, b"\xef\xbc\x95"))
        hs, wb, note = [xt, (b"Content-Length", bad)], body, "value %r" % bad
    elif v in (4, 5):
        order = [(b"Content-Length", b"%d" % rng.choice((n, 3, 0))), te]
        rng.shuffle(order)
        hs, wb, note = [xt] + order, chunked_body, "with Transfer-Encoding"
    elif v == 6:
        hs, wb, note = [xt, (b"Content-Length", b"%d" % rng.choice((0, 5))), te, (b"X-Status", b"204")], b"", "204 CL+TE"
        wire = hdr_block(b"HTTP/1.1 204 No Content", hs)
        return invalid_head_plan(Plan("bad-length", note), wire, rng)
    elif v == 7:  # obs-fold in Content-Length
        hs, wb, note = [xt, (b"Content-Length", b"\r\n %d" % n)], body, "folded"
        p = Plan("bad-length", note)
        p.status, p.headers, p.body, p.cl = 200, [xt, (b"Content-Length", b"%d" % n)], body, n
        return invalid_head_plan(p, hdr_block(b"HTTP/1.1 200 OK", hs) + wb, rng, end="keep",
                                 outcome="either")
    else:  # valid spellings: leading zeros, whitespace around the value (OWS)
        val = rng.choice((b"00%d" % n, b"%d  " % n, b"\t%d" % n, b"%d\t" % n, b"%d \t" % n))
        p = Plan("bad-length", "valid %r" % val)
        hs = [xt, (b"Content-Length", val)]
        p.status, p.headers, p.body, p.cl = 200, hs, body, n
        wire = hdr_block(b"HTTP/1.1 200 OK", hs) + body
        if b"\t" in val:  # OWS, but llhttp 8.1 refuses a tab there
            return invalid_head_plan(p, wire, rng, end="keep", outcome="either")
        p.writes = split_writes(rng, wire)
        p.raw = wire
        return p
    wire = hdr_block(b"HTTP/1.1 200 OK", hs) + wb
    p = Plan("bad-length", note)
    p.status, p.headers, p.body = 200, hs, body
    # RFC 9110 8.6 lets a recipient merge identical values; the gateway refuses them
    return invalid_head_plan(p, wire, rng, outcome="either" if v in (1, 2) else "error",
                             end="poison" if v in (1, 2) else None)


def g_bad_coding(rng, tag):
    body = make_body(rng, tag, rng.randint(1, 60))
    xt = (b"X-Tag", tag.encode())
    ch = chunk_encode(rng, body, trailers=[])
    v = rng.choice([
        ([(b"Transfer-Encoding", b"gzip")], b"\x1f\x8b" + body),
        ([(b"Transfer-Encoding", b"chunked, gzip")], ch),
        ([(b"Transfer-Encoding", b"gzip, chunked")], ch),
        ([(b"Transfer-Encoding", b"identity")], body),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], ch),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"identity")], ch),
        ([(b"Transfer-Encoding", b"compress")], body),
        ([(b"Transfer-Encoding", b"xchunked")], ch),
        ([(b"Transfer-Encoding", b"chunked ,")], ch),
        ([(b"Transfer-Encoding", b",chunked")], ch),
        ([(b"Transfer-Encoding", b"")], ch),
    ])
    hs = [xt] + v[0]
    p = Plan("bad-coding", b"; ".join(x for _, x in v[0]).decode("latin-1"))
    return invalid_head_plan(p, hdr_block(b"HTTP/1.1 200 OK", hs) + v[1], rng, end="poison")


BAD_STATUS_LINES = [b"HTTP/1.1 2000 OK", b"HTTP/1.1 20 OK", b"HTTP/2 200 OK", b"HTTP/1.2 200 OK",
                    b"http/1.1 200 OK", b"ICY 200 OK", b"HTTP/1.1  200 OK", b"HTTP/1.1\t200 OK",
                    b"HTTP/1.1 099 X", b"HTTP/1.1 2x0 OK", b"XTTP/1.1 200 OK", b" HTTP/1.1 200 OK",
                    b"HTTP/1.1", b"HTTP/1.1 OK", b"HTTP/ 200 OK", b"HTTP/1.1 -20 OK",
                    b"HTTP/1.1 200 O\rK", b"\x00HTTP/1.1 200 OK", b"HTTP/11 200 OK",
                    b"GET / HTTP/1.1", b"HTTP/1.1 000 Zero", b"HTTP/1.1 0 Zero", b"HTTP/1.1 ",
                    b"HTTP/1.1 1 X", b"HTTP/1.0 99 X"]
# accepted or refused, both fine; when accepted, relayed with this status
ODD_STATUS_LINES = [(b"HTTP/1.1 200", 200), (b"HTTP/1.1 200 ", 200), (b"HTTP/1.1 200 O\x01K", 200),
                    (b"HTTP/1.1 999 Odd", 999), (b"HTTP/1.1 600 Odd", 600), (b"HTTP/2.0 200 OK", 200),
                    (b"HTTP/0.9 200 OK", 200), (b"\r\nHTTP/1.1 200 OK", 200),
                    (b"HTTP/1.1 200 OK\r", 200), (b"HTTP/1.1 299 Odd", 299)]


def g_bad_status(rng, tag):
    body = make_body(rng, tag, rng.randint(0, 40))
    hs = [(b"X-Tag", tag.encode()), (b"Content-Length", b"%d" % len(body))]
    if rng.random() < 0.55:
        line = rng.choice(BAD_STATUS_LINES)
        p = Plan("bad-status", repr(line))
        return invalid_head_plan(p, hdr_block(line, hs) + body, rng)
    line, st = rng.choice(ODD_STATUS_LINES)
    if line.endswith(b"\r"):  # bare LF after the status line: "...OK\n"
        wire = line[:-1] + b"\n" + hdr_block(b"", hs)[2:] + body
    else:
        wire = hdr_block(line, hs) + body
    p = Plan("odd-status", repr(line))
    p.status, p.headers, p.body, p.cl = st, hs, body, len(body)
    return invalid_head_plan(p, wire, rng, end="keep", outcome="either")


# (header line, outcome): "error" lines must be refused before anything is relayed; "either"
# ones (obs-fold) may be refused or relayed; "valid" ones must be relayed.
HEADER_LINES = [
    (b"X-Bad : v", "error"), (b"X A: v", "error"), (b"Content-Length : 2", "error"),
    (b"X-Bad\t: v", "error"), (b"X-A: a\x00b", "error"), (b"X-A: a\x01b", "error"),
    (b"X-A: a\x7fb", "error"), (b"X-A: a\x0bb", "error"), (b"X-A: a\x0cb", "error"),
    (b"X-A: a\rb", "error"), (b"X-A: a\nb", "error"), (b"X-No-Colon", "error"),
    (b"X(A): v", "error"), (b"X@A: v", "error"), (b"X\x00A: v", "error"), (b"X\xffA: v", "error"),
    (b"X-A:\x1bv", "error"), (b"\x7f: v", "error"), (b"X-A\x01: v", "error"),
    (b": empty-name", "error"), (b"X-Fold: a\r\n b", "either"), (b"X-Fold: a\r\n\tb c", "either"),
    (b"X-Fold:\r\n b", "either"), (b"X-Tab: a\tb", "valid"), (b"X-Hi: \x80\xfe\xff", "valid"),
    (b"X-Empty:", "valid"), (b"X-Spaces:    ", "valid"), (b"x-UPPER-lower: MiXeD", "valid"),
    (b"X-Lots: " + b"a," * 500, "valid"), (b"!#$%&'*+-.^_`|~: tchar", "valid"),
]


def g_bad_header(rng, tag):
    line, what = rng.choice(HEADER_LINES)
    body = make_body(rng, tag, rng.randint(0, 40))
    xt = (b"X-Tag", tag.encode())
    cl = (b"Content-Length", b"%d" % len(body))
    before, after = rng.choice((([xt, cl], []), ([xt], [cl]), ([xt], [cl, (b"X-After", b"1")])))
    wire = hdr_block(b"HTTP/1.1 200 OK", before).rstrip(b"\r\n") + b"\r\n" + line + b"\r\n" + \
        b"".join(n + b": " + v + b"\r\n" for n, v in after) + b"\r\n" + body
    p = Plan("bad-header", repr(line[:60]))
    p.status, p.body, p.cl = 200, body, len(body)
    name, _, value = line.partition(b":")
    p.headers = before + [(name, value.strip(b" \t"))] + after
    if what == "valid":
        p.writes = split_writes(rng, wire)
        p.raw = wire
        return p
    if what == "either":
        p.loose_names = {b"x-fold"}
        return invalid_head_plan(p, wire, rng, end="keep", outcome="either")
    p.headers = []
    return invalid_head_plan(p, wire, rng)


def g_bare_lf(rng, tag):
    """Bare LF as a line end somewhere in the head (RFC 9112 2.2: a recipient MAY accept it)."""
    r = Resp(rng, tag, framing="cl", hop_ok=False, size=rng.randint(0, 50))
    head = r.head()
    ends = [m.start() for m in re.finditer(rb"\r\n", head)]
    at = rng.choice(ends)
    wire = head[:at] + b"\n" + head[at + 2:] + r.wire_body
    p = r.into(Plan("bare-lf", "at %d of %d" % (at, len(head))))
    return invalid_head_plan(p, wire, rng, end="keep", outcome="either")


def g_bad_chunks(rng, tag):
    """A chunked response whose body framing breaks after the head went out."""
    r = Resp(rng, tag, framing="chunked", trailers=[], ext=False, size=rng.randint(10, 3000))
    body = r.body
    k = rng.randint(1, len(body) - 2)  # at least 2 bytes left for the broken chunk
    good = b"%x\r\n" % k + body[:k] + b"\r\n"
    v = rng.randrange(11)
    rest = body[k:]
    bad = [
        b"zz\r\n" + rest + b"\r\n0\r\n\r\n",
        b"-%x\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n",
        b"0x%x\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n",
        b"ffffffffffffffffff\r\n" + rest + b"\r\n0\r\n\r\n",
        b"%x\r\n" % len(rest) + rest + b"XX0\r\n\r\n",               # no CRLF after the data
        b"%x\r\n" % max(1, len(rest) - 1) + rest + b"\r\n0\r\n\r\n",  # data longer than said
        b"%x\n" % len(rest) + rest + b"\n0\n\n",                     # bare LF
        b"%x\r\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n",
        b"%x;a=\x01\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n",      # control char in an extension
        b"%x\r\n" % len(rest) + rest + b"\r\n0\r\nX a\r\n\r\n",       # bad trailer line
        b"%x\r\n" % len(rest) + rest + b"\r\n0\r\nX: a\x00\r\n\r\n",  # control char in a trailer
    ][v]
    wire = r.head() + good + bad
    p = r.into(Plan("bad-chunks", "variant %d after %d bytes" % (v, k)))
    return invalid_head_plan(p, wire, rng, outcome="trunc")


def g_lenient_chunks(rng, tag):
    """Chunk extensions RFC 9112 7.1.1 allows that llhttp 8.1 refuses (BWS before ';', an
    extension after one with a value): relayed, or cut after the head (never a 502 or a
    complete-looking wrong body)."""
    r = Resp(rng, tag, framing="chunked", trailers=[], ext=False, size=rng.randint(2, 500))
    ext = rng.choice((b" ;a", b";a=1;b", b"\t;x=y", b";a = 1", b";a=1 ;b=2"))
    n = len(r.body)
    r.wire_body = b"%x%s\r\n" % (n, ext) + r.body + b"\r\n0\r\n\r\n"
    p = r.into(Plan("lenient-chunks", repr(ext)))
    return invalid_head_plan(p, r.wire(), rng, end="keep", outcome="lenient")


GARBAGE = [b"\r\n", b"\r\n\r\n", b"x", b"0\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"\x00\xff\xfe",
           b"<html>trailing junk</html>", b"HTTP/1.1 200 OK\r\nX-Tag: SMUGGLED\r\nContent-Length: 5\r\n\r\nevil!"]


def g_garbage_after(rng, tag):
    v = rng.choice(("cl", "cl", "chunked", "head-body", "204-body", "304-body"))
    garbage = rng.choice(GARBAGE)
    if rng.random() < 0.3:
        garbage = rng.randbytes(rng.randint(1, 300))
    method = "GET"
    if v in ("cl", "chunked"):
        r = Resp(rng, tag, framing=v, size=rng.randint(0, 2000), trailers=[])
        wire = r.wire()
    elif v == "head-body":  # a body sent to HEAD (with chunked: often just the last chunk)
        method = "HEAD"
        r = Resp(rng, tag, framing=rng.choice(("cl", "chunked")), size=rng.randint(1, 100),
                 status=200, trailers=[])
        if r.framing == "chunked" and rng.random() < 0.5:
            garbage = b"0\r\n\r\n"
        else:
            garbage = r.wire_body + garbage
        wire = r.head()
    else:
        st = 204 if v == "204-body" else 304
        r = Resp(rng, tag, framing="none", status=st, size=0)
        body = make_body(rng, tag, rng.randint(1, 50))
        r.headers.append((b"Content-Length", b"%d" % len(body)))
        garbage = body + garbage
        wire = r.head()
    p = r.into(Plan("garbage-after", "%s + %d bytes" % (v, len(garbage))), method=method)
    p.method = method
    if v in ("204-body", "304-body"):
        p.framing, p.cl = "none", len(garbage)
    p.writes = with_tail(split_writes(rng, wire), garbage)
    p.end = rng.choice(("poison", "poison", "close"))
    p.raw = wire + garbage
    return p


def g_early(rng, tag):
    """The answer goes out before the request body was read (it is drained after)."""
    r = Resp(rng, tag, framing=rng.choice(("cl", "cl", "chunked")), size=rng.randint(0, 3000),
             status=rng.choice((200, 201, 400, 413, 403)), hop_ok=False)
    close = rng.random() < 0.4
    if close:
        r.headers.append((b"Connection", b"close"))
    p = r.into(Plan("early", "%s%s" % (r.framing, ", close" if close else "")))
    p.method = "POST"
    p.req_body = rng.randbytes(rng.choice((100000, 300000, 1 << 20)))
    p.keyed = True
    p.early = True
    p.writes = split_writes(rng, r.wire(), bytewise_ok=False)
    p.end = "close" if close else "keep"
    return p


def g_premature(rng, tag):
    """The upstream goes away (FIN or RST) part-way."""
    how = rng.choice(("close", "close", "rst"))
    where = rng.choice(("zero", "zero", "status", "headers", "after-interim", "after-head",
                        "body", "chunk-size", "chunk-data", "before-last", "last-crlf", "trailers"))
    framing = "chunked" if where in ("chunk-size", "chunk-data", "before-last", "last-crlf",
                                     "trailers") else rng.choice(("cl", "chunked"))
    if where in ("after-head", "body") and framing == "chunked":
        framing = "cl"
    trailers = [(b"X-Trailer", b"t" * 20)] if where == "trailers" else []
    r = Resp(rng, tag, framing=framing, size=rng.randint(8, 5000), trailers=trailers, ext=False)
    head = r.head()
    interim = hdr_block(b"HTTP/1.1 103 Early Hints", [(b"Link", b"</x>")]) if where == "after-interim" else b""
    wb = r.wire_body
    p = r.into(Plan("premature", "%s %s" % (how, where)))
    p.end = how
    if where == "zero":
        data = b""
        p.outcome = "zero"
        if rng.random() < 0.5:  # not replayable: a 502 on a fresh and a reused connection alike
            p.method = "POST"
            p.req_body = rng.randbytes(rng.randint(0, 3000))
        p.err_types = ("upstream_reset",)
        p.retry = b"HTTP/1.1 200 OK\r\nX-Tag: %s\r\nX-Attempt: 2\r\nContent-Length: %d\r\n\r\nretry %s" % (
            tag.encode(), len(tag) + 6, tag.encode())
    elif where in ("status", "headers", "after-interim"):
        if where == "status":
            data = head[:rng.randint(1, head.index(b"\r\n") + 1)]
        elif where == "headers":
            data = head[:rng.randint(head.index(b"\r\n") + 2, len(head) - 1)]
        else:
            data = interim + head[:rng.randint(0, len(head) - 1)]
        p.outcome = "error"
        p.err_types = ("upstream_reset",)
    else:
        p.outcome = "trunc"
        if where == "after-head":
            cut = 0
        elif where == "body":
            cut = rng.randint(1, len(wb) - 1)
        elif where == "chunk-size":  # inside a chunk-size line, its CRLF not complete
            a, b, _, _ = rng.choice(chunk_layout(wb)[:-1] or chunk_layout(wb))
            cut = rng.randint(a + 1, b - 1)
        elif where == "chunk-data":
            _, _, a, b = rng.choice(chunk_layout(wb)[:-1])
            cut = rng.randint(a, b - 1)
        elif where == "before-last":
            cut = chunk_layout(wb)[-1][0]
        elif where == "last-crlf":
            cut = len(wb) - 2
        else:  # in the trailers
            cut = rng.randint(chunk_layout(wb)[-1][1], len(wb) - 1)
        data = head + wb[:cut]
        # the client gets at most what was sent of the body
        if framing == "cl":
            p.body = r.body[:cut]
        else:
            p.body = r.body
    p.writes = split_writes(rng, data)
    p.raw = data
    return p


def g_switching(rng, tag):
    hs = [(b"X-Tag", tag.encode()), (b"Upgrade", rng.choice((b"websocket", b"h2c", b"foo/1"))),
          (b"Connection", b"Upgrade")]
    wire = hdr_block(b"HTTP/1.1 101 Switching Protocols", hs) + rng.choice((b"", b"\x81\x02hi", b"raw bytes"))
    if rng.random() < 0.3:
        wire = hdr_block(b"HTTP/1.1 100 Continue", []) + wire
    p = Plan("101", "")
    return invalid_head_plan(p, wire, rng, end="poison")


MUT_SPECIALS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b";", b"\x7f", b"\xff", b"0",
                b"\r\n\r\n", b"\r\n ", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 0\r\n",
                b"Content-Length: 99\r\n", b"Connection: close\r\n", b"HTTP/1.1 200 OK\r\n"]


def mutate(rng, data):
    d = bytearray(data)
    ops = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not d:
            d = bytearray(b"\r\n")
        pos = rng.randrange(len(d) + 1)
        posi = min(pos, len(d) - 1)
        op = rng.choice(("flip", "bit", "insert", "delete", "dupline", "dropline", "crlf",
                         "number", "truncate"))
        ops.append(op)
        if op == "flip":
            d[posi] = rng.randrange(256)
        elif op == "bit":
            d[posi] ^= 1 << rng.randrange(8)
        elif op == "insert":
            d[pos:pos] = rng.choice(MUT_SPECIALS)
        elif op == "delete":
            del d[posi:posi + rng.randint(1, 8)]
        elif op in ("dupline", "dropline"):
            lines = bytes(d).split(b"\r\n")
            if len(lines) > 2:
                i = rng.randrange(0, len(lines) - 1)
                if op == "dupline":
                    lines.insert(i, lines[i])
                else:
                    del lines[i]
                d = bytearray(b"\r\n".join(lines))
        elif op == "crlf":
            idx = [m.start() for m in re.finditer(rb"\r\n", bytes(d))]
            if idx:
                i = rng.choice(idx)
                d[i:i + 2] = rng.choice((b"\n", b"\r", b"\r\r\n", b"\r\n\r\n", b""))
        elif op == "number":
            runs = [m.span() for m in re.finditer(rb"[0-9a-fA-F]+", bytes(d))]
            if runs:
                a, b = rng.choice(runs)
                d[a:b] = rng.choice((b"0", b"1", b"-1", b"ffffffff", b"99999999999999999999", b""))
        elif op == "truncate":
            del d[max(1, posi):]
    return bytes(d), ops


def g_mutated(rng, tag):
    """A valid response mutated after its X-Tag line: any clean outcome will do, as long as
    nothing but this request's own tag reaches its client. It starts with Connection: close
    (left alone) and the upstream closes after it: whatever the gateway made of the framing,
    the connection is not reused, and a mutation that asks for more bytes ends at the FIN."""
    r = Resp(rng, tag, size=rng.randint(0, 3000), hop_ok=False)
    r.headers.insert(0, (b"Connection", b"close"))
    wire = r.wire()
    start = wire.index(b"\r\n", wire.index(b"X-Tag")) + 2
    tail, ops = mutate(rng, wire[start:])
    wire = wire[:start] + tail
    p = Plan("mutated", "+".join(ops))
    p.outcome = "loose"
    p.err_types = ("upstream_protocol_error", "upstream_reset")
    p.writes = split_writes(rng, wire)
    p.end = "close"
    p.raw = wire
    return p


GENERATORS = [
    (g_length, 14), (g_chunked, 10), (g_sse, 4), (g_close_delimited, 4), (g_head, 5),
    (g_nobody, 5), (g_interim, 5), (g_http10, 5), (g_conn_close, 5), (g_big_headers, 3),
    (g_bad_length, 5), (g_bad_coding, 3), (g_bad_status, 5), (g_bad_header, 6), (g_bare_lf, 2),
    (g_bad_chunks, 4), (g_lenient_chunks, 2), (g_garbage_after, 6), (g_early, 3),
    (g_premature, 9), (g_switching, 2), (g_mutated, 8),
]


def make_plan(rng, tag, http10_client):
    for _ in range(50):
        gen = rng.choices([g for g, _ in GENERATORS], weights=[w for _, w in GENERATORS])[0]
        p = gen(rng, tag)
        if p.method == "GET" and rng.random() < 0.15:
            p.method = "POST"
            p.req_body = rng.randbytes(rng.randint(0, 3000))
            p.keyed = rng.random() < 0.5
        if http10_client and (p.outcome not in ("valid", "error") or p.early):
            continue
        break
    if not p.raw:
        p.raw = b"".join(d for _, d in p.writes)
    return p


# ---------------------------------------------------------------------------------------
# Client cases


class Req:
    def __init__(self, case, k, plan, version):
        self.case, self.k, self.plan, self.version = case, k, plan, version
        self.tag = tag_of(case, k)
        self.state = "unsent"   # unsent | sent | answered | aborted | abandoned (not owed)
        self.result = None      # what the client got: valid | error | trunc | retry | loose-*
        hs = "Host: fuzz.test\r\n"
        if version == "HTTP/1.0":
            hs += "Connection: keep-alive\r\n"
        if plan.req_body is not None:
            hs += "Content-Length: %d\r\n" % len(plan.req_body)
            if plan.keyed:
                hs += "Idempotency-Key: %s\r\n" % self.tag
        self.data = ("%s /u/%s %s\r\n%s\r\n" % (plan.method, self.tag, version, hs)).encode() + \
            (plan.req_body or b"")

    @property
    def replayable(self):
        return self.plan.method in ("GET", "HEAD") or self.plan.keyed


class Case:
    def __init__(self, idx):
        rng = random.Random(SEED * 1000003 + idx)
        self.idx = idx
        self.http10 = rng.random() < 0.08
        n = rng.choice((1, 2, 3, 3, 4, 5, 6))
        reqs = []
        version = "HTTP/1.0" if self.http10 else "HTTP/1.1"
        for k in range(n):
            reqs.append(Req(idx, k, make_plan(rng, tag_of(idx, k), self.http10), version))
        self.reqs = reqs
        # groups: sent together (pipelined) when more than one; big bodies go alone
        def big(r):
            return r.plan.req_body is not None and len(r.plan.req_body) > 8192

        self.groups = []
        i = 0
        while i < n:
            size = rng.choice((2, 3, 4)) if rng.random() < 0.3 else 1
            g = [reqs[i]]
            i += 1
            while i < n and len(g) < size and not big(reqs[i]) and not big(g[0]):
                g.append(reqs[i])
                i += 1
            self.groups.append(g)
        # a slow reader (small receive buffer: the gateway pauses the upstream read), and a
        # client that goes away (RST or FIN) part-way into one response
        self.slow = rng.random() < 0.1
        self.abort = None
        if rng.random() < 0.06:
            self.abort = (rng.randrange(n), rng.choice(("rst", "fin")), rng.choice((0, 1, 100, 5000)))


# ---------------------------------------------------------------------------------------
# The scripted upstream


class Upstream(h.ThreadedServer):
    """Serves each request the response its plan says, records every request (connection id,
    index on the connection, tag) and flags requests that arrive where none may."""

    def __init__(self, plans):
        self.plans = plans
        self.nconns = 0
        self.records = collections.defaultdict(list)  # tag -> [(conn id, n on conn)]
        self.violations = []
        super().__init__(backlog=128)

    def violation(self, msg):
        with self.lock:
            self.violations.append(msg)

    def serve(self, s):
        with self.lock:
            self.nconns += 1
            cid = self.nconns
        s.settimeout(30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        n = 0
        after = None  # (why no request may follow, the tag of that response)
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = s.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                n += 1
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                method = parts[0].decode("latin-1")
                target = parts[1].decode("latin-1") if len(parts) > 1 else ""
                tag = target.rsplit("/", 1)[-1]
                headers = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                with self.lock:
                    self.records[tag].append((cid, n))
                    attempt = len(self.records[tag])
                if after:
                    self.violation("REUSE: connection %d carried request %s (%s) after %s %s (plan=%s)"
                                   % (cid, tag, method, after[0], after[1], self.plans[after[1]].describe()))
                    after = None  # served all the same: what follows shows the damage, if any
                plan = self.plans.get(tag)
                if plan is None:
                    self.violation("connection %d: request %r for no planned tag" % (cid, lines[0][:200]))
                    return
                if method != plan.method:
                    self.violation("%s: method %s, the client sent %s" % (tag, method, plan.method))
                clen = int(headers.get(b"content-length", b"0") or 0)
                writes, end = plan.writes, plan.end
                if attempt > 1:
                    if plan.outcome != "zero":
                        self.violation("%s (%s) reached the upstream %d times" % (tag, plan.describe(), attempt))
                        return
                    writes, end = [(0, plan.retry)], "keep"
                early = plan.early and attempt == 1
                if early:
                    if not self._write(s, writes):
                        return
                    if end == "close":
                        s.shutdown(socket.SHUT_WR)
                while len(buf) < clen:
                    d = s.recv(262144)
                    if not d:
                        return
                    buf += d
                body, buf = buf[:clen], buf[clen:]
                if plan.req_body is not None and attempt == 1 and body != plan.req_body:
                    self.violation("%s: the request body arrived altered (%d of %d bytes)"
                                   % (tag, len(body), len(plan.req_body)))
                if not early and not self._write(s, writes):
                    return
                if end == "keep":
                    continue
                if end == "poison":
                    after = ("the response to", tag)
                    continue
                if end == "close":
                    after = ("the upstream's FIN after the response to", tag)
                    if not early:
                        s.shutdown(socket.SHUT_WR)
                    continue  # linger: read until the gateway closes too
                if end == "rst":
                    # only once the gateway has every byte: an RST drops unsent data
                    self._wait_sent(s)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
        except OSError:
            return
        finally:
            try:
                s.close()
            except OSError:
                pass

    @staticmethod
    def _wait_sent(s, timeout=2.0):
        """Until the peer has acknowledged everything written (SIOCOUTQ is 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            if left == 0:
                return
            time.sleep(0.001)

    def _write(self, s, writes):
        try:
            for pause, data in writes:
                if pause:
                    time.sleep(pause / 1000.0)
                if data:
                    s.sendall(data)
            return True
        except OSError:  # the gateway gave up on the response
            return False


# ---------------------------------------------------------------------------------------
# The client side: a strict reader of what the gateway sends


class Hang(Exception):
    pass


TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
STATUS_RE = re.compile(rb"^HTTP/1\.1 ([1-9][0-9][0-9]) ([\t \x21-\x7e\x80-\xff]*)$")


class Got:
    """One response as the client read it."""

    def __init__(self):
        self.status = None
        self.headers = []
        self.interim = []
        self.body = b""
        self.framing = None
        self.complete = False
        self.eof_in_head = False   # the connection ended before a complete head
        self.nothing = False       # ... before any byte of it
        self.malformed = None
        self.raw = b""

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def header(self, name):
        v = self.header_all(name)
        return v[0] if v else None

    def closes(self):
        return any(b"close" in [t.strip().lower() for t in v.split(b",")] for v in self.header_all(b"connection"))

    def __repr__(self):
        return "<%s %s complete=%s body=%d %r>" % (self.status, self.headers[:12], self.complete,
                                                   len(self.body), self.body[:80])


class Client:
    def __init__(self, port, slow=False):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.recv_size = 262144
        self.slow = slow
        if slow:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.recv_size = 4096
        self.sock.settimeout(WAIT_S)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self.eof = False
        self.rst = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def fill(self):
        if self.eof:
            return False
        if self.slow:
            time.sleep(0.0003)
        try:
            d = self.sock.recv(self.recv_size)
        except socket.timeout:
            raise Hang("nothing from the gateway for %.0fs" % WAIT_S)
        except ConnectionResetError:
            self.rst = self.eof = True
            return False
        if not d:
            self.eof = True
            return False
        self.buf += d
        return True

    def _line(self):
        while True:
            i = self.buf.find(b"\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos:i + 1])
                self.pos = i + 1
                if not line.endswith(b"\r\n"):
                    raise ValueError("line not ended by CRLF: %r" % line[:120])
                return line[:-2]
            if not self.fill():
                return None

    def read(self, method):
        """The next response (interim ones gathered on .interim)."""
        g = Got()
        start = self.pos
        try:
            self._read(g, method, start)
        except ValueError as e:
            g.malformed = str(e)
        g.raw = bytes(self.buf[start:self.pos])
        # keep memory flat: drop what was consumed
        del self.buf[:self.pos]
        self.pos = 0
        return g

    def _read(self, g, method, start):
        while True:
            line = self._line()
            if line is None:
                g.eof_in_head = True
                g.nothing = self.pos == start and len(self.buf) == start
                return
            m = STATUS_RE.match(line)
            if not m:
                raise ValueError("bad status line %r" % line[:120])
            status = int(m.group(1))
            headers = []
            while True:
                ln = self._line()
                if ln is None:
                    g.eof_in_head = True
                    return
                if ln == b"":
                    break
                name, sep, value = ln.partition(b":")
                if not sep or not TOKEN_RE.match(name):
                    raise ValueError("malformed header line %r" % ln[:120])
                if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
                    raise ValueError("control character in header line %r" % ln[:120])
                headers.append((name, value.strip(b" \t")))
            if 100 <= status < 200:
                g.interim.append(status)
                continue
            g.status, g.headers = status, headers
            break
        te = g.header_all(b"transfer-encoding")
        cl = g.header_all(b"content-length")
        if te and cl:
            raise ValueError("both Transfer-Encoding and Content-Length")
        if method == "HEAD" or status in (204, 304):
            g.framing = "none"
            g.complete = True
            return
        if te:
            if [t.lower() for t in te] != [b"chunked"]:
                raise ValueError("transfer-encoding %r" % te)
            g.framing = "chunked"
            parts = []
            while True:
                ln = self._line()
                if ln is None:
                    g.body = b"".join(parts)
                    return
                if not re.match(rb"^[0-9a-fA-F]{1,15}$", ln):
                    raise ValueError("bad chunk size line %r" % ln[:60])
                n = int(ln, 16)
                if n == 0:
                    while True:
                        t = self._line()
                        if t is None:
                            g.body = b"".join(parts)
                            return
                        if t == b"":
                            break
                    g.body = b"".join(parts)
                    g.complete = True
                    return
                while len(self.buf) - self.pos < n + 2:
                    if not self.fill():
                        parts.append(bytes(self.buf[self.pos:self.pos + n]))
                        self.pos = len(self.buf)
                        g.body = b"".join(parts)
                        return
                parts.append(bytes(self.buf[self.pos:self.pos + n]))
                if self.buf[self.pos + n:self.pos + n + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                self.pos += n + 2
        if cl:
            if len(cl) != 1 or not re.match(rb"^[0-9]{1,15}$", cl[0]):
                raise ValueError("content-length %r" % cl)
            n = int(cl[0])
            g.framing = "length"
            while len(self.buf) - self.pos < n:
                if not self.fill():
                    break
            g.body = bytes(self.buf[self.pos:self.pos + n])
            self.pos += len(g.body)
            g.complete = len(g.body) == n
            return
        if not g.closes():
            raise ValueError("no framing and no Connection: close")
        g.framing = "close"
        while self.fill():
            pass
        g.body = bytes(self.buf[self.pos:])
        self.pos = len(self.buf)
        g.complete = True

    def abort(self, how, nbytes):
        """Goes away once nbytes of the next response arrived (or nothing more came for a
        moment, or the gateway closed)."""
        self.sock.settimeout(0.3)
        try:
            while len(self.buf) - self.pos < nbytes and self.fill():
                pass
        except Hang:
            pass
        if how == "rst":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(2.0)
            try:
                while self.sock.recv(65536):
                    pass
            except OSError:
                pass
        self.close()

    def at_eof(self, timeout=2.0):
        """Whether the gateway closes the connection (nothing more arrives first)."""
        if self.pos < len(self.buf):
            return False
        if self.eof:
            return True
        self.sock.settimeout(timeout)
        try:
            return not self.fill()
        except Hang:
            return False
        finally:
            self.sock.settimeout(WAIT_S)


# ---------------------------------------------------------------------------------------
# Checks


def expected_headers(headers):
    tokens = set()
    for n, v in headers:
        if n.lower() == b"connection":
            tokens |= {t.strip().lower() for t in v.split(b",") if t.strip()}
    return [(n, v.strip(b" \t")) for n, v in headers
            if n.lower() not in HOP and n.lower() not in tokens]


GATEWAY_SET = {b"x-request-id", b"content-length", b"transfer-encoding", b"connection"}


def check_head(req, g, probs):
    """Status, end-to-end headers, x-request-id and framing of an upstream answer."""
    p = req.plan
    if g.status != p.status:
        probs.append("status %s, planned %d" % (g.status, p.status))
    rid = g.header_all(b"x-request-id")
    if len(rid) != 1 or not re.match(rb"^[0-9a-f]{32}$", rid[0]):
        probs.append("x-request-id %r" % rid)
    want = expected_headers(p.headers)
    got = [(n, v) for n, v in g.headers if n.lower() not in GATEWAY_SET]
    if p.loose_names:
        want = [(n, None if n.lower() in p.loose_names else v) for n, v in want]
        got = [(n, None if n.lower() in p.loose_names else v) for n, v in got]
    if got != want:
        probs.append("end-to-end headers differ:\n      got  %r\n      want %r" % (got[:40], want[:40]))
    no_body = p.method == "HEAD" or p.status in (204, 304)
    cl = g.header_all(b"content-length")
    te = g.header_all(b"transfer-encoding")
    if p.framing == "cl" and (not no_body or p.method == "HEAD"):
        if cl != [b"%d" % p.cl]:
            probs.append("content-length %r, the upstream said %d" % (cl, p.cl))
    elif cl and not (p.method == "HEAD" and p.cl is not None):
        probs.append("content-length %r where the upstream sent %s" % (cl, p.cl))
    chunked_out = not no_body and p.framing != "cl" and req.version == "HTTP/1.1"
    if chunked_out != (te == [b"chunked"]):
        probs.append("transfer-encoding %r (expected chunked: %s)" % (te, chunked_out))
    close_out = not no_body and p.framing != "cl" and req.version == "HTTP/1.0"
    if req.version == "HTTP/1.1" and g.header_all(b"connection"):
        probs.append("connection %r to a keep-alive HTTP/1.1 client" % g.header_all(b"connection"))
    if req.version == "HTTP/1.0":
        want_conn = [b"close"] if close_out else [b"keep-alive"]
        if [v.lower() for v in g.header_all(b"connection")] != want_conn:
            probs.append("connection %r to an HTTP/1.0 keep-alive client (want %r)"
                         % (g.header_all(b"connection"), want_conn))
    for st in g.interim:
        if not 100 <= st < 200 or st == 101:
            probs.append("interim status %d" % st)


def check_valid(req, g, probs):
    check_head(req, g, probs)
    if not g.complete:
        probs.append("the response was cut (%d of the body bytes)" % len(g.body))
    if g.body != req.plan.body:
        probs.append("body differs: got %d bytes %r..., planned %d bytes %r..."
                     % (len(g.body), g.body[:60], len(req.plan.body), req.plan.body[:60]))


def check_error(req, g, probs, types):
    if g.status != 502 and not (g.status == 504 and "upstream_timeout" in types):
        probs.append("status %s, expected a gateway 502" % g.status)
        return
    if g.header(b"x-tag") is not None:
        probs.append("a 502 carrying the upstream's X-Tag (an upstream answer, not the gateway's)")
    if not (g.header(b"content-type") or b"").lower().startswith(b"application/json"):
        probs.append("gateway error content-type %r" % g.header(b"content-type"))
    try:
        err = json.loads(g.body)["error"]
        if err.get("type") not in types:
            probs.append("error type %r, expected one of %r (%s)" % (err.get("type"), types, err.get("message")))
        rid = g.header(b"x-request-id")
        if not rid or err.get("request_id") != rid.decode():
            probs.append("error.request_id %r vs x-request-id %r" % (err.get("request_id"), rid))
    except (ValueError, KeyError, TypeError, AttributeError):
        probs.append("gateway error without a JSON error body: %r" % g.body[:200])
    if not g.complete:
        probs.append("the gateway's error response was cut")


def is_gateway_error(g):
    return g.status in (502, 504) and g.header(b"x-tag") is None and g.complete


def check_response(req, g, client, probs):
    """Checks one response against its plan; returns whether the connection goes on."""
    p = req.plan
    tag = req.tag.encode()
    if g.malformed:
        probs.append("the gateway sent a malformed response: %s" % g.malformed)
        return False
    if g.eof_in_head:
        if g.nothing:
            probs.append("the connection closed without a response")
        else:
            probs.append("the connection closed inside a response head")
        return False
    xt = g.header_all(b"x-tag")
    if xt and xt != [tag]:
        probs.append("CROSS-TALK: the response carries X-Tag %r, the request was %s" % (xt, req.tag))
        return False
    if p.outcome == "valid":
        req.result = "valid"
        check_valid(req, g, probs)
    elif p.outcome == "error":
        req.result = "error"
        check_error(req, g, probs, p.err_types)
    elif p.outcome == "either":
        if is_gateway_error(g):
            req.result = "error"
            check_error(req, g, probs, p.err_types)
        else:
            req.result = "valid"
            check_valid(req, g, probs)
    elif p.outcome in ("trunc", "lenient"):
        check_head(req, g, probs)
        if g.complete and p.outcome == "lenient":
            req.result = "valid"
            if g.body != p.body:
                probs.append("body differs: got %d bytes %r..., planned %d bytes"
                             % (len(g.body), g.body[:60], len(p.body)))
        elif g.complete:
            req.result = "trunc"
            probs.append("a response the upstream broke off looks complete (%s framing, %d body bytes)"
                         % (g.framing, len(g.body)))
        else:
            req.result = "trunc"
            if not p.body.startswith(g.body):
                probs.append("the cut body is not a prefix of the upstream's: got %r..." % g.body[:80])
            if not client.eof:
                probs.append("a cut response but the connection stays open")
    elif p.outcome == "zero":
        if is_gateway_error(g):
            req.result = "error"
            check_error(req, g, probs, p.err_types)
        else:
            req.result = "retry"
            if (g.status, g.header(b"x-attempt"), g.body) != (200, b"2", b"retry " + tag) or not g.complete:
                probs.append("neither a 502 nor the answer to the re-send: %r" % g)
    elif p.outcome == "loose":
        if is_gateway_error(g):
            req.result = "loose-error"
            check_error(req, g, probs, p.err_types)
        elif xt == [tag]:
            req.result = "loose-relayed" if g.complete else "loose-cut"
        else:
            probs.append("an answer without the request's X-Tag: %r" % g)
            return False
    return g.complete and g.framing != "close" and not g.closes()


def describe_req(req, extra=""):
    p = req.plan
    return ("seed=%d case=%d req=%d tag=%s %s %s plan=%s writes=%s end=%s\n    upstream sent: %r%s"
            % (SEED, req.case, req.k, req.tag, p.method, req.version, p.describe(),
               [len(d) for _, d in p.writes][:30], p.end, p.raw[:600], extra))


def run_case(case, port):
    """Runs one client connection; returns a list of problems."""
    probs = []
    try:
        c = Client(port, case.slow)
    except OSError as e:
        return ["seed=%d case=%d: cannot connect: %s" % (SEED, case.idx, e)]
    try:
        alive = True
        for group in case.groups:
            if not alive:
                break
            try:
                c.send(b"".join(r.data for r in group))
            except OSError:
                pass  # the reads say what happened
            for r in group:
                r.state = "sent"
            for r in group:
                if not alive:
                    break
                if case.abort and case.abort[0] == r.k:
                    try:
                        c.abort(case.abort[1], case.abort[2])
                    except Hang as e:
                        probs.append(describe_req(r, "\n    -> HANG: %s" % e))
                    r.state = "aborted"
                    for q in case.reqs:
                        if q.state == "sent":
                            q.state = "abandoned"
                    return probs
                try:
                    g = c.read(r.plan.method)
                except Hang as e:
                    probs.append(describe_req(r, "\n    -> HANG: %s" % e))
                    return probs
                r.state = "answered"
                rp = []
                alive = check_response(r, g, c, rp)
                if not alive and not c.eof and not rp and not c.at_eof():
                    rp.append("the response ended the exchange but the connection stays open")
                if rp:
                    probs.append(describe_req(r, "\n    got: %r" % g.raw[:700]) + "".join(
                        "\n    -> %s" % x for x in rp))
                    if not alive:  # the client gave up: whatever it queued is not owed
                        for q in case.reqs:
                            if q.state == "sent":
                                q.state = "abandoned"
                        break
    finally:
        c.close()
    return probs


def summarize(probs):
    """Problem count by plan kind, then one problem of each kind first."""
    kinds = collections.OrderedDict()
    for p in probs:
        m = re.search(r"plan=([\w-]+/\w+)", p)
        kinds.setdefault(m.group(1) if m else "?", []).append(p)
    first = [v[0] for v in kinds.values()]
    rest = [p for p in probs if p not in first]
    shown = (first + rest)[:14]
    return "%d problem(s) (seed %d), by plan: %s\n\n%s" % (
        len(probs), SEED, {k: len(v) for k, v in kinds.items()}, "\n\n".join(shown))


# ---------------------------------------------------------------------------------------
# The test


class FuzzUpstreamTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        idxs = ONLY or list(range(N_CASES))
        cls.cases = [Case(i) for i in idxs]
        cls.plans = {r.tag: r.plan for c in cls.cases for r in c.reqs}
        cls.up = Upstream(cls.plans)
        cls.env.upstreams.append(cls.up)
        pool = h.make_pool([cls.up.url], keepalive={"max_idle": 64, "idle_timeout_ms": 30000},
                           timeout_ms=POOL_TIMEOUTS)
        cfg = h.make_config({"u": pool}, [{"path": "/", "pool": "u"}], watch=False)
        cls.sluice = cls.env.sluice(cfg)
        cls.port = cls.sluice.port

    def status(self):
        return self.sluice.status()

    def check_upstream(self, cases):
        """(c), (d): what the upstream saw against what the clients sent and got."""
        up = self.up
        probs = list(up.violations)
        reqs = {r.tag: r for c in cases for r in c.reqs}
        with up.lock:
            records = {t: list(v) for t, v in up.records.items()}
        for tag, recs in sorted(records.items()):
            r = reqs.get(tag)
            if r is None:
                continue  # reported by the upstream already
            if r.state == "unsent":
                probs.append(describe_req(r, "\n    -> reached the upstream but the client never sent it"))
            elif r.state == "sent":
                probs.append(describe_req(r, "\n    -> reached the upstream though it was queued behind "
                                             "a response that ended its client connection"))
            if r.plan.outcome == "zero" and r.result in ("error", "retry"):
                fresh = recs[0][1] == 1
                want_retry = not fresh and r.replayable
                if (r.result == "retry") != want_retry or len(recs) != (2 if want_retry else 1):
                    probs.append(describe_req(r, "\n    -> first attempt on a %s connection, %s request: "
                                                 "attempts %r, client got %s"
                                              % ("fresh" if fresh else "reused",
                                                 "replayable" if r.replayable else "non-replayable",
                                                 recs, r.result)))
                elif want_retry and recs[1][1] != 1:
                    probs.append(describe_req(r, "\n    -> re-sent on a pooled connection, not a fresh one: %r"
                                              % recs))
        for tag, r in reqs.items():
            if r.result in ("valid", "trunc", "retry") and tag not in records:
                probs.append(describe_req(r, "\n    -> the client got an upstream answer the upstream "
                                             "never sent (no request seen)"))
        return probs

    def test_fuzz_responses(self):
        t0 = time.monotonic()
        cases = self.cases
        probs = []
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as ex:
            futs = [ex.submit(run_case, c, self.port) for c in cases]
            for f in futs:
                probs += f.result()
                if not self.sluice.alive():
                    break
        elapsed = time.monotonic() - t0
        if not self.sluice.alive():
            self.fail("sluice died (rc %s):\n%s" % (self.sluice.proc.returncode,
                                                    h.sanitizer_report(self.sluice.log_text()) or
                                                    "\n".join(self.sluice.lines[-40:])))
        probs += self.check_upstream(cases)

        reqs = [r for c in cases for r in c.reqs]
        kinds = collections.Counter(r.plan.kind for r in reqs)
        results = collections.Counter(r.result for r in reqs if r.result)
        with self.up.lock:
            nconns = self.up.nconns
            reused = sum(1 for recs in self.up.records.values() for _, n in recs if n > 1)
            seen = sum(len(v) for v in self.up.records.values())
        sys.stderr.write(
            "fuzz_upstream: seed %d, %d client connections (%d HTTP/1.0, %d slow readers, %d "
            "aborting), %d requests in %.1fs; upstream: %d connections, %d requests (%d on reused "
            "connections); plans %s; outcomes %s\n" % (
                SEED, len(cases), sum(c.http10 for c in cases), sum(c.slow for c in cases),
                sum(bool(c.abort) for c in cases), len(reqs), elapsed, nconns, seen, reused,
                dict(sorted(kinds.items())), dict(sorted(results.items()))))
        if probs:
            if os.environ.get("SLUICE_IT_VERBOSE"):
                sys.stderr.write("\n\n".join(probs) + "\n")
            self.fail(summarize(probs))
        if len(reqs) > 50:
            self.assertGreater(reused, 0, "the gateway never reused an upstream connection")

        # (e) still serving, nothing in flight, no sanitizer report
        self.assertTrue(self.sluice.alive())
        self.assert_serving()
        self.assertSettled(self.sluice)

    def assert_serving(self):
        tag = "u9999-99-ffff"
        plan = Plan("after", "")
        body = b"still fine " + tag.encode()
        plan.writes = [(0, b"HTTP/1.1 200 OK\r\nX-Tag: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            tag.encode(), len(body), body))]
        self.up.plans[tag] = plan
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/u/" + tag)
            self.assertEqual((r.status, r.body), (200, body), r)


# ---------------------------------------------------------------------------------------
# Minimal reproducers of what the fuzzing found


class FoundByFuzzTest(h.SluiceTestCase):
    """Minimal reproducers of what the fuzzing found: regression tests for the bugs fixed since
    (a685398, 927670b), expected failures (docstring "BUG:") for those still open. Each test
    sets `answer(n_on_conn, target)` -> (bytes, keep the connection)."""

    @classmethod
    def setUpEnv(cls):
        cls.seen = []
        cls.answer = None

        def handler(up, conn, n, req):
            cls.seen.append((n, req[1]))
            data, keep = cls.answer(n, req[1])
            if data:
                conn.sendall(data)
            return keep
        cls.up = cls.env.scripted(handler)
        pool = h.make_pool([cls.up.url], timeout_ms={"connect": 2000, "first_byte": 1500, "total": 5000})
        cls.sluice = cls.env.sluice(h.make_config({"u": pool}, [{"path": "/", "pool": "u"}], watch=False))
        cls.port = cls.sluice.port

    def setUp(self):
        del self.seen[:]

    def serve(self, responses):
        """Answers the i-th request with responses[i] and keeps the connection."""
        it = iter(responses)
        type(self).answer = staticmethod(lambda n, target: (next(it), True))

    def test_empty_header_name_is_502(self):
        """A response header line with an empty field name (": b"; field-name is a token of at
        least one character, RFC 9110 5.1) is an invalid response, not relayed. llhttp 8.1
        reports it as a zero-length name."""
        self.serve([b"HTTP/1.1 200 OK\r\nX-Tag: t\r\n: b\r\nContent-Length: 2\r\n\r\nok"])
        with h.RawConn(self.port, timeout=5) as c:
            c.send(h.build_request("GET", "/u/empty-name"))
            head = b""
            while b"\r\n\r\n" not in head:
                d = c.sock.recv(65536)
                if not d:
                    break
                head += d
        self.assertNotIn(b"\r\n: b\r\n", head)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)

    def test_http10_response_with_transfer_encoding_is_not_reused(self):
        """An HTTP/1.0 response with Transfer-Encoding (and Connection: keep-alive) is relayed,
        and its connection is not reused: RFC 9112 6.1, its framing is faulty and the
        connection must be closed after it (the sender may have kept part of the message back,
        to be read as the next response). Used to go back to the pool (fixed in a685398).
        Upstream sends: b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n
        2\r\nok\r\n0\r\n\r\n"; the next request must come on a new connection."""
        self.serve([b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nok\r\n0\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"])
        with h.RawConn(self.port, timeout=5) as c:
            r1 = c.request("GET", "/u/h10-te")
            r2 = c.request("GET", "/u/next")
        self.assertEqual((r1.body, r2.body), (b"ok", b"next"))
        self.assertEqual(len(self.seen), 2)
        self.assertEqual(self.seen[1][0], 1,
                         "the second request came on the same upstream connection: %r" % self.seen)

    def test_trailers_do_not_count_against_the_header_limit(self):
        """The 256 KiB limit on a response's header section is the head's: a valid chunked
        response whose head is just under it and whose trailer would take the sum over it is
        relayed whole. Trailers used to be stored with the headers, and such a response was
        cut after its head (fixed in a685398).
        Upstream sends: b"HTTP/1.1 200 OK\r\nX-Big: " + 262112 * b"b" + b"\r\nTransfer-Encoding:
        chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: " + 100 * b"t" + b"\r\n\r\n"
        (names + values of the head: 262141 bytes, under 262144)."""
        big = b"b" * (HEAD_LIMIT - len(b"X-Big") - len(b"Transfer-Encodingchunked") - 3)
        self.serve([b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nok\r\n0\r\nX-Trailer: " + b"t" * 100 + b"\r\n\r\n"])
        with h.RawConn(self.port, timeout=5) as c:
            c.send(h.build_request("GET", "/u/trailer"))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            try:
                c.read_body(r)
            except h.IncompleteResponse as e:
                self.fail("the response was cut after its head: %s" % e)
        self.assertEqual(r.body, b"ok")

    def test_options_of_every_connection_line_are_removed(self):
        """A header named by any Connection header line is hop-by-hop (RFC 9110 7.6.1: the
        Connection field is all its lines together), not only by the last one. X-Gone used to
        be relayed here (fixed in 927670b).
        Upstream sends: b"HTTP/1.1 200 OK\r\nConnection: X-Gone\r\nConnection: keep-alive\r\n
        X-Gone: secret\r\nContent-Length: 2\r\n\r\nok"."""
        self.serve([b"HTTP/1.1 200 OK\r\nConnection: X-Gone\r\nConnection: keep-alive\r\n"
                    b"X-Gone: secret\r\nContent-Length: 2\r\n\r\nok"])
        with h.RawConn(self.port, timeout=5) as c:
            r = c.request("GET", "/u/conn-lines")
        self.assertEqual((r.status, r.body), (200, b"ok"))
        self.assertIsNone(r.header("x-gone"), r.headers)

    def test_status_below_100_is_a_protocol_error(self):
        """A status code below 100 (status-code is 3DIGIT and 100..599, RFC 9112 4 and RFC
        9110 15; llhttp 8.1 also parses "20", "" and the empty code of a status line with two
        spaces) is a 502 at once. It used to be handled like a 1xx interim response (fixed in
        a685398):
        (1) b"HTTP/1.1  200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length:
            2\r\n\r\nok" (a 0 status whose 5-byte body is the text of another response) gave
            the client 201 "ok", a response the upstream never sent as one;
        (2) b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n" on a kept connection made the client
            wait timeout_ms.first_byte (60 s by default) for a 504 upstream_timeout."""
        self.serve([b"HTTP/1.1  200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 201 Created\r\n"
                    b"Content-Length: 2\r\n\r\nok"])
        with h.RawConn(self.port, timeout=5) as c:
            r = c.request("GET", "/u/status-0")
        self.assertJsonError(r, 502, "upstream_protocol_error")
        self.serve([b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"])
        t0 = time.monotonic()
        with h.RawConn(self.port, timeout=5) as c:
            r = c.request("GET", "/u/status-20")
        self.assertJsonError(r, 502, "upstream_protocol_error")
        self.assertLess(time.monotonic() - t0, 1.0)

    def test_stale_connection_resend_goes_to_a_fresh_connection(self):
        """When a pooled connection turns out closed (EOF before any response byte), the
        replayable request is re-sent once, on a fresh connection. The re-send used to take
        another idle pooled connection when there was one, and nothing wrote the request on
        it: the client waited timeout_ms.first_byte (1500 ms here) for a 504 upstream_timeout
        (fixed in a685398).
        Setup: two idle pooled connections (two concurrent slow requests); the upstream closes
        a connection without answering when a second request arrives on it."""
        def answer(n, target):
            if target.startswith("/u/warm"):
                time.sleep(0.3)
                return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nwarm", True
            if n >= 2:  # a keep-alive connection the upstream had given up on
                return b"", False
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh", True
        type(self).answer = staticmethod(answer)
        conns = [h.RawConn(self.port, timeout=5) for _ in range(2)]
        try:
            for i, c in enumerate(conns):
                c.send(h.build_request("GET", "/u/warm%d" % i))
            for c in conns:
                self.assertEqual(c.read_response().body, b"warm")
        finally:
            for c in conns:
                c.close()
        h.wait_for(lambda: self.sluice.status()["pools"][0]["endpoints"][0]["idle_connections"] >= 2,
                   3, what="two idle upstream connections")
        t0 = time.monotonic()
        with h.RawConn(self.port, timeout=5) as c:
            r = c.request("GET", "/u/stale")
        elapsed = time.monotonic() - t0
        self.assertEqual((r.status, r.body), (200, b"fresh"), (r, elapsed, self.seen))
        self.assertLess(elapsed, 1.0)
        self.assertEqual(self.seen[-1], (1, "/u/stale"), self.seen)


if __name__ == "__main__":
    unittest.main()
