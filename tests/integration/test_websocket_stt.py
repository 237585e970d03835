"""Streaming speech-to-text through sluice against the bundled mock STT server
(examples/mock/stt): 1 MiB of audio streamed in 4 KiB frames arrives intact (the server's
SHA-256 of what it received matches), partial transcripts flow back while audio is sent, the
final transcript follows the end message, and a handshake the instance refuses is retried on
another one without the client noticing."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402
import websockets  # noqa: E402

STT_BIN = os.environ.get("SLUICE_MOCK_STT_BIN")


class SttMock:
    def __init__(self, env, name, args=()):
        self.port_file = env.path("%s.port" % name)
        self.proc = subprocess.Popen([STT_BIN, "--listen", "127.0.0.1:0", "--port-file",
                                      self.port_file, "--name", name, "--quiet"] + list(args),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.wait_for(lambda: os.path.exists(self.port_file), 5, what="stt mock port file")
        with open(self.port_file) as f:
            self.port = int(f.read().strip())
        self.url = "ws://127.0.0.1:%d" % self.port

    def stop(self):
        h._stop_process(self.proc)


class SttThroughSluiceTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.mocks = [SttMock(env, "stt-a"), SttMock(env, "stt-b"),
                     SttMock(env, "stt-refuse", ["--refuse-handshake", "503"])]
        pools = {
            "stt": h.make_pool([m.url for m in cls.mocks[:2]], balancer="least_queue"),
            "flaky": h.make_pool([cls.mocks[2].url, cls.mocks[0].url], balancer="round_robin",
                                 retry={"attempts": 2, "retry_on": ["connect_error", 503]}),
        }
        routes = [{"path": "/v1/listen", "pool": "stt"}, {"path": "/flaky", "pool": "flaky"}]
        cls.s = env.sluice(h.make_config(pools, routes, watch=False))

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for m in cls.mocks:
            m.stop()

    async def stream(self, path, audio, frame=4096):
        partials = []
        async with websockets.connect("ws://127.0.0.1:%d%s" % (self.s.port, path),
                                      max_size=None) as ws:
            for i in range(0, len(audio), frame):
                chunk = audio[i:i + frame]
                if chunk[0] == 0xEE:  # the mock echoes frames starting with 0xEE
                    chunk = b"\x00" + chunk[1:]
                    audio[i] = 0
                await ws.send(bytes(chunk))
                while True:  # collect what arrived meanwhile, without blocking
                    try:
                        partials.append(json.loads(await asyncio.wait_for(ws.recv(), 0.0001)))
                    except asyncio.TimeoutError:
                        break
            await ws.send('{"type":"end"}')
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "final":
                    return partials, msg
                partials.append(msg)

    def test_audio_stream_integrity_and_transcripts(self):
        audio = bytearray(os.urandom(1 << 20))
        partials, final = asyncio.run(asyncio.wait_for(self.stream("/v1/listen", audio), 60))
        self.assertEqual(final["bytes"], 1 << 20)
        self.assertEqual(final["frames"], 256)
        self.assertEqual(final["sha256"], hashlib.sha256(bytes(audio)).hexdigest())
        self.assertGreaterEqual(len([p for p in partials if p["type"] == "partial"]), 40)

    def test_refused_handshake_retried_on_another_instance(self):
        async def go():
            for _ in range(4):
                audio = bytearray(os.urandom(64 * 1024))
                _, final = await self.stream("/flaky", audio)
                self.assertEqual(final["instance"], "stt-a")
                self.assertEqual(final["sha256"], hashlib.sha256(bytes(audio)).hexdigest())
        asyncio.run(asyncio.wait_for(go(), 60))


if __name__ == "__main__":
    unittest.main()
