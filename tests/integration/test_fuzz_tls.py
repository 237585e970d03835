"""Seeded robustness fuzzing of TLS, both ways, against the real gateway.

Downstream (clients -> sluice's TLS listener), one client connection per case, many cases at
once on a thread pool; the case kinds are cycled so each runs several times with seeded
variation (TLS 1.2 or 1.3, ALPN, SNI, how the bytes are split into TCP writes and TLS records):
  garbage        random bytes or plausible record headers instead of a ClientHello
  plain_http     plaintext HTTP (and an HTTP/2 preface) sent to the TLS port
  hello_mutated  a real ClientHello (Python's ssl over memory BIOs) with flipped bytes,
                 truncation, inflated or zeroed length fields, duplicated / dropped / unknown /
                 reordered extensions, a padding extension up to ~70 KB spread over several
                 records; then silence, a FIN, or the rest of the handshake
  hello_split    a valid ClientHello re-fragmented into 1-byte or random-size handshake records
                 and 1-byte or random TCP writes; the handshake completes and a request is
                 served
  abort_fin/rst  the client goes away (FIN or RST) at every stage: before any byte, inside the
                 ClientHello, after it, after the server's flight, inside its Finished flight,
                 after the handshake, inside a request, with a request in flight, mid-response
  bad_record     after the handshake: an application-data record with a bad MAC, a record over
                 16 KiB (header lengths up to 64 KiB), unknown or plaintext record types, a
                 record cut short then FIN, a bad record right behind a valid request
  pipelined      2-40 pipelined requests in one TLS record (or a few), answered in order
  tiny_records   one request (with a body) written in records of 1-3 bytes each
  stall          silence at each handshake stage and inside a request head: closed by
                 header_timeout_ms (a 408 inside a request head), not earlier, not never
  close_notify   close_notify, then garbage, plaintext HTTP, a new ClientHello or a record
                 sealed before it (out of sequence: Python's ssl cannot seal one after it); or a
                 request and close_notify in one segment
  alpn           ALPN lists without http/1.1 (h2 only, junk, 255-byte names) and odd SNI
  s_client       TLS 1.2 renegotiation (openssl s_client "R": refused, no crash) and TLS 1.3
                 KeyUpdate with and without update_requested (the connection keeps serving)
Checked for every case: the gateway closes the connection in bounded time (a hang is a
failure), never answers in plaintext on the TLS port, serves requests that are valid with the
right bytes, in order; and right after the case a fresh HTTPS request succeeds.

Upstream (sluice -> a TLS upstream written in Python), one request per case, in sequence:
  hs_garbage / hs_mutated / hs_truncated / hs_close
                 the upstream answers the ClientHello with garbage, its real server flight
                 mutated or cut short, or closes (FIN or RST) at a handshake stage; then FIN, RST
                 or silence
  hs_wrong_cert  a certificate for another host, a self-signed one, one for client auth only
  resp_*         after the handshake: responses in 1-byte or random-size TLS records (must be
                 served intact), a corrupted record before or after the response head, FIN,
                 RST or close_notify mid-body, a record over 16 KiB / a plaintext alert /
                 garbage mid-body, and a pooled idle connection that gets a bad record, an
                 unsolicited response, close_notify, FIN or RST
The gateway's client (plain or TLS listener, seeded) must get a 502 JSON error
(upstream_tls_failed for the handshake, upstream_reset / upstream_protocol_error after it, a 504
upstream_connect_timeout when the upstream goes silent mid-handshake) when nothing was relayed,
or a truncated response (never completed, never ended by a TLS close_notify) after the head;
a broken upstream connection must never carry another request and must be closed by the
gateway; the next non-replayable request on the pool must be served fresh.

At the end the gateway is alive, holds no client connection or exchange, and its log has no
sanitizer report (Env.close checks the exit too).

Bugs this suite found (fixed in 04f254a "TLS: clear OpenSSL's error queue before every call;
a truncated TLS body is not complete"), kept as minimal regression tests at the end:
 - a TLS read that failed inside the gateway (a broken record, a fatal alert, from a client or
   an upstream) left OpenSSL's per-thread error queue dirty, and the next TLS read of any
   other connection was then taken for an error: that connection was dropped mid-request;
 - a close-delimited upstream body cut by a broken record or by a TCP close without
   close_notify was relayed as complete.

Reproducing: SLUICE_FUZZ_SEED=N runs another seed; SLUICE_FUZZ_CASE=d12,u3 runs only those cases
(d = downstream, u = upstream; same bytes, same splits); SLUICE_FUZZ_TLS_CASES=D,U changes the
number of cases; SLUICE_FUZZ_TLS_STATS=1 prints how the cases ended, per kind;
SLUICE_FUZZ_TLS_LOG=debug sets the gateway's log level (SLUICE_IT_VERBOSE=1 prints its log).
ClientHello / server flights carry fresh randoms and key shares on every run: the seed fixes
every choice made about them (kinds, positions, values, splits), not their random fields."""

import collections
import hashlib
import os
import random
import re
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import unittest
import zlib
from concurrent.futures import ThreadPoolExecutor

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

SEED = int(os.environ.get("SLUICE_FUZZ_SEED", "4127"))
_COUNTS = [x for x in os.environ.get("SLUICE_FUZZ_TLS_CASES", "").split(",") if x.strip()]
N_DOWN = int(_COUNTS[0]) if _COUNTS else 280   # 20 per kind
N_UP = int(_COUNTS[1]) if len(_COUNTS) > 1 else 120   # 10 per kind
_ONLY = [x.strip().lower() for x in os.environ.get("SLUICE_FUZZ_CASE", "").split(",") if x.strip()]
ONLY_DOWN = [int(x[1:]) for x in _ONLY if x.startswith("d")]
ONLY_UP = [int(x[1:]) for x in _ONLY if x.startswith("u")]

HEADER_TIMEOUT_MS = 1000
IDLE_TIMEOUT_MS = 1000
CONNECT_TIMEOUT_MS = 800       # the "hs" pool: also bounds the upstream handshake
FIRST_BYTE_TIMEOUT_MS = 4000
HANG_S = HEADER_TIMEOUT_MS / 1000.0 + 4.0   # a client connection must be closed within this
CONCURRENCY = 8
RESP_MAX_IDLE = 4


class CaseTimeout(Exception):
    """The gateway did not answer or close within a case's bound."""


def rbytes(rng, n):
    return rng.randbytes(n)


def zlib_crc(text):
    return zlib.crc32(text.encode()) & 0xFFFF


# ---------------------------------------------------------------------------------------
# Certificates (openssl command line)


def _openssl(args, cwd):
    p = subprocess.run(["openssl"] + args, cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if p.returncode != 0:
        raise AssertionError("openssl %s failed: %s" % (" ".join(args), p.stderr.decode("utf-8", "replace")))


class Pki:
    """ca.pem; leaf certificates signed by it: srv (DNS:localhost, IP:127.0.0.1), other
    (DNS:other.example), clientonly (localhost, but extendedKeyUsage=clientAuth); and a
    self-signed one for localhost."""

    EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def __init__(self, d):
        os.makedirs(d, exist_ok=True)
        self.dir = d
        _openssl(["req", "-x509"] + self.EC + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                  "-subj", "/CN=sluice fuzz CA", "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
        self._leaf("srv", "localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth", 11)
        self._leaf("other", "other.example", "DNS:other.example", "serverAuth", 12)
        self._leaf("clientonly", "localhost", "DNS:localhost,IP:127.0.0.1", "clientAuth", 13)
        _openssl(["req", "-x509"] + self.EC + ["-keyout", "self.key", "-out", "self.pem", "-days", "2",
                  "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], d)
        self.ca = self.path("ca.pem")

    def _leaf(self, name, cn, san, eku, serial):
        with open(self.path(name + ".ext"), "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n" % (san, eku))
        _openssl(["req", "-new"] + self.EC + ["-keyout", name + ".key", "-out", name + ".csr",
                  "-subj", "/CN=" + cn], self.dir)
        _openssl(["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                  "-set_serial", str(serial), "-days", "2", "-extfile", name + ".ext",
                  "-out", name + ".pem"], self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)


def client_ctx(pki, maxv=None, alpn=None, check_hostname=True):
    ctx = ssl.create_default_context(cafile=pki.ca)
    # A close without close_notify must read as an error, not as a clean end.
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if not check_hostname:
        ctx.check_hostname = False
    if maxv is not None:
        ctx.maximum_version = maxv
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def server_ctx(pki, name="srv", maxv=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.path(name + ".pem"), pki.path(name + ".key"))
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if maxv is not None:
        ctx.maximum_version = maxv
    return ctx


V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


# ---------------------------------------------------------------------------------------
# TLS bytes: records, ClientHello surgery


def records_of(data):
    """Splits bytes into (type, version, payload) TLS records; a trailing partial record is
    dropped."""
    out = []
    p = 0
    while p + 5 <= len(data):
        n = struct.unpack(">H", data[p + 3:p + 5])[0]
        if p + 5 + n > len(data):
            break
        out.append((data[p], data[p + 1:p + 3], data[p + 5:p + 5 + n]))
        p += 5 + n
    return out


def record(ctype, ver, payload):
    return bytes([ctype]) + ver + struct.pack(">H", len(payload)) + payload


def pieces(rng, n, mode):
    """Sizes summing to n: one piece, 1-byte pieces, 1-8 byte pieces, or random cuts."""
    if n <= 0:
        return []
    if mode == "one":
        return [n]
    if mode == "bytes":
        return [1] * n
    if mode == "small":
        out = []
        while n > 0:
            k = min(n, rng.randint(1, 8))
            out.append(k)
            n -= k
        return out
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 12)))) if n > 1 else []
    edges = [0] + cuts + [n]
    return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]


def cut(data, sizes):
    out = []
    p = 0
    for s in sizes:
        out.append(data[p:p + s])
        p += s
    if p < len(data):
        out.append(data[p:])
    return out


def refragment(data, rng, mode):
    """The handshake records in `data` re-cut into records of 1 byte / small / random payloads
    (valid TLS: handshake messages may span records)."""
    recs = records_of(data)
    ctype, ver = recs[0][0], recs[0][1]
    payload = b"".join(p for _, _, p in recs)
    out = []
    for piece in cut(payload, pieces(rng, len(payload), mode)):
        out.append(record(ctype, ver, piece))
    return b"".join(out)


class Hello:
    """A ClientHello parsed into the fields before its extensions and the extension list."""

    def __init__(self, data):
        recs = records_of(data)
        if not recs or recs[0][0] != 22:
            raise ValueError("not a handshake record")
        self.ver = recs[0][1]
        hs = b"".join(p for _, _, p in recs)
        if hs[0] != 1:
            raise ValueError("not a ClientHello")
        body = hs[4:4 + int.from_bytes(hs[1:4], "big")]
        p = 2 + 32
        p += 1 + body[p]                                            # session id
        p += 2 + struct.unpack(">H", body[p:p + 2])[0]              # cipher suites
        p += 1 + body[p]                                            # compression methods
        self.prefix = body[:p]
        elen = struct.unpack(">H", body[p:p + 2])[0]
        q = p + 2
        end = q + elen
        self.exts = []
        while q + 4 <= end:
            t, n = struct.unpack(">HH", body[q:q + 4])
            self.exts.append((t, body[q + 4:q + 4 + n]))
            q += 4 + n

    def build(self):
        blob = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in self.exts)
        body = self.prefix + struct.pack(">H", len(blob)) + blob
        hs = b"\x01" + len(body).to_bytes(3, "big") + body
        return b"".join(record(22, self.ver, hs[i:i + 16384]) for i in range(0, len(hs), 16384))


