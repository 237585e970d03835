"""Seeded fuzzing of the HTTP/1.1 request path, against the real gateway over raw sockets.

A few thousand cases. Each case is one client connection: valid requests (GET, bodies framed
by Content-Length or chunked, Expect: 100-continue, pipelines of 2-5, HTTP/1.0) mutated byte-
and line-wise; classic smuggling shapes (CL.TE, TE.CL, TE.TE with obfuscated
Transfer-Encoding, odd Content-Length values, chunk-size tricks, obs-fold, header injection);
odd request lines (HTTP/0.9, absolute-form, random method tokens, very long lines); pipelines
of up to 120 requests; clients that go away (RST, or FIN) anywhere in a request. Some cases
first run clean requests on the same keep-alive connection and wait for their answers, some
send a clean probe request right after the fuzzed bytes. Every case's bytes go out in seeded
random-size writes. Many cases run at once on one selector loop; a case ends when the gateway
closes its connection (after an error, or on its idle or header timeout).

Checked for every case:
 (a) the gateway closes the connection in bounded time (no hang);
 (b) its bytes parse as a sequence of HTTP/1.1 responses; the gateway's own answers are 4xx
     (or 505 for a version it does not speak) with a JSON {"error": {...}} body and an
     x-request-id, and nothing follows a 400 or a Connection: close before the FIN;
 (c) clean requests get their upstream 200 echo, in order, with the body intact;
 (d) no smuggling: every request the upstream received was answered on the connection of the
     case it came from (each target carries a checksummed per-case tag; the mock logs every
     request it serves), and the upstream never saw a target the client did not send.
After the run the gateway still serves, holds no connection or exchange, and its log has no
sanitizer report, nor when it exits.

Reproducing: SLUICE_FUZZ_SEED=N runs another seed; SLUICE_FUZZ_CASE=I[,J...] runs only those
cases (same bytes, same writes); SLUICE_FUZZ_CASES=N changes the number of cases."""

import collections
import hashlib
import json
import os
import random
import re
import selectors
import socket
import struct
import sys
import time
import unittest
import zlib

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

SEED = int(os.environ.get("SLUICE_FUZZ_SEED", "7341"))
N_CASES = int(os.environ.get("SLUICE_FUZZ_CASES", "4000"))
ONLY = [int(x) for x in os.environ.get("SLUICE_FUZZ_CASE", "").split(",") if x.strip()]

CONCURRENCY = 64
HANG_S = 8.0  # the gateway must close within this after the last byte either way moved

MAX_HEADER_BYTES = 4096
MAX_HEADERS = 40
MAX_BODY = 32768
HEADER_TIMEOUT_MS = 2000
IDLE_TIMEOUT_MS = 500


# ---------------------------------------------------------------------------------------
# Case tags: every request target of case i carries tag(i); a checksum keeps a mutated tag
# from passing for another case's.


def tag_of(i):
    return "s%05dx%04x" % (i, zlib.crc32(b"sluice-fuzz-%d" % i) & 0xFFFF)


TAG_RE = re.compile(rb"s(\d{5})x([0-9a-f]{4})")


def case_of_target(url):
    for m in TAG_RE.finditer(url):
        i = int(m.group(1))
        if tag_of(i).encode() == m.group(0):
            return i
    return None


# ---------------------------------------------------------------------------------------
# The corpus: valid requests


HOSTS = ["localhost", "example.com", "example.com:8080", "127.0.0.1", "[::1]:8080", "x"]
HDR_POOL = [
    ("User-Agent", "fuzz/1.0"), ("Accept", "*/*"), ("Accept-Encoding", "gzip, br"),
    ("X-Trace", "abc-123"), ("Cookie", "a=b; c=d"), ("Cache-Control", "no-cache"),
    ("Authorization", "Bearer t0k3n"), ("Content-Type", "application/json"),
    ("X-Forwarded-For", "10.0.0.1"), ("Via", "1.1 edge"), ("Connection", "keep-alive"),
    ("Accept-Language", "en;q=0.8"), ("X-Empty", ""), ("Pragma", "no-cache"),
    ("X-Request-Id", "fuzz-rid-0001"), ("Idempotency-Key", "k1"), ("TE", "trailers"),
    ("Referer", "http://example.com/a?b=c"), ("X-Tab", "a\tb"), ("Range", "bytes=0-10"),
]
CL_NAMES = ["Content-Length", "content-length", "CONTENT-LENGTH", "Content-length"]
TE_NAMES_OK = ["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING"]


class Req:
    """A valid request: its bytes and what the upstream's echo must report."""

    def __init__(self, data, method, url, body, keep=True):
        self.data, self.method, self.url, self.body, self.keep = data, method, url, body, keep


def rand_body(rng, lo=0, hi=300):
    n = rng.randint(lo, hi)
    if rng.random() < 0.5:
        return bytes(rng.randrange(256) for _ in range(n))
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 {}\":,\r\n") for _ in range(n))


def rand_headers(rng, n=None):
    hs = []
    for _ in range(rng.randint(0, 4) if n is None else n):
        hs.append(rng.choice(HDR_POOL))
    return "".join("%s: %s\r\n" % kv for kv in hs).encode("latin-1")


def chunk_body(rng, body, ext=False, trailers=False):
    out = []
    i = 0
    while i < len(body):
        n = rng.randint(1, max(1, min(len(body) - i, 120)))
        piece = body[i:i + n]
        i += n
        size = b"%x" % n if rng.random() < 0.7 else b"%X" % n
        if ext and rng.random() < 0.4:
            size += rng.choice([b";a=b", b";name", b";x=\"q v\"", b";e", b";e;f=2", b";e=\"1\";f"])
        out.append(size + b"\r\n" + piece + b"\r\n")
    last = b"0"
    if ext and rng.random() < 0.3:
        last += b";end=1"
    out.append(last + b"\r\n")
    if trailers and rng.random() < 0.5:
        out.append(b"X-Trailer: t\r\n")
    out.append(b"\r\n")
    return b"".join(out)


CLEAN_KINDS = ["get", "get", "post_cl", "post_chunked", "expect_cl", "expect_chunked", "put",
               "delete", "patch", "options", "http10_ka", "post_empty"]


