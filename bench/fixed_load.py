#!/usr/bin/python3
"""Send exactly N requests to HOST:PORT over C keep-alive connections, then exit.

wrk runs for a time, not a count; instruction counting (valgrind --tool=callgrind) needs a
fixed amount of work so that "instructions / request" is comparable from run to run. Each
connection sends its next request when the previous response is complete (no pipelining).
Prints one line: "requests=N ok=N non2xx=N errors=N seconds=S".
Exits 1 if any request failed or was not 2xx.

usage: fixed_load.py HOST PORT N [--conns 10] [--path /echo]
"""

import argparse
import asyncio
import sys
import time

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from idle_conns import read_response  # noqa: E402


async def worker(host, port, request, count, stats):
    reader = writer = None
    for _ in range(count):
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status = await asyncio.wait_for(read_response(reader), 60)
        except Exception as e:  # noqa: BLE001 -- counted; reconnect and go on
            stats["errors"] += 1
            if stats["errors"] <= 3:
                print(f"fixed_load: {e!r}", file=sys.stderr)
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        if 200 <= status < 300:
            stats["ok"] += 1
        else:
            stats["non2xx"] += 1
    if writer is not None:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--path", default="/echo")
    a = ap.parse_args()
    request = (f"GET {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n"
               "User-Agent: sluice-bench-fixed\r\n\r\n").encode()
    stats = {"ok": 0, "non2xx": 0, "errors": 0}
    per, extra = divmod(a.n, a.conns)
    t0 = time.monotonic()
    await asyncio.gather(*(worker(a.host, a.port, request, per + (i < extra), stats)
                           for i in range(a.conns)))
    dt = time.monotonic() - t0
    print(f"requests={a.n} ok={stats['ok']} non2xx={stats['non2xx']} "
          f"errors={stats['errors']} seconds={dt:.2f}")
    return 0 if stats["ok"] == a.n else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
