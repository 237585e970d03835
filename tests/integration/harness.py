"""Shared machinery for the sluice integration tests.

Everything here uses only the Python standard library (Debian's /usr/bin/python3).

- Env: owns a temp dir and every process started through it; close() always kills them
  (SIGTERM, then SIGKILL), removes the temp dir and reports a sluice that did not exit 0
  on SIGTERM.
- Mock: one sluice-mock on an ephemeral (or given) port, learned from --port-file.
- Sluice: the gateway under test, config rendered from Python data (to_lua), port learned
  from the "listening on" log line; stderr drained by a thread and kept for assertions.
- RawConn: raw-socket HTTP/1.1 client with a response parser that handles Content-Length,
  chunked and close-delimited bodies, interim 1xx responses and records when body bytes
  arrive; plus checks for how the server ended the connection (FIN vs RST).
- http_request(): a one-shot http.client request.
- wait_for(): poll a condition until a deadline.
- SluiceTestCase: unittest base class with an Env per test class.
"""

import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("SLUICE_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))
SLUICE_BIN = os.environ.get("SLUICE_BIN") or "/tmp/itb/sluice"
MOCK_BIN = os.environ.get("SLUICE_MOCK_BIN") or "/tmp/itb/examples/mock/sluice-mock"
POLICIES_DIR = os.path.join(SOURCE_DIR, "policies")

LISTEN_RE = re.compile(r"\[info\] listening on (127\.0\.0\.1|\[?[0-9a-fA-F:.]+\]?):(\d+)")
HEX32_RE = re.compile(r"^[0-9a-f]{32}$")


# ---------------------------------------------------------------------------------------
# Waiting


def wait_for(cond, timeout=5.0, interval=0.01, what=None):
    """Polls cond() until it returns a truthy value (returned) or timeout expires
    (AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = cond()
            if v:
                return v
            last_exc = None
        except Exception as e:  # the condition may fail while the thing starts up
            last_exc = e
        if time.monotonic() >= deadline:
            msg = "timed out after %.1fs waiting for %s" % (timeout, what or getattr(cond, "__name__", "condition"))
            if last_exc is not None:
                msg += " (last error: %r)" % (last_exc,)
            raise AssertionError(msg)
        time.sleep(interval)


def free_port():
    """A loopback port that nothing listens on (bound then released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid):
    """Resident set size of a process in kB, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


# ---------------------------------------------------------------------------------------
# Lua config rendering

_LUA_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LUA_KEYWORDS = {
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if",
    "in", "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
}


class LuaExpr(str):
    """A raw Lua expression, rendered as is."""


def lua_str(s):
    out = ['"']
    for ch in s.encode("utf-8"):
        c = chr(ch)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif 32 <= ch < 127:
            out.append(c)
        else:
            out.append("\\%d" % ch)
    out.append('"')
    return "".join(out)


def to_lua(v, indent=0):
    """Renders Python data as a Lua expression: dict -> record (insertion order kept, so the
    line of every key is predictable), list/tuple -> array, str, int, float, bool, None."""
    pad = "  " * (indent + 1)
    end = "  " * indent
    if isinstance(v, LuaExpr):
        return str(v)
    if v is None:
        return "nil"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return lua_str(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return "{}"
        if all(not isinstance(x, (dict, list, tuple)) for x in v):
            return "{ " + ", ".join(to_lua(x, indent + 1) for x in v) + " }"
        return "{\n" + "".join(pad + to_lua(x, indent + 1) + ",\n" for x in v) + end + "}"
    if isinstance(v, dict):
        if not v:
            return "{}"
        items = []
        for k, x in v.items():
            if isinstance(k, str) and _LUA_IDENT.match(k) and k not in _LUA_KEYWORDS:
                key = k
            else:
                key = "[" + to_lua(k) + "]"
            items.append(pad + key + " = " + to_lua(x, indent + 1) + ",\n")
        return "{\n" + "".join(items) + end + "}"
    raise TypeError("cannot render %r as Lua" % (v,))


def config_text(cfg):
    return "return " + to_lua(cfg) + "\n"


def make_pool(endpoints, balancer="round_robin", **kw):
    """A pool table; endpoints are URLs, Mocks, or {url=, weight=} dicts."""
    eps = []
    for e in endpoints:
        eps.append(e.url if isinstance(e, Mock) else e)
    # Pools retry and eject failing endpoints by default; most tests look at what one attempt
    # does, so they opt back in explicitly where resilience is what they test.
    p = {"endpoints": eps, "balancer": balancer, "retry": False, "breaker": False}
    p.update(kw)
    return p


def make_config(pools, routes, limits=None, policies=None, log_level="info", **extra):
    cfg = {
        "listen": ["127.0.0.1:0"],
        "admin": "127.0.0.1:0",  # the default 9901 would collide between parallel tests
        "policies": policies or POLICIES_DIR,
        "log_level": log_level,
    }
    if limits:
        cfg["limits"] = limits
    cfg["pools"] = pools
    cfg["routes"] = routes
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------
# Processes


METRICS_DOC = os.path.join(SOURCE_DIR, "docs", "metrics.md")


def metrics_catalogue():
    """{name: (type, set of label names)} from the catalogue table of docs/metrics.md."""
    row = re.compile(r"^\|\s*`(sluice_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|"
                     r"\s*([^|]*)\|")
    cat = {}
    with open(METRICS_DOC, encoding="utf-8") as f:
        for line in f:
            m = row.match(line)
            if not m:
                continue
            labels = {l.strip() for l in m.group(3).split(",")} - {"", "—", "-"}
            if m.group(1) in cat:
                raise AssertionError("docs/metrics.md lists %s twice" % m.group(1))
            cat[m.group(1)] = (m.group(2), labels)
    if len(cat) < 20:
        raise AssertionError("could not parse the catalogue table of %s (%d rows)" % (METRICS_DOC, len(cat)))
    return cat


ADMIN_RE = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
SANITIZER_RE = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                          r"UndefinedBehaviorSanitizer|SUMMARY: \w+Sanitizer")


def sanitizer_report(text):
    """The sanitizer report in a sluice log (with some context before it), or None."""
    m = SANITIZER_RE.search(text)
    if not m:
        return None
    start = text.rfind("\n", 0, max(0, m.start() - 2000)) + 1
    return text[start:m.start() + 6000]


def _stop_process(proc, sig=signal.SIGTERM, timeout=10.0):
    """Signals proc and waits; SIGKILL after timeout. Returns (returncode, killed)."""
    if proc.poll() is not None:
        return proc.returncode, False
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10), True


class Mock:
    """A sluice-mock process. port=0 binds an ephemeral port; pass an old port to restart
    an upstream on the same address."""

    def __init__(self, env, name="mock", args=(), port=0):
        self.env = env
        self.name = name
        self.args = list(args)
        self.requested_port = port
        self.port = None
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix="mock-%s-" % name, dir=env.tmp)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, timeout=5.0):
        pf = os.path.join(self.dir, "port")
        if os.path.exists(pf):
            os.unlink(pf)
        self.log = open(os.path.join(self.dir, "stderr.log"), "ab")
        cmd = [MOCK_BIN, "--listen", "127.0.0.1:%d" % self.requested_port, "--port-file", pf,
               "--name", self.name] + self.args
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("sluice-mock exited with %s: %s" % (self.proc.returncode, self.stderr()))
            try:
                with open(pf) as f:
                    text = f.read().strip()
            except FileNotFoundError:
                return None
            return int(text) if text.isdigit() else None

        try:
            self.port = wait_for(ready, timeout, what="sluice-mock port file")
        except RuntimeError as e:
            raise AssertionError(str(e))
        return self

    def stderr(self):
        try:
            with open(os.path.join(self.dir, "stderr.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self):
        """SIGKILL: every connection of the mock is closed by the kernel."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self):
        if self.proc:
            _stop_process(self.proc, signal.SIGTERM, timeout=5)
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def restart(self):
        """Kills this mock and starts a new one on the same port."""
        port = self.port
        self.kill()
        if getattr(self, "log", None):
            self.log.close()
            self.log = None
        self.requested_port = port
        # The port may linger for a moment only if something else grabbed it; retry briefly.
        wait_for(lambda: self._try_start(), 5.0, 0.05, what="mock restart on port %d" % port)
        return self

    def _try_start(self):
        try:
            self.start(timeout=2.0)
            return True
        except AssertionError:
            self.kill()
            if self.log:
                self.log.close()
                self.log = None
            return False

    def get_json(self, path, method="GET"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return json.loads(r.read())
        finally:
            conn.close()

    def stats(self):
        return self.get_json("/stats")

    def reset_stats(self):
        return self.get_json("/stats/reset", "POST")


class Sluice:
    """The gateway under test. cfg: a dict (rendered with to_lua) or Lua source text."""

    def __init__(self, env, cfg, args=(), config_name="sluice.lua"):
        self.env = env
        self.dir = tempfile.mkdtemp(prefix="sluice-", dir=env.tmp)
        self.config_path = os.path.join(self.dir, config_name)
        text = cfg if isinstance(cfg, str) else config_text(cfg)
        with open(self.config_path, "w") as f:
            f.write(text)
        self.args = list(args)
        self.proc = None
        self.port = None
        self.lines = []
        self._cv = threading.Condition()
        self._eof = False
        self.stop_rc = None

    def start(self, timeout=10.0):
        self.stdout = open(os.path.join(self.dir, "stdout.log"), "wb")
        cmd = [SLUICE_BIN, "-c", self.config_path] + self.args
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stdout,
                                     stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        m = self.wait_log(LISTEN_RE, timeout)
        if m is None:
            self.kill()
            raise AssertionError("sluice did not start (rc=%s):\n%s" % (self.proc.returncode, self.log_text()))
        self.port = int(m.group(2))
        return self

    def _drain(self):
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def wait_log(self, pattern, timeout=5.0, start=0):
        """Waits for a stderr line matching pattern (regex or compiled); returns the match,
        or None on timeout or when sluice exits first."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        i = start
        with self._cv:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    i += 1
                if self._eof:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)

    def log_text(self):
        with self._cv:
            return "\n".join(self.lines)

    def log_mark(self):
        with self._cv:
            return len(self.lines)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def admin_port(self, timeout=5.0):
        """The port the admin listener bound (from the start-up log line)."""
        m = self.wait_log(ADMIN_RE, timeout)
        assert m, "no admin listener in the log:\n" + self.log_text()
        return int(m.group(1))

    def status(self):
        """GET /status on the admin listener, decoded."""
        st, _, body = http_request(self.admin_port(), "GET", "/status")
        assert st == 200, (st, body)
        return json.loads(body)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Signals sluice and waits for it; returns its exit code (SIGKILL after timeout:
        then the code is reported as 'killed')."""
        if self.proc is None:
            return 0
        if self.stop_rc is not None:
            return self.stop_rc
        rc, killed = _stop_process(self.proc, sig, timeout)
        self._close_pipes()
        self.stop_rc = "killed after %.0fs" % timeout if killed else rc
        return self.stop_rc

    def wait_exit(self, timeout=10.0):
        """Waits for sluice to exit by itself (no signal sent); returns the exit code, or
        None if it is still running after timeout."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.stop_rc is None:
            self._close_pipes()
            self.stop_rc = rc
        return rc

    def _close_pipes(self):
        self._reader.join(timeout=5)
        for f in (self.proc.stderr, self.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.stop_rc is None and self.proc is not None:
            self.stop_rc = "killed"
            self._close_pipes()


class Env:
    """Temp dir plus every process started through it."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="sluice-it-")
        self.mocks = []
        self.sluices = []
        self.upstreams = []

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def write(self, relpath, text):
        p = self.path(relpath)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        return p

    def mock(self, name="mock", args=(), port=0):
        m = Mock(self, name, args, port)
        self.mocks.append(m)
        return m.start()

    def scripted(self, handler):
        u = ScriptedUpstream(self, handler)
        self.upstreams.append(u)
        return u

    def sluice(self, cfg, args=(), start=True):
        s = Sluice(self, cfg, args)
        self.sluices.append(s)
        return s.start() if start else s

    def close(self, check_exit=True):
        """Stops everything. Returns a list of problems (a sluice that did not exit 0 on
        SIGTERM) for the caller to assert on."""
        problems = []
        for s in self.sluices:
            if s.proc is None:
                continue
            already = s.stop_rc is not None
            early = None if already else s.proc.poll()
            rc = s.stop()
            if early is not None:
                problems.append("sluice (pid %d) exited by itself with %s before teardown; log:\n%s"
                                % (s.proc.pid, early, "\n".join(s.lines[-30:])))
                continue
            if os.environ.get("SLUICE_IT_VERBOSE"):
                sys.stderr.write("--- sluice pid %d exit %s, log:\n%s\n" % (s.proc.pid, rc, s.log_text()))
            if check_exit and not already and rc != 0:
                problems.append("sluice (pid %d) exited with %s on SIGTERM; log:\n%s"
                                % (s.proc.pid, rc, "\n".join(s.lines[-30:])))
            rep = sanitizer_report(s.log_text())
            if rep:
                problems.append("sanitizer report in the log of sluice (pid %d):\n%s" % (s.proc.pid, rep))
        for u in self.upstreams:
            u.close()
        for m in self.mocks:
            try:
                m.stop()
            except Exception:
                m.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


class WsEchoUpstream:
    """A WebSocket server (python3-websockets) on its own asyncio loop in a thread. Echoes
    messages; `close:C:R` makes it close with code C and reason R; `flood:N:SIZE` sends N
    binary messages of SIZE bytes (waiting while the socket is full), then "flood-done".
    Records each session's path, request headers, SNI and TLS session reuse (`sessions`), and
    close codes. `ssl`: a server SSLContext for wss://; `refuse`: an HTTP status to refuse
    handshakes with."""

    def __init__(self, refuse=None, ssl=None, subprotocols=None):
        import asyncio
        self.refuse, self.ssl, self.subprotocols = refuse, ssl, subprotocols
        self.sessions, self.headers, self.close_codes = [], [], []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise AssertionError("WebSocket upstream did not start")

    async def _handler(self, ws, path=None):
        import websockets
        so = ws.transport.get_extra_info("ssl_object")
        with self.lock:
            self.headers.append(ws.request_headers)  # case-insensitive lookups
            self.sessions.append({"path": ws.path, "headers": ws.request_headers,
                                  "sni": getattr(so, "sluice_sni", None),
                                  "reused": so.session_reused if so else None})
        try:
            async for msg in ws:
                if isinstance(msg, str) and msg.startswith("flood:"):
                    _, n, size = msg.split(":")
                    chunk = b"f" * int(size)
                    for _ in range(int(n)):
                        await ws.send(chunk)
                    await ws.send("flood-done")
                    continue
                if isinstance(msg, str) and msg.startswith("close:"):
                    _, code, reason = msg.split(":", 2)
                    await ws.close(int(code), reason)
                    return
                await ws.send(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            with self.lock:
                self.close_codes.append(ws.close_code)

    async def _process_request(self, path, headers):
        if self.refuse:
            return (self.refuse, [("Content-Type", "text/plain")], b"refused\n")
        return None

    def _run(self):
        import asyncio
        import websockets
        asyncio.set_event_loop(self.loop)

        async def start():
            self.server = await websockets.serve(self._handler, "127.0.0.1", 0, max_size=None,
                                                 ssl=self.ssl, subprotocols=self.subprotocols,
                                                 process_request=self._process_request)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def url_for(self, host):
        return "%s://%s:%d" % ("wss" if self.ssl else "ws", host, self.port)

    @property
    def url(self):
        return self.url_for("127.0.0.1")

    def kill(self):
        """Drops every connection without a close frame (like a crashed instance)."""
        def drop():
            self.server.close()
            for ws in list(self.server.websockets):
                ws.transport.abort()
        self.loop.call_soon_threadsafe(drop)

    def stop(self):
        import asyncio
        if not self.thread.is_alive():
            return

        async def shutdown():
            self.server.close()
            await self.server.wait_closed()
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    close = stop  # Env.close() closes env.upstreams


class ThreadedServer:
    """A loopback listener whose connections are each served by serve(conn) on a thread of
    their own; close() ends the listener and every connection. `connections` counts the
    accepted ones; `lock` guards the counters subclasses keep."""

    scheme = "http"

    def __init__(self, backlog=64):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(backlog)
        self.port = self.lsock.getsockname()[1]
        self.cv = threading.Condition()
        self.lock = self.cv
        self.socks = []
        self.connections = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def serve(self, conn):
        raise NotImplementedError

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            with self.cv:
                self.connections += 1
                self.socks.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self):
        self.closed = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        with self.cv:
            for c in self.socks:
                try:
                    c.close()
                except OSError:
                    pass


class MemoryTLS:
    """The server side of a TLS session over a socket through memory BIOs, so that a test
    upstream sees and controls every record: handshake(), then read_request() / write().
    Raises EOFError when the peer closed the TCP connection."""

    def __init__(self, ctx, sock):
        import ssl
        self.ssl = ssl
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.buf = b""

    def flush(self):
        """Sends what the TLS layer produced."""
        d = self.out.read()
        if d:
            self.sock.sendall(d)

    def pump(self):
        """Feeds the next bytes from the socket to the TLS layer."""
        d = self.sock.recv(65536)
        if not d:
            raise EOFError
        self.inc.write(d)

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                break
            except self.ssl.SSLWantReadError:
                self.flush()
                self.pump()
        self.flush()

    def _read_more(self):
        try:
            self.buf += self.obj.read(65536)
        except self.ssl.SSLWantReadError:
            self.pump()

    def read_request(self):
        """(head bytes, body bytes) of the next request (Content-Length bodies only)."""
        while b"\r\n\r\n" not in self.buf:
            self._read_more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        clen = int(m.group(1)) if m else 0
        while len(self.buf) < clen:
            self._read_more()
        body, self.buf = self.buf[:clen], self.buf[clen:]
        return head, body

    def write(self, data):
        self.obj.write(data)
        self.flush()


class ScriptedUpstream(ThreadedServer):
    """A tiny upstream written in Python for behaviour sluice-mock cannot produce (garbage
    responses, closing a kept-alive connection at a chosen moment, odd headers).

    handler(up, conn, n_on_conn, req) is called for every request parsed from a
    connection; req is (method, target, headers, body); n_on_conn counts requests on this
    connection from 1. It writes the response with conn.sendall() and returns True to keep
    the connection open, False to close it."""

    def __init__(self, env, handler):
        self.env = env
        self.handler = handler
        self.requests = 0
        super().__init__()

    def serve(self, conn):
        buf = b""
        n = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in l.split(":", 1)) for l in lines[1:]]
                clen = int(hdr(headers, "content-length", "0"))
                while len(buf) < clen:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:clen], buf[clen:]
                n += 1
                with self.lock:
                    self.requests += 1
                if not self.handler(self, conn, n, (method, target, headers, body)):
                    return
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------
# Raw HTTP