def clean_request(rng, tag, label, kind=None, close=False):
    kind = kind or rng.choice(CLEAN_KINDS)
    url = "/echo/%s-%s" % (tag, label)
    if rng.random() < 0.3:
        url += "?q=%d&r=a%%20b" % rng.randrange(1000)
    host = rng.choice(HOSTS)
    extra = rand_headers(rng)
    if close:
        extra += b"Connection: close\r\n"
    version = b"HTTP/1.1"
    method = "GET"
    body = b""
    framing = b""
    if kind == "get":
        pass
    elif kind in ("post_cl", "put", "patch", "expect_cl", "post_empty"):
        method = {"put": "PUT", "patch": "PATCH"}.get(kind, "POST")
        body = b"" if kind == "post_empty" else rand_body(rng)
        framing = b"%s: %d\r\n" % (rng.choice(CL_NAMES).encode(), len(body))
        if kind == "expect_cl":
            framing += b"Expect: 100-continue\r\n"
    elif kind in ("post_chunked", "expect_chunked"):
        method = "POST"
        body = rand_body(rng, 0, 400)
        framing = b"%s: chunked\r\n" % rng.choice(TE_NAMES_OK).encode()
        if kind == "expect_chunked":
            framing += b"Expect: 100-continue\r\n"
    elif kind == "delete":
        method = "DELETE"
    elif kind == "options":
        method = "OPTIONS"
    elif kind == "http10_ka":
        version = b"HTTP/1.0"
        if not close:
            extra += b"Connection: keep-alive\r\n"
    head = b"%s %s %s\r\nHost: %s\r\n" % (method.encode(), url.encode(), version, host.encode())
    head += extra + framing + b"\r\n"
    if kind in ("post_chunked", "expect_chunked"):
        data = head + chunk_body(rng, body, ext=True, trailers=True)
    else:
        data = head + body
    return Req(data, method, url, body, keep=not close)


def clean_pipeline(rng, tag, label, n, close_last=False):
    return [clean_request(rng, tag, "%s%d" % (label, k), close=close_last and k == n - 1)
            for k in range(n)]


# ---------------------------------------------------------------------------------------
# Smuggling shapes and odd request lines


TE_VALUES = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked",
             b"chunked\t", b"xchunked", b"chunked, chunked", b"identity, chunked",
             b"chunked, identity", b"gzip, chunked", b"chunked;q=1", b"\"chunked\"", b"chunk",
             b"chunked\x0b", b"\x0bchunked", b"chunked\x00", b"chu nked", b"cHuNkEd", b"",
             b",chunked", b"chunked,", b"identity", b"chunked\r\n\tx", b"\xc2\xa0chunked"]
TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING",
            b"Transfer-Encoding ", b"Transfer-Encoding\t", b" Transfer-Encoding",
            b"Transfer_Encoding", b"Transfer-Encoding\x00", b"X-Transfer-Encoding",
            b"Transfer-Encodin", b"Transfer-Encoding\x0b", b"Transfer\r\n-Encoding"]
CL_VALUES = [b"1, 2", b"+5", b"-5", b"05", b"0005", b"00000000000000000000000000000005",
             b"5, 5", b"5,5", b"0x5", b"5.0", b"1e1", b"5 5", b"", b" ", b"99999999999999999999",
             b"18446744073709551621", b"4294967301", b"9223372036854775807",
             b"9223372036854775808", b"-0", b"0", b"5\x00", b"\t5", b"5\t", b"\x0b5",
             b"\xef\xbc\x95", b"5;", b"\"5\"", b"0005 ", b"0, 5"]
CHUNK_SIZES = [b"5", b"5;e=1;f=2", b"0x5", b"+5", b"-5", b" 5", b"5 ", b"05", b"0000000000000000005",
               b"5;ext", b"5;ext=\"a;b\"", b"5;", b"5\t;x", b"10000000000000005",
               b"ffffffffffffffffff", b"fffffffffffffff5", b"5\n", b"5\r", b"5\r\r", b"5;\x00",
               b"5 ;a", b"5;a b", b"5;" + b"e" * 5000, b"5" + b"\x00", b"\xff5", b"5g"]
LAST_CHUNKS = [b"0\r\n\r\n", b"0\r\n", b"0\n\n", b"000\r\n\r\n", b"0;ext\r\n\r\n",
               b"0\r\nTrailer-X: x\r\n\r\n", b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"0\r\nContent-Length: 5\r\n\r\n", b"0\r\nX: a\r\n folded\r\n\r\n", b"0\r\n\n",
               b"0\r\n\r", b"0 \r\n\r\n", b"0\r\nX:\x00\r\n\r\n", b""]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "MKCOL",
           "PURGE", "LINK", "M-SEARCH", "PRI", "SEARCH", "QUERY", "FOO", "G ET", "get", "Get",
           "G\x00T", "GET\t", "\x00", "-", "A" * 60, "BREW", "CONNECT", "SOURCE", "ACL",
           "REPORT", "UNLOCK", "GET/", "X-Y", "GÉT"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "HTTP/1.10", "HTTP/01.1",
            "http/1.1", "HTTP/1.1 ", "HTTP/1", "HTTP/", "HTTP/1.1\t", "HTTP/9.9", "HTTPS/1.1",
            "HTTP/1.1x", ""]