def hello_length_fields(data):
    """(offset, size) of the length fields of a single-record ClientHello: record, handshake,
    session id, cipher suites, compression, extensions block, each extension and the inner
    list lengths of SNI, groups, signature algorithms, ALPN, supported_versions, key_share."""
    f = [(3, 2), (6, 3), (43, 1)]
    p = 44 + data[43]
    f.append((p, 2))
    p += 2 + struct.unpack(">H", data[p:p + 2])[0]
    f.append((p, 1))
    p += 1 + data[p]
    f.append((p, 2))
    p += 2
    while p + 4 <= len(data):
        t, n = struct.unpack(">HH", data[p:p + 4])
        f.append((p + 2, 2))
        if t in (0, 10, 13, 16, 51) and n >= 2:
            f.append((p + 4, 2))
        if t == 0 and n >= 5:
            f.append((p + 7, 2))
        if t == 43 and n >= 1:
            f.append((p + 4, 1))
        p += 4 + n
    return [x for x in f if x[0] + x[1] <= len(data)]


def mutate_hello(rng, data):
    """1-3 seeded mutations of ClientHello bytes; returns (bytes, description)."""
    ops = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choice(["flip", "flip", "truncate", "inflate", "inflate", "dup_ext", "drop_ext",
                         "unknown_ext", "reorder", "pad", "junk", "insert", "version"])
        try:
            if op == "flip":
                k = rng.randint(1, 6)
                b = bytearray(data)
                for _ in range(k):
                    pos = rng.randrange(min(len(b), 64)) if rng.random() < 0.5 else rng.randrange(len(b))
                    b[pos] ^= rng.randint(1, 255)
                data = bytes(b)
            elif op == "truncate":
                data = data[:rng.randrange(1, len(data))]
            elif op == "inflate":
                fields = hello_length_fields(data)
                off, size = rng.choice(fields)
                cur = int.from_bytes(data[off:off + size], "big")
                top = (1 << (8 * size)) - 1
                new = rng.choice([cur + 1, max(cur - 1, 0), 0, top, min(top, cur + rng.randint(2, 5000))])
                data = data[:off] + min(new, top).to_bytes(size, "big") + data[off + size:]
                op = "inflate@%d:%d->%d" % (off, cur, new)
            elif op in ("dup_ext", "drop_ext", "unknown_ext", "reorder", "pad"):
                hl = Hello(data)
                if op == "dup_ext":
                    hl.exts.insert(rng.randrange(len(hl.exts) + 1), rng.choice(hl.exts))
                elif op == "drop_ext":
                    t, _ = hl.exts.pop(rng.randrange(len(hl.exts)))
                    op = "drop_ext:%d" % t
                elif op == "unknown_ext":
                    hl.exts.insert(rng.randrange(len(hl.exts) + 1),
                                   (rng.choice([0x1234, 0xfafa, 0xff00, 0x0f0f]),
                                    rbytes(rng, rng.randint(0, 300))))
                elif op == "reorder":
                    rng.shuffle(hl.exts)
                else:
                    n = rng.choice([1, 200, 4000, 16400, rng.randint(20000, 70000)])
                    hl.exts.append((21, b"\x00" * n))
                    op = "pad:%d" % n
                data = hl.build()
            elif op == "junk":
                data = data + rbytes(rng, rng.randint(1, 400))
            elif op == "insert":
                pos = rng.randrange(len(data))
                data = data[:pos] + rbytes(rng, rng.randint(1, 16)) + data[pos:]
            elif op == "version":
                b = bytearray(data)
                pos = rng.choice([1, 2, 9, 10])
                b[pos] = rng.choice([0, 1, 2, 3, 4, 0x7f, 0xfe, 0xff])
                data = bytes(b)
        except (ValueError, IndexError, struct.error):
            b = bytearray(data)
            b[rng.randrange(len(b))] ^= 0x5a
            data = bytes(b)
            op += "(fallback flip)"
        ops.append(op)
    return data, ops


# ---------------------------------------------------------------------------------------
# Client side plumbing: a raw socket (Wire) and a TLS client over memory BIOs (MemTLS)


