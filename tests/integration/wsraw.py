"""WebSocket frames on raw sockets, for tests that look at the exact bytes sluice relays: the
frame codec (RFC 6455 5.2) and the raw TCP server that upstream fakes build on."""

import struct

import harness as h

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def mask(data, key):
    """XORs data with the 4-byte key (masking and unmasking are the same)."""
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def encode(op, payload=b"", fin=True, key=None, rsv=0, length=None, form=None):
    """One frame's bytes. key: a 4-byte masking key, or None for an unmasked frame. length:
    the length written in the header when it is not len(payload) (a lie); form: 7, 16 or 64
    to force a length encoding (non-minimal ones included)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    m = 0x80 if key is not None else 0
    if form is None:
        form = 7 if n < 126 else 16 if n <= 0xFFFF else 64
    if form == 7:
        head = struct.pack("!BB", b0, m | n)
    elif form == 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if key is None:
        return head + payload
    return head + key + mask(payload, key)


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


class Frame:
    def __init__(self, fin, rsv, op, key, payload, raw):
        self.fin, self.rsv, self.op, self.key = fin, rsv, op, key
        self.payload = payload  # unmasked
        self.raw = raw          # the bytes as they arrived

    @property
    def masked(self):
        return self.key is not None

    @property
    def code(self):
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def reason(self):
        return self.payload[2:].decode("utf-8", "replace")

    def sig(self):
        return (self.op, self.fin, self.payload)

    def __repr__(self):
        p = self.payload if len(self.payload) <= 40 else self.payload[:40] + b"...(%d)" % len(self.payload)
        return "<Frame op=%d fin=%d rsv=%d masked=%d %r>" % (self.op, self.fin, self.rsv, self.masked, p)


def parse_frame(buf):
    """(Frame, bytes used) from the start of buf, or None when incomplete."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    i = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack("!H", bytes(buf[2:4]))[0]
        i = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack("!Q", bytes(buf[2:10]))[0]
        i = 10
    key = None
    if buf[1] & 0x80:
        if len(buf) < i + 4:
            return None
        key = bytes(buf[i:i + 4])
        i += 4
    if len(buf) < i + n:
        return None
    raw = bytes(buf[:i + n])
    payload = raw[i:]
    if key is not None:
        payload = mask(payload, key)
    return Frame(bool(raw[0] & 0x80), (raw[0] >> 4) & 7, raw[0] & 0xF, key, payload, raw), i + n


def read_upgrade(conn):
    """Reads an opening handshake request from a raw socket: (method, path, headers with
    lower-case names, bytes after the head), or None when the peer closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, path = lines[0].split(" ")[:2]
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    return method, path, headers, rest


class RawServer(h.ThreadedServer):
    """A raw TCP server for WebSocket upstream fakes (ws:// URLs)."""

    scheme = "ws"