class IncompleteResponse(Exception):
    """The connection ended before a complete response was read."""

    def __init__(self, msg, partial=None):
        super().__init__(msg)
        self.partial = partial


class Response:
    def __init__(self):
        self.version = None
        self.status = None
        self.reason = None
        self.headers = []          # [(name, value)] in received order
        self.body = b""
        self.interim = []          # 1xx responses seen before this one
        self.framing = None        # "length" | "chunked" | "close" | "none"
        self.chunks = []           # chunked: [(t, data)] per chunk, t = when its data arrived
        self.arrivals = []         # [(t, cumulative body bytes)] as body data arrived
        self.t_sent = None         # set by callers that time a request
        self.t_head = None         # when the head was parsed
        self.t_done = None
        self.trailers = []

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_token(self, name, token):
        """True when a comma-separated header (e.g. Connection) lists token."""
        for v in self.header_all(name):
            if token.lower() in [t.strip().lower() for t in v.split(",")]:
                return True
        return False

    def json(self):
        return json.loads(self.body)

    def time_at(self, offset):
        """When body byte number `offset` (0-based) had arrived."""
        for t, n in self.arrivals:
            if n > offset:
                return t
        return None

    def __repr__(self):
        return "<Response %s %s %r>" % (self.status, self.headers, self.body[:200])


