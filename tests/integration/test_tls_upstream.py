"""Upstream TLS: https:// and wss:// endpoints. Certificates are made with the openssl command
line (a CA, a server certificate for localhost/127.0.0.1 and one for other.example signed by
it, a self-signed one); the upstreams are Python's ssl with http.server and python3-websockets,
recording SNI, Host, TCP connections and TLS session reuse.

Covers: verification against a CA file (DNS and IP SANs) and the system store, hostname and IP
mismatches, verify = false (with its warning), keep-alive and session resumption (TLS 1.3 and
1.2), streaming and 2 MiB bodies both ways, wss relaying, --check and reload with a missing CA
file, and upstreams that close the TLS connection mid-response."""

import asyncio
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
import websockets  # noqa: E402  (Debian python3-websockets)

PAYLOAD = os.urandom(2 * 1024 * 1024)  # served by /download, uploaded by the upload tests
TRUNC_LEN = 100000                     # what /truncate announces
TRUNC_SENT = 1000                      # what it sends before closing


# ---------------------------------------------------------------------------------------
# Certificates (openssl command line)


class Certs:
    """ca.pem, localhost.pem (DNS:localhost, IP:127.0.0.1), other.pem (DNS:other.example),
    both signed by the CA, and self.pem (self-signed, DNS:localhost, IP:127.0.0.1)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sluice-tls-certs-")
        try:
            self._make()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _openssl(self, *args):
        p = subprocess.run(["openssl"] + list(args), cwd=self.dir, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        if p.returncode != 0:
            raise RuntimeError("openssl %s failed: %s" % (" ".join(args), p.stderr.decode()))

    def _leaf(self, name, cn, san, serial):
        with open(os.path.join(self.dir, name + ".ext"), "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n" % san)
        self._openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + cn)
        self._openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                      "-set_serial", str(serial), "-days", "3",
                      "-extfile", name + ".ext", "-out", name + ".pem")

    def _make(self):
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "3",
                      "-subj", "/CN=sluice test CA",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self._leaf("localhost", "localhost", "DNS:localhost,IP:127.0.0.1", 2)
        self._leaf("other", "other.example", "DNS:other.example", 3)
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", "self.key", "-out", "self.pem", "-days", "3",
                      "-subj", "/CN=localhost",
                      "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")

    def path(self, name):
        return os.path.join(self.dir, name)

    def pair(self, name):
        return self.path(name + ".pem"), self.path(name + ".key")

    def copy_ca(self, dest_dir, rel="certs/ca.pem"):
        """Copies ca.pem to dest_dir/rel (configs name it relative to their own file)."""
        dst = os.path.join(dest_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(self.path("ca.pem"), dst)
        return rel

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


CERTS = None


def setUpModule():
    global CERTS
    CERTS = Certs()


def tearDownModule():
    if CERTS:
        CERTS.close()


def server_ctx(name, max_version=None):
    """A server context for certificate `name`; records the SNI the client sent on the
    connection object (None when the ClientHello had none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*CERTS.pair(name))
    if max_version:
        ctx.maximum_version = max_version

    def on_sni(sslobj, server_name, _ctx):
        try:
            sslobj.sluice_sni = server_name
        except AttributeError:
            pass
        return None

    ctx.sni_callback = on_sni
    return ctx


