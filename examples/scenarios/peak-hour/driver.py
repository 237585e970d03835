#!/usr/bin/python3
"""peak-hour driver: the STT incident of DESIGN.md, once per balancer, against the same mocks.

run.sh starts the mock STT instances and calls this with their port files. For each balancer
this script starts sluice (identical pool config except `balancer`), replays the same
seeded open-loop arrival trace (Poisson arrivals, bursty rate), records every request
(latency from its scheduled arrival, status, serving instance from `x-mock-instance`),
samples every mock's GET /stats every 100 ms, stops sluice, and at the end prints one
table per run, a comparison line, and draws a PNG with gnuplot.

Standard library only. Exit status: 0 when every run completed (processes alive, requests
answered), 1 when a run failed, 2 on bad usage. The latency outcome never changes it.
"""

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
ROUTE = "/v1/audio/transcriptions"


# ---------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 client over asyncio streams (keep-alive, Content-Length or chunked bodies).

class HttpError(Exception):
    pass


async def read_response(reader):
    """Reads one response. Returns (status, headers dict with lower-case names, body bytes,
    keep_alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HttpError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif status in (204, 304) or status < 200:
        body = b""
    else:
        body = await reader.read()
        keep_alive = False
    return status, headers, body, keep_alive


class Pool:
    """Keep-alive connections to one host:port; grows on demand (open-loop load never waits
    for a connection), idle connections are reused most-recently-used first."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.idle = []
        self.opened = 0

    async def request(self, raw, timeout):
        """Sends raw (a whole request) and reads the response. No retry: a failure is the
        result (a gateway that drops kept-alive connections early should show)."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout)
            self.opened += 1
        try:
            writer.write(raw)
            resp = await asyncio.wait_for(read_response(reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            writer.close()
            raise HttpError(f"connection: {e!r}") from e
        except BaseException:
            writer.close()
            raise
        if resp[3]:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return resp

    def close(self):
        for _, w in self.idle:
            w.close()
        self.idle = []


# ---------------------------------------------------------------------------------------------
# Setup

def read_mocks(path):
    """mocks.tsv from run.sh: name, port, latency_ms, jitter_ms, max_concurrency, pid."""
    mocks = []
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            name, port, lat, jit, conc, pid = line.split()
            m = {"name": name, "port": int(port), "latency_ms": int(lat), "jitter_ms": int(jit),
                 "conc": int(conc), "pid": int(pid)}
            # sluice-mock draws latency + uniform integer 0..jitter: mean jitter/2
            m["service_ms"] = m["latency_ms"] + m["jitter_ms"] / 2.0
            mocks.append(m)
    return mocks


def capacity_rps(mocks):
    return sum(m["conc"] * 1000.0 / m["service_ms"] for m in mocks)


def arrival_trace(duration_s, capacity, high, low, phase_s, seed):
    """Poisson arrivals whose rate alternates high*capacity (phase_s) and low*capacity."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        phase = int(t // phase_s)
        rate = capacity * (high if phase % 2 == 0 else low)
        dt = rng.expovariate(rate)
        # a gap that crosses into the next phase restarts there (memoryless)
        if int((t + dt) // phase_s) != phase:
            t = (phase + 1) * phase_s
            if t >= duration_s:
                break
            continue
        t += dt
        if t >= duration_s:
            break
        out.append(t)
    return out


def parse_spec(spec):
    """A run: a balancer name, optionally with diagnostic variants after colons:
    `:mi2` sets max_inflight = 2 (the gateway queues the rest: sluice's admission queue),
    `:w` weights each endpoint by its throughput (slots / mean service time, the fastest = 1
    unit, rounded). The two default runs use neither."""
    parts = spec.split(":")
    v = {"balancer": parts[0], "max_inflight": 0, "weights": False, "name": spec.replace(":", "-")}
    for p in parts[1:]:
        if p.startswith("mi") and p[2:].isdigit():
            v["max_inflight"] = int(p[2:])
        elif p == "w":
            v["weights"] = True
        else:
            raise ValueError(f"unknown variant {p!r} in {spec!r} (known: mi<N>, w)")
    return v


def sluice_config(path, spec, mocks, policies):
    v = parse_spec(spec)
    top = max(m["conc"] / m["service_ms"] for m in mocks)
    eps = []
    for m in mocks:
        url = f'"http://127.0.0.1:{m["port"]}/echo"'
        if v["weights"]:
            w = max(1, round((m["conc"] / m["service_ms"]) / top * 2))
            url = f"{{ url = {url}, weight = {w} }}"
        eps.append(url)
    eps = ",\n      ".join(eps)
    queue = ""
    if v["max_inflight"]:
        queue = "\n      queue = { max = 4096, timeout_ms = 30000 },"
    text = f"""-- peak-hour scenario, generated by examples/scenarios/peak-hour/driver.py ({spec})
return {{
  listen = {{ "127.0.0.1:0" }},
  admin = false,
  workers = 1,
  watch = false,
  log_level = "warn",
  policies = "{policies}",
  pools = {{
    stt = {{
      endpoints = {{
      {eps},
      }},
      balancer = "{v['balancer']}",
      -- 0: no admission limit, each instance queues internally, as in the incident
      max_inflight = {v['max_inflight']},{queue}
      timeout_ms = {{ connect = 1000, first_byte = 30000, total = 0 }},
      keepalive = {{ max_idle = 64, idle_timeout_ms = 60000 }},
    }},
  }},
  routes = {{
    {{ path = "{ROUTE}", pool = "stt" }},
  }},
}}
"""
    with open(path, "w") as f:
        f.write(text)


def listening_ports(pid):
    """TCP ports process pid listens on (from /proc: no log parsing, no extra tools)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[3] == "0A" and p[9] in inodes:
                        ports.append(int(p[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc (NaN when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# One run

async def get_stats(pool):
    status, _, body, _ = await pool.request(
        b"GET /stats HTTP/1.1\r\nHost: mock\r\n\r\n", 5)
    if status != 200:
        raise HttpError(f"/stats: {status}")
    return json.loads(body)


async def wait_mocks_idle(mpools, limit_s):
    """Waits until no mock has a request in progress; returns whether they all got there."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        stats = await asyncio.gather(*(get_stats(p) for p in mpools))
        if all(s["inflight"] == 0 and s["queued"] == 0 for s in stats):
            return True
        await asyncio.sleep(0.2)
    return False


async def reset_mocks(mpools):
    for p in mpools:
        status, _, _, _ = await p.request(
            b"POST /stats/reset HTTP/1.1\r\nHost: mock\r\nContent-Length: 0\r\n\r\n", 5)
        if status != 200:
            raise HttpError(f"/stats/reset: {status}")


async def sampler(mpools, t0, samples, stop, problems):
    """Every 100 ms: each mock's inflight and queued (one keep-alive connection per mock)."""
    nxt = time.monotonic()
    failures = [0] * len(mpools)
    while not stop.is_set():
        t = time.monotonic() - t0
        res = await asyncio.gather(*(get_stats(p) for p in mpools), return_exceptions=True)
        row = []
        for i, r in enumerate(res):
            if isinstance(r, BaseException):
                failures[i] += 1
                row.append(None)
                if failures[i] == 3:
                    problems.append(f"mock #{i + 1}: /stats failed 3 times ({r!r})")
            else:
                failures[i] = 0
                row.append((r["inflight"], r["queued"]))
        samples.append((t, row))
        nxt += 0.1
        delay = nxt - time.monotonic()
        if delay < 0:
            nxt = time.monotonic()
            delay = 0
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass


async def one_request(pool, raw, t_sched, t0, rec, timeout):
    rec["send"] = time.monotonic() - t0
    try:
        status, headers, body, _ = await pool.request(raw, timeout)
        rec["status"] = status
        rec["instance"] = headers.get("x-mock-instance", "")
        if status != 200:
            try:  # sluice's JSON error: {"error":{"type":...}}
                rec["error"] = json.loads(body)["error"]["type"]
            except Exception:  # noqa: BLE001 -- not a sluice error body
                rec["error"] = f"http_{status}"
    except asyncio.TimeoutError:
        rec["status"] = 0
        rec["error"] = "client_timeout"
    except Exception as e:  # noqa: BLE001 -- recorded, not fatal
        rec["status"] = 0
        rec["error"] = type(e).__name__
    rec["done"] = time.monotonic() - t0
    rec["latency_ms"] = (rec["done"] - t_sched) * 1000.0


async def run_one(args, balancer, mocks, trace, rundir, pids_file):
    os.makedirs(rundir, exist_ok=True)
    conf = os.path.join(rundir, "sluice.lua")
    sluice_config(conf, balancer, mocks, os.path.join(ROOT, "policies"))
    chk = subprocess.run([args.sluice, "--check", "-c", conf], capture_output=True, text=True)
    if chk.returncode != 0:
        raise RuntimeError(f"sluice --check failed: {chk.stdout}{chk.stderr}")

    problems = []
    mpools = [Pool("127.0.0.1", m["port"]) for m in mocks]
    if not await wait_mocks_idle(mpools, 90):
        problems.append("mocks still busy from the previous run after 90 s")
    await reset_mocks(mpools)

    log = open(os.path.join(rundir, "sluice.log"), "w")
    proc = subprocess.Popen([args.sluice, "-c", conf], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    with open(pids_file, "w") as f:  # one sluice at a time
        f.write(f"{proc.pid}\n")
    try:
        port = None
        for _ in range(100):
            ports = listening_ports(proc.pid)
            if ports:
                port = ports[0]
                break
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if port is None:
            raise RuntimeError(f"sluice did not start (see {rundir}/sluice.log)")

        gw = Pool("127.0.0.1", port)
        body = bytes(random.Random(7).getrandbits(8) for _ in range(args.body_bytes))
        raw = (f"POST {ROUTE} HTTP/1.1\r\nHost: stt.example\r\n"
               f"Content-Type: audio/l16; rate=16000\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body

        # warm-up: one request per instance's worth, sequential, not recorded
        for _ in range(len(mocks)):
            await gw.request(raw, 10)
        await reset_mocks(mpools)

        records = [{"sched": t} for t in trace]
        cpu0 = cpu_seconds(proc.pid)
        samples = []
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic() + 0.2
        samp = asyncio.create_task(sampler(mpools, t0, samples, stop, problems))
        tasks = []
        lags = []
        for rec in records:
            delay = t0 + rec["sched"] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append((time.monotonic() - t0 - rec["sched"]) * 1000.0)
            tasks.append(loop.create_task(
                one_request(gw, raw, rec["sched"], t0, rec, args.request_timeout)))
        arrivals_end = time.monotonic() - t0
        # drain: requests still waiting in the instances' queues are part of the run
        done, pending = await asyncio.wait(tasks, timeout=args.drain_limit) if tasks else ((), ())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        for rec in records:
            if "done" not in rec:
                rec.update(status=0, error="unfinished", done=None, latency_ms=None)
        stop.set()
        await samp
        end_stats = await asyncio.gather(*(get_stats(p) for p in mpools), return_exceptions=True)
        gw.close()
        sluice_cpu_s = cpu_seconds(proc.pid) - cpu0
        sluice_alive = proc.poll() is None
        if not sluice_alive:
            problems.append(f"sluice exited with status {proc.returncode} during the run")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        open(pids_file, "w").close()  # reaped: run.sh must not signal a recycled pid
        log.close()
    for i, m in enumerate(mocks):
        if not alive(m["pid"]):
            problems.append(f"mock {m['name']} (pid {m['pid']}) is not running")
        if isinstance(end_stats[i], BaseException):
            problems.append(f"mock {m['name']}: /stats failed at the end: {end_stats[i]!r}")
    for p in mpools:
        p.close()
    mock_requests = sum(s["requests"] for s in end_stats if isinstance(s, dict))
    return {"balancer": balancer, "dir": parse_spec(balancer)["name"], "records": records,
            "samples": samples, "lags": lags,
            "arrivals_end": arrivals_end, "problems": problems, "port": port,
            "gw_conns": gw.opened, "sluice_cpu_s": sluice_cpu_s, "mock_requests": mock_requests,
            "mock_aborted": sum(s["aborted"] for s in end_stats if isinstance(s, dict))}


# ---------------------------------------------------------------------------------------------
# Analysis

def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def analyse(run, mocks, duration):
    recs = run["records"]
    by_name = {m["name"]: i for i, m in enumerate(mocks)}
    ok = [r for r in recs if r["status"] == 200]
    lat = sorted(r["latency_ms"] for r in ok)
    n = len(recs)
    a = {"requests": n, "ok": len(ok), "lat": lat}
    a["p50"], a["p95"], a["p99"] = pct(lat, 50), pct(lat, 95), pct(lat, 99)
    a["max"] = lat[-1] if lat else float("nan")
    # "over X" shares count every request: a failed one is not a fast one
    a["over1"] = sum(1 for r in recs if r["status"] != 200 or r["latency_ms"] > 1000) / max(n, 1)
    a["over3"] = sum(1 for r in recs if r["status"] != 200 or r["latency_ms"] > 3000) / max(n, 1)
    a["timeouts"] = sum(1 for r in recs if r["status"] == 504 or r.get("error") in
                        ("client_timeout", "unfinished"))
    a["errors"] = sum(1 for r in recs if r["status"] != 200) - a["timeouts"]
    statuses = {}
    for r in recs:
        if r["status"] != 200:
            key = str(r["status"]) if r["status"] else r.get("error", "?")
            statuses[key] = statuses.get(key, 0) + 1
    a["statuses"] = statuses
    # queue wait = latency - the instance's mean service time
    waits = []
    per = [{"n": 0, "wait": 0.0} for _ in mocks]
    for r in ok:
        i = by_name.get(r["instance"])
        if i is None:
            continue
        w = r["latency_ms"] - mocks[i]["service_ms"]
        waits.append(w)
        per[i]["n"] += 1
        per[i]["wait"] += w
    waits.sort()
    classes = {}
    for r in ok:
        i = by_name.get(r["instance"])
        if i is not None:
            classes.setdefault(mocks[i]["service_ms"], []).append(r["latency_ms"])
    a["classes"] = [(ms, len(v), pct(sorted(v), 50), pct(sorted(v), 99))
                    for ms, v in sorted(classes.items())]
    a["wait_mean"] = sum(waits) / len(waits) if waits else float("nan")
    a["wait_p99"] = pct(waits, 99)
    # per instance, from the 100 ms /stats samples while arrivals ran
    samples = [s for s in run["samples"] if s[0] <= duration]
    a["samples"] = len(samples)
    spreads = []
    for i, m in enumerate(mocks):
        vals = [s[1][i] for s in samples if s[1][i] is not None]
        busy = sum(v[0] for v in vals) / (len(vals) * m["conc"]) if vals else float("nan")
        per[i].update(busy=busy, qmax=max((v[1] for v in vals), default=0),
                      qmean=sum(v[1] for v in vals) / len(vals) if vals else float("nan"))
    for _, row in samples:
        if all(v is not None for v in row):
            loads = [v[0] + v[1] for v in row]
            spreads.append(max(loads) - min(loads))
    a["spread_mean"] = sum(spreads) / len(spreads) if spreads else float("nan")
    a["spread_max"] = max(spreads, default=0)
    # idle instances while another has a queue (the incident's "8 of 12 busy, queue 15")
    idle_while_q = 0
    for _, row in samples:
        if all(v is not None for v in row) and any(v[1] > 0 for v in row):
            if any(v[0] < m["conc"] for v, m in zip(row, mocks)):
                idle_while_q += 1
    a["idle_while_queued"] = idle_while_q / max(len(samples), 1)
    a["per"] = per
    a["view_equal"], a["view_maxdiff"] = view_check(recs, samples, mocks)
    lags = sorted(run["lags"])
    a["lag_p99"], a["lag_max"] = pct(lags, 99), (lags[-1] if lags else float("nan"))
    # the balancer's choices against the loads the gateway saw (reconstructed from the
    # client's send/done times: a request is in flight at its instance from send to done)
    a["picks_not_shortest"] = not_shortest_share(ok, by_name, len(mocks))
    return a


def view_check(recs, samples, mocks):
    """Requests in flight per instance as the client-side timeline counts them (sent, not yet
    answered: what the gateway's per-endpoint `inflight` should read with max_inflight = 0),
    against the instance's own inflight + queued, at each /stats sample. Returns the share
    of (sample, instance) pairs that agree and the largest difference."""
    import bisect
    sends = {m["name"]: [] for m in mocks}
    dones = {m["name"]: [] for m in mocks}
    for r in recs:
        if r["status"] == 200 and r.get("instance") in sends:
            sends[r["instance"]].append(r["send"])
            dones[r["instance"]].append(r["done"])
    for v in list(sends.values()) + list(dones.values()):
        v.sort()
    equal = total = maxdiff = 0
    for t, row in samples:
        for m, v in zip(mocks, row):
            if v is None:
                continue
            n = m["name"]
            count = bisect.bisect_right(sends[n], t) - bisect.bisect_right(dones[n], t)
            d = abs(count - (v[0] + v[1]))
            total += 1
            equal += d == 0
            maxdiff = max(maxdiff, d)
    return equal / max(total, 1), maxdiff


def not_shortest_share(ok, by_name, n):
    """Share of requests sent to an instance with more requests in flight (as the gateway
    counts them: dispatched, not yet answered) than the least loaded instance had."""
    events = []
    for k, r in enumerate(ok):
        i = by_name.get(r["instance"])
        if i is None:
            continue
        events.append((r["send"], 1, i, k))
        events.append((r["done"], 0, i, k))
    events.sort()
    load = [0] * n
    worse = total = 0
    for _, kind, i, _ in events:
        if kind == 1:
            total += 1
            if load[i] > min(load):
                worse += 1
            load[i] += 1
        else:
            load[i] -= 1
    return worse / max(total, 1)


def fmt_ms(v):
    return "-" if v != v else f"{v:,.0f}"


def table(run, a, mocks, capacity, args):
    out = []
    w = out.append
    w(f"== {run['balancer']} ==")
    w(f"requests {a['requests']}  ok {a['ok']}  timeouts {a['timeouts']}  other errors "
      f"{a['errors']}" + (f"  ({', '.join(f'{k}: {v}' for k, v in sorted(a['statuses'].items()))})"
                          if a["statuses"] else ""))
    w(f"latency ms  p50 {fmt_ms(a['p50'])}  p95 {fmt_ms(a['p95'])}  p99 {fmt_ms(a['p99'])}  "
      f"max {fmt_ms(a['max'])}")
    w(f"over 1 s {a['over1'] * 100:.1f}%   over 3 s {a['over3'] * 100:.1f}%   "
      f"queue wait (latency - service) mean {fmt_ms(a['wait_mean'])} ms, p99 "
      f"{fmt_ms(a['wait_p99'])} ms")
    w("by instance speed: " + "; ".join(
        f"~{ms:.0f} ms instances served {n / max(a['ok'], 1) * 100:.0f}%, p50 {fmt_ms(p50)} "
        f"p99 {fmt_ms(p99)}" for ms, n, p50, p99 in a["classes"]))
    bounded = parse_spec(run["balancer"])["max_inflight"]
    picks = "n/a (gateway queue)" if bounded else f"{a['picks_not_shortest'] * 100:.1f}%"
    w(f"load spread (max - min of inflight+queued over instances) mean {a['spread_mean']:.1f}, "
      f"max {a['spread_max']}; samples with an instance idle while another queues: "
      f"{a['idle_while_queued'] * 100:.0f}%; picks to a non-shortest queue: {picks}")
    if not parse_spec(run["balancer"])["max_inflight"]:
        w(f"in-flight count per instance from the client's timeline = the instance's own "
          f"inflight+queued in {a['view_equal'] * 100:.1f}% of samples (max difference "
          f"{a['view_maxdiff']})")
    w(f"{'instance':<10}{'service':>9}{'requests':>10}{'busy':>7}{'queue max':>11}"
      f"{'queue mean':>12}{'wait mean':>11}")
    for m, p in zip(mocks, a["per"]):
        wait = p["wait"] / p["n"] if p["n"] else float("nan")
        w(f"{m['name']:<10}{m['service_ms']:>7.0f}ms{p['n']:>10}{p['busy'] * 100:>6.0f}%"
          f"{p['qmax']:>11}{p['qmean']:>12.1f}{fmt_ms(wait):>9}ms")
    w(f"(sluice CPU {run['sluice_cpu_s']:.1f} s for arrivals and drain = "
      f"{run['sluice_cpu_s'] / max(run['arrivals_end'], 1e-9) * 100:.1f}% of one core over the "
      f"{run['arrivals_end']:.0f} s of arrivals; {run['gw_conns']} client connections opened)")
    w(f"(generator lag p99 {a['lag_p99']:.1f} ms, max {a['lag_max']:.1f} ms; "
      f"{a['samples']} /stats samples; mocks counted {run['mock_requests']} requests, "
      f"{run['mock_aborted']} aborted)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# A model: the same arrival trace through simulated instances (no network, no gateway), to
# tell what the load itself forces from what the balancer adds.

def simulate(policy, trace, mocks, seed):
    """Discrete-event simulation of the instances (FIFO queue each, `conc` slots, service
    uniform in latency..latency+jitter ms). policy: "rr" (round robin), "jsq" (least
    requests at the instance, idle first, ties rotated: least_queue with max_inflight = 0),
    "ideal" (one central FIFO queue, a request starts on the fastest free slot the moment
    one frees: no balancer can do better without reordering requests).
    Returns the sorted latencies in ms."""
    import heapq
    rng = random.Random(seed)
    n = len(mocks)
    busy, queues, central = [0] * n, [[] for _ in mocks], []
    arrival, lat = {}, []
    ev = [(t * 1000.0, 1, k, -1) for k, t in enumerate(trace)]
    heapq.heapify(ev)
    state = {"rr": 0, "jsq": 0}
    order = sorted(range(n), key=lambda i: mocks[i]["service_ms"])

    def start(i, k, now):
        busy[i] += 1
        m = mocks[i]
        heapq.heappush(ev, (now + m["latency_ms"] + rng.randint(0, m["jitter_ms"]) + 0.5, 0, k, i))

    def fastest_free():
        for i in order:
            if busy[i] < mocks[i]["conc"]:
                return i
        return -1

    while ev:
        now, kind, k, i = heapq.heappop(ev)
        if kind == 1:
            arrival[k] = now
            if policy == "ideal":
                i = fastest_free() if not central else -1
                if i < 0:
                    central.append(k)
                else:
                    start(i, k, now)
                continue
            if policy == "rr":
                i = state["rr"]
                state["rr"] = (i + 1) % n
            else:
                best, best_load = -1, 0
                for s in range(n):
                    j = (state["jsq"] + s) % n
                    load = busy[j] + len(queues[j])
                    if load == 0:
                        best = j
                        break
                    if best < 0 or load < best_load:
                        best, best_load = j, load
                i = best
                state["jsq"] = (i + 1) % n
            if busy[i] < mocks[i]["conc"]:
                start(i, k, now)
            else:
                queues[i].append(k)
        else:
            lat.append(now - arrival[k])
            busy[i] -= 1
            if queues[i]:
                start(i, queues[i].pop(0), now)
            elif central:
                start(fastest_free(), central.pop(0), now)
    lat.sort()
    return lat


def model_line(trace, mocks, seed):
    parts = []
    for policy, label in (("rr", "round robin"), ("jsq", "shortest queue (JSQ)"),
                          ("ideal", "ideal dispatcher")):
        lat = simulate(policy, trace, mocks, seed)
        over3 = sum(1 for v in lat if v > 3000) / max(len(lat), 1)
        parts.append(f"  {label:<22} p50 {fmt_ms(pct(lat, 50)):>6}  p99 {fmt_ms(pct(lat, 99)):>6}  "
                     f"max {fmt_ms(lat[-1]):>6} ms, over 3 s {over3 * 100:.1f}%")
    return "\n".join(["model: the same arrivals through simulated instances (no gateway, "
                      "no network):"] + parts)


# ---------------------------------------------------------------------------------------------
# Data files and the plot

def write_data(run, a, mocks, rundir, duration):
    with open(os.path.join(rundir, "requests.tsv"), "w") as f:
        f.write("# sched_s\tsend_s\tlatency_ms\tstatus\tinstance\terror\n")
        for r in run["records"]:
            lat = "" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
            f.write(f"{r['sched']:.4f}\t{r['send']:.4f}\t{lat}\t{r['status']}\t"
                    f"{r.get('instance', '')}\t{r.get('error', '')}\n")
    lat = a["lat"]
    with open(os.path.join(rundir, "ccdf.tsv"), "w") as f:
        f.write("# latency_ms\tshare_slower\n")
        n = len(lat)
        step = max(1, n // 2000)
        for k in range(0, n, step):
            f.write(f"{lat[k]:.1f}\t{(n - k) / n:.6f}\n")
        if n:
            f.write(f"{lat[-1]:.1f}\t{1 / n:.6f}\n")
    buckets = {}
    for r in run["records"]:
        if r["status"] == 200:
            buckets.setdefault(int(r["sched"]), []).append(r["latency_ms"])
    with open(os.path.join(rundir, "over_time.tsv"), "w") as f:
        f.write("# second(arrival)\tp50_ms\tp99_ms\tmax_ms\tcount\n")
        for s in sorted(buckets):
            v = sorted(buckets[s])
            f.write(f"{s + 0.5}\t{pct(v, 50):.1f}\t{pct(v, 99):.1f}\t{v[-1]:.1f}\t{len(v)}\n")
    with open(os.path.join(rundir, "queues.tsv"), "w") as f:
        f.write("# t_s\t" + "\t".join(f"{m['name']}_queued" for m in mocks) + "\t"
                + "\t".join(f"{m['name']}_inflight" for m in mocks) + "\n")
        for t, row in run["samples"]:
            q = ["NaN" if v is None else str(v[1]) for v in row]
            i = ["NaN" if v is None else str(v[0]) for v in row]
            f.write(f"{t:.2f}\t" + "\t".join(q) + "\t" + "\t".join(i) + "\n")


def describe_mocks(mocks):
    groups = {}
    for m in mocks:
        groups[m["service_ms"]] = groups.get(m["service_ms"], 0) + 1
    slots = sorted({m["conc"] for m in mocks})
    return (", ".join(f"{n} x ~{ms:.0f} ms" for ms, n in sorted(groups.items()))
            + f", {'/'.join(map(str, slots))} slots each")


def plot(runs, mocks, args, fast_service, png):
    out, duration = args.out, args.duration
    gp = shutil.which("gnuplot")
    if not gp:
        return "gnuplot not found: no PNG (data files are in " + out + ")"
    dirs = [r["dir"] for r in runs]
    titles = [r["balancer"] for r in runs]
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    lines = [
        f"set terminal pngcairo size 1600,1150 font 'DejaVu Sans,11' noenhanced",
        f"set output '{png}'",
        f"set multiplot layout 2,2 title 'peak-hour: {len(mocks)} STT instances "
        f"({describe_mocks(mocks)}); Poisson arrivals at {args.high * 100:.0f}% / "
        f"{args.low * 100:.0f}% of capacity, alternating every {args.phase:g} s' font ',14'",
        "set grid",
        "set key top right",
        # 1: CCDF
        "set title 'Latency tail: share of requests slower than x'",
        "set logscale xy",
        "set xlabel 'latency (ms)'",
        "set ylabel 'share of requests slower'",
        "set format y '%g'",
        "set yrange [0.0002:1.2]",
        f"set arrow 1 from {2 * fast_service},0.0002 to {2 * fast_service},1.2 nohead dt 2 lc "
        "rgb '#555555'",
        f"set label 1 '2 x {fast_service:.0f} ms' at {2 * fast_service * 1.05},0.0005 "
        "tc rgb '#555555'",
        "set arrow 2 from 3000,0.0002 to 3000,1.2 nohead dt 3 lc rgb '#555555'",
        "set label 2 '3 s' at 3150,0.0005 tc rgb '#555555'",
    ]
    plots = []
    for k, (d, name) in enumerate(zip(dirs, titles)):
        plots.append(f"'{out}/{d}/ccdf.tsv' using 1:2 with lines lw 2 lc rgb "
                     f"'{colors[k % len(colors)]}' title '{name}'")
    lines.append("plot " + ", ".join(plots))
    lines += [
        "unset arrow 1", "unset arrow 2", "unset label 1", "unset label 2",
        "unset logscale x",
        f"set title 'Latency over time (by arrival second); shaded: {args.high * 100:.0f}% bursts'",
        "set xlabel 'time (s)'",
        "set ylabel 'latency (ms), log scale'",
        "set yrange [100:*]",
        f"set xrange [0:{duration}]",
        "set key top left opaque",
    ]
    # shade the burst phases
    b, k = 0.0, 0
    while b < duration:
        lines.append(f"set object {100 + k} rect from {b},graph 0 to "
                     f"{min(b + args.phase, duration)},graph 1 behind fc rgb '#f3e5d0' "
                     "fs solid noborder")
        b += 2 * args.phase
        k += 1
    plots = []
    for k, (d, name) in enumerate(zip(dirs, titles)):
        c = colors[k % len(colors)]
        plots.append(f"'{out}/{d}/over_time.tsv' using 1:3 with lines lw 2 lc rgb '{c}' "
                     f"title '{name} p99'")
        plots.append(f"'{out}/{d}/over_time.tsv' using 1:2 with lines lw 1 dt 2 lc rgb '{c}' "
                     f"title '{name} p50'")
    lines.append("plot " + ", ".join(plots))
    lines += ["unset logscale y", "unset object", "set format y '%g'", "set key top left opaque"]
    for d, name in list(zip(dirs, titles))[:2]:
        lines.append(f"set title 'Queue depth inside each instance (mock /stats queued, every "
                     f"100 ms): {name}'")
        lines.append("set ylabel 'requests waiting in the instance'")
        qmax = max((max((v[1] for v in row if v is not None), default=0)
                    for _, row in next(r for r in runs if r["dir"] == d)["samples"]), default=0)
        lines.append(f"set yrange [0:{qmax * 1.08 + 0.5:.1f}]")
        plots = []
        first_fast = True
        nslow = 0
        for i, m in enumerate(mocks):
            slow = m["service_ms"] > 1.5 * fast_service
            if slow:
                style = f"lw 2.5 lc rgb '{['#d62728', '#ff7f0e', '#9467bd', '#8c564b'][nslow % 4]}'"
                nslow += 1
                title = f"title '{m['name']} (~{m['service_ms']:.0f} ms)'"
            else:
                style = "lw 1 lc rgb '#7f9fbf'"
                title = (f"title 'fast instances (~{fast_service:.0f} ms)'" if first_fast
                         else "notitle")
                first_fast = False
            plots.append(f"'{out}/{d}/queues.tsv' using 1:{i + 2} with lines {style} {title}")
        lines.append("plot " + ", ".join(plots))
    lines.append("unset multiplot")
    script = os.path.join(out, "peak-hour.gp")
    with open(script, "w") as f:
        f.write("\n".join(lines) + "\n")
    r = subprocess.run([gp, script], capture_output=True, text=True)
    if r.returncode != 0:
        return f"gnuplot failed: {r.stderr.strip()}"
    return None


# ---------------------------------------------------------------------------------------------

async def main_async(args):
    mocks = read_mocks(args.mocks)
    if not mocks:
        print("peak-hour: no mocks", file=sys.stderr)
        return 2
    capacity = capacity_rps(mocks)
    trace = arrival_trace(args.duration, capacity, args.high, args.low, args.phase, args.seed)
    fast_service = min(m["service_ms"] for m in mocks)
    mean_rate = len(trace) / args.duration
    print(f"capacity {capacity:.1f} req/s (sum of slots / mean service time); offered "
          f"{args.high * 100:.0f}% / {args.low * 100:.0f}% alternating every {args.phase:g} s, "
          f"{len(trace)} Poisson arrivals in {args.duration:g} s = {mean_rate:.1f} req/s "
          f"({mean_rate / capacity * 100:.0f}% of capacity); seed {args.seed}", flush=True)
    runs, analyses, failed = [], [], False
    for balancer in args.balancers:
        rundir = os.path.join(args.out, parse_spec(balancer)["name"])
        t_start = time.monotonic()
        print(f"-- {balancer}: running {args.duration:g} s ...", flush=True)
        try:
            run = await run_one(args, balancer, mocks, trace, rundir, args.pids_file)
        except Exception as e:  # noqa: BLE001 -- a failed run is reported, the rest goes on
            print(f"peak-hour: run {balancer} failed: {e}", file=sys.stderr)
            failed = True
            continue
        a = analyse(run, mocks, args.duration)
        write_data(run, a, mocks, rundir, args.duration)
        print(f"   done in {time.monotonic() - t_start:.0f} s "
              f"(arrivals {run['arrivals_end']:.1f} s,"
              f" then waited for the queues to drain)", flush=True)
        if run["problems"]:
            failed = True
            for p in run["problems"]:
                print(f"peak-hour: {balancer}: {p}", file=sys.stderr)
        if a["ok"] == 0:
            failed = True
            print(f"peak-hour: {balancer}: no request succeeded", file=sys.stderr)
        runs.append(run)
        analyses.append(a)

    report = []
    report.append(f"peak-hour: {len(mocks)} instances, capacity {capacity:.1f} req/s, "
                  f"{len(trace)} requests in {args.duration:g} s ({mean_rate:.1f} req/s = "
                  f"{mean_rate / capacity * 100:.0f}% of capacity, bursts {args.high * 100:.0f}%/"
                  f"{args.low * 100:.0f}% every {args.phase:g} s)")
    for run, a in zip(runs, analyses):
        report.append("")
        report.append(table(run, a, mocks, capacity, args))
    if len(analyses) >= 2:
        a0, a1 = analyses[0], analyses[1]
        ratio = a0["p99"] / a1["p99"] if a1["p99"] else float("nan")
        report.append("")
        report.append(
            f"comparison: p99 {runs[0]['balancer']} {fmt_ms(a0['p99'])} ms / "
            f"{runs[1]['balancer']} {fmt_ms(a1['p99'])} ms = {ratio:.1f}x; over 3 s "
            f"{a0['over3'] * 100:.1f}% vs {a1['over3'] * 100:.1f}%; "
            f"{runs[1]['balancer']} p99 = {a1['p99'] / fast_service:.2f}x the fast service time "
            f"({fast_service:.0f} ms)")
    report.append(model_line(trace, mocks, args.seed))
    text = "\n".join(report)
    print(text)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(text + "\n")
    if runs:
        png = os.path.join(args.out, "peak-hour.png")
        err = plot(runs, mocks, args, fast_service, png)
        if err:
            print(f"peak-hour: {err}", file=sys.stderr)
        else:
            print(f"plot: {png}")
        print(f"data: {args.out}/<balancer>/requests.tsv, queues.tsv; report: "
              f"{args.out}/report.txt")
    return 1 if failed or not runs else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mocks", required=True, help="mocks.tsv written by run.sh")
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pids-file", required=True,
                    help="the running sluice's pid is written here (for run.sh's cleanup)")
    ap.add_argument("--balancers", default="round_robin,least_queue")
    ap.add_argument("--duration", type=float, default=40)
    ap.add_argument("--high", type=float, default=1.10, help="burst rate, share of capacity")
    ap.add_argument("--low", type=float, default=0.60, help="lull rate, share of capacity")
    ap.add_argument("--phase", type=float, default=2.0, help="seconds per burst / lull")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--body-bytes", type=int, default=16000, help="0.5 s of 16 kHz s16 audio")
    ap.add_argument("--request-timeout", type=float, default=60)
    ap.add_argument("--drain-limit", type=float, default=60,
                    help="after the last arrival, how long to wait for outstanding requests")
    args = ap.parse_args()
    args.balancers = [b for b in args.balancers.split(",") if b]
    try:
        for b in args.balancers:
            parse_spec(b)
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    def on_signal(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("peak-hour: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