class RawConn:
    """One client TCP connection to host:port with an HTTP/1.1 response parser."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Closes with RST (SO_LINGER 0)."""
        import struct
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def _fill(self, max_bytes=65536):
        """Reads more bytes into buf; returns False at EOF. Raises socket.timeout."""
        if self.eof:
            return False
        data = self.sock.recv(max_bytes)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = self.buf[:i + 1]
                self.buf = self.buf[i + 1:]
                return line
            if not self._fill():
                raise IncompleteResponse("connection closed in the response head (%r)" % self.buf[:100])

    def _exact(self, n, resp=None, base=0):
        """Reads exactly n bytes, recording arrival times on resp."""
        out = []
        got = 0
        while got < n:
            if not self.buf and not self._fill(min(65536, max(n - got, 1))):
                raise IncompleteResponse("connection closed after %d of %d body bytes" % (got, n), resp)
            take = self.buf[:n - got]
            self.buf = self.buf[len(take):]
            out.append(take)
            got += len(take)
            if resp is not None:
                resp.arrivals.append((time.monotonic(), base + got))
        return b"".join(out)

    def read_head(self, method="GET", stop_at_interim=False):
        """Reads a response head. 1xx responses are collected on .interim (or returned, with
        stop_at_interim). Returns the Response; the body is read by read_body()."""
        resp = Response()
        resp.request_method = method
        while True:
            line = self._line()
            if not line.endswith(b"\r\n"):
                raise AssertionError("status line not terminated by CRLF: %r" % line)
            parts = line[:-2].decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not re.match(r"^HTTP/\d\.\d$", parts[0]) or not re.match(r"^\d{3}$", parts[1]):
                raise AssertionError("bad status line %r" % line)
            resp.version, resp.status = parts[0], int(parts[1])
            resp.reason = parts[2] if len(parts) > 2 else ""
            resp.headers = self._headers()
            resp.t_head = time.monotonic()
            if 100 <= resp.status < 200 and resp.status != 101:
                if stop_at_interim:
                    return resp
                resp.interim.append((resp.status, resp.headers))
                continue
            return resp

    def _headers(self):
        headers = []
        while True:
            line = self._line()
            if line == b"\r\n":
                return headers
            if not line.endswith(b"\r\n"):
                raise AssertionError("header line not terminated by CRLF: %r" % line)
            text = line[:-2].decode("latin-1")
            if text[:1] in (" ", "\t") or ":" not in text:
                raise AssertionError("malformed response header line %r" % line)
            k, v = text.split(":", 1)
            if k != k.strip() or not k:
                raise AssertionError("malformed response header name %r" % line)
            headers.append((k, v.strip(" \t")))

    def read_body(self, resp, on_data=None, max_recv=65536, pause=None):
        """Reads the body of resp according to its framing. on_data(bytes) gets each piece
        instead of accumulating it in resp.body (for big downloads). pause: seconds to
        sleep after each recv (a slow reader)."""
        status = resp.status
        te = ",".join(resp.header_all("transfer-encoding")).lower()
        cls = resp.header_all("content-length")
        parts = []
        total = 0

        def emit(data):
            nonlocal total
            total += len(data)
            if on_data:
                on_data(data)
            else:
                parts.append(data)

        if resp.request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            resp.framing = "none"
        elif te:
            if te.split(",")[-1].strip() != "chunked":
                raise AssertionError("unexpected transfer-encoding %r" % te)
            resp.framing = "chunked"
            while True:
                line = self._line()
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise AssertionError("bad chunk size line %r" % line)
                if size == 0:
                    while True:  # trailer section
                        t = self._line()
                        if t == b"\r\n":
                            break
                        resp.trailers.append(t)
                    break
                data = self._exact(size, resp, total)
                resp.chunks.append((time.monotonic(), data))
                emit(data)
                if self._exact(2) != b"\r\n":
                    raise AssertionError("chunk data not followed by CRLF")
                if pause:
                    time.sleep(pause)
        elif cls:
            if len(set(cls)) != 1:
                raise AssertionError("conflicting content-length %r" % cls)
            n = int(cls[0])
            resp.framing = "length"
            left = n
            while left:
                if not self.buf and not self._fill(min(max_recv, left)):
                    resp.body = b"".join(parts)
                    raise IncompleteResponse("connection closed after %d of %d body bytes" % (n - left, n), resp)
                take = self.buf[:left]
                self.buf = self.buf[len(take):]
                left -= len(take)
                emit(take)
                resp.arrivals.append((time.monotonic(), total))
                if pause:
                    time.sleep(pause)
        else:
            resp.framing = "close"
            while True:
                if self.buf:
                    take, self.buf = self.buf, b""
                    emit(take)
                    resp.arrivals.append((time.monotonic(), total))
                if not self._fill(max_recv):
                    break
        resp.body = b"".join(parts)
        resp.body_length = total
        resp.t_done = time.monotonic()
        return resp

    def read_response(self, method="GET", **kw):
        resp = self.read_head(method)
        return self.read_body(resp, **kw)

    def request(self, method, path, headers=None, body=None, version="HTTP/1.1", host="localhost"):
        """Sends one request (Host added unless given; Content-Length for a body) and
        reads the response."""
        self.send(build_request(method, path, headers, body, version, host))
        return self.read_response(method)

    def closed_state(self, timeout=3.0):
        """How the server ends the connection from here on: 'fin' (orderly close), 'rst',
        or 'open' (still open after timeout). Bytes still arriving first are returned too:
        (state, extra_bytes)."""
        extra = self.buf
        self.buf = b""
        if self.eof:
            return "fin", extra
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "open", extra
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return "open", extra
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return "rst", extra
            except socket.timeout:
                continue
            if not data:
                self.eof = True
                return "fin", extra
            extra += data

    def read_all_until_close(self, timeout=5.0):
        """Everything until the server closes; raises on timeout."""
        deadline = time.monotonic() + timeout
        out = self.buf
        self.buf = b""
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("connection not closed within %.1fs" % timeout)
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                break
            out += data
        self.sock.settimeout(self.timeout)
        return out


