"""TLS termination on listeners (listen = { { addr, tls = { cert, key } } }): https to a plain
upstream (curl and http.client, keep-alive, X-Forwarded-Proto), ALPN, the TLS 1.2 floor,
session resumption, streaming and big bodies, wss to a plain ws upstream, close_notify on
close, certificate reload (good and bad files), --check, and garbage on the TLS port.

A throwaway CA and two server certificates (same names, different serial and subject) are
made with the openssl CLI at setup."""

import asyncio
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import unittest
import warnings

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
import websockets  # noqa: E402  (Debian python3-websockets)

BYTES_PATTERN = bytes(range(251))

# ---------------------------------------------------------------------------------------
# Certificates


SERVER_EXT = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""

INTERMEDIATE_EXT = """\
basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""


def _openssl(args, cwd):
    p = subprocess.run(["openssl"] + args, cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if p.returncode != 0:
        raise AssertionError("openssl %s failed: %s" % (" ".join(args), p.stderr.decode("utf-8", "replace")))


class Pki:
    """ca.pem; srv.pem/srv.key (serial 1001, O=first) and srv2.pem/srv2.key (serial 1002,
    O=second), both for DNS:localhost and IP:127.0.0.1 and signed by the CA; srv3.pem/srv3.key
    (serial 1003) signed by an intermediate (int.pem), with srv3-chain.pem = leaf +
    intermediate; garbage.pem."""

    def __init__(self, d):
        os.makedirs(d, exist_ok=True)
        self.dir = d
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl(["req", "-x509"] + ec + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                  "-subj", "/CN=sluice test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
        with open(os.path.join(d, "ext.cnf"), "w") as f:
            f.write(SERVER_EXT)
        with open(os.path.join(d, "int.cnf"), "w") as f:
            f.write(INTERMEDIATE_EXT)
        certs = (("int", 2001, "/CN=sluice test intermediate", "ca", "int.cnf"),
                 ("srv", 1001, "/CN=localhost/O=first", "ca", "ext.cnf"),
                 ("srv2", 1002, "/CN=localhost/O=second", "ca", "ext.cnf"),
                 ("srv3", 1003, "/CN=localhost/O=third", "int", "ext.cnf"))
        for name, serial, subj, issuer, ext in certs:
            _openssl(["req", "-new"] + ec + ["-keyout", name + ".key", "-out", name + ".csr",
                      "-subj", subj], d)
            _openssl(["x509", "-req", "-in", name + ".csr", "-CA", issuer + ".pem",
                      "-CAkey", issuer + ".key", "-set_serial", str(serial), "-days", "2",
                      "-out", name + ".pem", "-extfile", ext], d)
        with open(self.path("srv3-chain.pem"), "w") as f:
            for name in ("srv3.pem", "int.pem"):
                with open(self.path(name)) as g:
                    f.write(g.read())
        with open(os.path.join(d, "garbage.pem"), "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        self.ca = self.path("ca.pem")
        self.der = {n: self.der_of(n + ".pem") for n in ("srv", "srv2", "srv3")}
        self.serial = {"srv": "%04X" % 1001, "srv2": "%04X" % 1002, "srv3": "%04X" % 1003}

    def path(self, name):
        return os.path.join(self.dir, name)

    def der_of(self, name):
        with open(self.path(name)) as f:
            return ssl.PEM_cert_to_DER_cert(f.read())

    def install(self, dest_dir, cert="srv.pem", key="srv.key"):
        """Copies a cert/key pair into dest_dir as srv.pem / srv.key (what the configs name)."""
        shutil.copyfile(self.path(cert), os.path.join(dest_dir, "srv.pem"))
        shutil.copyfile(self.path(key), os.path.join(dest_dir, "srv.key"))


def client_ctx(pki, alpn=None, minv=None, maxv=None, tickets=True):
    ctx = ssl.create_default_context(cafile=pki.ca)
    # Python sets this by default with OpenSSL 3: a close without close_notify would then
    # read as a clean b"" and the close_notify checks could not fail.
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if minv is not None:
        ctx.minimum_version = minv
    if maxv is not None:
        ctx.maximum_version = maxv
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def tls_listen(cert="srv.pem", key="srv.key"):
    return [{"addr": "127.0.0.1:0", "tls": {"cert": cert, "key": key}}]


def start_tls_sluice(env, pki, cfg):
    """Starts sluice with srv.pem/srv.key next to its config file (the config names them
    relatively). Returns (sluice, admin port)."""
    s = env.sluice(cfg, start=False)
    pki.install(s.dir)
    s.start()
    return s, s.admin_port()


# ---------------------------------------------------------------------------------------
# Clients


class TLSConn(h.RawConn):
    """h.RawConn over TLS (the harness's HTTP/1.1 parser on an SSLSocket). Ragged EOFs are
    not suppressed (and client_ctx clears OP_IGNORE_UNEXPECTED_EOF): a close without
    close_notify raises ssl.SSLError UNEXPECTED_EOF_WHILE_READING."""

    def __init__(self, port, ctx, server_hostname="localhost", session=None, timeout=5.0):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session,
                                        suppress_ragged_eofs=False)
        except BaseException:
            raw.close()
            raise
        self.buf = b""
        self.eof = False
        self.timeout = timeout

    def peer_der(self):
        return self.sock.getpeercert(binary_form=True)

    def peer_serial(self):
        return self.sock.getpeercert()["serialNumber"]


def await_close_notify(testcase, conn, timeout=5.0):
    """Reads until the server ends the TLS connection; fails unless it did so with
    close_notify (recv returns b"" rather than raising SSLEOFError). Returns the bytes read."""
    deadline = time.monotonic() + timeout
    extra = conn.buf
    conn.buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            testcase.fail("server did not close the TLS connection within %.1fs" % timeout)
        conn.sock.settimeout(left)
        try:
            data = conn.sock.recv(65536)
        except ssl.SSLError as e:  # UNEXPECTED_EOF_WHILE_READING (or SSLEOFError)
            testcase.fail("TCP closed without a TLS close_notify: %r" % (e,))
        except socket.timeout:
            continue
        if not data:
            return extra
        extra += data


def await_tcp_close(sock, timeout):
    """Waits for the peer to close a plain socket: returns (how, seconds, bytes received)
    with how 'fin', 'rst' or 'open' (still open at timeout)."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(timeout)
    while True:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            return "open", time.monotonic() - t0, got
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return "rst", time.monotonic() - t0, got
        except socket.timeout:
            return "open", time.monotonic() - t0, got
        if not data:
            return "fin", time.monotonic() - t0, got
        got += data


def mem_handshake(port, ctx, flush_last=True):
    """A TLS handshake over memory BIOs on a plain socket, so raw bytes can follow it.
    flush_last=False keeps the client's last flight in obj.outgoing. Returns (socket,
    SSLObject); obj.incoming / obj.outgoing are its BIOs."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    obj.incoming, obj.outgoing = inc, out
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = out.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise AssertionError("server closed during the handshake")
            inc.write(data)
    if flush_last:
        pending = out.read()
        if pending:
            sock.sendall(pending)
    return sock, obj


WsUpstream = h.WsEchoUpstream


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---------------------------------------------------------------------------------------
# Serving over TLS

SSE_EVENTS = 4
SSE_INTERVAL_MS = 150


class TLSDownstreamTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.pki = Pki(env.path("pki"))
        cls.up = env.mock("up")
        cls.sse = env.mock("sse", ["--sse-events", str(SSE_EVENTS), "--sse-interval-ms", str(SSE_INTERVAL_MS)])
        cls.ws = WsUpstream()
        pools = {
            "up": h.make_pool([cls.up]),
            "sse": h.make_pool([cls.sse]),
            "ws": h.make_pool([cls.ws.url], websocket={"max_message_bytes": 4 * 1024 * 1024}),
        }
        routes = [{"path": "/v1/chat/completions", "pool": "sse"}, {"path": "/ws", "pool": "ws"},
                  {"path": "/", "pool": "up"}]
        cfg = h.make_config(pools, routes, watch=False, listen=tls_listen())
        cls.s, cls.admin = start_tls_sluice(env, cls.pki, cfg)
        cls.port = cls.s.port
        cls.ctx = client_ctx(cls.pki)

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            cls.ws.stop()

    def conn(self, ctx=None, **kw):
        return TLSConn(self.port, ctx or self.ctx, **kw)

    def get_echo(self, c, path="/echo", headers=None):
        r = c.request("GET", path, headers)
        self.assertEqual(r.status, 200, r)
        return r.json()

    def assert_serving(self):
        """A fresh TLS connection still gets proxied."""
        with self.conn() as c:
            echo = self.get_echo(c, "/echo/alive")
        self.assertEqual(echo["url"], "/echo/alive")
        self.assertTrue(self.s.alive())

    # --- 1. https -> http ---------------------------------------------------------------------

    def test_curl_https_to_plain_upstream(self):
        out = os.path.join(self.env.tmp, "curl-body")
        p = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", self.pki.ca,
                            "--resolve", "localhost:%d:127.0.0.1" % self.port,
                            "-H", "X-Forwarded-Proto: http",  # a client's claim must not survive
                            "-o", out, "-w", "%{http_code} %{http_version} %{ssl_verify_result}",
                            "https://localhost:%d/echo?via=curl" % self.port],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=20)
        self.assertEqual(p.returncode, 0, p.stderr.decode("utf-8", "replace"))
        self.assertEqual(p.stdout.decode().split(), ["200", "1.1", "0"])
        with open(out, "rb") as f:
            echo = json.loads(f.read())
        self.assertEqual(echo["instance"], "up")
        self.assertEqual(echo["url"], "/echo?via=curl")
        self.assertEqual(h.echo_header_all(echo, "X-Forwarded-Proto"), ["https"])
        self.assertEqual(h.echo_header_all(echo, "X-Forwarded-For"), ["127.0.0.1"])

    def test_http_client_keepalive_five_requests_on_one_connection(self):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=self.ctx)
        try:
            sock0 = None
            for i in range(5):
                conn.request("GET", "/echo/%d" % i)
                r = conn.getresponse()
                body = r.read()
                self.assertEqual(r.status, 200, body)
                if sock0 is None:
                    sock0 = conn.sock
                    self.assertIsInstance(sock0, ssl.SSLSocket)
                    # verified against IP:127.0.0.1 in the certificate (no SNI)
                    self.assertEqual(sock0.getpeercert()["serialNumber"], self.pki.serial["srv"])
                self.assertIs(conn.sock, sock0, "request %d needed a new connection" % i)
                echo = json.loads(body)
                self.assertEqual(echo["url"], "/echo/%d" % i)
                self.assertEqual(h.echo_header_all(echo, "X-Forwarded-Proto"), ["https"])
                self.assertIsNone(r.getheader("Connection"))
        finally:
            conn.close()

    def test_pipelined_requests_over_tls(self):
        with self.conn() as c:
            c.send(b"".join(h.build_request("GET", "/echo/p%d" % i) for i in range(4)))
            for i in range(4):
                r = c.read_response()
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.json()["url"], "/echo/p%d" % i)
            r = c.request("POST", "/echo/after", body=b"x" * 1000)
            self.assertEqual(r.json()["body_length"], 1000)

    def test_request_in_the_same_segment_as_the_last_handshake_flight(self):
        """The client's Finished and its first request arrive in one read: the request must
        not wait for more input."""
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            with self.subTest(version.name):
                sock, obj = mem_handshake(self.port, client_ctx(self.pki, maxv=version),
                                          flush_last=False)
                with sock:
                    self.assertEqual(obj.version(), version.name.replace("_", "."))
                    obj.write(h.build_request("GET", "/echo/coalesced", [("Connection", "close")]))
                    sock.sendall(obj.outgoing.read())
                    plain = b""
                    sock.settimeout(5)
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            break
                        obj.incoming.write(data)
                        try:
                            while True:
                                chunk = obj.read(65536)
                                if not chunk:
                                    break
                                plain += chunk
                        except ssl.SSLWantReadError:
                            pass
                        except ssl.SSLZeroReturnError:
                            break
                self.assertTrue(plain.startswith(b"HTTP/1.1 200 "), plain[:200])
                self.assertIn(b'"url":"/echo/coalesced"', plain)

    # --- 2. ALPN -------------------------------------------------------------------------------

    def test_alpn_h2_and_http11_selects_http11(self):
        with self.conn(client_ctx(self.pki, alpn=["h2", "http/1.1"])) as c:
            self.assertEqual(c.sock.selected_alpn_protocol(), "http/1.1")
            self.get_echo(c)

    def test_alpn_h2_only_completes_without_alpn_and_speaks_http11(self):
        with self.conn(client_ctx(self.pki, alpn=["h2"])) as c:
            self.assertIsNone(c.sock.selected_alpn_protocol())
            echo = self.get_echo(c, "/echo/h2only")
            self.assertEqual(echo["url"], "/echo/h2only")
            r = c.request("GET", "/echo/again")  # and keeps the connection
            self.assertEqual(r.status, 200)

    def test_no_alpn_offered(self):
        with self.conn() as c:
            self.assertIsNone(c.sock.selected_alpn_protocol())
            self.get_echo(c)

    # --- 3. protocol floor --------------------------------------------------------------------

    def legacy_ctx(self, version):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = client_ctx(self.pki, minv=version, maxv=version)
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        return ctx

    def assert_client_can_speak(self, ctx, version_name):
        """The legacy client context works against a Python server that allows it, so a
        refusal by sluice is sluice's doing, not the client's."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            sctx.minimum_version = ssl.TLSVersion.TLSv1
            sctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        sctx.load_cert_chain(self.pki.path("srv.pem"), self.pki.path("srv.key"))
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(5)

        def serve():
            try:
                c, _ = lsock.accept()
                with sctx.wrap_socket(c, server_side=True) as s:
                    s.sendall(b"ok")
            except (OSError, ssl.SSLError):
                pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with ctx.wrap_socket(socket.create_connection(lsock.getsockname(), timeout=5),
                                 server_hostname="localhost") as s:
                self.assertEqual(s.version(), version_name)
                self.assertEqual(s.recv(2), b"ok")
        finally:
            t.join(5)
            lsock.close()

    def test_tls11_and_tls10_refused(self):
        for version, name in ((ssl.TLSVersion.TLSv1_1, "TLSv1.1"), (ssl.TLSVersion.TLSv1, "TLSv1")):
            with self.subTest(name):
                ctx = self.legacy_ctx(version)
                self.assert_client_can_speak(ctx, name)
                with self.assertRaises(ssl.SSLError) as cm:
                    self.conn(ctx).close()
                # the refusal is a protocol_version alert, not a dropped connection
                self.assertIn("PROTOCOL_VERSION", str(cm.exception).upper().replace(" ", "_"))
        self.assert_serving()

    def test_tls12_and_tls13_accepted(self):
        for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
            with self.subTest(name):
                with self.conn(client_ctx(self.pki, minv=version, maxv=version)) as c:
                    self.assertEqual(c.sock.version(), name)
                    self.get_echo(c)

    # --- 4. session resumption ------------------------------------------------------------------

    def test_session_resumption(self):
        cases = [
            ("TLSv1.3", client_ctx(self.pki, minv=ssl.TLSVersion.TLSv1_3)),
            ("TLSv1.2 ticket", client_ctx(self.pki, maxv=ssl.TLSVersion.TLSv1_2)),
            ("TLSv1.2 session id", client_ctx(self.pki, maxv=ssl.TLSVersion.TLSv1_2, tickets=False)),
        ]
        for name, ctx in cases:
            with self.subTest(name):
                with self.conn(ctx) as c1:
                    self.assertFalse(c1.sock.session_reused)
                    self.get_echo(c1)  # TLS 1.3 tickets arrive after the handshake
                    session = c1.sock.session
                self.assertIsNotNone(session)
                for i in range(2):
                    with self.conn(ctx, session=session) as c2:
                        self.assertTrue(c2.sock.session_reused, "%s: connection %d not resumed" % (name, i + 2))
                        echo = self.get_echo(c2, "/echo/resumed")
                        self.assertEqual(h.echo_header_all(echo, "X-Forwarded-Proto"), ["https"])
                        if c2.sock.version() == "TLSv1.3":
                            session = c2.sock.session  # TLS 1.3 tickets are single use

    # --- 5. streaming ---------------------------------------------------------------------------

    def test_sse_over_tls_event_by_event(self):
        with self.conn(timeout=10) as c:
            t0 = time.monotonic()
            c.send(h.build_request("POST", "/v1/chat/completions",
                                   [("Content-Type", "application/json"), ("Accept", "text/event-stream")],
                                   b'{"model":"m","stream":true,"messages":[]}'))
            r = c.read_head()
            c.read_body(r)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("content-type", "").startswith("text/event-stream"), r)
        events = []
        start = 0
        while True:
            end = r.body.find(b"\n\n", start)
            if end < 0:
                break
            events.append((r.time_at(end + 1) - t0, r.body[start:end].decode()))
            start = end + 2
        self.assertEqual(start, len(r.body), "trailing bytes after the last event: %r" % r.body[start:])
        self.assertEqual(len(events), SSE_EVENTS + 1, events)
        self.assertEqual(events[-1][1], "data: [DONE]")
        words = []
        for _, ev in events[:-1]:
            self.assertTrue(ev.startswith("data: {"), ev)
            chunk = json.loads(ev[len("data: "):])
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            words.append(chunk["choices"][0]["delta"]["content"])
        self.assertTrue(all(words), words)
        for i in range(1, SSE_EVENTS):
            gap = events[i][0] - events[i - 1][0]
            self.assertGreater(gap, SSE_INTERVAL_MS / 1000.0 / 2,
                               "events %d and %d arrived %.0f ms apart (batched?)" % (i - 1, i, gap * 1000))

    def test_two_mib_upload_and_download(self):
        n = 2 * 1024 * 1024
        body = os.urandom(n)
        with self.conn(timeout=20) as c:
            r = c.request("POST", "/upload", [("Content-Type", "application/octet-stream")], body)
            self.assertEqual(r.status, 200, r)
            got = json.loads(r.body)
            self.assertEqual(got["body_length"], n)
            self.assertEqual(got["body_sha256"], h.sha256(body))
            r = c.request("GET", "/bytes?n=%d" % n)
            self.assertEqual(r.status, 200)
            self.assertEqual(len(r.body), n)
            expect = (BYTES_PATTERN * (n // 251 + 1))[:n]
            self.assertEqual(h.sha256(r.body), h.sha256(expect))
            # the connection is still good after 4 MiB both ways
            self.get_echo(c)

    # --- 6. wss -----------------------------------------------------------------------------------

    def wss(self, path):
        return "wss://localhost:%d%s" % (self.port, path)

    def test_wss_relay_integrity_and_server_close_code(self):
        async def go():
            async with websockets.connect(self.wss("/ws/a"), ssl=self.ctx, max_size=None,
                                          extra_headers={"X-Probe": "wss"}) as ws:
                sslobj = ws.transport.get_extra_info("ssl_object")
                self.assertIsNotNone(sslobj)
                self.assertEqual(sslobj.getpeercert()["serialNumber"], self.pki.serial["srv"])
                await ws.send("hello over tls")
                self.assertEqual(await ws.recv(), "hello over tls")
                blob = os.urandom(1 << 20)
                await ws.send(blob)
                back = await ws.recv()
                self.assertIsInstance(back, bytes)
                self.assertEqual(hashlib.sha256(back).digest(), hashlib.sha256(blob).digest())
                await ws.send("close:4001:bye")
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await ws.recv()
                return cm.exception.rcvd

        rcvd = run(go())
        self.assertIsNotNone(rcvd)
        self.assertEqual((rcvd.code, rcvd.reason), (4001, "bye"))
        hdrs = self.ws.headers[-1]
        self.assertEqual(hdrs.get("X-Probe"), "wss")
        self.assertEqual(hdrs.get("X-Forwarded-Proto"), "https")

    def test_wss_client_close_code_reaches_upstream(self):
        n = len(self.ws.close_codes)

        async def go():
            ws = await websockets.connect(self.wss("/ws/b"), ssl=self.ctx)
            await ws.send("x")
            self.assertEqual(await ws.recv(), "x")
            await ws.close(4002, "client bye")
            return ws.close_code

        self.assertEqual(run(go()), 4002)
        h.wait_for(lambda: len(self.ws.close_codes) > n, 5, what="upstream session ended")
        self.assertIn(4002, self.ws.close_codes[n:])
        self.assert_serving()

    # --- 7. close_notify --------------------------------------------------------------------------

    def test_connection_close_ends_with_close_notify(self):
        with self.conn() as c:
            r = c.request("GET", "/echo/last", [("Connection", "close")])
            self.assertEqual(r.status, 200)
            self.assertTrue(r.has_token("connection", "close"), r)
            self.assertEqual(await_close_notify(self, c), b"")

    def test_http10_response_ends_with_close_notify(self):
        with self.conn() as c:
            r = c.request("GET", "/echo/ten", version="HTTP/1.0")
            self.assertEqual(r.status, 200)
            self.assertEqual(await_close_notify(self, c), b"")

    def test_gateway_error_with_connection_close_ends_with_close_notify(self):
        with self.conn() as c:
            r = c.request("GET", "/echo/x", [("Connection", "close"), ("Content-Length", "abc")])
            self.assertEqual(r.status, 400, r)
            self.assertEqual(await_close_notify(self, c), b"")

    def test_keepalive_connection_stays_open(self):
        with self.conn() as c:
            self.get_echo(c)
            c.sock.settimeout(0.3)
            with self.assertRaises(socket.timeout):
                c.sock.recv(1)  # nothing: no close_notify, no close
            c.sock.settimeout(5)
            self.get_echo(c)

    # --- 10. garbage ------------------------------------------------------------------------------

    def test_garbage_and_plain_http_on_tls_port(self):
        payloads = [
            b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n",
            os.urandom(2048),
            b"\x16\x03\x01\xff\xff" + os.urandom(300),           # a handshake record that lies about its size
            b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03" + os.urandom(40),  # a ClientHello cut short
            b"\x15\x03\x03\x00\x02\x02\x28",                     # an alert as the first record
        ]
        for i, payload in enumerate(payloads):
            with self.subTest(i):
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(payload)
                    if i == 3:
                        s.shutdown(socket.SHUT_WR)  # then EOF mid-handshake
                    how, _, got = await_tcp_close(s, 5)
                self.assertIn(how, ("fin", "rst"), "connection left open after %r" % payload[:16])
                self.assertNotIn(b"HTTP/", got, "plaintext answer on the TLS port")
                self.assertTrue(self.s.alive())
        self.assert_serving()

    def test_broken_record_after_handshake_closes(self):
        sock, obj = mem_handshake(self.port, self.ctx)
        with sock:
            # an application_data record whose MAC cannot verify
            sock.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
            how, _, _ = await_tcp_close(sock, 5)
        self.assertIn(how, ("fin", "rst"))
        self.assert_serving()


# ---------------------------------------------------------------------------------------
# Timeouts


class TLSHeaderTimeoutTest(h.SluiceTestCase):
    """limits.header_timeout_ms bounds the handshake and the request head on a TLS port;
    limits.idle_timeout_ms closes kept-alive TLS connections."""

    TIMEOUT_MS = 300
    IDLE_MS = 400

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.pki = Pki(env.path("pki"))
        cls.up = env.mock("up")
        cfg = h.make_config({"up": h.make_pool([cls.up])}, [{"path": "/", "pool": "up"}],
                            limits={"header_timeout_ms": cls.TIMEOUT_MS, "idle_timeout_ms": cls.IDLE_MS},
                            watch=False,
                            listen=tls_listen())
        cls.s, _ = start_tls_sluice(env, cls.pki, cfg)
        cls.ctx = client_ctx(cls.pki)

    def assert_timely(self, seconds):
        self.assertGreater(seconds, self.TIMEOUT_MS / 1000.0 * 0.8, "closed before the header timeout")
        self.assertLess(seconds, 4.0, "closed long after the header timeout")

    def test_silent_client_closed_after_header_timeout(self):
        with socket.create_connection(("127.0.0.1", self.s.port), timeout=5) as s:
            how, took, got = await_tcp_close(s, 6)
        self.assertEqual(how, "fin", "silent client: %s after %.2fs" % (how, took))
        self.assertEqual(got, b"")
        self.assert_timely(took)

    def test_handshake_then_silence_closed_after_header_timeout(self):
        t0 = time.monotonic()
        c = TLSConn(self.s.port, self.ctx)
        with c:
            c.sock.settimeout(6)
            try:
                data = c.sock.recv(1)
            except (ssl.SSLError, ConnectionResetError):  # no close_notify here: not required
                data = b""
            took = time.monotonic() - t0
        self.assertEqual(data, b"")
        self.assert_timely(took)

    def test_partial_head_gets_408_then_close_notify(self):
        with TLSConn(self.s.port, self.ctx) as c:
            t0 = time.monotonic()
            c.send(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n")
            r = c.read_response()
            took = time.monotonic() - t0
            self.assertEqual(r.status, 408, r)
            self.assert_timely(took)
            self.assertEqual(await_close_notify(self, c), b"")
        with TLSConn(self.s.port, self.ctx) as c:  # and serving goes on
            self.assertEqual(c.request("GET", "/echo").status, 200)

    def test_idle_keepalive_close_sends_close_notify(self):
        with TLSConn(self.s.port, self.ctx) as c:
            self.assertEqual(c.request("GET", "/echo").status, 200)
            t0 = time.monotonic()
            self.assertEqual(await_close_notify(self, c, timeout=5), b"")
            self.assertGreater(time.monotonic() - t0, self.IDLE_MS / 1000.0 * 0.8)

    def test_client_close_notify_is_answered(self):
        with TLSConn(self.s.port, self.ctx) as c:
            self.assertEqual(c.request("GET", "/echo").status, 200)
            c.sock.settimeout(5)
            c.sock.unwrap()  # sends close_notify, waits for the server's


# ---------------------------------------------------------------------------------------
# Certificate reload


class TLSCertReloadTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.pki = Pki(env.path("pki"))
        cls.up = env.mock("up")
        cfg = h.make_config({"up": h.make_pool([cls.up])}, [{"path": "/", "pool": "up"}],
                            watch=False, listen=tls_listen())
        cls.s, cls.admin = start_tls_sluice(env, cls.pki, cfg)
        cls.ctx = client_ctx(cls.pki)

    def reload(self):
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        return status, body.decode("utf-8", "replace")

    def install(self, cert, key):
        self.pki.install(self.s.dir, cert, key)

    def install_and_reload(self, name):
        self.install(name + ".pem", name + ".key")
        status, body = self.reload()
        self.assertEqual(status, 200, body)

    def conn(self, **kw):
        return TLSConn(self.s.port, self.ctx, **kw)

    def assert_new_conn_presents(self, name):
        with self.conn() as c:
            self.assertEqual(c.peer_der(), self.pki.der[name])
            self.assertEqual(c.peer_serial(), self.pki.serial[name])
            self.assertEqual(c.request("GET", "/echo").status, 200)

    def test_reload_swaps_certificate_open_connection_undisturbed(self):
        self.install_and_reload("srv")
        old = self.conn()
        old13 = self.conn()
        with old, old13:
            self.assertEqual(old.peer_der(), self.pki.der["srv"])
            self.assertEqual(old.request("GET", "/echo/1").status, 200)
            self.assertEqual(old13.request("GET", "/echo/1").status, 200)
            session = old13.sock.session

            self.install_and_reload("srv2")

            # the open connection keeps working, still on the old certificate
            r = old.request("GET", "/echo/2")
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["url"], "/echo/2")
            self.assertEqual(old.peer_der(), self.pki.der["srv"])
            # new connections present the new certificate
            self.assert_new_conn_presents("srv2")
            # an old session is not resumed into the new certificate
            with self.conn(session=session) as c:
                self.assertFalse(c.sock.session_reused)
                self.assertEqual(c.peer_der(), self.pki.der["srv2"])
            # and back
            self.install_and_reload("srv")
            self.assert_new_conn_presents("srv")
            self.assertEqual(old.request("GET", "/echo/3").status, 200)
            self.assertEqual(old13.request("GET", "/echo/3").status, 200)

    def test_reload_to_a_chained_certificate(self):
        """cert may be a full chain: the intermediate is sent (the client trusts only the root)."""
        try:
            self.install_and_reload("srv3")  # srv3.pem alone: no intermediate in the file
            with self.assertRaises(ssl.SSLCertVerificationError):  # the negative control
                self.conn().close()
            self.install("srv3-chain.pem", "srv3.key")
            status, body = self.reload()
            self.assertEqual(status, 200, body)
            self.assert_new_conn_presents("srv3")
        finally:
            self.install_and_reload("srv")

    def test_reload_with_bad_files_is_refused_and_keeps_the_certificate(self):
        self.install_and_reload("srv2")
        with self.conn() as kept:
            self.assertEqual(kept.request("GET", "/echo").status, 200)
            bad = [
                ("garbage certificate", lambda: self.install("garbage.pem", "srv2.key"), "certificate"),
                ("key of another certificate", lambda: self.install("srv.pem", "srv2.key"), "mismatch"),
                ("missing key", lambda: (self.install("srv2.pem", "srv2.key"),
                                         os.unlink(os.path.join(self.s.dir, "srv.key"))), "key"),
            ]
            for what, prepare, needle in bad:
                with self.subTest(what):
                    mark = self.s.log_mark()
                    prepare()
                    status, body = self.reload()
                    self.assertEqual(status, 422, body)
                    self.assertRegex(body, r"sluice\.lua:\d+: listen\[1\]\.tls: ")
                    self.assertIn(needle, body)
                    self.assertTrue(self.s.wait_log(r"reload failed.*listen\[1\]\.tls", 5, mark), self.s.log_text())
                    self.assert_new_conn_presents("srv2")
                    self.assertEqual(kept.request("GET", "/echo").status, 200)
            # fixed files load again
            self.install_and_reload("srv")
            self.assert_new_conn_presents("srv")


class TLSMixedListenersTest(h.SluiceTestCase):
    """A plain and a TLS listener side by side: each speaks its own protocol, the upstream
    sees the right X-Forwarded-Proto, and errors name the TLS listener by its index."""

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.pki = Pki(env.path("pki"))
        cls.up = env.mock("up")
        listen = ["127.0.0.1:0"] + tls_listen()
        cfg = h.make_config({"up": h.make_pool([cls.up])}, [{"path": "/", "pool": "up"}],
                            watch=False, listen=listen)
        cls.s, cls.admin = start_tls_sluice(env, cls.pki, cfg)
        ports = [int(m.group(2)) for m in map(h.LISTEN_RE.search, cls.s.lines) if m]
        if len(ports) != 2:
            raise AssertionError("expected two listeners:\n" + cls.s.log_text())
        cls.plain_port, cls.tls_port = ports
        cls.ctx = client_ctx(cls.pki)

    def test_each_listener_speaks_its_protocol(self):
        status, _, body = h.http_request(self.plain_port, "GET", "/echo/plain")
        self.assertEqual(status, 200)
        self.assertEqual(h.echo_header_all(json.loads(body), "X-Forwarded-Proto"), ["http"])
        with TLSConn(self.tls_port, self.ctx) as c:
            r = c.request("GET", "/echo/tls")
            self.assertEqual(r.status, 200)
            self.assertEqual(h.echo_header_all(r.json(), "X-Forwarded-Proto"), ["https"])
        with socket.create_connection(("127.0.0.1", self.plain_port), timeout=5) as s:
            with self.assertRaises((ssl.SSLError, ConnectionError)):
                self.ctx.wrap_socket(s, server_hostname="localhost")

    def test_bad_certificate_reload_names_the_second_listener(self):
        try:
            shutil.copyfile(self.pki.path("garbage.pem"), os.path.join(self.s.dir, "srv.pem"))
            status, _, body = h.http_request(self.admin, "POST", "/reload")
            self.assertEqual(status, 422, body)
            self.assertRegex(body.decode(), r"listen\[2\]\.tls: ")
            with TLSConn(self.tls_port, self.ctx) as c:
                self.assertEqual(c.peer_der(), self.pki.der["srv"])
        finally:
            self.pki.install(self.s.dir)
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        self.assertEqual(status, 200, body)


class TLSListenerReloadTest(h.SluiceTestCase):
    """docs/config.md, Reload: `listen` needs a restart and a reload that changes it logs a
    warning."""

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.pki = Pki(env.path("pki"))
        cls.up = env.mock("up")
        cls.pools = {"up": h.make_pool([cls.up])}
        cls.routes = [{"path": "/", "pool": "up"}]
        cfg = h.make_config(cls.pools, cls.routes, watch=False, listen=tls_listen())
        cls.s, cls.admin = start_tls_sluice(env, cls.pki, cfg)
        cls.ctx = client_ctx(cls.pki)

    def test_reload_removing_tls_does_not_turn_the_port_plaintext(self):
        with open(self.s.config_path, "w") as f:
            f.write(h.config_text(h.make_config(self.pools, self.routes, watch=False,
                                                listen=["127.0.0.1:0"])))
        mark = self.s.log_mark()
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        self.assertIn(status, (200, 422), body)
        if status == 200:  # the warning is logged before the reload's result
            self.assertTrue(self.s.wait_log(r"reload: generation \d+ active", 5, mark), self.s.log_text())
            self.assertTrue(any("[warn]" in l and "listen changed" in l for l in self.s.lines[mark:]),
                            "no restart warning:\n" + self.s.log_text())
        with TLSConn(self.s.port, self.ctx) as c:  # the port still terminates TLS
            self.assertEqual(c.request("GET", "/echo").status, 200)


# ---------------------------------------------------------------------------------------
# --check


CHECK_CONFIG = """\
return {
  listen = {
    {
      addr = "127.0.0.1:0",
      tls = { cert = "%(cert)s", key = "%(key)s" },
    },
  },
  admin = false,
  pools = { up = { endpoints = { "http://127.0.0.1:9" } } },
  routes = { { path = "/", pool = "up" } },
}
"""


class TLSCheckTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.env = h.Env()
        cls.pki = Pki(cls.env.path("pki"))

    @classmethod
    def tearDownClass(cls):
        cls.env.close()

    def check(self, name, cert, key):
        d = self.env.path("check-" + name)
        os.makedirs(d)
        shutil.copyfile(self.pki.path(cert), os.path.join(d, "c.pem"))
        shutil.copyfile(self.pki.path(key), os.path.join(d, "k.pem"))
        path = os.path.join(d, "sluice.lua")
        with open(path, "w") as f:
            f.write(CHECK_CONFIG % {"cert": "c.pem", "key": "k.pem"})
        p = subprocess.run([h.SLUICE_BIN, "--check", "-c", path], cwd="/", stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
        return path, p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    def test_check_good_pair_passes(self):
        path, rc, out, err = self.check("good", "srv.pem", "srv.key")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.strip(), "%s: ok" % path)

    def test_check_key_mismatch_names_listener(self):
        path, rc, out, err = self.check("mismatch", "srv.pem", "srv2.key")
        self.assertEqual(rc, 1, (out, err))
        first = err.strip().splitlines()[0] if err.strip() else ""
        self.assertTrue(first.startswith("%s:5: listen[1].tls: " % path), err)  # line of `tls =`
        self.assertRegex(first, "mismatch|does not match")
        self.assertNotIn(": ok", out)

    def test_check_second_listener_is_named_by_its_index(self):
        d = self.env.path("check-second")
        os.makedirs(d)
        self.pki.install(d, "srv.pem", "srv2.key")
        path = os.path.join(d, "sluice.lua")
        text = CHECK_CONFIG.replace('    {\n      addr', '    "127.0.0.1:0",\n    {\n      addr', 1)
        with open(path, "w") as f:
            f.write(text % {"cert": "srv.pem", "key": "srv.key"})
        p = subprocess.run([h.SLUICE_BIN, "--check", "-c", path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
        err = p.stderr.decode("utf-8", "replace")
        self.assertEqual(p.returncode, 1, err)
        self.assertIn("%s:6: listen[2].tls: " % path, err)

    def test_check_garbage_certificate_names_listener(self):
        path, rc, out, err = self.check("garbage", "garbage.pem", "srv.key")
        self.assertEqual(rc, 1, (out, err))
        self.assertIn("listen[1].tls: ", err)
        self.assertIn("certificate", err)


if __name__ == "__main__":
    unittest.main()