def smuggle_case(rng, tag):
    """Returns (bytes, must_reject): must_reject when the gateway has to refuse the first
    request whatever it makes of the rest."""
    url = ("/echo/%s-f" % tag).encode()
    hidden = b"GET /echo/%s-h HTTP/1.1\r\nHost: x\r\n\r\n" % tag.encode()
    host = b"Host: %s\r\n" % rng.choice(HOSTS).encode()
    method = rng.choice([b"POST", b"POST", b"GET", b"PUT"])
    start = method + b" " + url + b" HTTP/1.1\r\n" + host
    te_name = rng.choice(TE_NAMES)
    te_line = b"%s: %s\r\n" % (te_name, rng.choice(TE_VALUES))
    te_real = te_name.lower() == b"transfer-encoding"  # a real TE header, whatever its value
    te_std = b"Transfer-Encoding: chunked\r\n"
    shape = rng.randrange(16)
    if shape == 0:  # CL.TE
        body = b"0\r\n\r\n" + hidden
        n = rng.choice([len(body), 5, 3, 0, len(body) + 3])
        return start + b"Content-Length: %d\r\n" % n + te_line + b"\r\n" + body, te_real
    if shape == 1:  # TE.CL
        body = b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
        return start + te_line + b"Content-Length: 4\r\n\r\n" + body, te_real
    if shape == 2:  # TE.TE: one plain, one obfuscated, in either order
        body = b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
        lines = [te_std, te_line]
        rng.shuffle(lines)
        cl = b"Content-Length: 4\r\n" if rng.random() < 0.5 else b""
        return start + lines[0] + cl + lines[1] + b"\r\n" + body, False
    if shape == 3:  # obfuscated TE alone: the body is a last chunk and a hidden request
        return start + te_line + b"\r\n" + b"0\r\n\r\n" + hidden, False
    if shape == 4:  # odd Content-Length values
        v = rng.choice(CL_VALUES)
        return start + b"%s: %s\r\n\r\n" % (rng.choice(CL_NAMES).encode(), v) + b"hello" + hidden, False
    if shape == 5:  # two Content-Length headers
        a, b = rng.choice([(5, 5), (5, 0), (0, 5), (5, 40), (40, 5)])
        return start + b"Content-Length: %d\r\ncontent-length: %d\r\n\r\nhello" % (a, b) + hidden, True
    if shape == 6:  # chunk-size tricks
        size = rng.choice(CHUNK_SIZES)
        data = rng.choice([b"hello\r\n", b"helloXX", b"hello\n", b"hello", b"hello\r\r\n"])
        last = rng.choice(LAST_CHUNKS)
        return start + te_std + b"\r\n" + size + b"\r\n" + data + last + hidden, False
    if shape == 7:  # obs-fold around the framing headers
        v = rng.choice([b"Transfer-Encoding:\r\n chunked\r\n", b"Content-Length:\r\n 5\r\n",
                        b"X-A: v\r\n Transfer-Encoding: chunked\r\n",
                        b"X-A: v\r\n\tContent-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n ,x\r\n"])
        return start + v + b"\r\n" + b"0\r\n\r\n" + hidden, True
    if shape == 8:  # header injection: bare CR / LF / NUL inside a header value
        sep = rng.choice([b"\r", b"\n", b"\x00", b"\r\r\n", b"\n\r"])
        inj = rng.choice([b"Transfer-Encoding: chunked", b"Content-Length: 5", b"Host: evil"])
        return start + b"X-A: a" + sep + inj + b"\r\n\r\n" + b"0\r\n\r\n" + hidden, True
    if shape == 9:  # chunked in HTTP/1.0, CL in HTTP/1.0
        v = rng.choice([te_std, b"Content-Length: 5\r\n", te_std + b"Connection: keep-alive\r\n"])
        req = method + b" " + url + b" HTTP/1.0\r\n" + host + v + b"\r\n5\r\nhello\r\n0\r\n\r\n"
        return req + hidden, v.startswith(b"Transfer")
    if shape == 10:  # Expect: 100-continue with a hidden request in or after the body
        body = b"0\r\n\r\n" + hidden
        fr = rng.choice([b"Content-Length: %d\r\n" % len(body), te_std,
                         b"Content-Length: 5\r\n" + te_std])
        return start + b"Expect: 100-continue\r\n" + fr + b"\r\n" + body, fr.count(b"\r\n") > 1
    if shape == 11:  # Upgrade on a plain HTTP pool, the rest right behind
        up = rng.choice([b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
                         b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                         b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
                         b"Connection: upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"])
        return b"GET " + url + b" HTTP/1.1\r\n" + host + up + b"\r\n" + hidden, False
    if shape == 12:  # Connection header naming framing headers
        v = rng.choice([b"Content-Length", b"Transfer-Encoding", b"Host", b"close, Content-Length",
                        b"keep-alive, X-A"])
        return start + b"Connection: " + v + b"\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello" + hidden, False
    if shape == 13:  # a body that is itself a request, under a correct Content-Length
        return start + b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden, False
    if shape == 14:  # Content-Length with a chunked body and no TE, and the reverse
        if rng.random() < 0.5:
            body = b"5\r\nhello\r\n0\r\n\r\n"
            return start + b"Content-Length: 3\r\n\r\n" + body + hidden, False
        return start + te_std + b"\r\nhello" + hidden, False
    # shape 15: multiple Host headers / odd Host values
    hv = rng.choice([b"Host: a\r\nHost: b\r\n", b"Host: a b\r\n", b"Host: a/b\r\n", b"Host: \r\n",
                     b"Host: a\x00\r\n", b"Host: a@b\r\n", b"Host:a\r\n", b"Host: [::1\r\n",
                     b"Host: localhost:99999\r\n", b"HOST: a\r\nhost: a\r\n"])
    req = method + b" " + url + b" HTTP/1.1\r\n" + hv + b"Content-Length: 0\r\n\r\n"
    return req + hidden, hv.count(b"\r\n") > 1