def build_request(method, path, headers=None, body=None, version="HTTP/1.1", host="localhost"):
    """Request bytes. headers: list of (name, value) or dict. Host is added first unless
    headers has one or host is None; Content-Length is added for a body unless headers
    set Content-Length or Transfer-Encoding."""
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in hs}
    lines = ["%s %s %s" % (method, path, version)]
    if host is not None and "host" not in names:
        lines.append("Host: %s" % host)
    for k, v in hs:
        lines.append("%s: %s" % (k, v))
    if isinstance(body, str):
        body = body.encode()
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(body, sizes):
    """Chunked encoding of body, cutting it into pieces of the given sizes (cycled)."""
    out = []
    i = 0
    k = 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        k += 1
        piece = body[i:i + n]
        i += len(piece)
        out.append(b"%x\r\n" % len(piece) + piece + b"\r\n")
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def http_request(port, method, path, headers=None, body=None, timeout=10.0, host=None):
    """One request with http.client on a fresh connection. Returns (status, headers as a
    list of (name, value), body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hs = dict(headers or {})
        if host is not None:
            hs["Host"] = host
        conn.request(method, path, body=body, headers=hs)
        r = conn.getresponse()
        data = r.read()
        return r.status, r.getheaders(), data
    finally:
        conn.close()


def hdr(headers, name, default=None):
    """First value of header `name` in a list of (name, value)."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return default


