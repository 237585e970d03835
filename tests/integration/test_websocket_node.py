"""The WebSocket relay with a second client nobody here wrote: npm's `ws`, installed from the
npm registry into the build tree on first use (package pinned below)."""

import json
import os
import subprocess
import sys
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
from test_websocket import Upstream  # noqa: E402

WS_VERSION = "8.18.0"
NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")


def node_ws_prefix():
    """A directory with node_modules/ws, outside the source tree."""
    base = os.environ.get("SLUICE_BUILD_DIR") or os.path.join(h.tempfile.gettempdir(), "sluice-node")
    prefix = os.path.join(base, "node-ws-" + WS_VERSION)
    if not os.path.isdir(os.path.join(prefix, "node_modules", "ws")):
        os.makedirs(prefix, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", prefix,
                        "ws@" + WS_VERSION], check=True, timeout=300)
    return prefix


class NodeWsClientTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.prefix = node_ws_prefix()
        cls.up = Upstream()
        cls.s = cls.env.sluice(h.make_config(
            {"stt": h.make_pool([cls.up.url], websocket={"max_message_bytes": 4 * 1024 * 1024})},
            [{"path": "/", "pool": "stt"}], watch=False))

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.up.stop()

    def test_ws_client_through_sluice(self):
        env = dict(os.environ, NODE_PATH=os.path.join(self.prefix, "node_modules"))
        # ESM ignores NODE_PATH: run the script from a copy inside the prefix instead.
        script = os.path.join(self.prefix, "ws_client.mjs")
        with open(os.path.join(NODE_DIR, "ws_client.mjs")) as src, open(script, "w") as dst:
            dst.write(src.read())
        r = subprocess.run(["node", script, "ws://127.0.0.1:%d/v1/listen" % self.s.port],
                           capture_output=True, text=True, timeout=60, env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        self.assertEqual(out.get("protocol"), "stt.v1", out)
        self.assertTrue(out.get("text"), out)
        self.assertTrue(out.get("binary_1mib"), out)
        self.assertTrue(out.get("fragmented"), out)
        self.assertEqual((out.get("close_code"), out.get("close_reason")), (4003, "node bye"))
        h.wait_for(lambda: 4003 in self.up.close_codes, 5, what="upstream saw close code 4003")


if __name__ == "__main__":
    unittest.main()