class Wire:
    """A client TCP connection whose writes are recorded and can be split."""

    def __init__(self, port, case=None, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.case = case
        self.rx = bytearray()
        self.eof = False
        self.rst = False
        self.send_failed = False
        self.t0 = time.monotonic()
        self.closed = False

    def send(self, data, sizes=None):
        if self.case is not None:
            self.case.record_sent(data)
        for piece in (cut(data, sizes) if sizes else [data]):
            if not piece:
                continue
            try:
                self.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.send_failed = True
                return False
        return True

    def recv(self, timeout):
        """Bytes, b"" at EOF / reset, None on timeout."""
        if self.eof:
            return b""
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return None
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            self.rst = True
            self.eof = True
            return b""
        except socket.timeout:
            return None
        if not data:
            self.eof = True
            return b""
        self.rx += data
        return data

    def wait_closed(self, timeout):
        """('fin' | 'rst' | 'open', seconds waited, bytes received meanwhile)."""
        t0 = time.monotonic()
        got = bytearray()
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                return "open", time.monotonic() - t0, bytes(got)
            d = self.recv(left)
            if d is None:
                continue
            if d == b"":
                return ("rst" if self.rst else "fin"), time.monotonic() - t0, bytes(got)
            got += d

    def fin(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def abort(self):
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


class MemTLS:
    """Python's ssl client over memory BIOs: every byte it produces is handed to the test."""

    def __init__(self, ctx, hostname="localhost"):
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=hostname)
        self.closed_clean = False    # close_notify received
        self.error = None            # SSLError while reading

    def hello(self):
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.out.read()

    def step(self):
        """One handshake step: (done, bytes to send). SSLError propagates."""
        try:
            self.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        return done, self.out.read()

    def handshake(self, wire, deadline, sizes_of=None):
        """Completes the handshake over wire; sizes_of(data) -> write sizes for each flight."""
        while True:
            done, data = self.step()
            if data:
                wire.send(data, sizes_of(data) if sizes_of else None)
            if done:
                return
            raw = wire.recv(deadline - time.monotonic())
            if raw is None:
                raise CaseTimeout("handshake: no answer from the gateway")
            if raw == b"":
                raise ConnectionError("the gateway closed during the handshake (%s)" %
                                      ("rst" if wire.rst else "fin"))
            self.inc.write(raw)

    def until_second_flight(self, wire, deadline):
        """After the ClientHello went out: reads the server's flight until the client has its
        next flight ready (returned, not sent)."""
        while True:
            raw = wire.recv(deadline - time.monotonic())
            if raw is None:
                raise CaseTimeout("no server flight")
            if raw == b"":
                raise ConnectionError("closed before the server flight")
            self.inc.write(raw)
            done, data = self.step()
            if data or done:
                return data

    def seal(self, plain_pieces):
        """Each piece in its own record; returns the record bytes."""
        for p in plain_pieces:
            if p:
                self.obj.write(p)
        return self.out.read()

    def feed_read(self, raw):
        """Feeds raw bytes, returns plaintext decrypted so far."""
        if raw:
            self.inc.write(raw)
        out = bytearray()
        while True:
            try:
                d = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed_clean = True
                break
            except ssl.SSLError as e:
                self.error = e
                break
            if not d:  # SSLObject.read() returns b"" once close_notify is in
                self.closed_clean = True
                break
            out += d
        return bytes(out)


class PlainOverMem:
    """socket-like recv/sendall over a MemTLS + Wire, for h.RawConn's response parser."""

    def __init__(self, tls, wire, timeout=5.0):
        self.tls, self.wire, self.timeout = tls, wire, timeout
        self.pending = b""

    def recv(self, n):
        deadline = time.monotonic() + self.timeout
        while not self.pending:
            if self.tls.closed_clean or self.tls.error is not None:
                return b""
            got = self.tls.feed_read(b"")
            if got:
                self.pending = got
                break
            if self.tls.closed_clean or self.tls.error is not None:
                return b""
            raw = self.wire.recv(deadline - time.monotonic())
            if raw is None:
                raise socket.timeout("no response bytes")
            if raw == b"":
                return b""
            self.pending = self.tls.feed_read(raw)
        d, self.pending = self.pending[:n], self.pending[n:]
        return d

    def sendall(self, data):
        self.wire.send(self.tls.seal([data]))

    def settimeout(self, t):
        self.timeout = t if t else 5.0

    def close(self):
        self.wire.close()


class SockAdapter:
    """recv() that reports how a (TLS or plain) connection ended instead of raising:
    ragged (TCP closed without close_notify), tls_error, rst; clean (close_notify / FIN)."""

    def __init__(self, sock):
        self.s = sock
        self.ragged = self.rst = self.clean = False
        self.tls_error = None

    def recv(self, n):
        try:
            d = self.s.recv(n)
        except ssl.SSLEOFError:
            self.ragged = True
            return b""
        except ssl.SSLError as e:
            if "UNEXPECTED_EOF" in str(e) or "EOF occurred" in str(e):
                self.ragged = True
            else:
                self.tls_error = e
            return b""
        except ConnectionResetError:
            self.rst = True
            return b""
        if not d:
            self.clean = True
        return d

    def sendall(self, data):
        self.s.sendall(data)

    def settimeout(self, t):
        self.s.settimeout(t)

    def setsockopt(self, *a):
        self.s.setsockopt(*a)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def raw_conn(sock, timeout=5.0):
    """An h.RawConn parsing from any object with recv/sendall."""
    c = h.RawConn.__new__(h.RawConn)
    c.sock, c.buf, c.eof, c.timeout = sock, b"", False, timeout
    return c


def tls_socket(port, ctx, hostname="localhost", timeout=5.0):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname=hostname, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise


def echo_problem(resp, method, url, body=b""):
    """None when resp is the mock's 200 echo of (method, url, body)."""
    if resp.status != 200:
        return "expected a 200 echo of %s %s, got %r" % (method, url, resp)
    try:
        j = resp.json()
    except ValueError:
        return "echo body is not JSON: %r" % (resp.body[:200],)
    if j.get("method") != method or j.get("url") != url:
        return "echo of %s %s names %s %s (wrong request served)" % (
            method, url, j.get("method"), j.get("url"))
    if j.get("body_sha256") != hashlib.sha256(body).hexdigest():
        return "echo of %s %s: body of %d bytes arrived as %s bytes (sha mismatch)" % (
            method, url, len(body), j.get("body_length"))
    return None


def json_error_problem(resp, status, types, needle=None):
    """None when resp is the gateway's JSON error with that status and one of the types."""
    if resp.status != status:
        return "expected %d %s, got %r" % (status, "/".join(types), resp)
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "%d without a JSON error body: %r" % (status, resp.body[:300])
    if err.get("type") not in types:
        return "error type %r, expected one of %s: %r" % (err.get("type"), types, err)
    if not resp.header("content-type", "").lower().startswith("application/json"):
        return "error content-type %r" % resp.header("content-type")
    rid = resp.header("x-request-id")
    if not rid or err.get("request_id") != rid:
        return "x-request-id %r vs error.request_id %r" % (rid, err.get("request_id"))
    if needle and needle not in err.get("message", ""):
        return "error message %r lacks %r" % (err.get("message"), needle)
    return None


# ---------------------------------------------------------------------------------------
# Cases


class Case:
    def __init__(self, suite, idx, kinds):
        self.suite, self.idx = suite, idx
        self.kind = kinds[idx % len(kinds)]
        self.rng = random.Random("sluice-fuzz-tls:%d:%s:%d" % (SEED, suite, idx))
        digest = hashlib.sha256(b"%d:%s:%d" % (SEED, suite.encode(), idx)).digest()
        self.tag = "%s%04dz%04x" % (suite, idx, int.from_bytes(digest[:2], "big"))  # in URLs
        self.ops = []
        self.sent = bytearray()
        self.plan = {}
        self.outcome = None  # a short label for the run's summary

    def record_sent(self, data):
        if len(self.sent) < 1200:
            self.sent += data[:1200 - len(self.sent)]

    def note(self, *ops):
        self.ops.extend(str(o) for o in ops)

    def describe(self):
        return "seed=%d case=%s%d kind=%s plan=%s ops=%s\n    %s: %r" % (
            SEED, self.suite, self.idx, self.kind, self.plan, self.ops,
            "sent" if self.suite == "d" else "upstream sent", bytes(self.sent[:700]))


DOWN_KINDS = ["garbage", "plain_http", "hello_mutated", "hello_split", "abort_fin", "abort_rst",
              "bad_record", "pipelined", "tiny_records", "stall", "close_notify", "alpn",
              "hello_mutated", "s_client"]

ABORT_STAGES = ["connect", "partial_hello", "hello", "server_flight", "partial_finished",
                "handshaken", "partial_request", "request", "mid_response"]
STALL_STAGES = ["connect", "partial_hello", "hello", "server_flight", "partial_finished",
                "handshaken", "partial_request"]


def plan_down(case):
    """Draws every choice of a downstream case up front (the I/O never consumes the rng)."""
    rng = case.rng
    p = case.plan
    p["tls"] = rng.choice(["1.2", "1.3", "1.3"])
    p["split_seed"] = rng.getrandbits(32)
    k = case.kind
    if k == "garbage":
        p["variant"] = rng.choice(["random", "record_prefix", "huge_len", "alert", "ccs", "sslv2",
                                   "zeros", "appdata_first", "hs_wrong_msg"])
        p["len"] = rng.choice([1, 3, 5, 6, 40, 300, rng.randint(1, 5000)])
        p["split"] = rng.choice(["one", "random", "small"])
        p["after"] = rng.choice(["open", "fin"])
    elif k == "plain_http":
        p["req"] = rng.choice(["get", "post", "pipeline", "h2", "connect", "upgrade", "lf"])
        p["split"] = rng.choice(["one", "random", "bytes"])
        p["after"] = rng.choice(["open", "fin"])
    elif k == "hello_mutated":
        p["mut_seed"] = rng.getrandbits(32)
        p["alpn"] = rng.choice([None, ["http/1.1"], ["h2"]])
        p["split"] = rng.choice(["one", "random", "small"])
        p["after"] = rng.choice(["open", "fin", "follow", "follow"])
    elif k == "hello_split":
        p["frag"] = rng.choice(["bytes", "small", "random", "one"])
        p["split"] = rng.choice(["bytes", "random", "one", "small"])
        p["later_split"] = rng.choice(["one", "random", "small"])
        p["method"] = rng.choice(["GET", "POST"])
        p["body_len"] = rng.randint(0, 2000)
    elif k in ("abort_fin", "abort_rst"):
        p["stage"] = ABORT_STAGES[(case.idx // len(DOWN_KINDS)) % len(ABORT_STAGES)]
        p["frac"] = rng.random()
    elif k == "bad_record":
        p["variant"] = rng.choice(["bad_mac", "bad_mac_tag", "bad_type", "oversize", "oversize_edge",
                                   "truncated_fin", "split_bad", "behind_request", "plain_handshake"])
        p["warmup"] = rng.random() < 0.5
        p["type"] = rng.choice([0x00, 0x14, 0x16, 0x18, 0x19, 0x7f, 0xff])
        p["len"] = rng.randint(18433, 65535)
        p["frac"] = rng.random()
    elif k == "pipelined":
        p["n"] = rng.choice([2, 3, 5, 8, 16, 40])
        p["bodies"] = [rng.choice([0, 0, 1, 50, 700]) for _ in range(p["n"])]
        p["close_last"] = rng.random() < 0.3
        p["split"] = rng.choice(["one", "random", "small"])
    elif k == "tiny_records":
        p["body_len"] = rng.choice([0, 1, 17, 300, 2500])
        p["rec"] = rng.choice(["bytes", "small"])
        p["split"] = rng.choice(["per_record", "one", "random"])
        p["then_normal"] = rng.random() < 0.5
    elif k == "stall":
        p["stage"] = STALL_STAGES[(case.idx // len(DOWN_KINDS)) % len(STALL_STAGES)]
        p["frac"] = rng.random()
    elif k == "close_notify":
        p["variant"] = rng.choice(["cn_only", "cn_then_stale_record", "cn_then_garbage", "cn_then_plain",
                                   "cn_then_hello", "request_and_cn"])
        p["warmup"] = rng.random() < 0.5
        p["together"] = rng.random() < 0.5
    elif k == "alpn":
        p["alpn"] = rng.choice([["h2"], ["h2", "h2c"], ["spdy/3.1", "h2"], ["x" * 255],
                                ["h2", "http/1.1"], ["http/1.0"], ["a", "b", "c", "h3"],
                                ["http/1.1", "h2"], [rbytes(rng, 6).hex()]])
        p["sni"] = rng.choice(["localhost", "localhost", None, ".".join(["a" * 63] * 3) + ".example",
                               "other.example", "xn--nxasmq6b.example"])
    elif k == "s_client":
        p["variant"] = ["reneg", "keyupdate_K", "reneg_after_request", "keyupdate_k"][
            (case.idx // len(DOWN_KINDS)) % 4]
        p["count"] = rng.randint(1, 3)
    return case


class DownRunner:
    """Runs one downstream case (in a pool thread); returns a list of problems."""

    def __init__(self, test, case):
        self.t, self.case = test, case
        self.port = test.tls_port
        p = case.plan
        self.srng = random.Random(p["split_seed"])
        self.maxv = V12 if p["tls"] == "1.2" else V13
        self.ctx = test.ctxs[p["tls"]]
        self.probs = []

    def sizes(self, mode):
        return lambda data: pieces(self.srng, len(data), mode)

    def wire(self):
        self.w = Wire(self.port, self.case)
        return self.w

    def expect_close(self, w, what, timeout=HANG_S):
        how, took, got = w.wait_closed(timeout)
        self.case.outcome = "%s%s" % (how, "+alert" if got[:1] == b"\x15" else "")
        if how == "open":
            self.probs.append("%s: connection still open %.1fs later (hang); %d bytes received"
                              % (what, took, len(w.rx)))
        if b"HTTP/" in bytes(w.rx):
            self.probs.append("%s: plaintext HTTP on the TLS port: %r" % (what, bytes(w.rx[:200])))
        return how, took, got

    def run(self):
        fn = getattr(self, "k_" + self.case.kind)
        try:
            fn()
        except CaseTimeout as e:
            self.probs.append("timed out: %s" % e)
        except Exception as e:  # noqa: BLE001 - reported with the case
            w = getattr(self, "w", None)
            self.probs.append("client side raised %r%s" % (e, "" if w is None else
                              " (connection: eof=%s rst=%s, %d bytes received, %.2fs)"
                              % (w.eof, w.rst, len(w.rx), time.monotonic() - w.t0)))
        return self.probs

    # --- kinds ---------------------------------------------------------------------------

    def k_garbage(self):
        p, rng = self.case.plan, random.Random(self.case.plan["split_seed"] ^ 0x55)
        n = p["len"]
        v = p["variant"]
        if v == "random":
            data = rbytes(rng, n)
        elif v == "record_prefix":
            data = (bytes([22, 3, rng.choice([0, 1, 3, 4])]) + struct.pack(">H", n)
                    + rbytes(rng, min(n, rng.randint(0, n))))
        elif v == "huge_len":
            data = b"\x16\x03\x01" + struct.pack(">H", rng.randint(16385, 65535)) + rbytes(rng, n)
        elif v == "alert":
            data = b"\x15\x03\x01\x00\x02" + bytes([rng.choice([1, 2]), rng.randrange(256)])
        elif v == "ccs":
            data = b"\x14\x03\x03\x00\x01\x01" + rbytes(rng, min(n, 50))
        elif v == "sslv2":
            data = b"\x80" + bytes([min(n, 255)]) + b"\x01\x00\x02" + rbytes(rng, min(n, 255))
        elif v == "zeros":
            data = b"\x00" * n
        elif v == "appdata_first":
            data = b"\x17\x03\x03" + struct.pack(">H", n) + rbytes(rng, n)
        else:  # a handshake record carrying a ServerHello / Finished / garbage type
            body = rbytes(rng, min(n, 600))
            msg = bytes([rng.choice([2, 11, 20, 0, 255])]) + len(body).to_bytes(3, "big") + body
            data = record(22, b"\x03\x01", msg)
        w = self.wire()
        try:
            w.send(data, pieces(self.srng, len(data), p["split"]))
            if p["after"] == "fin":
                w.fin()
            how, took, got = self.expect_close(w, "garbage")
            if got and got[0] not in (0x15, 0x16):
                self.probs.append("answer to garbage is not a TLS record: %r" % (got[:40],))
        finally:
            w.close()

    def k_plain_http(self):
        p = self.case.plan
        tag = self.case.tag
        reqs = {
            "get": h.build_request("GET", "/echo/%s-plain" % tag),
            "post": h.build_request("POST", "/echo/%s-plain" % tag, body=b"x" * 300),
            "pipeline": b"".join(h.build_request("GET", "/echo/%s-p%d" % (tag, i)) for i in range(5)),
            "h2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            "connect": b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n",
            "upgrade": h.build_request("GET", "/echo/%s-ws" % tag,
                                       [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
            "lf": b"GET /echo/%s-lf HTTP/1.1\nHost: x\n\n" % tag.encode(),
        }
        data = reqs[p["req"]]
        w = self.wire()
        try:
            w.send(data, pieces(self.srng, len(data), p["split"]))
            if p["after"] == "fin":
                w.fin()
            _, _, got = self.expect_close(w, "plaintext request")
            if got and got[0] != 0x15:
                self.probs.append("answer to plaintext HTTP is not a TLS alert: %r" % (got[:40],))
        finally:
            w.close()

    def k_hello_mutated(self):
        p = self.case.plan
        ctx = client_ctx(self.t.pki, maxv=self.maxv, alpn=p["alpn"])
        tls = MemTLS(ctx)
        hello = tls.hello()
        data, ops = mutate_hello(random.Random(p["mut_seed"]), hello)
        self.case.note(*ops)
        w = self.wire()
        try:
            w.send(data, pieces(self.srng, len(data), p["split"]))
            if p["after"] == "fin":
                w.fin()
            elif p["after"] == "follow":
                # play the rest of the handshake as the client that made the hello would
                deadline = time.monotonic() + HANG_S
                while not w.eof and time.monotonic() < deadline:
                    raw = w.recv(deadline - time.monotonic())
                    if not raw:
                        break
                    tls.inc.write(raw)
                    try:
                        done, out = tls.step()
                    except ssl.SSLError as e:
                        self.case.note("client: %s" % e.reason)
                        w.send(tls.out.read())
                        break
                    if out:
                        w.send(out)
                    if done:
                        self.case.note("handshake completed")
                        w.send(tls.seal([h.build_request("GET", "/echo/%s-mut" % self.case.tag,
                                                         [("Connection", "close")])]))
                        break
            self.expect_close(w, "mutated ClientHello")
        finally:
            w.close()

    def k_hello_split(self):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        hello = refragment(tls.hello(), self.srng, p["frag"])
        w = self.wire()
        deadline = time.monotonic() + HANG_S
        try:
            w.send(hello, pieces(self.srng, len(hello), p["split"]))
            tls.handshake(w, deadline, self.sizes(p["later_split"]))
            body = rbytes(self.srng, p["body_len"]) if p["method"] == "POST" else b""
            url = "/echo/%s-split" % self.case.tag
            c = raw_conn(PlainOverMem(tls, w))
            r = c.request(p["method"], url, body=body if p["method"] == "POST" else None)
            pr = echo_problem(r, p["method"], url, body)
            if pr:
                self.probs.append(pr)
        finally:
            w.close()

    def _to_stage(self, w, tls, stage, frac, deadline):
        """Drives a connection to `stage`; returns what is needed to act there."""
        if stage == "connect":
            return
        hello = tls.hello()
        if stage == "partial_hello":
            w.send(hello[:max(1, int(len(hello) * frac))])
            return
        w.send(hello)
        if stage == "hello":
            return
        flight = tls.until_second_flight(w, deadline)
        if stage == "server_flight":
            return
        if stage == "partial_finished":
            w.send(flight[:max(1, int(len(flight) * frac * 0.99))])
            return
        w.send(flight)
        if self.maxv == V12:  # the server's CCS + Finished
            while True:
                done, out = tls.step()
                if out:
                    w.send(out)
                if done:
                    break
                raw = w.recv(deadline - time.monotonic())
                if not raw:
                    raise ConnectionError("closed before the server Finished")
                tls.inc.write(raw)
        if stage == "handshaken":
            return
        tag = self.case.tag
        if stage == "partial_request":
            req = h.build_request("GET", "/echo/%s-partial" % tag)
            if frac < 0.5:  # inside a TLS record: no plaintext reaches the gateway
                rec = tls.seal([req])
                w.send(rec[:max(1, int(len(rec) * frac * 2))])
            else:           # whole records carrying part of a request head
                w.send(tls.seal([req[:max(1, int(len(req) * (frac - 0.5) * 1.9))]]))
            return
        if stage == "request":
            w.send(tls.seal([h.build_request("GET", "/stream?chunks=20&interval_ms=40&%s" % tag)]))
            return
        if stage == "mid_response":
            w.send(tls.seal([h.build_request("GET", "/stream?chunks=40&interval_ms=25&size=3000&%s" % tag)]))
            got = b""
            while b"\r\n\r\n" not in got:
                raw = w.recv(deadline - time.monotonic())
                if not raw:
                    raise ConnectionError("no response head")
                got += tls.feed_read(raw)
            return

    def k_abort(self, mode):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        w = self.wire()
        try:
            self._to_stage(w, tls, p["stage"], p["frac"], time.monotonic() + HANG_S)
            if mode == "rst":
                w.abort()
                return
            w.fin()
            how, took, _ = self.expect_close(w, "FIN at stage %s" % p["stage"])
        finally:
            w.close()

    def k_abort_fin(self):
        self.k_abort("fin")

    def k_abort_rst(self):
        self.k_abort("rst")

    def _handshaken(self, w, tls, warmup):
        deadline = time.monotonic() + HANG_S
        tls.handshake(w, deadline)
        if warmup:
            url = "/echo/%s-warm" % self.case.tag
            r = raw_conn(PlainOverMem(tls, w)).request("GET", url)
            pr = echo_problem(r, "GET", url)
            if pr:
                self.probs.append("warm-up request: " + pr)

    def k_bad_record(self):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        w = self.wire()
        tag = self.case.tag
        try:
            self._handshaken(w, tls, p["warmup"])
            v = p["variant"]
            req = h.build_request("GET", "/echo/%s-bad" % tag)
            rec = bytearray(tls.seal([req]))
            frac = p["frac"]
            sizes = None
            allow_answer = False
            if v == "bad_mac":
                rec[5 + int((len(rec) - 5) * frac * 0.999)] ^= 0x01
            elif v == "bad_mac_tag":
                rec[-1 - int(15 * frac)] ^= 0x80
            elif v == "bad_type":
                rec[0] = p["type"]
            elif v in ("oversize", "oversize_edge"):
                n = p["len"] if v == "oversize" else (16641 if self.maxv == V13 else 18433)
                body = rbytes(random.Random(p["split_seed"]), min(n, 1000 + int(frac * 20000)))
                rec = bytearray(b"\x17\x03\x03" + struct.pack(">H", n) + body)
            elif v == "truncated_fin":
                rec = rec[:max(1, int(len(rec) * frac * 0.99))]
            elif v == "split_bad":
                rec[-3] ^= 0x10
                sizes = [len(rec) // 2, len(rec) - len(rec) // 2]
            elif v == "behind_request":
                bad = bytearray(tls.seal([h.build_request("GET", "/echo/%s-bad2" % tag)]))
                bad[len(bad) // 2] ^= 0x04
                rec = rec + bad
                allow_answer = True
            elif v == "plain_handshake":
                rec = bytearray(MemTLS(self.ctx).hello())
            w.send(bytes(rec), sizes)
            if v == "truncated_fin":
                w.fin()
            how, took, got = self.expect_close(w, "bad record (%s)" % v)
            plain = tls.feed_read(got)
            if plain:
                resp_ok = allow_answer and plain.startswith(b"HTTP/1.1 200 ") and \
                    ("/echo/%s-bad\"" % tag).encode() in plain and b"-bad2" not in plain
                if not resp_ok:
                    self.probs.append("plaintext served after a bad record: %r" % (plain[:300],))
        finally:
            w.close()

    def k_pipelined(self):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        w = self.wire()
        try:
            tls.handshake(w, time.monotonic() + HANG_S)
            reqs = []
            for i in range(p["n"]):
                url = "/echo/%s-p%d" % (self.case.tag, i)
                body = bytes((i * 7 + j) % 256 for j in range(p["bodies"][i]))
                hs = [("Connection", "close")] if p["close_last"] and i == p["n"] - 1 else None
                method = "POST" if body else "GET"
                reqs.append((method, url, body, h.build_request(method, url, hs, body if body else None)))
            data = tls.seal([b"".join(r[3] for r in reqs)])
            self.case.note("%d records" % len(records_of(data)))
            w.send(data, pieces(self.srng, len(data), p["split"]))
            c = raw_conn(PlainOverMem(tls, w))
            for i, (method, url, body, _) in enumerate(reqs):
                r = c.read_response(method)
                pr = echo_problem(r, method, url, body)
                if pr:
                    self.probs.append("pipelined request %d: %s" % (i, pr))
                    return
            if p["close_last"]:
                how, _, got = w.wait_closed(HANG_S)
                tls.feed_read(got)
                if how == "open":
                    self.probs.append("no close after Connection: close")
                elif not tls.closed_clean:
                    self.probs.append("Connection: close ended without close_notify (%s, tls error %r, "
                                      "%d raw bytes after the last response)" % (how, tls.error, len(got)))
        finally:
            w.close()

    def k_tiny_records(self):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        w = self.wire()
        try:
            tls.handshake(w, time.monotonic() + HANG_S)
            url = "/echo/%s-tiny" % self.case.tag
            body = bytes(self.srng.randrange(256) for _ in range(p["body_len"]))
            data = h.build_request("POST", url, body=body)
            chunks = cut(data, pieces(self.srng, len(data), p["rec"]))
            if p["split"] == "per_record":
                for ch in chunks:
                    w.send(tls.seal([ch]))
            else:
                out = tls.seal(chunks)
                w.send(out, pieces(self.srng, len(out), "one" if p["split"] == "one" else "random"))
            c = raw_conn(PlainOverMem(tls, w))
            pr = echo_problem(c.read_response("POST"), "POST", url, body)
            if pr:
                self.probs.append(pr)
            if p["then_normal"] and not pr:
                url2 = url + "-again"
                pr = echo_problem(c.request("GET", url2), "GET", url2)
                if pr:
                    self.probs.append("second request: " + pr)
        finally:
            w.close()

    def k_stall(self):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        w = self.wire()
        T = HEADER_TIMEOUT_MS / 1000.0
        try:
            t_connect = time.monotonic()
            self._to_stage(w, tls, p["stage"], p["frac"], time.monotonic() + HANG_S)
            head_part = p["stage"] == "partial_request" and p["frac"] >= 0.5
            t_ref = time.monotonic() if head_part else t_connect
            how, _, got = w.wait_closed(T + 4.0)
            took = time.monotonic() - t_ref
            self.case.outcome = "%s after %.1fs" % (how, took)
            if how == "open":
                self.probs.append("stalled at %s: still open after %.1fs (header timeout %d ms)"
                                  % (p["stage"], took, HEADER_TIMEOUT_MS))
                return
            if took < T * 0.8:
                self.probs.append("stalled at %s: closed after %.2fs, before the header timeout"
                                  % (p["stage"], took))
            plain = tls.feed_read(got)
            if not head_part and plain:
                self.probs.append("stalled at %s: answered %r" % (p["stage"], plain[:200]))
            if head_part:
                if not plain.startswith(b"HTTP/1.1 408 ") or b'"request_timeout"' not in plain:
                    self.probs.append("stalled request head: expected a 408 JSON error, got %r"
                                      % (plain[:300],))
                elif not tls.closed_clean:
                    self.probs.append("408 not followed by close_notify")
            if b"HTTP/" in bytes(w.rx):
                self.probs.append("plaintext HTTP on the TLS port")
        finally:
            w.close()

    def k_close_notify(self):
        p = self.case.plan
        tls = MemTLS(self.ctx)
        w = self.wire()
        tag = self.case.tag
        try:
            self._handshaken(w, tls, p["warmup"])
            v = p["variant"]
            early = b""
            if v in ("cn_then_stale_record", "request_and_cn"):
                which = "aftercn" if v == "cn_then_stale_record" else "beforecn"
                early = tls.seal([h.build_request("GET", "/echo/%s-%s" % (tag, which))])
            try:
                tls.obj.unwrap()
            except ssl.SSLWantReadError:
                pass
            cn = tls.out.read()
            if v == "cn_only":
                seq = [cn]
            elif v == "cn_then_stale_record":
                seq = [cn, early]
            elif v == "cn_then_garbage":
                seq = [cn, rbytes(random.Random(p["split_seed"]), 200)]
            elif v == "cn_then_plain":
                seq = [cn, h.build_request("GET", "/echo/%s-aftercn" % tag)]
            elif v == "cn_then_hello":
                seq = [cn, MemTLS(self.ctx).hello()]
            else:
                seq = [early, cn]
            if p["together"]:
                w.send(b"".join(seq))
            else:
                for s in seq:
                    w.send(s)
            how, _, got = self.expect_close(w, "close_notify (%s)" % v)
            plain = tls.feed_read(got)
            if b"aftercn" in plain:
                self.probs.append("a request after close_notify was answered: %r" % (plain[:300],))
            if plain and v != "request_and_cn":
                self.probs.append("application data after the client's close_notify: %r" % (plain[:200],))
            if plain and v == "request_and_cn":
                if not plain.startswith(b"HTTP/1.1 200 ") or b"-beforecn" not in plain:
                    self.probs.append("answer to the request before close_notify: %r" % (plain[:300],))
            if v == "cn_only" and how != "open" and not tls.closed_clean and tls.error is None:
                self.probs.append("client close_notify not answered with close_notify (%s)" % how)
        finally:
            w.close()

    def k_alpn(self):
        p = self.case.plan
        ctx = client_ctx(self.t.pki, maxv=self.maxv, alpn=p["alpn"], check_hostname=False)
        s = tls_socket(self.port, ctx, hostname=p["sni"])
        try:
            got = s.selected_alpn_protocol()
            want = "http/1.1" if "http/1.1" in p["alpn"] else None
            if got != want:
                self.probs.append("ALPN %r selected %r, expected %r" % (p["alpn"], got, want))
            url = "/echo/%s-alpn" % self.case.tag
            c = raw_conn(SockAdapter(s))
            pr = echo_problem(c.request("GET", url), "GET", url)
            if pr:
                self.probs.append(pr)
        finally:
            s.close()

    def k_s_client(self):
        p = self.case.plan
        v = p["variant"]
        tag = self.case.tag
        reneg = v.startswith("reneg")
        cmd = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % self.port,
               "-tls1_2" if reneg else "-tls1_3", "-CAfile", self.t.pki.ca, "-servername", "localhost",
               "-verify_return_error", "-crlf"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        out = bytearray()

        def pump(timeout, until=None):
            end = time.monotonic() + timeout
            while True:
                if until is not None and until in out:
                    return "found"
                left = end - time.monotonic()
                if left <= 0:
                    return "timeout"
                r, _, _ = select.select([proc.stdout], [], [], left)
                if r:
                    d = os.read(proc.stdout.fileno(), 65536)
                    if not d:
                        return "eof"
                    out.extend(d)

        def send(data):
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError):
                return False

        def get(label):
            url = "/echo/%s-%s" % (tag, label)
            send(b"GET %s HTTP/1.1\nHost: localhost\n\n" % url.encode())
            return pump(HANG_S, b'"url":"%s"' % url.encode()) == "found"

        try:
            if pump(HANG_S, b"Verify return code: 0") != "found":
                self.probs.append("s_client handshake did not complete")
                return
            pump(0.05)
            if v == "reneg_after_request" and not get("pre"):
                self.probs.append("request before renegotiation not answered")
                return
            if reneg:
                send(b"R\n")
                st = pump(HANG_S, b"RENEGOTIATING")
                end = pump(HANG_S)  # until s_client exits: the attempt must fail
                if end != "eof":
                    # renegotiation did not end the connection: it must not have succeeded either
                    if not get("post-reneg"):
                        self.probs.append("after a renegotiation attempt the connection neither "
                                          "closed nor served")
                elif b"no renegotiation" not in out and b"alert" not in out and b"error" not in out:
                    self.probs.append("s_client ended without a sign of the refusal (%s)" % st)
                self.case.note("reneg end=%s" % end)
                self.case.outcome = "refused, s_client exited" if end == "eof" else "declined, kept serving"
            else:
                for i in range(p["count"]):
                    send(b"K\n" if v == "keyupdate_K" else b"k\n")
                    if pump(HANG_S, b"KEYUPDATE") != "found":
                        self.probs.append("s_client did not do the key update")
                        return
                    out[:] = out.replace(b"KEYUPDATE", b"keyupdate")
                    if not get("ku%d" % i):
                        self.probs.append("no answer after key update %d: %r" % (i, bytes(out[-600:])))
                        return
                self.case.outcome = "served after %d key update(s)" % p["count"]
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=HANG_S)
            except subprocess.TimeoutExpired:
                self.probs.append("s_client did not exit (connection left open)")
                proc.kill()
                proc.wait(timeout=5)
            proc.stdout.close()


# ---------------------------------------------------------------------------------------
# Upstream servers written in Python


def linger0(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def read_record(sock, timeout=5.0):
    """Reads one whole TLS record (or what arrives before EOF / timeout)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            if len(data) >= 5 and len(data) >= 5 + struct.unpack(">H", data[3:5])[0]:
                return data
            d = sock.recv(65536)
            if not d:
                return data
            data += d
    except (socket.timeout, OSError):
        return data


def wait_peer_close(sock, timeout):
    """Waits for the gateway to close; returns (how, seconds, bytes it sent meanwhile)."""
    t0 = time.monotonic()
    got = b""
    while True:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            return "open", time.monotonic() - t0, got
        try:
            r, _, _ = select.select([sock], [], [], left)
        except (OSError, ValueError):
            return "closed", time.monotonic() - t0, got
        if not r:
            continue
        try:
            d = sock.recv(65536)
        except (ConnectionResetError, OSError):
            return "rst", time.monotonic() - t0, got
        if not d:
            return "fin", time.monotonic() - t0, got
        got += d


class HandshakeUpstream:
    """A TLS upstream that misbehaves during the handshake, one plan per accepted connection
    (plans are queued by the test before its request). Each plan's outcome goes to `done`."""

    def __init__(self, pki):
        self.pki = pki
        self.ctxs = {(name, v): server_ctx(pki, name, v) for name in ("srv", "other", "self", "clientonly")
                     for v in (V12, V13)}
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.plans = collections.deque()
        self.closed = False
        self.threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self):
        return "https://localhost:%d" % self.port

    def push(self, plan):
        plan["done"] = threading.Event()
        plan["outcome"] = {"accepted": 0, "requests": 0, "peer": None, "error": None}
        with self.lock:
            self.plans.append(plan)
        return plan

    def _accept(self):
        while not self.closed:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                plan = self.plans.popleft() if self.plans else None
            t = threading.Thread(target=self._serve, args=(sock, plan), daemon=True)
            t.start()

    @staticmethod
    def _send(sock, data, plan):
        sent = plan["outcome"].setdefault("sent", b"")
        plan["outcome"]["sent"] = sent + data[:max(0, 1200 - len(sent))]
        sock.sendall(data)

    def _end(self, sock, action, plan):
        out = plan["outcome"]
        if action == "rst":
            linger0(sock)
        elif action == "stall":
            how, took, _ = wait_peer_close(sock, 15)
            out["peer"] = (how, took)
        sock.close()

    def _good(self, obj, inc, out, sock, plan):
        """Finishes the handshake and answers requests until the gateway closes."""
        def flush():
            d = out.read()
            if d:
                sock.sendall(d)
        sock.settimeout(10)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                d = sock.recv(65536)
                if not d:
                    raise EOFError
                inc.write(d)
        flush()
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    buf += obj.read(65536)
                except ssl.SSLWantReadError:
                    d = sock.recv(65536)
                    if not d:
                        raise EOFError
                    inc.write(d)
            head, buf = buf.split(b"\r\n\r\n", 1)
            plan["outcome"]["requests"] += 1
            body = plan.get("body", b"hs-ok")
            obj.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            flush()

    def _serve(self, sock, plan):
        if plan is None:
            sock.close()
            return
        out_ = plan["outcome"]
        out_["accepted"] += 1
        rng = random.Random(plan["seed"])
        kind = plan["kind"]
        maxv = plan["maxv"]
        try:
            sock.settimeout(10)
            if kind == "hs_close" and plan["stage"] == "accept":
                self._end(sock, plan["action"], plan)
                return
            if kind == "hs_close" and plan["stage"] == "partial_ch":
                sock.recv(rng.randint(1, 5))
                self._end(sock, plan["action"], plan)
                return
            ch = read_record(sock)
            if kind == "hs_close":
                self._end(sock, plan["action"], plan)
                return
            if kind == "hs_garbage":
                v = plan["variant"]
                if v == "random":
                    g = rbytes(rng, plan["len"])
                elif v == "http":
                    g = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                elif v == "record":
                    g = (bytes([22, 3, 3]) + struct.pack(">H", plan["len"])
                         + rbytes(rng, rng.randint(0, plan["len"])))
                elif v == "alert":
                    g = b"\x15\x03\x03\x00\x02\x02" + bytes([rng.choice([40, 47, 70, 80, 112])])
                elif v == "huge":
                    g = b"\x16\x03\x03" + struct.pack(">H", rng.randint(16385, 65535)) + rbytes(rng, 100)
                else:  # a ServerHello-typed message of garbage
                    body = rbytes(rng, min(plan["len"], 800))
                    g = record(22, b"\x03\x03", b"\x02" + len(body).to_bytes(3, "big") + body)
                self._send(sock, g, plan)
                self._end(sock, plan["action"], plan)
                return
            cert = plan.get("cert", "srv")
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = self.ctxs[(cert, maxv)].wrap_bio(inc, out, server_side=True)
            inc.write(ch)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            flight = out.read()
            if kind == "hs_wrong_cert":
                self._send(sock, flight, plan)
                try:
                    self._good(obj, inc, out, sock, plan)
                except (ssl.SSLError, EOFError, OSError) as e:
                    out_["error"] = repr(e)
                sock.close()
                return
            if kind == "hs_truncated":
                self._send(sock, flight[:max(1, int(len(flight) * plan["frac"]))], plan)
                self._end(sock, plan["action"], plan)
                return
            # hs_mutated
            b = bytearray(flight)
            op = plan["op"]
            if op == "flip":
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] ^= rng.randint(1, 255)
            elif op == "flip_head":
                b[rng.randrange(min(len(b), 90))] ^= rng.randint(1, 255)
            elif op == "inflate":
                pos = rng.choice([3, 4, 6, 7, 8])
                b[pos] = (b[pos] + rng.randint(1, 255)) % 256
            elif op == "refragment":
                b = bytearray(refragment(flight[:5 + struct.unpack(">H", flight[3:5])[0]], rng, "small")
                              + flight[5 + struct.unpack(">H", flight[3:5])[0]:])
            elif op == "insert":
                pos = rng.randrange(len(b))
                b[pos:pos] = rbytes(rng, rng.randint(1, 10))
            elif op == "drop":
                pos = rng.randrange(len(b))
                del b[pos:pos + rng.randint(1, 20)]
            self._send(sock, bytes(b), plan)
            if plan["action"] == "stall":
                try:
                    self._good(obj, inc, out, sock, plan)
                except (ssl.SSLError, EOFError, OSError) as e:
                    out_["error"] = repr(e)
                sock.close()
            else:
                self._end(sock, plan["action"], plan)
        except Exception as e:  # noqa: BLE001 - recorded for the case
            out_["error"] = repr(e)
            try:
                sock.close()
            except OSError:
                pass
        finally:
            plan["done"].set()

    def close(self):
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass


class ResponseUpstream:
    """An HTTPS upstream (memory-BIO TLS) whose answer to a request is the plan registered for
    the tag in its path; records every connection: requests served, whether a plan broke it,
    and how the gateway ended it."""

    def __init__(self, pki, maxv=None):
        self.ctx = server_ctx(pki, "srv", maxv)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.plans = {}
        self.conns = []
        self.problems = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self):
        return "https://localhost:%d" % self.port

    def register(self, tag, plan):
        plan.setdefault("served", [])
        plan.setdefault("released", threading.Event())  # the client got the response
        plan.setdefault("broken_done", threading.Event())
        plan.setdefault("peer", None)
        with self.lock:
            self.plans[tag] = plan
        return plan

    def _accept(self):
        while not self.closed:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            conn = {"id": None, "requests": 0, "broken": None, "peer": None, "open": True}
            with self.lock:
                conn["id"] = len(self.conns)
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock, conn):
        sock.settimeout(15)
        t = h.MemoryTLS(self.ctx, sock)
        obj, inc, out, flush = t.obj, t.inc, t.out, t.flush
        try:
            t.handshake()
            while True:
                head, _ = t.read_request()
                target = head.split(b" ", 2)[1].decode("latin-1")
                m = re.search(r"/([ud]\d{4}z[0-9a-f]+(?:-\w+)?)", target)
                with self.lock:
                    plan = self.plans.get(m.group(1)) if m else None
                    conn["requests"] += 1
                    if conn["broken"]:
                        self.problems.append("connection %d, broken by %s, carried another request: %s"
                                             % (conn["id"], conn["broken"], target))
                if plan is None:
                    obj.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    flush()
                    continue
                plan["served"].append(conn["id"])
                if not self.respond(plan, obj, inc, out, sock, conn):
                    return
        except (EOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
            pass
        except (ssl.SSLError, OSError, socket.timeout) as e:
            with self.lock:
                if not conn["broken"]:
                    conn["error"] = repr(e)
        finally:
            conn["open"] = False
            try:
                sock.close()
            except OSError:
                pass

    def _break_and_wait(self, plan, sock, conn, obj, inc, action):
        """The connection is broken: FIN / RST it, or keep it open until the gateway closes it.
        Whatever the gateway sends meanwhile must not be a request."""
        conn["broken"] = plan["behaviour"]
        try:
            if action == "fin":
                sock.close()
                plan["peer"] = ("we-closed", 0)
            elif action == "rst":
                linger0(sock)
                sock.close()
                plan["peer"] = ("we-reset", 0)
            else:
                how, took, got = wait_peer_close(sock, 8)
                plan["peer"] = (how, took)
                if got:
                    inc.write(got)
                    try:
                        data = obj.read(65536)
                        if data:
                            with self.lock:
                                self.problems.append("gateway sent application data %r on connection "
                                                     "%d after it was broken by %s"
                                                     % (data[:100], conn["id"], plan["behaviour"]))
                    except ssl.SSLError:
                        pass  # its alert or close_notify
        finally:
            plan["broken_done"].set()
        return False

    def respond(self, plan, obj, inc, out, sock, conn):
        """Writes the plan's response; False when the connection is over."""
        rng = random.Random(plan["seed"])
        beh = plan["behaviour"]
        wire_head, framed = plan["head"], plan["framed"]

        def send_records(data, mode):
            recs = []
            for piece in cut(data, pieces(rng, len(data), mode)):
                if piece:
                    obj.write(piece)
                    recs.append(out.read())
            blob = b"".join(recs)
            for seg in cut(blob, pieces(rng, len(blob), plan["tcp"])):
                sock.sendall(seg)

        if beh in ("good", "one_byte", "idle_break"):
            send_records(wire_head + framed, "bytes" if beh == "one_byte" else plan["records"])
            if plan["framing"] == "close":
                try:
                    obj.unwrap()
                except ssl.SSLWantReadError:
                    pass
                sock.sendall(out.read())
                wait_peer_close(sock, 8)
                return False
            if beh == "idle_break":
                if not plan["released"].wait(10):
                    return self._break_and_wait(plan, sock, conn, obj, inc, "fin")
                v = plan["variant"]
                if v == "corrupt":
                    obj.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
                    r = bytearray(out.read())
                    r[-2] ^= 0x20
                    sock.sendall(bytes(r))
                elif v == "unsolicited":
                    obj.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
                    sock.sendall(out.read())
                elif v == "close_notify":
                    try:
                        obj.unwrap()
                    except ssl.SSLWantReadError:
                        pass
                    sock.sendall(out.read())
                elif v == "garbage":
                    sock.sendall(rbytes(rng, rng.randint(1, 300)))
                elif v == "oversize":
                    sock.sendall(b"\x17\x03\x03\xff\xf0" + rbytes(rng, 64))
                action = {"fin": "fin", "rst": "rst"}.get(v, "wait")
                return self._break_and_wait(plan, sock, conn, obj, inc, action)
            return True
        # broken responses: the head (maybe partly), part of the body, then the break
        if beh == "corrupt_before_head":
            k = int(len(wire_head) * plan["frac"])
            if k:
                send_records(wire_head[:k], plan["records"])
            obj.write(wire_head[k:] + framed)
            r = bytearray(out.read())
            first = struct.unpack(">H", r[3:5])[0]  # the record holding the rest of the head
            r[5 + first // 2] ^= 0x01
            sock.sendall(bytes(r))
            return self._break_and_wait(plan, sock, conn, obj, inc, plan["action"])
        k = int((len(framed) - 1) * plan["frac"])
        send_records(wire_head + framed[:k], plan["records"])
        if beh == "corrupt_after_head":
            obj.write(framed[k:])
            r = bytearray(out.read())
            r[-1 - rng.randrange(min(len(r) - 5, 40))] ^= 0x08
            sock.sendall(bytes(r))
            action = plan["action"] if plan["action"] != "rst" else "wait"
        elif beh == "cut_mid_body":
            if plan["action"] == "close_notify":
                try:
                    obj.unwrap()
                except ssl.SSLWantReadError:
                    pass
                sock.sendall(out.read())
                action = "wait"
            else:
                action = plan["action"]
        else:  # bad_record_mid_body
            v = plan["variant"]
            if v == "oversize":
                n = rng.randint(18433, 65535)  # over any TLS version's record limit
                sock.sendall(b"\x17\x03\x03" + struct.pack(">H", n) + rbytes(rng, 200))
            elif v == "alert":
                sock.sendall(b"\x15\x03\x03\x00\x02\x02\x50")
            elif v == "handshake":
                sock.sendall(record(22, b"\x03\x03", b"\x04\x00\x00\x08" + rbytes(rng, 8)))
            else:
                sock.sendall(rbytes(rng, rng.randint(1, 500)))
            action = plan["action"]
        return self._break_and_wait(plan, sock, conn, obj, inc, action)

    def close(self):
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------
# Upstream cases


UP_KINDS = ["hs_garbage", "hs_mutated", "hs_wrong_cert", "hs_truncated", "hs_close", "resp_good",
            "resp_one_byte", "resp_corrupt_after_head", "resp_cut_mid_body", "resp_corrupt_before_head",
            "resp_bad_record_mid_body", "resp_idle_break"]


def response_bytes(rng, body, framing, tag):
    """(head, framed body) of the upstream's response."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nX-Fuzz: %s\r\n" % tag.encode()
    if framing == "cl":
        return head + b"Content-Length: %d\r\n\r\n" % len(body), body
    if framing == "chunked":
        out = []
        for piece in cut(body, pieces(rng, len(body), "random")):
            if piece:
                out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        return head + b"Transfer-Encoding: chunked\r\n\r\n", b"".join(out) + b"0\r\n\r\n"
    return head + b"Connection: close\r\n\r\n", body


def plan_up(case):
    rng = case.rng
    p = case.plan
    k = case.kind
    p["client"] = rng.choice(["plain", "tls"])
    p["seed"] = rng.getrandbits(32)
    p["maxv"] = rng.choice([V12, V13, V13])
    if k == "hs_garbage":
        p["variant"] = rng.choice(["random", "http", "record", "alert", "huge", "serverhello"])
        p["len"] = rng.choice([1, 4, 5, 40, 700, rng.randint(1, 3000)])
        p["action"] = rng.choice(["fin", "rst", "fin", "stall"])
    elif k == "hs_mutated":
        p["op"] = rng.choice(["flip", "flip_head", "inflate", "refragment", "insert", "drop"])
        p["action"] = rng.choice(["fin", "rst", "stall", "stall"])
    elif k == "hs_wrong_cert":
        p["cert"] = ["other", "self", "clientonly"][(case.idx // len(UP_KINDS)) % 3]
    elif k == "hs_truncated":
        p["frac"] = rng.random()
        p["action"] = rng.choice(["fin", "rst", "stall"])
    elif k == "hs_close":
        p["stage"] = rng.choice(["accept", "partial_ch", "ch"])
        p["action"] = rng.choice(["fin", "rst"])
    else:
        p["pool"] = "r12" if p["maxv"] == V12 else "r13"
        del p["maxv"]
        p["behaviour"] = k[len("resp_"):]
        p["framing"] = rng.choice(["cl", "chunked"] + ([] if k == "resp_idle_break" else ["close"]))
        p["len"] = rng.choice([1, 2, 100, 5000, 40000] if k != "resp_one_byte" else [1, 100, 3000])
        if k == "resp_good":
            p["len"] = rng.choice([0, 1, 100, 5000, 40000])
        p["records"] = rng.choice(["one", "random", "small"] if p["len"] <= 5000 else ["one", "random"])
        p["tcp"] = rng.choice(["one", "random"])
        p["frac"] = rng.random()
        p["method"] = rng.choice(["GET", "GET", "POST"])
        if k == "resp_corrupt_after_head":
            p["action"] = rng.choice(["wait", "fin"])
        elif k == "resp_cut_mid_body":
            p["action"] = rng.choice(["fin", "rst", "close_notify"])
        elif k == "resp_corrupt_before_head":
            p["action"] = rng.choice(["wait", "fin"])
        elif k == "resp_bad_record_mid_body":
            p["variant"] = rng.choice(["oversize", "alert", "handshake", "garbage"])
            p["action"] = rng.choice(["wait", "fin"])
        elif k == "resp_idle_break":
            p["variant"] = ["corrupt", "unsolicited", "close_notify", "garbage", "oversize", "fin",
                            "rst"][(case.idx // len(UP_KINDS)) % 7]
    return case


class UpRunner:
    def __init__(self, test, case):
        self.t, self.case = test, case
        self.probs = []

    def client(self):
        if self.case.plan["client"] == "tls":
            s = tls_socket(self.t.tls_port, self.t.ctxs["1.3"], timeout=10)
        else:
            s = socket.create_connection(("127.0.0.1", self.t.plain_port), timeout=10)
        self.ad = ad = SockAdapter(s)
        return raw_conn(ad, 10), ad

    def run(self):
        try:
            if self.case.kind.startswith("hs_"):
                self.run_hs()
            else:
                self.run_resp()
        except socket.timeout as e:
            self.probs.append("no answer from the gateway in time (hang): %r" % (e,))
        except Exception as e:  # noqa: BLE001 - reported with the case
            ad = getattr(self, "ad", None)
            self.probs.append("client side raised %r%s" % (e, "" if ad is None else
                              " (client connection: clean=%s ragged=%s rst=%s tls_error=%r)"
                              % (ad.clean, ad.ragged, ad.rst, ad.tls_error)))
        return self.probs

    def run_hs(self):
        p = self.case.plan
        hs = self.t.hs
        with hs.lock:
            hs.plans.clear()
        plan = hs.push(dict(p, kind=self.case.kind))
        c, ad = self.client()
        try:
            r = c.request("GET", "/hs/%s" % self.case.tag)
        finally:
            ad.close()
        self.case.outcome = self.label(r)
        k = self.case.kind
        stall = p.get("action") == "stall"
        if k == "hs_mutated" and r.status == 200:
            if r.body != b"hs-ok":
                self.probs.append("mutated flight: 200 with the wrong body %r" % (r.body[:100],))
            self.case.note("mutation survived")
        elif k == "hs_mutated":
            allowed = [(502, ["upstream_tls_failed", "upstream_reset"]), (504, ["upstream_connect_timeout"])]
            errs = [json_error_problem(r, s, ts) for s, ts in allowed]
            if all(errs):
                self.probs.append(errs[0] if r.status != 504 else errs[1])
        elif stall and k in ("hs_garbage", "hs_truncated"):
            errs = [json_error_problem(r, 502, ["upstream_tls_failed"]),
                    json_error_problem(r, 504, ["upstream_connect_timeout"])]
            if all(errs):
                self.probs.append(errs[0] if r.status != 504 else errs[1])
        elif k == "hs_close" and p["stage"] == "accept" and r.status == 502 and \
                b"upstream_connect_failed" in r.body:
            # reset before the gateway's connect callback ran: libuv reports the connect failed
            pr = json_error_problem(r, 502, ["upstream_connect_failed"], "reset")
            if pr:
                self.probs.append(pr)
        else:
            needle = "certificate verify failed" if k == "hs_wrong_cert" else "TLS handshake with"
            pr = json_error_problem(r, 502, ["upstream_tls_failed"], needle)
            if pr:
                self.probs.append(pr)
        if not plan["done"].wait(CONNECT_TIMEOUT_MS / 1000.0 + 8):
            self.probs.append("the upstream connection was not ended by the gateway in time (left open)")
            return
        out = plan["outcome"]
        self.case.record_sent(out.get("sent", b""))
        self.case.note("upstream: %s" % {k2: v for k2, v in out.items() if k2 != "sent"})
        if out["accepted"] != 1:
            self.probs.append("%d upstream connections for one request" % out["accepted"])
        if k == "hs_wrong_cert" and out["requests"]:
            self.probs.append("a request was sent over a connection whose certificate failed verification")
        pr = self.t.probe(self.case.tag)
        if pr:
            self.probs.append("fresh HTTPS request right after the case: " + pr)
        if out["peer"] is not None:
            how, took = out["peer"]
            if how == "open" or took > CONNECT_TIMEOUT_MS / 1000.0 + 4:
                self.probs.append("silent upstream mid-handshake: gateway closed it after %.1fs (%s); "
                                  "connect timeout is %d ms" % (took, how, CONNECT_TIMEOUT_MS))

    @staticmethod
    def label(r):
        try:
            return "%d %s" % (r.status, r.json()["error"]["type"])
        except (ValueError, KeyError, TypeError):
            return str(r.status)

    def idle_count(self, pool):
        for pl in self.t.s.status()["pools"]:
            if pl["name"] == pool:
                return pl["endpoints"][0]["idle_connections"]
        raise AssertionError("no pool %s in /status" % pool)

    def run_resp(self):
        p = self.case.plan
        tag = self.case.tag
        up = self.t.r12 if p["pool"] == "r12" else self.t.r13
        rng = random.Random(p["seed"])
        body = rbytes(rng, p["len"])
        head, framed = response_bytes(rng, body, p["framing"], tag)
        plan = up.register(tag, dict(p, head=head, framed=framed, seed=rng.getrandbits(32)))
        beh = p["behaviour"]
        url = "/%s/%s" % (p["pool"], tag)
        c, ad = self.client()
        try:
            c.send(h.build_request(p["method"], url, body=b"req-body" if p["method"] == "POST" else None))
            if beh in ("good", "one_byte", "idle_break"):
                r = c.read_response(p["method"])
                if r.status != 200 or r.body != body:
                    self.probs.append("expected the upstream's 200 with %d body bytes, got %r (%d bytes, "
                                      "%s)" % (len(body), r, len(r.body),
                                               "same" if r.body == body else "different"))
                    return
                if beh == "idle_break":
                    self.idle_break(plan, up)
            elif beh == "corrupt_before_head":
                r = c.read_response(p["method"])
                self.case.outcome = self.label(r)
                pr = json_error_problem(r, 502, ["upstream_reset", "upstream_protocol_error"])
                if pr:
                    self.probs.append(pr)
            elif beh == "cut_mid_body" and p["action"] == "close_notify" and p["framing"] == "close":
                # a clean end: the close-delimited body is what was sent, complete
                k = int((len(framed) - 1) * p["frac"])
                r = c.read_response(p["method"])
                self.case.outcome = "%d, %s body" % (r.status, "full" if r.body == framed[:k] else "wrong")
                if r.status != 200 or r.body != framed[:k]:
                    self.probs.append("close_notify ending a close-delimited body: expected 200 with "
                                      "its %d bytes, got %r (%d bytes)" % (k, r, len(r.body)))
            else:
                self.expect_truncated(c, ad, p["method"], body)
        finally:
            ad.close()
        if beh not in ("good", "one_byte"):
            if not plan["broken_done"].wait(10):
                self.probs.append("the upstream never saw the end of the broken connection")
            elif plan["peer"] and plan["peer"][0] == "open":
                self.probs.append("the gateway left the broken upstream TLS connection open for %.1fs"
                                  % plan["peer"][1])
        # A fresh HTTPS request on the listener: the gateway's other side is unharmed.
        pr = self.t.probe(tag)
        if pr:
            self.probs.append("fresh HTTPS request right after the case: " + pr)
        self.follow_up(up, p["pool"], tag)

    def expect_truncated(self, c, ad, method, body):
        """The head (200), then a body that never completes; or, when the upstream reset the
        connection, a 502 (its RST makes the kernel drop what the gateway had not read yet)."""
        try:
            r = c.read_head(method)
        except h.IncompleteResponse:
            # The gateway relayed the head, then aborted the client connection: uv_close drops
            # what was still queued, over TLS possibly the only (partial) record of the head.
            if self.case.plan["client"] != "tls" or not (ad.ragged or ad.rst):
                self.probs.append("no response head and the connection ended %s" % (
                    "cleanly" if ad.clean else "with a TLS error %r" % (ad.tls_error,)))
            else:
                self.case.note("aborted before a whole record of the head arrived")
                self.case.outcome = "cut before the head"
            return
        if r.status == 502 and self.case.plan.get("action") == "rst":
            c.read_body(r)
            self.case.outcome = self.label(r)
            pr = json_error_problem(r, 502, ["upstream_reset"])
            if pr:
                self.probs.append("upstream reset: " + pr)
            return
        if r.status != 200:
            self.probs.append("expected the upstream's head (200) before the break, got %r" % (r,))
            return
        got = []
        try:
            c.read_body(r, on_data=got.append)
            self.probs.append("a broken upstream response was relayed as complete (%d of %d bytes, "
                              "framing %s)" % (sum(map(len, got)), len(body), r.framing))
        except h.IncompleteResponse:
            pass
        data = b"".join(got)
        self.case.outcome = "200 head, cut (%s)" % ("ragged" if ad.ragged else "rst" if ad.rst else
                                                    "fin" if ad.clean else "?")
        if not body.startswith(data):
            self.probs.append("the truncated body is not a prefix of the upstream's (wrong bytes)")
        if self.case.plan["client"] == "tls":
            if ad.clean:
                self.probs.append("a truncated response over TLS ended with close_notify (looks complete)")
            if ad.tls_error is not None:
                self.probs.append("TLS error on the client connection: %r" % (ad.tls_error,))

    def idle_break(self, plan, up):
        pool = self.case.plan["pool"]
        n0 = self.idle_count(pool)
        if n0 < 1:
            self.probs.append("the upstream connection was not pooled after a complete response")
        plan["released"].set()
        v = self.case.plan["variant"]
        if not plan["broken_done"].wait(10):
            self.probs.append("the upstream never saw the end of the idle connection after %s" % v)
            return
        if plan["peer"][0] == "open":
            self.probs.append("idle pooled connection not closed after %s" % v)
        try:
            h.wait_for(lambda: self.idle_count(pool) < n0, 5, what="the pool to drop the broken connection")
        except AssertionError as e:
            self.probs.append(str(e))

    def follow_up(self, up, pool, tag):
        """A non-replayable request on the same pool right after: served fresh and intact."""
        rng = random.Random(self.case.plan["seed"] ^ 0xF0)
        body = rbytes(rng, 300)
        head, framed = response_bytes(rng, body, "cl", tag + "-follow")
        plan = up.register(tag + "-follow", {"behaviour": "good", "head": head, "framed": framed,
                                              "records": "one", "tcp": "one", "framing": "cl",
                                              "seed": rng.getrandbits(32)})
        with h.RawConn(self.t.plain_port, timeout=10) as c:
            r = c.request("POST", "/%s/%s-follow" % (pool, tag), body=b"once")
        if r.status != 200 or r.body != body:
            self.probs.append("follow-up POST on the pool: expected a fresh 200, got %r" % (r,))
        with up.lock:
            broken = [cid for cid in plan["served"] if up.conns[cid]["broken"]]
        if broken:
            self.probs.append("follow-up request went over broken connection(s) %s" % broken)


# ---------------------------------------------------------------------------------------
# The test


class FuzzTLSTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.pki = Pki(env.path("pki"))
        cls.mock = env.mock("m", args=["--verbose"])
        cls.hs = HandshakeUpstream(cls.pki)
        cls.r13 = ResponseUpstream(cls.pki)
        cls.r12 = ResponseUpstream(cls.pki, V12)
        s = env.sluice({}, start=False)
        for name in ("ca.pem", "srv.pem", "srv.key"):
            shutil.copyfile(cls.pki.path(name), os.path.join(s.dir, name))
        tls = {"ca": "ca.pem"}
        pools = {
            "m": h.make_pool([cls.mock], keepalive={"max_idle": 16}),
            "hs": h.make_pool([cls.hs.url()], tls=tls, keepalive={"max_idle": 0},
                              timeout_ms={"connect": CONNECT_TIMEOUT_MS,
                                          "first_byte": FIRST_BYTE_TIMEOUT_MS}),
            "r13": h.make_pool([cls.r13.url()], tls=tls, keepalive={"max_idle": RESP_MAX_IDLE},
                               timeout_ms={"connect": 3000, "first_byte": FIRST_BYTE_TIMEOUT_MS}),
            "r12": h.make_pool([cls.r12.url()], tls=tls, keepalive={"max_idle": RESP_MAX_IDLE},
                               timeout_ms={"connect": 3000, "first_byte": FIRST_BYTE_TIMEOUT_MS}),
        }
        routes = [{"path": "/hs", "pool": "hs"}, {"path": "/r13", "pool": "r13"},
                  {"path": "/r12", "pool": "r12"}, {"path": "/", "pool": "m"}]
        limits = {"header_timeout_ms": HEADER_TIMEOUT_MS, "idle_timeout_ms": IDLE_TIMEOUT_MS}
        listen = [{"addr": "127.0.0.1:0", "tls": {"cert": "srv.pem", "key": "srv.key"}}, "127.0.0.1:0"]
        cfg = h.make_config(pools, routes, limits=limits, watch=False, listen=listen,
                            log_level=os.environ.get("SLUICE_FUZZ_TLS_LOG", "info"))
        with open(s.config_path, "w") as f:
            f.write(h.config_text(cfg))
        cls.s = s.start()
        s.admin_port()  # logged after every listener: both "listening on" lines are in by then
        ports = [int(m.group(2)) for m in map(h.LISTEN_RE.search, s.lines) if m]
        if len(ports) != 2:
            raise AssertionError("expected two listeners:\n" + s.log_text())
        cls.tls_port, cls.plain_port = ports
        cls.ctxs = {"1.2": client_ctx(cls.pki, maxv=V12), "1.3": client_ctx(cls.pki, maxv=V13)}

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            for u in (cls.hs, cls.r13, cls.r12):
                u.close()

    def assert_alive(self, what):
        if not self.s.alive():
            self.fail("sluice died during %s (rc %s):\n%s" % (
                what, self.s.proc.returncode,
                h.sanitizer_report(self.s.log_text()) or "\n".join(self.s.lines[-40:])))

    def probe(self, label):
        """A fresh, valid HTTPS request; None when it is served right."""
        try:
            s = tls_socket(self.tls_port, self.ctxs["1.3"])
            try:
                url = "/echo/%s-probe" % label
                r = raw_conn(SockAdapter(s)).request("GET", url, [("Connection", "close")])
                return echo_problem(r, "GET", url)
            finally:
                s.close()
        except Exception as e:  # noqa: BLE001
            return "raised %r" % (e,)

    def report(self, name, cases, failures, elapsed):
        kinds = collections.Counter(c.kind for c in cases)
        outcomes = collections.defaultdict(collections.Counter)
        for c in cases:
            if c.outcome:
                outcomes[c.kind][c.outcome] += 1
        sys.stderr.write("fuzz_tls %s: seed %d, %d cases %s in %.1fs\n" % (
            name, SEED, len(cases), dict(kinds), elapsed))
        if os.environ.get("SLUICE_FUZZ_TLS_STATS"):
            for k, cnt in sorted(outcomes.items()):
                sys.stderr.write("  %-26s %s\n" % (k, dict(cnt)))
        if failures:
            self.fail("%d problem(s) (seed %d); first ones:\n\n%s" % (
                len(failures), SEED, "\n\n".join(failures[:15])))

    def test_1_downstream(self):
        idxs = ONLY_DOWN if _ONLY else list(range(N_DOWN))
        if not idxs:
            self.skipTest("no downstream case selected")
        cases = [plan_down(Case("d", i, DOWN_KINDS)) for i in idxs]
        failures = []

        def one(case):
            probs = DownRunner(self, case).run()
            pr = self.probe(case.tag)
            if pr:
                probs.append("fresh HTTPS request right after the case: " + pr)
            return case, probs

        # Broken records and fatal alerts run alongside healthy connections on purpose: that is
        # how a dirty OpenSSL error queue (one connection's failure failing another's read) shows.
        t0 = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as ex:
            for case, probs in ex.map(one, cases):
                failures.extend("%s\n    -> %s" % (case.describe(), p) for p in probs)
        self.assert_alive("the downstream cases")
        self.report("downstream", cases, failures, time.monotonic() - t0)

    def test_2_upstream(self):
        idxs = ONLY_UP if _ONLY else list(range(N_UP))
        if not idxs:
            self.skipTest("no upstream case selected")
        cases = [plan_up(Case("u", i, UP_KINDS)) for i in idxs]
        failures = []
        t0 = time.monotonic()
        for case in cases:
            probs = UpRunner(self, case).run()
            failures.extend("%s\n    -> %s" % (case.describe(), p) for p in probs)
            self.assert_alive("upstream case u%d" % case.idx)
        for up in (self.r13, self.r12):
            with up.lock:
                failures.extend("upstream: " + p for p in up.problems)
        self.report("upstream", cases, failures, time.monotonic() - t0)

    def test_z_settled(self):
        """After the cases: alive, serving, no connection or exchange left, no broken upstream
        connection left open, nothing after a close_notify reached the upstream."""
        self.assert_alive("the run")
        pr = self.probe("final")
        self.assertIsNone(pr, pr)

        def settled():
            st = self.s.status()
            if st["connections"] > 1:  # this /status request itself
                return None
            for pl in st["pools"]:
                if pl["active"] or pl["queued"]:
                    return None
                for ep in pl["endpoints"]:
                    if ep["inflight"] or ep["queued"]:
                        return None
            return st

        st = h.wait_for(settled, 10, what="the gateway to hold no client connection or exchange")
        limit = {"hs": 0, "r12": RESP_MAX_IDLE, "r13": RESP_MAX_IDLE, "m": 16}
        for pl in st["pools"]:
            self.assertLessEqual(pl["endpoints"][0]["idle_connections"], limit[pl["name"]], pl)

        def broken_open():
            out = []
            for up in (self.r13, self.r12):
                with up.lock:
                    out += [c for c in up.conns if c["broken"] and c["open"]]
            return out

        try:
            h.wait_for(lambda: not broken_open(), 10, what="broken upstream connections to be closed")
        except AssertionError:
            self.fail("broken upstream TLS connections left open: %r" % broken_open())
        for up in (self.r13, self.r12):
            self.assertEqual(up.problems, [])
        with open(os.path.join(self.mock.dir, "stderr.log"), "rb") as f:
            mock_log = f.read()
        self.assertNotIn(b"aftercn", mock_log, "a request sent after close_notify reached the upstream")
        rep = h.sanitizer_report(self.s.log_text())
        self.assertIsNone(rep, rep)


    # --- regression tests for what this suite found (fixed in 04f254a) --------------------

    def keepalive_client(self):
        s = tls_socket(self.tls_port, self.ctxs["1.3"])
        ad = SockAdapter(s)
        c = raw_conn(ad)
        r = c.request("GET", "/echo/regress-first")
        self.assertEqual(r.status, 200, r)
        return c, ad

    def handshaken_wire(self):
        w = Wire(self.tls_port)
        tls = MemTLS(self.ctxs["1.3"])
        tls.handshake(w, time.monotonic() + 5)
        return w, tls

    def fail_client_record(self):
        """A client that completes the handshake, then sends a record with a bad MAC."""
        w, tls = self.handshaken_wire()
        try:
            rec = bytearray(tls.seal([h.build_request("GET", "/echo/regress-bad")]))
            rec[-1] ^= 0x01
            w.send(bytes(rec))
            self.assertIn(w.wait_closed(5)[0], ("fin", "rst"))
        finally:
            w.close()

    def fail_client_alert(self):
        """A client that completes the handshake, then sends a plaintext fatal alert."""
        w, _ = self.handshaken_wire()
        try:
            w.send(b"\x15\x03\x03\x00\x02\x02\x28")
            self.assertIn(w.wait_closed(5)[0], ("fin", "rst"))
        finally:
            w.close()

    def fail_upstream_record(self):
        """An upstream whose response carries a record with a bad MAC after the head."""
        r, got, ended, body = self.close_delimited("corrupt_after_head", "wait", framing="cl", tag_n=1)
        self.assertEqual((r.status, ended), (200, "truncated"))

    def test_failed_tls_read_does_not_poison_other_connections(self):
        """A TLS read that fails on one connection (a broken client record, a client's fatal
        alert, an upstream's broken record) must not fail the next TLS read of an unrelated
        keep-alive connection. It did: the failure stayed on OpenSSL's per-thread error queue,
        which SSL_get_error() consults first, so the other connection's harmless WANT_READ read
        as SSL_ERROR_SSL and it was closed without a response."""
        for name, trigger in (("client bad record", self.fail_client_record),
                              ("client fatal alert", self.fail_client_alert),
                              ("upstream bad record", self.fail_upstream_record)):
            with self.subTest(name):
                c, ad = self.keepalive_client()  # B: keep-alive TLS connection, one request done
                try:
                    trigger()                    # A fails inside the gateway
                    try:
                        r = c.request("GET", "/echo/regress-second")  # B's next request
                    except h.IncompleteResponse as e:
                        self.fail("B's request got no response, its connection was closed (%s; "
                                  "ragged EOF without close_notify: %s)" % (e, ad.ragged))
                    self.assertEqual(r.status, 200, r)
                finally:
                    ad.close()

    def close_delimited(self, behaviour, action, framing="close", tag_n=0):
        """An upstream response over TLS that breaks half-way through its body (by default
        close-delimited: no Content-Length, no chunking); returns (head, body bytes the client
        got, "complete" or "truncated", the whole body)."""
        tag = "u9%03dz%04x" % (tag_n, zlib_crc(behaviour + action + framing))
        rng = random.Random(tag)
        body = rbytes(rng, 3000)
        head, framed = response_bytes(rng, body, framing, tag)
        plan = self.r13.register(tag, {"behaviour": behaviour, "head": head, "framed": framed,
                                       "records": "one", "tcp": "one", "framing": framing,
                                       "frac": 0.5, "action": action, "seed": 1})
        with h.RawConn(self.plain_port, timeout=10) as c:
            c.send(h.build_request("GET", "/r13/%s" % tag))
            r = c.read_head()
            got = []
            try:
                c.read_body(r, on_data=got.append)
                ended = "complete"
            except h.IncompleteResponse:
                ended = "truncated"
        plan["broken_done"].wait(10)
        return r, b"".join(got), ended, body

    def test_close_delimited_body_cut_by_a_bad_record_is_not_complete(self):
        """A close-delimited upstream body (no Content-Length, no chunked coding) that a TLS
        record failing to decrypt cuts short must reach the client truncated, not as a complete
        chunked response lacking the rest (it did: on_up_eof finished the body at any end of
        input)."""
        r, got, ended, body = self.close_delimited("corrupt_after_head", "wait", tag_n=2)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(body.startswith(got))
        self.assertEqual(ended, "truncated", "got %d of %d bytes as a complete response"
                         % (len(got), len(body)))

    def test_close_delimited_body_cut_without_close_notify_is_not_complete(self):
        """A close-delimited upstream body whose TLS connection ends without close_notify is
        truncated (RFC 9112 section 9.8: such a response "is complete only if a valid closure
        alert has been received"; RFC 8446 section 6.1): the client must not get it as a
        complete response (it did: a TCP EOF read like a close_notify)."""
        r, got, ended, body = self.close_delimited("cut_mid_body", "fin", tag_n=3)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(body.startswith(got))
        self.assertEqual(ended, "truncated", "got %d of %d bytes as a complete response"
                         % (len(got), len(body)))

    def test_close_delimited_body_ended_by_close_notify_is_complete(self):
        """The other side of the two above: close_notify does end a close-delimited body."""
        r, got, ended, body = self.close_delimited("cut_mid_body", "close_notify", tag_n=4)
        self.assertEqual((r.status, ended), (200, "complete"), r)
        self.assertEqual(got, body[:1499])

if __name__ == "__main__":
    unittest.main()