# ---------------------------------------------------------------------------------------
# HTTPS upstream: ThreadingHTTPServer over ssl, keep-alive HTTP/1.1


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(out)
                out.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status, body, ctype="application/octet-stream", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj):
        self._send(200, json.dumps(obj).encode(), "application/json")

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        self.wfile.flush()

    def _handle(self):
        up = self.server.up
        conn = self.request.sluice_conn
        path, _, query = self.path.partition("?")
        args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        action = path.rstrip("/").rsplit("/", 1)[-1]
        body = self._body()
        with up.lock:
            conn["requests"] += 1
            up.requests.append({"method": self.command, "path": self.path,
                                "headers": list(self.headers.items()), "conn": conn["id"],
                                "sni": conn["sni"]})
        if action == "upload":
            self._json({"len": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                        "te": self.headers.get("Transfer-Encoding"),
                        "cl": self.headers.get("Content-Length")})
        elif action == "download":
            n = int(args.get("n", len(PAYLOAD)))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            for i in range(0, n, 65536):
                self.wfile.write(PAYLOAD[i:min(n, i + 65536)])
                with up.lock:
                    up.progress = min(n, i + 65536)
        elif action == "sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(1, 6):
                with up.lock:
                    up.sse_sent = i  # counted before it is written: the client may be quicker
                self._chunk(b"data: event-%d\n\n" % i)
                if i == 1:
                    up.release.wait(10)  # the test reads event 1 through sluice first
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        elif action == "truncate":
            # Announces TRUNC_LEN bytes, sends TRUNC_SENT, then ends the connection: "fin"
            # closes TCP without close_notify, "notify" sends close_notify first.
            self.send_response(200)
            chunked = args.get("framing") == "chunked"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(TRUNC_LEN))
            self.end_headers()
            data = b"t" * TRUNC_SENT
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()
            self._drop(args.get("mode", "fin"))
        elif action == "drop":  # closes before answering anything
            self._drop("fin")
        else:
            self._json({"method": self.command, "path": self.path,
                        "headers": list(self.headers.items()), "sni": conn["sni"],
                        "conn": conn["id"], "reused": conn["reused"], "version": conn["version"],
                        "body_len": len(body)})

    def _drop(self, mode):
        s = self.request
        if mode == "notify":
            # close_notify, then wait (longer than the client's timeout) for sluice to act on
            # it by closing or answering: the TCP connection stays open meanwhile.
            s.settimeout(10)
            try:
                s.unwrap()
            except (OSError, ValueError):
                pass
        try:
            socket.socket.shutdown(s, socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

    do_GET = do_POST = do_PUT = _handle

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def get_request(self):
        sock, addr = self.socket.accept()
        with self.up.lock:
            self.up.accepted += 1
        return sock, addr

    def finish_request(self, request, client_address):
        up = self.up
        request.settimeout(30)
        try:
            ssock = up.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with up.lock:
                up.handshake_errors.append(repr(e))
            return
        conn = {"sni": getattr(ssock, "sluice_sni", None), "reused": ssock.session_reused,
                "version": ssock.version(), "requests": 0}
        with up.lock:
            conn["id"] = len(up.conns)
            up.conns.append(conn)
            up.live.add(ssock)
        ssock.sluice_conn = conn
        try:
            self.RequestHandlerClass(ssock, client_address, self)
        except (OSError, ValueError):
            pass
        finally:
            with up.lock:
                up.live.discard(ssock)
            try:
                ssock.close()
            except OSError:
                pass


class TLSHTTPUpstream:
    """An HTTPS upstream on 127.0.0.1 with certificate `cert` (a Certs name)."""

    def __init__(self, cert="localhost", max_version=None):
        self.ctx = server_ctx(cert, max_version)
        self.lock = threading.Lock()
        self.accepted = 0         # TCP connections accepted
        self.conns = []           # per TLS connection: sni, reused, version, requests, id
        self.requests = []
        self.handshake_errors = []
        self.live = set()
        self.progress = 0
        self.sse_sent = 0
        self.release = threading.Event()
        self.server = _TLSServer(("127.0.0.1", 0), _Handler)
        self.server.up = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, host="localhost", path=""):
        return "https://%s:%d%s" % (host, self.port, path)

    def snapshot(self):
        with self.lock:
            return self.accepted, [dict(c) for c in self.conns], list(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            live = list(self.live)
        for s in live:
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------
# WSS upstream: python3-websockets with ssl


def WSSUpstream(cert="localhost"):
    return h.WsEchoUpstream(ssl=server_ctx(cert))


class CoalescingUpstream:
    """An HTTPS upstream driving ssl.SSLObject over memory BIOs, so that what it sends
    after a response leaves in the same TCP segment as the response:

    - a path containing "notify": the response, then close_notify; it then waits up to 5 s
      for sluice and records in `outcomes` what came: "closed" (sluice closed the connection),
      "data" (sluice sent another request on it) or "timeout".
    - a path containing "extra": the response "first", then an unsolicited second response
      "stale" in its own TLS record; the connection stays open.
    - anything else: the response "fresh"."""

    def __init__(self):
        self.ctx = server_ctx("localhost")
        self.lock = threading.Lock()
        self.accepted = 0
        self.outcomes = []
        self.errors = []
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, host="localhost"):
        return "https://%s:%d" % (host, self.port)

    def _accept(self):
        while not self.closed:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    @staticmethod
    def _response(body):
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)

    def _serve(self, sock):
        sock.settimeout(10)
        t = h.MemoryTLS(self.ctx, sock)
        obj, flush = t.obj, t.flush
        try:
            t.handshake()
            while True:
                head, _ = t.read_request()
                target = head.split(b" ", 2)[1]
                if b"notify" in target:
                    obj.write(self._response(b"first"))
                    try:
                        obj.unwrap()
                    except ssl.SSLWantReadError:
                        pass
                    flush()  # one sendall: the response and close_notify together
                    sock.settimeout(5)
                    try:
                        outcome = "data" if sock.recv(65536) else "closed"
                    except ConnectionResetError:
                        outcome = "closed"
                    except TimeoutError:
                        outcome = "timeout"
                    with self.lock:
                        self.outcomes.append(outcome)
                    return
                if b"extra" in target:
                    obj.write(self._response(b"first"))
                    obj.write(self._response(b"stale"))  # a TLS record of its own
                else:
                    obj.write(self._response(b"fresh"))
                flush()
        except (EOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            pass
        except Exception as e:  # recorded, so that a test can show it
            with self.lock:
                self.errors.append(repr(e))
        finally:
            sock.close()

    def close(self):
        self.closed = True
        self.lsock.close()


def run(coro, timeout=15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def request(port, method, path, headers=None, body=None, timeout=5.0):
    """One request on a fresh client connection; returns the harness Response."""
    with h.RawConn(port, timeout=timeout) as c:
        return c.request(method, path, headers, body)


# ---------------------------------------------------------------------------------------


class TLSUpstreamTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.good = TLSHTTPUpstream()          # CA-signed localhost/127.0.0.1
        cls.sysstore = TLSHTTPUpstream()      # same certificate, pool without `ca`
        cls.other = TLSHTTPUpstream("other")  # CA-signed, but for other.example
        cls.selfsigned = TLSHTTPUpstream("self")
        cls.strict = TLSHTTPUpstream("self")  # one endpoint named by a lax and a strict pool
        cls.ka = TLSHTTPUpstream()
        cls.r13 = TLSHTTPUpstream()
        cls.r12 = TLSHTTPUpstream(max_version=ssl.TLSVersion.TLSv1_2)
        cls.stream = TLSHTTPUpstream()
        cls.trunc = TLSHTTPUpstream()
        cls.co = CoalescingUpstream()
        cls.wss = WSSUpstream()
        cls.wss_bad = WSSUpstream("other")
        cls.https = [cls.good, cls.sysstore, cls.other, cls.selfsigned, cls.strict, cls.ka,
                     cls.r13, cls.r12, cls.stream, cls.trunc, cls.co]

        s = cls.env.sluice({}, start=False)  # config below: the CA path is relative to it
        ca = CERTS.copy_ca(s.dir)
        tls = {"ca": ca}
        pools = {
            "ca": h.make_pool([cls.good.url()], tls=tls),
            "ip": h.make_pool([cls.good.url("127.0.0.1")], tls=tls),
            "sys": h.make_pool([cls.sysstore.url()]),
            "mismatch": h.make_pool([cls.other.url()], tls=tls),
            "ipmismatch": h.make_pool([cls.other.url("127.0.0.1")], tls=tls),
            "insecure": h.make_pool([cls.selfsigned.url()], tls={"verify": False}),
            "lax": h.make_pool([cls.strict.url()], tls={"verify": False}),
            "strict": h.make_pool([cls.strict.url()]),
            "ka": h.make_pool([cls.ka.url()], tls=tls),
            "r13": h.make_pool([cls.r13.url()], tls=tls, keepalive={"max_idle": 0}),
            "r12": h.make_pool([cls.r12.url()], tls=tls, keepalive={"max_idle": 0}),
            "stream": h.make_pool([cls.stream.url()], tls=tls),
            "trunc": h.make_pool([cls.trunc.url()], tls=tls),
            "co": h.make_pool([cls.co.url()], tls=tls),
            "wss": h.make_pool([cls.wss.url_for("localhost")], tls=tls,
                               websocket={"max_message_bytes": 4 * 1024 * 1024}),
            "wssbad": h.make_pool([cls.wss_bad.url_for("localhost")], tls=tls),
        }
        routes = [{"path": "/" + name, "pool": name} for name in pools]
        cfg = h.make_config(pools, routes, watch=False,
                            limits={"max_body_bytes": 8 * 1024 * 1024})
        with open(s.config_path, "w") as f:
            f.write(h.config_text(cfg))
        cls.s = s.start()
        cls.port = s.port

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            for u in cls.https:
                u.close()
            cls.wss.stop()
            cls.wss_bad.stop()

    def get(self, path, **kw):
        return request(self.port, "GET", path, **kw)

    def assert_healthy(self):
        self.assertTrue(self.s.alive(), "sluice exited:\n" + self.s.log_text()[-3000:])
        r = self.get("/ca/hello")
        self.assertEqual(r.status, 200, r)

    def assert_tls_failed(self, path, needle):
        r = self.get(path)
        err = self.assertJsonError(r, 502, "upstream_tls_failed")
        self.assertIn("TLS handshake with https://", err["message"])
        self.assertIn("certificate verify failed", err["message"])
        self.assertRegex(err["message"], needle)
        return err

    # 1 ------------------------------------------------------------------------------------
    def test_https_with_ca_file_sni_and_host(self):
        r = self.get("/ca/hello?x=1", headers=[("X-Trace", "t1")])
        self.assertEqual(r.status, 200, r)
        echo = r.json()
        self.assertEqual(echo["path"], "/ca/hello?x=1")
        self.assertEqual(echo["sni"], "localhost")
        self.assertIn(echo["version"], ("TLSv1.3", "TLSv1.2"))
        hs = {k.lower(): v for k, v in echo["headers"]}
        self.assertEqual(hs.get("host"), "localhost:%d" % self.good.port)
        self.assertEqual(hs.get("x-trace"), "t1")
        self.assertEqual(self.good.handshake_errors, [])

    # 2 ------------------------------------------------------------------------------------
    def test_ip_endpoint_verified_against_ip_san(self):
        r = self.get("/ip/hello")
        self.assertEqual(r.status, 200, r)
        echo = r.json()
        self.assertIsNone(echo["sni"], "SNI must not carry an IP address (RFC 6066)")
        hs = {k.lower(): v for k, v in echo["headers"]}
        self.assertEqual(hs.get("host"), "127.0.0.1:%d" % self.good.port)

    # 3 ------------------------------------------------------------------------------------
    def test_system_store_refuses_private_ca(self):
        err = self.assert_tls_failed("/sys/hello", r"issuer|self.signed|unable to")
        self.assertIn(self.sysstore.url(), err["message"])
        self.assertEqual(self.sysstore.snapshot()[2], [], "a request reached the upstream")
        self.assert_healthy()
        # and again: a refused endpoint stays refused, the gateway keeps serving
        self.assert_tls_failed("/sys/hello", r".")
        self.assert_healthy()

    # 4 ------------------------------------------------------------------------------------
    def test_hostname_mismatch(self):
        self.assert_tls_failed("/mismatch/hello", r"(?i)hostname mismatch")
        self.assertEqual(self.other.snapshot()[2], [])
        self.assert_healthy()

    def test_ip_address_mismatch(self):
        self.assert_tls_failed("/ipmismatch/hello", r"(?i)ip address mismatch")
        self.assert_healthy()

    # 5 ------------------------------------------------------------------------------------
    def test_verify_false_accepts_self_signed_and_warns(self):
        r = self.get("/insecure/hello")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["sni"], "localhost")
        warn = re.compile(r"\[warn\].*verification is OFF for %s" % re.escape(self.selfsigned.url()))
        self.assertIsNotNone(self.s.wait_log(warn, 1.0), self.s.log_text()[-2000:])

    def test_endpoint_shared_by_lax_and_strict_pool_verifies(self):
        # One endpoint, one TLS context: the strictest setting of the pools naming it wins.
        for path in ("/lax/hello", "/strict/hello"):
            self.assert_tls_failed(path, r"self.signed")
        self.assertEqual(self.strict.snapshot()[2], [])
        warn = re.compile(r"verification is OFF for %s" % re.escape(self.strict.url()))
        self.assertIsNone(self.s.wait_log(warn, 0), "warned about an endpoint that verifies")

    # 6 ------------------------------------------------------------------------------------
    def test_keepalive_reuses_one_tls_connection(self):
        for i in range(5):
            r = self.get("/ka/hello?i=%d" % i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["conn"], 0)
        accepted, conns, reqs = self.ka.snapshot()
        self.assertEqual(accepted, 1, conns)
        self.assertEqual(len(reqs), 5)
        self.assertEqual(conns[0]["requests"], 5)

    # 7 ------------------------------------------------------------------------------------
    def check_resumption(self, up, route, version):
        for i in range(4):
            r = self.get("/%s/hello?i=%d" % (route, i))
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["conn"], i, "max_idle = 0: a new connection per request")
        accepted, conns, _ = up.snapshot()
        self.assertEqual(accepted, 4)
        self.assertEqual([c["version"] for c in conns], [version] * 4)
        self.assertEqual([c["reused"] for c in conns], [False, True, True, True], conns)

    def test_session_resumption_tls13(self):
        self.check_resumption(self.r13, "r13", "TLSv1.3")

    def test_session_resumption_tls12(self):
        self.check_resumption(self.r12, "r12", "TLSv1.2")

    # 8 ------------------------------------------------------------------------------------
    def test_sse_streams_through_tls(self):
        up = self.stream
        up.release.clear()
        up.sse_sent = 0
        seen_at_first = []

        def on_data(data):
            if not seen_at_first:
                with up.lock:
                    seen_at_first.append(up.sse_sent)
                up.release.set()
            parts.append(data)

        parts = []
        try:
            with h.RawConn(self.port, timeout=5) as c:
                c.send(h.build_request("GET", "/stream/sse", [("Accept", "text/event-stream")]))
                r = c.read_head()
                self.assertEqual(r.status, 200, r)
                self.assertTrue(r.header("content-type", "").startswith("text/event-stream"))
                c.read_body(r, on_data=on_data)
        finally:
            up.release.set()
        self.assertEqual(r.framing, "chunked")
        self.assertEqual(seen_at_first, [1], "event 1 was not relayed before the upstream went on")
        body = b"".join(parts)
        expect = b"".join(b"data: event-%d\n\n" % i for i in range(1, 6)) + b"data: [DONE]\n\n"
        self.assertEqual(body, expect)

    def test_download_2mib(self):
        r = self.get("/stream/download")
        self.assertEqual(r.status, 200)
        self.assertEqual(len(r.body), len(PAYLOAD))
        self.assertEqual(h.sha256(r.body), h.sha256(PAYLOAD))

    def test_download_2mib_slow_reader(self):
        # The client reads nothing until the upstream has written 512 KiB: sluice's read
        # side pauses and resumes under TLS, and the body must still be intact.
        up = self.stream
        with up.lock:
            up.progress = 0
        digest = hashlib.sha256()
        with h.RawConn(self.port, timeout=10, rcvbuf=32 * 1024) as c:
            c.send(h.build_request("GET", "/stream/download?slow=1"))
            h.wait_for(lambda: up.progress >= 512 * 1024, 10, what="upstream wrote 512 KiB")
            r = c.read_head()
            self.assertEqual(r.status, 200)
            c.read_body(r, on_data=digest.update)
        self.assertEqual(r.body_length, len(PAYLOAD))
        self.assertEqual(digest.hexdigest(), h.sha256(PAYLOAD))

    def test_upload_2mib(self):
        r = request(self.port, "POST", "/stream/upload", [("Content-Type", "application/octet-stream")],
                    PAYLOAD)
        self.assertEqual(r.status, 200, r)
        got = r.json()
        self.assertEqual((got["len"], got["sha256"]), (len(PAYLOAD), h.sha256(PAYLOAD)))

    def test_upload_2mib_chunked(self):
        body = h.chunked(PAYLOAD, [70000, 1, 16384, 99999])
        r = request(self.port, "POST", "/stream/upload", [("Transfer-Encoding", "chunked")], body)
        self.assertEqual(r.status, 200, r)
        got = r.json()
        self.assertEqual((got["len"], got["sha256"]), (len(PAYLOAD), h.sha256(PAYLOAD)))

    def test_upload_and_download_on_one_keepalive_client_connection(self):
        with h.RawConn(self.port, timeout=5) as c:
            for _ in range(2):
                r = c.request("POST", "/stream/upload", None, PAYLOAD)
                self.assertEqual(r.json()["sha256"], h.sha256(PAYLOAD))
                r = c.request("GET", "/stream/download")
                self.assertEqual(h.sha256(r.body), h.sha256(PAYLOAD))

    # 9 ------------------------------------------------------------------------------------
    def ws_uri(self, path):
        return "ws://127.0.0.1:%d%s" % (self.port, path)

    def test_wss_relay_integrity_and_close_codes(self):
        big = os.urandom(1024 * 1024)

        async def go():
            async with websockets.connect(self.ws_uri("/wss/listen?lang=en"), max_size=None) as ws:
                await ws.send("hello over wss")
                self.assertEqual(await ws.recv(), "hello over wss")
                await ws.send(big)
                got = await ws.recv()
                self.assertIsInstance(got, bytes)
                self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(big).hexdigest())
                await ws.send("close:4001:upstream bye")
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await ws.recv()
                return cm.exception.rcvd

        rcvd = run(go())
        self.assertEqual((rcvd.code, rcvd.reason), (4001, "upstream bye"))
        with self.wss.lock:
            sess = self.wss.sessions[-1]
        self.assertEqual(sess["path"], "/wss/listen?lang=en")
        self.assertEqual(sess["sni"], "localhost")
        self.assertEqual(sess["headers"].get("Host"), "localhost:%d" % self.wss.port)

    def test_wss_client_close_code_reaches_upstream(self):
        with self.wss.lock:
            n = len(self.wss.close_codes)

        async def go():
            ws = await websockets.connect(self.ws_uri("/wss/c"))
            await ws.send("x")
            self.assertEqual(await ws.recv(), "x")
            await ws.close(4002, "client bye")
            return ws.close_code

        self.assertEqual(run(go()), 4002)
        h.wait_for(lambda: len(self.wss.close_codes) > n, 5, what="upstream session ended")
        self.assertEqual(self.wss.close_codes[n], 4002)

    def test_wss_certificate_refused_is_http_502(self):
        async def go():
            with self.assertRaises(websockets.InvalidStatusCode) as cm:
                await websockets.connect(self.ws_uri("/wssbad/x"))
            return cm.exception.status_code
        self.assertEqual(run(go()), 502)
        self.assertEqual(self.wss_bad.sessions, [])
        self.assert_healthy()

    # 11 -----------------------------------------------------------------------------------
    def check_truncated(self, query):
        with h.RawConn(self.port, timeout=5) as c:
            c.send(h.build_request("GET", "/trunc/truncate?" + query))
            r = c.read_head()
            self.assertEqual(r.status, 200, r)
            with self.assertRaises(h.IncompleteResponse):
                c.read_body(r)  # socket.timeout here would mean a hang
            # the client connection ends (no second response can follow a truncated one)
            state, _ = c.closed_state(3)
            self.assertIn(state, ("fin", "rst"))
        self.assert_healthy()

    def test_upstream_closes_mid_response_fin(self):
        self.check_truncated("mode=fin")

    def test_upstream_closes_mid_response_close_notify(self):
        self.check_truncated("mode=notify")

    def test_upstream_closes_mid_chunked_response(self):
        self.check_truncated("mode=fin&framing=chunked")
        self.check_truncated("mode=notify&framing=chunked")

    def test_close_notify_right_after_response_retires_the_connection(self):
        with self.co.lock:
            n = len(self.co.outcomes)
        r = self.get("/co/notify")
        self.assertEqual((r.status, r.body), (200, b"first"))
        r2 = request(self.port, "POST", "/co/after", None, b"not replayable")
        h.wait_for(lambda: len(self.co.outcomes) > n, 8, what="the upstream saw sluice react")
        self.assertEqual(self.co.outcomes[n], "closed", "sluice did not close the connection "
                         "after close_notify (it sent a request on it or kept it idle)")
        self.assertEqual((r2.status, r2.body), (200, b"fresh"), r2)

    def test_unsolicited_record_after_response_is_not_served_to_the_next_request(self):
        r = self.get("/co/extra")
        self.assertEqual((r.status, r.body), (200, b"first"))
        r2 = self.get("/co/next")
        self.assertEqual((r2.status, r2.body), (200, b"fresh"), "a stale unsolicited response "
                         "was served for the next request: %r" % (r2,))

    def test_upstream_closes_before_answering(self):
        r = request(self.port, "GET", "/trunc/drop")
        self.assertJsonError(r, 502, "upstream_reset")
        self.assert_healthy()