def echo_headers(echo):
    """The headers the mock received, from an /echo JSON body: list of (name, value)."""
    return [(k, v) for k, v in echo["headers"]]


def echo_header_all(echo, name):
    name = name.lower()
    return [v for k, v in echo["headers"] if k.lower() == name]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# unittest base


class SluiceTestCase(unittest.TestCase):
    """One Env per test class: setUpEnv() (a classmethod to override) starts what the
    class needs; tearDownClass stops everything and fails if sluice did not exit 0 on
    SIGTERM."""

    maxDiff = 4000

    def assertSettled(self, sluice):
        """After a run: sluice alive, holding at most the admin connection, no request active or
        queued in any pool, no endpoint with requests in flight, no sanitizer report."""
        self.assertTrue(sluice.alive())
        wait_for(lambda: sluice.status()["connections"] <= 1, 10,
                 what="the gateway to hold no client connection")
        st = sluice.status()
        for pool in st["pools"]:
            self.assertEqual((pool["name"], pool["active"], pool["queued"]), (pool["name"], 0, 0), st)
            for ep in pool["endpoints"]:
                self.assertEqual(ep["inflight"], 0, st)
        rep = sanitizer_report(sluice.log_text())
        self.assertIsNone(rep, rep)
        return st
    # For classes whose sluice may be stuck in a runaway policy if a test fails: stop it with
    # a short timeout and do not require exit 0 (SIGTERM cannot be handled mid-loop).
    stuck_sluice_ok = False

    @classmethod
    def setUpClass(cls):
        cls.env = Env()
        try:
            cls.setUpEnv()
        except BaseException:
            cls.env.close(check_exit=False)
            raise

    @classmethod
    def setUpEnv(cls):
        pass

    @classmethod
    def tearDownClass(cls):
        if cls.stuck_sluice_ok:
            for sl in cls.env.sluices:
                if sl.alive():
                    try:
                        sl.stop(timeout=3)
                    except Exception:
                        pass
        problems = cls.env.close()
        if problems:
            raise AssertionError("\n".join(problems))

    # assertion helpers

    def assertJsonError(self, resp, status, etype=None):
        """resp: a Response. Checks status, JSON error body and x-request-id."""
        self.assertEqual(resp.status, status, resp)
        ctype = resp.header("content-type", "")
        self.assertTrue(ctype.lower().startswith("application/json"), "content-type %r" % ctype)
        body = json.loads(resp.body)
        self.assertIn("error", body)
        err = body["error"]
        self.assertIsInstance(err.get("type"), str)
        self.assertIsInstance(err.get("message"), str)
        if etype is not None:
            self.assertEqual(err["type"], etype, body)
        rid = resp.header("x-request-id")
        self.assertTrue(rid, "no x-request-id on %r" % resp)
        self.assertEqual(err.get("request_id"), rid)
        return err