def odd_line_case(rng, tag):
    url = "/echo/%s-f" % tag
    host = "Host: %s\r\n" % rng.choice(HOSTS)
    kind = rng.randrange(10)
    if kind == 0:  # HTTP/0.9-looking
        return ("GET %s\r\n" % url + rng.choice(["", "\r\n", host + "\r\n"])).encode("latin-1")
    if kind == 1:  # absolute-form and other target forms
        target = rng.choice(["http://localhost" + url, "https://x:443" + url, "//x" + url, "*",
                             "x" + url, url + "#frag", url + "/../../stats", url + "%00",
                             url + "?a=\x7f", url + "\xff", url + "?" + "q" * 100, "localhost:80",
                             "/" + url, url.replace("/", "\\")])
        m = rng.choice(["GET", "OPTIONS", "CONNECT", "POST"])
        return ("%s %s HTTP/1.1\r\n%s\r\n" % (m, target, host)).encode("latin-1")
    if kind == 2:  # versions
        return ("GET %s %s\r\n%s\r\n" % (url, rng.choice(VERSIONS), host)).encode("latin-1")
    if kind == 3:  # random method tokens
        m = rng.choice(METHODS) if rng.random() < 0.7 else "".join(
            chr(rng.randrange(33, 127)) for _ in range(rng.randint(1, 12)))
        body = "hello" if rng.random() < 0.5 else ""
        cl = "Content-Length: %d\r\n" % len(body) if body else ""
        return ("%s %s HTTP/1.1\r\n%s%s\r\n%s" % (m, url, host, cl, body)).encode("latin-1")
    if kind == 4:  # very long lines
        n = rng.choice([MAX_HEADER_BYTES - 200, MAX_HEADER_BYTES + 10, 3 * MAX_HEADER_BYTES, 70000])
        where = rng.randrange(4)
        if where == 0:
            return ("GET %s?%s HTTP/1.1\r\n%s\r\n" % (url, "a" * n, host)).encode()
        if where == 1:
            return ("GET %s HTTP/1.1\r\n%sX-Long: %s\r\n\r\n" % (url, host, "v" * n)).encode()
        if where == 2:
            return ("GET %s HTTP/1.1\r\n%sX-%s: v\r\n\r\n" % (url, host, "n" * n)).encode()
        return ("GET %s HTTP/1.1\r\n%s%s\r\n" % (url, host, "".join(
            "X-H%d: %s\r\n" % (k, "v" * 30) for k in range(n // 40)))).encode()
    if kind == 5:  # whitespace in the request line
        sep = rng.choice(["  ", "\t", " \t", "\x0b", "\x0c", "\r", " \r\n "])
        where = rng.randrange(3)
        parts = ["GET", url, "HTTP/1.1"]
        line = (sep.join(parts) if where == 0 else
                parts[0] + " " + parts[1] + sep + parts[2] if where == 1 else
                parts[0] + sep + parts[1] + " " + parts[2])
        return ("%s\r\n%s\r\n" % (line, host)).encode("latin-1")
    if kind == 6:  # empty lines before the request line, or trailing junk after the head
        pre = rng.choice(["\r\n", "\r\n\r\n", "\n", " \r\n", "\x00\r\n"])
        post = rng.choice(["", "\r\n", "\r\n\r\n", "junk", "\x00"])
        return ("%sGET %s HTTP/1.1\r\n%s\r\n%s" % (pre, url, host, post)).encode("latin-1")
    if kind == 7:  # too many headers, and header-count right at the limit
        n = rng.choice([MAX_HEADERS - 1, MAX_HEADERS, MAX_HEADERS + 1, 200])
        hs = "".join("X-H%d: v\r\n" % k for k in range(n))
        return ("GET %s HTTP/1.1\r\n%s%s\r\n" % (url, host, hs)).encode()
    if kind == 8:  # bodies at and over the limit
        n = rng.choice([MAX_BODY, MAX_BODY + 1, 2 * MAX_BODY])
        if rng.random() < 0.5:
            return ("POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (url, host, n)).encode() + b"b" * n
        body = b"b" * n
        return ("POST %s HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\n\r\n" % (url, host)).encode() + \
            h.chunked(body, [rng.choice([1000, 4096, 30000])])
    # kind 9: control characters and 8-bit bytes in names and values
    c = rng.choice(["\x00", "\x01", "\x7f", "\x80", "\xff", "\x1b", "\x0b", "\x0c"])
    line = rng.choice(["X-A: a%sb\r\n" % c, "X-%sA: b\r\n" % c, "%s: v\r\n" % c, "X-A:%s\r\n" % c])
    return ("GET %s HTTP/1.1\r\n%s%s\r\n" % (url, host, line)).encode("latin-1")


# ---------------------------------------------------------------------------------------
# Mutations


SPECIALS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x7f", b"\xff",
            b"\x0b", b"\x0c", b"\"", b"\r\n\r\n", b"\r\n ", b"\r\n\t", b"0", b"-", b"/", b"?"]
INSERT_HEADERS = [b"Transfer-Encoding: chunked\r\n", b"Content-Length: 0\r\n",
                  b"Content-Length: 7\r\n", b"Host: other\r\n", b"Expect: 100-continue\r\n",
                  b"Connection: close\r\n", b"Transfer-Encoding: identity\r\n",
                  b"Upgrade: websocket\r\nConnection: Upgrade\r\n", b"Expect: 200-ok\r\n",
                  b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked, chunked\r\n",
                  b" x\r\n", b":\r\n", b"\r\n"]
WEIRD_NUMBERS = [b"0", b"1", b"00", b"-1", b"+1", b"65536", b"99999999999999999999",
                 b"ffffffffffffffff", b"0x10", b"1 1", b"", b"4294967296", b"32769", b"7fffffff"]


def structural_pos(rng, data):
    """A position next to a byte that separates things (':', ' ', CR, LF, ';', digits)."""
    cands = [i for i, b in enumerate(data[:8192]) if b in b": \r\n;,0123456789"]
    if not cands:
        return rng.randrange(len(data) + 1)
    return min(len(data), max(0, rng.choice(cands) + rng.choice((-1, 0, 0, 1))))


def mutate(rng, data):
    d = bytearray(data)
    ops = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if not d:
            d = bytearray(b"\r\n")
        pos = structural_pos(rng, d) if rng.random() < 0.5 else rng.randrange(len(d) + 1)
        posi = min(pos, len(d) - 1)
        op = rng.choices(["flip", "bit", "insert", "delete", "dupline", "dropline", "swaplines",
                          "crlf", "number", "long", "case", "header", "repeat", "truncate"],
                         weights=[10, 6, 14, 8, 8, 8, 4, 8, 10, 2, 4, 10, 4, 2])[0]
        ops.append(op)
        if op == "flip":
            d[posi] = rng.randrange(256)
        elif op == "bit":
            d[posi] ^= 1 << rng.randrange(8)
        elif op == "insert":
            d[pos:pos] = rng.choice(SPECIALS)
        elif op == "delete":
            del d[posi:posi + rng.randint(1, 8)]
        elif op in ("dupline", "dropline", "swaplines"):
            lines = bytes(d).split(b"\r\n")
            if len(lines) < 3:
                continue
            i = rng.randrange(1, len(lines) - 1)
            if op == "dupline":
                lines.insert(i, lines[i])
            elif op == "dropline":
                del lines[i]
            else:
                j = rng.randrange(0, len(lines) - 1)
                lines[i], lines[j] = lines[j], lines[i]
            d = bytearray(b"\r\n".join(lines))
        elif op == "crlf":
            idx = [m.start() for m in re.finditer(rb"\r\n", bytes(d))]
            if idx:
                i = rng.choice(idx)
                d[i:i + 2] = rng.choice([b"\n", b"\r", b"\n\r", b"\r\r\n", b"\r\n\r\n", b""])
        elif op == "number":
            runs = [m.span() for m in re.finditer(rb"[0-9a-fA-F]+", bytes(d))]
            if runs:
                a, b = rng.choice(runs)
                d[a:b] = rng.choice(WEIRD_NUMBERS)
        elif op == "long":
            d[pos:pos] = bytes([rng.choice(b"aA0-")]) * rng.choice([100, 1000, MAX_HEADER_BYTES + 1])
        elif op == "case":
            if d and chr(d[posi]).isascii() and chr(d[posi]).isalpha():
                d[posi] ^= 0x20
        elif op == "header":
            first = bytes(d).find(b"\r\n")
            at = first + 2 if first >= 0 and rng.random() < 0.7 else pos
            d[at:at] = rng.choice(INSERT_HEADERS)
        elif op == "repeat":
            n = rng.randint(1, 40)
            d[pos:pos] = d[max(0, pos - n):pos]
        elif op == "truncate":
            del d[max(1, posi):]
    return bytes(d), ops


# ---------------------------------------------------------------------------------------
# Cases


class Segment:
    """Bytes sent as a unit. `expect` (a list of Req) when the requests are clean: the next
    segment waits for their answers. `writes`: [(gap_ms, bytes)]."""

    def __init__(self, data, expect=None):
        self.data = data
        self.expect = expect
        self.writes = None


class Case:
    def __init__(self, idx, kind, segments, must_reject=False, note=""):
        self.idx, self.kind, self.segments = idx, kind, segments
        self.must_reject = must_reject
        self.note = note

    def fuzz_bytes(self):
        return b"".join(s.data for s in self.segments if s.expect is None)

    def all_bytes(self):
        return b"".join(s.data for s in self.segments)


def split_writes(rng, data, allow_bytewise):
    mode = rng.random()
    if mode < 0.45 or len(data) <= 1:
        return [(0, data)]
    if mode < 0.75:  # a few random cuts
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
    elif mode < 0.87:  # at every line break, and inside them
        cuts = sorted({i + rng.choice((0, 1, 2)) for i in range(len(data)) if data[i:i + 1] == b"\n"})
        cuts = [c for c in cuts if 0 < c < len(data)]
    elif allow_bytewise and len(data) <= 400:  # byte by byte
        cuts = list(range(1, len(data)))
    else:  # many small pieces
        step = max(1, len(data) // 40)
        cuts = list(range(step, len(data), step))
    out = []
    last = 0
    for c in cuts + [len(data)]:
        if c > last:
            out.append((1 if out else 0, data[last:c]))
            last = c
    return out


def make_case(idx):
    rng = random.Random(SEED * 1000003 + idx)
    tag = tag_of(idx)
    segs = []
    r = rng.random()
    if r < 0.10:
        kind = "clean"
    elif r < 0.38:
        kind = "smuggle"
    elif r < 0.49:
        kind = "oddline"
    elif r < 0.56:
        kind = "abort"
    elif r < 0.58:
        kind = "deep"
    else:
        kind = "mutate"
    must_reject = False
    note = ""

    # clean requests first on the same keep-alive connection, answered before the rest
    prefix = rng.choice((0, 0, 0, 1, 2, 3)) if kind != "clean" else rng.randint(1, 3)
    for k in range(prefix):
        reqs = clean_pipeline(rng, tag, "k%d-" % k, rng.choice((1, 1, 2, 3)))
        segs.append(Segment(b"".join(r.data for r in reqs), reqs))

    abort = None
    if kind == "clean":
        reqs = clean_pipeline(rng, tag, "c", rng.randint(1, 5), close_last=rng.random() < 0.4)
        segs.append(Segment(b"".join(r.data for r in reqs), reqs))
    elif kind == "deep":  # a long pipeline in one go, possibly cut short by a bad request
        reqs = clean_pipeline(rng, tag, "d", rng.randint(20, 120))
        data = b"".join(r.data for r in reqs)
        if rng.random() < 0.5:
            data, ops = mutate(rng, data)
            note = "+".join(ops)
            segs.append(Segment(data))
        else:
            segs.append(Segment(data, reqs))
    elif kind == "abort":
        # clean requests cut anywhere, then the client goes away (RST, or FIN and reading on)
        # while the gateway parses, waits for the upstream, or writes the answers
        reqs = clean_pipeline(rng, tag, "a", rng.randint(1, 4))
        data = b"".join(r.data for r in reqs)
        data = data[:rng.randint(1, len(data))]
        segs.append(Segment(data))
        abort = (rng.choice(("rst", "rst", "fin")), rng.choice((0, 0, 1, 2, 5, 20)) / 1000.0)
        note = "%s after %.0f ms, %d of %d bytes" % (abort[0], abort[1] * 1000, len(data),
                                                     sum(len(r.data) for r in reqs))
    else:
        if kind == "smuggle":
            data, must_reject = smuggle_case(rng, tag)
        elif kind == "oddline":
            data = odd_line_case(rng, tag)
        else:
            reqs = clean_pipeline(rng, tag, "m", rng.choice((1, 1, 1, 2, 3, 4, 5)))
            data, ops = mutate(rng, b"".join(r.data for r in reqs))
            note = "+".join(ops)
        segs.append(Segment(data))
        if rng.random() < 0.3:  # a clean probe right behind, not waited for
            segs.append(Segment(b"GET /echo/%s-p HTTP/1.1\r\nHost: x\r\n\r\n" % tag.encode()))
    for s in segs:
        s.writes = split_writes(rng, s.data, allow_bytewise=s.expect is None and len(s.data) < 2000)
    case = Case(idx, kind, segs, must_reject, note)
    case.abort = abort
    return case


# ---------------------------------------------------------------------------------------
# Response parsing (strict: what the gateway writes must be well-formed)


class Malformed(Exception):
    pass


class Incomplete(Exception):
    pass


TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
STATUS_RE = re.compile(rb"^HTTP/1\.1 ([1-5][0-9][0-9]) ([\t \x21-\x7e\x80-\xff]*)$")


class Resp:
    def __init__(self, status, headers, body, framing):
        self.status, self.headers, self.body, self.framing = status, headers, body, framing
        self.interim = []

    def header(self, name, default=None):
        name = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == name:
                return v.decode("latin-1")
        return default

    def header_all(self, name):
        name = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == name]

    def closes(self):
        return any("close" in [t.strip().lower() for t in v.split(",")]
                   for v in self.header_all("connection"))

    @property
    def upstream(self):
        return self.header("x-mock-instance") is not None

    def json(self):
        return json.loads(self.body.decode("latin-1"))

    def __repr__(self):
        return "<%d %s %r>" % (self.status, "upstream" if self.upstream else "gateway", self.body[:160])


def _line(buf, pos):
    i = buf.find(b"\r\n", pos)
    if i < 0:
        raise Incomplete()
    return bytes(buf[pos:i]), i + 2


def parse_one(buf, pos, eof):
    """One response (1xx included) at pos: (Resp, new pos)."""
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        if b"\n" in buf[pos:] and not buf[pos:].startswith(b"HTTP/1.1 "[:len(buf) - pos]):
            raise Malformed("not a status line: %r" % bytes(buf[pos:pos + 80]))
        raise Incomplete()
    lines = bytes(buf[pos:end]).split(b"\r\n")
    m = STATUS_RE.match(lines[0])
    if not m:
        raise Malformed("bad status line %r" % lines[0][:100])
    status = int(m.group(1))
    headers = []
    for ln in lines[1:]:
        name, sep, value = ln.partition(b":")
        if not sep or not TOKEN_RE.match(name):
            raise Malformed("bad header line %r" % ln[:100])
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise Malformed("control character in header %r" % ln[:100])
        headers.append((name, value.strip(b" \t")))
    pos = end + 4
    r = Resp(status, headers, b"", "none")
    if 100 <= status < 200 or status in (204, 304):
        return r, pos
    te = r.header_all("transfer-encoding")
    cl = r.header_all("content-length")
    if te and cl:
        raise Malformed("response with both Transfer-Encoding and Content-Length")
    if te:
        if [t.strip().lower() for t in te] != ["chunked"]:
            raise Malformed("response transfer-encoding %r" % te)
        r.framing = "chunked"
        parts = []
        while True:
            ln, pos = _line(buf, pos)
            if not re.match(rb"^[0-9a-fA-F]{1,16}$", ln):
                raise Malformed("bad chunk size line %r" % ln[:60])
            n = int(ln, 16)
            if n == 0:
                while True:
                    t, pos = _line(buf, pos)
                    if t == b"":
                        break
                break
            if len(buf) < pos + n + 2:
                raise Incomplete()
            parts.append(bytes(buf[pos:pos + n]))
            if buf[pos + n:pos + n + 2] != b"\r\n":
                raise Malformed("chunk data not followed by CRLF")
            pos += n + 2
        r.body = b"".join(parts)
        return r, pos
    if cl:
        if len(cl) != 1 or not re.match(r"^[0-9]{1,15}$", cl[0]):
            raise Malformed("response content-length %r" % cl)
        n = int(cl[0])
        if len(buf) < pos + n:
            raise Incomplete()
        r.framing = "length"
        r.body = bytes(buf[pos:pos + n])
        return r, pos + n
    # close-delimited: only with Connection: close, and only the last thing on the connection
    if not r.closes():
        raise Malformed("response without framing and without Connection: close")
    if not eof:
        raise Incomplete()
    r.framing = "close"
    r.body = bytes(buf[pos:])
    return r, len(buf)


def parse_stream(buf, eof):
    """Final responses (1xx attached to the next one's .interim), the position parsed to, and
    the error that stopped parsing (None, 'incomplete' or a Malformed message)."""
    out = []
    interim = []
    pos = 0
    while pos < len(buf):
        try:
            r, pos = parse_one(buf, pos, eof)
        except Incomplete:
            return out, pos, "incomplete"
        except Malformed as e:
            return out, pos, str(e)
        if 100 <= r.status < 200:
            interim.append(r)
            continue
        r.interim = interim
        interim = []
        out.append(r)
    return out, pos, ("incomplete" if interim else None)


# ---------------------------------------------------------------------------------------
# Running many cases at once


class Run:
    """One case's connection, driven by the selector loop."""

    def __init__(self, case, port, now):
        self.case = case
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.rx = bytearray()
        self.sent = bytearray()
        self.eof = self.rst = self.write_closed = False
        self.seg = -1
        self.writes = collections.deque()
        self.next_at = now
        self.need = 0        # final responses the clean segments so far must get
        self.waiting = False  # the next segment waits for `need` responses
        self.last_io = now
        self.t0 = now
        self.done = False
        self.hung = False
        self.aborted = None   # "rst" once the client reset its connection, "fin" once it shut
        self.abort_at = None
        self._next_segment(now)

    def _next_segment(self, now):
        self.seg += 1
        if self.seg >= len(self.case.segments):
            return
        s = self.case.segments[self.seg]
        self.writes = collections.deque(s.writes)
        self.next_at = now + self.writes[0][0] / 1000.0

    def all_sent(self):
        return self.seg >= len(self.case.segments)

    def pump(self, now):
        if self.case.abort and self.aborted is None:
            if self.all_sent() or self.write_closed:
                mode, delay = self.case.abort
                if self.abort_at is None:
                    self.abort_at = now + delay
                if now >= self.abort_at:
                    self.aborted = mode
                    if mode == "rst":
                        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.eof = True  # nothing more to read: finish() closes the socket
                    else:
                        try:
                            self.sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                    self.last_io = now
                return
        while not self.all_sent() and not self.write_closed:
            if self.waiting:
                finals, _, _ = parse_stream(self.rx, False)
                if len(finals) < self.need:
                    return
                self.waiting = False
                self._next_segment(now)
                continue
            if not self.writes:
                s = self.case.segments[self.seg]
                if s.expect is not None:
                    self.need += len(s.expect)
                    self.waiting = True
                    continue
                self._next_segment(now)
                continue
            if now < self.next_at:
                return
            gap, data = self.writes[0]
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.write_closed = True
                return
            self.sent += data[:n]
            self.last_io = now
            if n < len(data):
                self.writes[0] = (0, data[n:])
                return
            self.writes.popleft()
            if self.writes:
                self.next_at = now + self.writes[0][0] / 1000.0

    def on_read(self, now):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.rst = True
            self.eof = True
            return
        if not data:
            self.eof = True
            return
        self.rx += data
        self.last_io = now

    def wake_at(self):
        if self.abort_at is not None and self.aborted is None:
            return self.abort_at
        if self.all_sent() or self.write_closed or self.waiting or not self.writes:
            return None
        return self.next_at

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


GATEWAY_OK = {400, 404, 405, 408, 413, 414, 417, 431, 501, 505}

class Results:
    def __init__(self):
        self.failures = []
        self.statuses = collections.Counter()
        self.upstream = collections.Counter()   # case -> upstream responses its client got
        self.seen_urls = collections.defaultdict(collections.Counter)  # case -> targets echoed
        self.wild = collections.Counter()  # case -> upstream answers that name no target
        self.rst = 0
        self.aborted = set()  # cases whose client went away: their requests may go unanswered


def describe(case, run=None, extra=""):
    s = "seed=%d case=%d kind=%s%s" % (SEED, case.idx, case.kind,
                                       (" ops=" + case.note) if case.note else "")
    s += "\n    sent: %r" % (case.all_bytes()[:700],)
    if run is not None:
        s += "\n    writes: %r" % ([len(d) for seg in case.segments for _, d in seg.writes][:40],)
        s += "\n    got: %r" % (bytes(run.rx[:900]),)
    return s + extra


def target_from_error(body_json):
    msg = body_json.get("error", {}).get("message", "")
    if msg.startswith("no route for "):
        return msg[len("no route for "):]
    return None


def check_run(run, res):
    """The per-case invariants; returns a list of problems."""
    case = run.case
    probs = []
    if run.hung:
        probs.append("no close within %.0fs of the last byte (hang); %d bytes received"
                     % (HANG_S, len(run.rx)))
        return probs
    finals, pos, err = parse_stream(run.rx, True)
    if run.rst:
        res.rst += 1
    if case.abort:
        # the client went away: what it read before that must parse, nothing more is owed;
        # the requests it sent may have reached the upstream unanswered
        res.aborted.add(case.idx)
        if err and err != "incomplete":
            probs.append("response stream does not parse at byte %d: %s" % (pos, err))
        for r in finals:
            res.statuses[(r.status, "up" if r.upstream else "gw")] += 1
            if r.upstream:
                res.upstream[case.idx] += 1
            elif r.status not in GATEWAY_OK:
                probs.append("gateway answered %d to an aborted client" % r.status)
        return probs
    if err:
        probs.append("response stream does not parse at byte %d: %s%s"
                     % (pos, err, " (connection reset)" if run.rst else ""))
    clean = [r for s in case.segments if s.expect is not None for r in s.expect]
    sent = bytes(run.sent)
    for i, r in enumerate(finals):
        res.statuses[(r.status, "up" if r.upstream else "gw")] += 1
        for it in r.interim:
            if it.status != 100:
                probs.append("response %d: unexpected interim %d" % (i, it.status))
        if r.closes() and i != len(finals) - 1:
            probs.append("response %d has Connection: close but response %d follows" % (i, i + 1))
        if r.upstream:
            res.upstream[case.idx] += 1
            try:
                j = r.json()
            except ValueError:
                j = None
            if isinstance(j, dict) and "url" in j:
                url = j["url"].encode("latin-1", "replace")
                res.seen_urls[case.idx][url] += 1
                # the gateway re-serializes the request line; llhttp (RFC 9112 3 allows it)
                # takes runs of spaces after the target
                if not re.search(re.escape(j["method"].encode()) + rb" " + re.escape(url) + rb" +HTTP/1\.",
                                 sent):
                    probs.append("response %d: the upstream got %s %r, which the client never sent"
                                 % (i, j["method"], url))
            elif isinstance(j, dict) and target_from_error(j) is not None:
                res.seen_urls[case.idx][target_from_error(j).encode("latin-1", "replace")] += 1
                if j["error"].get("type") == "invalid_request_error":
                    probs.append("response %d: the gateway forwarded a request the upstream could "
                                 "not parse: %r" % (i, r.body[:200]))
            else:
                res.wild[case.idx] += 1
                if isinstance(j, dict) and j.get("error", {}).get("type") == "invalid_request_error":
                    probs.append("response %d: the gateway forwarded a request the upstream could "
                                 "not parse: %r" % (i, r.body[:200]))
        else:
            if r.status not in GATEWAY_OK:
                probs.append("response %d: gateway answered %d (a bad request must get a 4xx)"
                             % (i, r.status))
            try:
                j = r.json()
                err_obj = j["error"]
                ok = isinstance(err_obj, dict) and isinstance(err_obj.get("type"), str) \
                    and isinstance(err_obj.get("message"), str)
            except (ValueError, KeyError, TypeError):
                ok, err_obj = False, None
            if not ok:
                probs.append("response %d: gateway %d without a JSON error body: %r"
                             % (i, r.status, r.body[:200]))
            elif not (r.header("content-type", "").lower().startswith("application/json")):
                probs.append("response %d: gateway error content-type %r" % (i, r.header("content-type")))
            else:
                rid = r.header("x-request-id")
                if not rid or err_obj.get("request_id") != rid:
                    probs.append("response %d: x-request-id %r vs error.request_id %r"
                                 % (i, rid, err_obj.get("request_id")))
            if r.status == 400:
                if i != len(finals) - 1:
                    probs.append("response %d: 400 and then another response on the connection" % i)
                if not r.closes():
                    probs.append("response %d: 400 without Connection: close" % i)
    # clean requests: their echoes, first and in order
    for k, want in enumerate(clean):
        if k >= len(finals):
            probs.append("clean request %d (%s %s) got no response" % (k, want.method, want.url))
            break
        r = finals[k]
        try:
            j = r.json() if r.upstream and r.status == 200 else None
        except ValueError:
            j = None
        if j is None or j.get("url") != want.url or j.get("method") != want.method or \
                j.get("body_sha256") != hashlib.sha256(want.body).hexdigest():
            probs.append("clean request %d (%s %s, %d body bytes) got %r"
                         % (k, want.method, want.url, len(want.body), r))
    if case.kind == "clean" and len(finals) != len(clean):
        probs.append("%d responses to %d clean requests" % (len(finals), len(clean)))
    if case.must_reject:
        extra = finals[len(clean):]
        if extra and extra[0].upstream:
            probs.append("an ambiguous request was forwarded instead of rejected: %r" % extra[0])
    return probs


# ---------------------------------------------------------------------------------------
# The test


class FuzzHttpTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.mock = cls.env.mock("m", args=["--verbose"])
        limits = {
            "max_header_bytes": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
            "max_body_bytes": MAX_BODY,
            "header_timeout_ms": HEADER_TIMEOUT_MS,
            "idle_timeout_ms": IDLE_TIMEOUT_MS,
            "drain_timeout_ms": 1000,
        }
        pool = h.make_pool([cls.mock], keepalive={"max_idle": 16})
        cfg = h.make_config({"p": pool}, [{"path": "/", "pool": "p"}], limits=limits, watch=False)
        cls.sluice = cls.env.sluice(cfg)
        cls.port = cls.sluice.port

    def status(self):
        return self.sluice.status()

    def assert_serving(self):
        with h.RawConn(self.port) as c:
            r = c.request("POST", "/echo/after-fuzz", body=b"still fine")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body_sha256"], h.sha256(b"still fine"))

    def mock_log_size(self):
        return os.path.getsize(os.path.join(self.mock.dir, "stderr.log"))

    def mock_log_requests(self, start=0):
        """(method, target) of every request the mock served, from its --verbose log (from
        byte `start` on)."""
        out = []
        with open(os.path.join(self.mock.dir, "stderr.log"), "rb") as f:
            f.seek(start)
            text = f.read()
        for ln in text.split(b"\n"):
            m = re.match(rb"^sluice-mock m: (\S+) (.*) -> \S+ .*\(\d+ ms\)$", ln)
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def run_cases(self, cases):
        res = Results()
        sel = selectors.DefaultSelector()
        pending = collections.deque(cases)
        active = {}
        t_start = time.monotonic()

        def finish(run):
            sel.unregister(run.sock)
            run.close()
            del active[run.sock]
            for p in check_run(run, res):
                res.failures.append("%s\n    -> %s" % (describe(run.case, run), p))

        while pending or active:
            now = time.monotonic()
            while pending and len(active) < CONCURRENCY:
                run = Run(pending.popleft(), self.port, now)
                active[run.sock] = run
                sel.register(run.sock, selectors.EVENT_READ, run)
                run.pump(now)
            wake = [w for w in (r.wake_at() for r in active.values()) if w is not None]
            timeout = 0.05 if not wake else max(0.0, min(0.05, min(wake) - now))
            for key, _ in sel.select(timeout):
                key.data.on_read(time.monotonic())
            now = time.monotonic()
            for run in list(active.values()):
                if not run.eof:
                    run.pump(now)
                if run.eof:
                    finish(run)
                elif now - run.last_io > HANG_S:
                    run.hung = True
                    finish(run)
            if not self.sluice.alive():
                inflight = sorted(r.case.idx for r in active.values())
                self.fail("sluice died (rc %s) with cases %s in flight:\n%s\n%s" % (
                    self.sluice.proc.returncode, inflight,
                    "\n".join(describe(r.case) for r in active.values())[:20000],
                    h.sanitizer_report(self.sluice.log_text()) or "\n".join(self.sluice.lines[-40:])))
            if len(res.failures) > 200:
                break
        sel.close()
        res.elapsed = time.monotonic() - t_start
        return res

    def check_upstream_log(self, cases, res, log_start):
        """(d) across the run: what the upstream served, attributed to cases by tag."""
        by_idx = {c.idx: c for c in cases}
        stats = self.mock.stats()
        total = stats["requests"]
        got = h.wait_for(lambda: (lambda l: l if len(l) >= total else None)(
            self.mock_log_requests(log_start)),
                         10, what="the mock to log %d requests" % total)
        probs = []
        per_case = collections.defaultdict(list)
        untagged = 0
        for method, url in got:
            i = case_of_target(url)
            if i is None or i not in by_idx:
                untagged += 1
                continue
            per_case[i].append((method, url))
        aborted_served = 0
        for i, reqs in sorted(per_case.items()):
            if i in res.aborted:
                aborted_served += len(reqs) - res.upstream.get(i, 0)
                continue
            seen = collections.Counter(res.seen_urls.get(i, {}))
            wild = res.wild.get(i, 0)
            unmatched = []
            for method, url in reqs:
                if seen[url] > 0:
                    seen[url] -= 1
                elif wild > 0:
                    wild -= 1
                else:
                    unmatched.append((method, url))
            if len(reqs) > res.upstream.get(i, 0) or unmatched:
                probs.append("%s\n    -> SMUGGLING: the upstream served %d request(s) of this case "
                             "but its client got %d upstream response(s); unanswered: %r"
                             % (describe(by_idx[i]), len(reqs), res.upstream.get(i, 0), unmatched))
        answered = sum(res.upstream.values()) + aborted_served
        if total > answered:
            probs.append("SMUGGLING: the upstream served %d requests in all, the clients got %d "
                         "upstream responses (%d requests carried no case tag)"
                         % (total, answered, untagged))
        return probs, total, untagged

    def test_fuzz_requests(self):
        self.mock.reset_stats()
        log_start = self.mock_log_size()
        idxs = ONLY or list(range(N_CASES))
        cases = [make_case(i) for i in idxs]
        res = self.run_cases(cases)
        probs, total, untagged = self.check_upstream_log(cases, res, log_start)
        kinds = collections.Counter(c.kind for c in cases)
        sys.stderr.write("fuzz_http: seed %d, %d cases %s in %.1fs; upstream served %d (%d untagged); "
                         "%d resets; responses %s\n" % (
                             SEED, len(cases), dict(kinds), res.elapsed, total, untagged, res.rst,
                             dict(sorted(res.statuses.items()))))
        all_probs = res.failures + probs
        if all_probs:
            self.fail("%d problem(s) (seed %d); first ones:\n\n%s" % (
                len(all_probs), SEED, "\n\n".join(all_probs[:15])))

        # (e) still serving, nothing held, no sanitizer report
        self.assertTrue(self.sluice.alive())
        self.assert_serving()
        self.assertSettled(self.sluice)


    # --- minimal reproducers of what the fuzzing found ------------------------------------

    def exchange(self, data):
        with h.RawConn(self.port, timeout=5) as c:
            c.send(data)
            r = c.read_response("POST")
            return r, c

    def test_obs_fold_after_empty_value_is_rejected(self):
        """obs-fold is rejected also when the folded header's first line has an empty value:
        llhttp drops the continuation's leading whitespace there, and "Content-Length:\r\n 5"
        used to be forwarded as Content-Length: 5 (a front proxy may read it otherwise)."""
        for data in (b"POST /echo/fold HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n 5\r\n\r\nhello",
                     b"POST /echo/fold-te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked"
                     b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                     b"GET /echo/fold-host HTTP/1.1\r\nHost:\r\n evil.example\r\n\r\n"):
            with self.subTest(data=data):
                self.mock.reset_stats()
                r, c = self.exchange(data)
                self.assertEqual(r.status, 400, r)
                self.assertIn("folding", r.json()["error"]["message"])
                self.assertEqual(self.mock.stats()["requests"], 0)

    def test_chunk_extension_list_fails_safe(self):
        """llhttp 8.1.0 (Debian 12's, which the gateway compiles) rejects a chunk extension
        with an unquoted value followed by another one ("5;a=1;b", valid per RFC 9112 7.1.1)
        with 400; a newer llhttp accepts it. Either way nothing ambiguous is forwarded."""
        self.mock.reset_stats()
        r, c = self.exchange(b"POST /echo/ext HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5;a=1;b\r\nhello\r\n0\r\n\r\n")
        if r.status == 400:
            self.assertEqual(self.mock.stats()["requests"], 0)
        else:
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body_sha256"], h.sha256(b"hello"))

if __name__ == "__main__":
    unittest.main()