# ---------------------------------------------------------------------------------------
# --check and reload


class TLSConfigTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.up = TLSHTTPUpstream()
        cls.selfsigned = TLSHTTPUpstream("self")
        cls.s = cls.env.sluice({}, start=False)
        CERTS.copy_ca(cls.s.dir)
        with open(cls.s.config_path, "w") as f:
            f.write(cls.config_text())
        cls.s.start()
        cls.admin = cls.s.admin_port()

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            cls.up.close()
            cls.selfsigned.close()

    @classmethod
    def config_text(cls, ca="certs/ca.pem", insecure_tls=None, **extra):
        pools = {
            "api": h.make_pool([cls.up.url()], tls={"ca": ca} if ca else {},
                               keepalive={"max_idle": 0}),
            "insecure": h.make_pool([cls.selfsigned.url()],
                                    tls=insecure_tls if insecure_tls is not None else {"verify": False}),
        }
        routes = [{"path": "/api", "pool": "api"}, {"path": "/insecure", "pool": "insecure"}]
        return h.config_text(h.make_config(pools, routes, watch=False, **extra))

    def rewrite(self, text):
        with open(self.s.config_path, "w") as f:
            f.write(text)

    def reload(self):
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        return status, body.decode("utf-8", "replace")

    def restore(self):
        self.rewrite(self.config_text())
        status, body = self.reload()
        self.assertEqual(status, 200, body)

    def get(self, path):
        return request(self.s.port, "GET", path)

    def check_cli(self, text, cwd="/"):
        d = tempfile.mkdtemp(prefix="check-", dir=self.env.tmp)
        CERTS.copy_ca(d)
        path = os.path.join(d, "sluice.lua")
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run([h.SLUICE_BIN, "--check", "-c", path], cwd=cwd, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        return path, p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    # 10 -----------------------------------------------------------------------------------
    def test_check_ok_with_relative_ca(self):
        path, rc, out, err = self.check_cli(self.config_text())
        self.assertEqual(rc, 0, (out, err))

    def test_check_missing_ca_names_the_key(self):
        text = self.config_text(ca="missing.pem")
        path, rc, out, err = self.check_cli(text)
        self.assertEqual(rc, 1, (out, err))
        first = err.strip().splitlines()[0]
        self.assertTrue(first.startswith(path + ":"), first)
        self.assertIn("pools.api.tls.ca", first)
        self.assertIn(os.path.join(os.path.dirname(path), "missing.pem"), first)
        self.assertNotIn(": ok", out)

    def test_check_ca_that_is_not_a_certificate(self):
        text = self.config_text(ca="sluice.lua")  # exists, but is no PEM
        path, rc, out, err = self.check_cli(text)
        self.assertEqual(rc, 1, (out, err))
        self.assertIn("pools.api.tls.ca", err)

    def test_reload_with_missing_ca_refused(self):
        self.assertEqual(self.get("/api/a").status, 200)
        self.rewrite(self.config_text(ca="missing.pem"))
        try:
            status, body = self.reload()
            self.assertEqual(status, 422, body)
            self.assertIn("pools.api.tls.ca", body)
            for _ in range(2):  # max_idle = 0: each is a new handshake with the old context
                r = self.get("/api/b")
                self.assertEqual(r.status, 200, r)
        finally:
            self.restore()
        self.assertEqual(self.get("/api/c").status, 200)

    def test_session_resumed_across_unchanged_reload(self):
        self.assertEqual(self.get("/api/r1").status, 200)
        self.restore()  # same TLS settings: the endpoint keeps its context and session
        r = self.get("/api/r2")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.json()["reused"], "session not resumed after a no-op reload")

    def test_refused_reload_leaves_tls_settings_unchanged(self):
        self.assertEqual(self.get("/api/a").status, 200)
        # New TLS settings (system store: would refuse the upstream) plus an error that is
        # only found after the TLS contexts were prepared.
        self.rewrite(self.config_text(ca=None, access_log="/nonexistent-sluice-dir/x/access.log"))
        try:
            status, body = self.reload()
            self.assertEqual(status, 422, body)
            r = self.get("/api/b")  # max_idle = 0: a new handshake
            self.assertEqual(r.status, 200, "a refused reload changed the TLS settings: %r" % (r,))
        finally:
            self.restore()

    def test_reload_enabling_verification_drops_unverified_pooled_connections(self):
        r = self.get("/insecure/a")
        self.assertEqual(r.status, 200, r)  # verify = false: pooled unverified connection
        self.rewrite(self.config_text(insecure_tls={}))  # verify = true, system store
        try:
            status, body = self.reload()
            self.assertEqual(status, 200, body)
            r = self.get("/insecure/b")
            self.assertEqual(r.status, 502, "a connection to an unverified upstream was reused "
                             "after verification was turned on: %r" % (r,))
        finally:
            self.restore()


if __name__ == "__main__":
    unittest.main()
