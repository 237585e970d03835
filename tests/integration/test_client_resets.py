"""Clients that reset their connection while the gateway still writes to it (a TLS
close_notify after a Connection: close response, a large body cut short) cost that connection
only: writing to a reset socket is an error code, never a SIGPIPE that kills the process."""

import os
import socket
import ssl
import struct
import subprocess
import sys
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


def reset(sock):
    """Closes with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class ClientResetsTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.up = env.mock("up")
        certs = os.path.join(env.tmp, "certs")
        os.mkdir(certs)
        cls.cert, cls.key = os.path.join(certs, "cert.pem"), os.path.join(certs, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-keyout", cls.key, "-out", cls.cert], check=True, capture_output=True)
        cfg = h.make_config({"p": h.make_pool([cls.up])}, [{"path": "/", "pool": "p"}],
                            watch=False)
        cls.plain = env.sluice(cfg)
        cfg = dict(cfg, listen=[{"addr": "127.0.0.1:0", "tls": {"cert": cls.cert, "key": cls.key}}])
        cls.tls = env.sluice(cfg)
        cls.ctx = ssl.create_default_context()
        cls.ctx.check_hostname = False
        cls.ctx.verify_mode = ssl.CERT_NONE

    def alive(self, s):
        self.assertIsNone(s.proc.poll(), "sluice died:\n" + "\n".join(s.lines[-20:]))

    def test_sigpipe_is_ignored(self):
        # The reset races below cannot force every write-after-reset path deterministically;
        # the disposition that makes all of them harmless can be checked directly.
        with open("/proc/%d/status" % self.plain.proc.pid) as f:
            sigign = int(next(l for l in f if l.startswith("SigIgn:")).split()[1], 16)
        self.assertTrue(sigign & (1 << (13 - 1)), "SIGPIPE is not ignored")

    def test_tls_client_resets_after_connection_close_response(self):
        # The gateway answers, then sends close_notify and shuts down; the client resets
        # first, so that last write meets a reset socket.
        for _ in range(200):
            raw = socket.create_connection(("127.0.0.1", self.tls.port), timeout=5)
            c = self.ctx.wrap_socket(raw, server_hostname="localhost")
            c.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += c.recv(65536)
            reset(c)  # no close_notify: Python closes TLS sockets without one
        self.alive(self.tls)
        raw = socket.create_connection(("127.0.0.1", self.tls.port), timeout=5)
        c = self.ctx.wrap_socket(raw, server_hostname="localhost")
        c.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(c.recv(100).startswith(b"HTTP/1.1 200"))
        c.close()

    def test_plain_client_resets_during_a_large_response(self):
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", self.plain.port), timeout=5)
            c.sendall(b"GET /bytes?n=64000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            c.recv(65536)  # the response has started
            reset(c)
        self.alive(self.plain)
        self.assertEqual(h.http_request(self.plain.port, "GET", "/echo")[0], 200)


if __name__ == "__main__":
    unittest.main()
