#!/usr/bin/python3
"""Open N idle keep-alive HTTP/1.1 connections to HOST:PORT and hold them.

Each connection sends one complete keep-alive request (GET PATH, default /healthz) and reads
the whole response, so the proxy has accepted it, parsed a request, forwarded it upstream and
answered it: the connection is then in the state a real idle keep-alive client leaves it in.
Once all N are done the script prints one line, "ready OPEN FAILED NON2XX", and waits until
its stdin reaches EOF (or a line is read) or it gets SIGTERM/SIGINT (only the signals with
--signal-only); then it closes them all.

Used by bench/proxy.sh to measure a proxy's resident memory per idle connection.
Standard library only (asyncio).

usage: idle_conns.py HOST PORT N [--path /healthz] [--concurrency 200] [--signal-only]
"""

import argparse
import asyncio
import os
import resource
import signal
import sys


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        print(f"idle_conns: RLIMIT_NOFILE {soft} < {need}; some connections will fail",
              file=sys.stderr)


async def read_response(reader):
    """Reads one response (Content-Length or chunked); returns the status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def open_one(host, port, request, sem, conns, stats):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(request)
            status = await asyncio.wait_for(read_response(reader), 10)
        except Exception as e:  # noqa: BLE001 -- counted and reported, not fatal
            stats["failed"] += 1
            if stats["failed"] <= 3:
                print(f"idle_conns: connection failed: {e!r}", file=sys.stderr)
            return
        if not 200 <= status < 300:
            stats["non2xx"] += 1
        conns.append((reader, writer))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--path", default="/healthz")
    ap.add_argument("--concurrency", type=int, default=200,
                    help="connections being set up at once (keeps the accept backlog sane)")
    ap.add_argument("--signal-only", action="store_true",
                    help="wait for SIGTERM/SIGINT only, not for stdin (stdin may be /dev/null)")
    a = ap.parse_args()
    raise_nofile(a.n + 64)

    request = (f"GET {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n"
               "User-Agent: sluice-bench-idle\r\n\r\n").encode()
    sem = asyncio.Semaphore(a.concurrency)
    conns, stats = [], {"failed": 0, "non2xx": 0}
    await asyncio.gather(*(open_one(a.host, a.port, request, sem, conns, stats)
                           for _ in range(a.n)))

    # Count how many the server closed while we were opening the rest.
    await asyncio.sleep(0.2)
    open_now = sum(1 for r, _ in conns if not r.at_eof())
    print(f"ready {open_now} {stats['failed']} {stats['non2xx']}", flush=True)

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    if not a.signal_only:
        stdin_eof = loop.run_in_executor(None, sys.stdin.readline)
        stdin_eof.add_done_callback(lambda _: done.set())
    await done.wait()

    for _, w in conns:
        w.close()
    await asyncio.sleep(0)
    # The stdin reader thread may still be blocked; exit without joining it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
