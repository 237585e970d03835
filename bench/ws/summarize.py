#!/usr/bin/env python3
"""bench/ws/summarize.py — the table and key=value summary of bench/ws/run.sh.

Inputs are the raw records run.sh writes (one `key=value ...` line per run or probe):
  --runs   kept load-generator runs (target=, tag=, then ws-load's summary line, noise=)
  --noisy  runs discarded for noise
  --mem    one line per proxy from the idle-session probe
  --rss    proxy RSS at the start and end of the throughput phase
  --logs   the raw dir (load-PROXY-proxy.log, mem-PROXY-proxy.log: what each proxy logged)
  --meta   key=value pairs about the run (repeatable)
Writes the table to stdout and the summary to --out.
"""
import argparse
import os
import re
import statistics

TARGET_RATIO = 1.3          # sluice msgs/s >= 1.3x nginx
TARGET_ADDED_P99_US = 1000  # p99 added latency < 1 ms at half load
TARGET_BYTES = 16 * 1024    # <= 16 KiB per idle session
ANOMALY_KEYS = ["failed", "bad", "lost", "stalled", "close_early", "eof_early", "err_early",
                "close_other", "not_closed", "skipped"]


def parse_line(line):
    d = {}
    for tok in line.split():
        if "=" in tok:
            k, _, v = tok.partition("=")
            d[k] = v
    return d


def read_lines(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [parse_line(l) for l in f if l.strip() and not l.startswith("#")]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=1, unit=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.{nd}f}{unit}"


def verdict(ok):
    return "MET" if ok else "NOT MET"


def table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
         for i, h in enumerate(headers)]
    out = ["  ".join(str(h).ljust(w[i]) if i == 0 else str(h).rjust(w[i])
                     for i, h in enumerate(headers))]
    out.append("  ".join("-" * x for x in w))
    for r in rows:
        out.append("  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i])
                             for i, c in enumerate(r)))
    return "\n".join(out)


def group(runs, prefix, target):
    """Runs whose tag is PREFIX followed by a round number, for TARGET."""
    pat = re.compile(re.escape(prefix) + r"\d+$")
    return [r for r in runs if r.get("target") == target and pat.match(r.get("tag", ""))]


def stats_of(rs):
    g = lambda k: med([num(r.get(k)) for r in rs])
    rates = [num(r.get("msgs_per_s")) for r in rs if num(r.get("msgs_per_s")) is not None]
    spread = None
    if len(rates) > 1 and statistics.median(rates) > 0:
        spread = (max(rates) - min(rates)) / statistics.median(rates) * 100
    return {
        "n": len(rs), "rate": g("msgs_per_s"), "spread": spread, "p50": g("p50_us"),
        "p99": g("p99_us"), "p999": g("p999_us"), "max": g("max_us"),
        "proxy_cpu": g("proxy_cpu_pct"), "proxy_us": g("proxy_us_per_msg"),
        "up_us": g("up_us_per_msg"), "load_cpu": g("self_cpu_pct"), "noise": g("noise"),
        "lag99": g("lag_p99_us"), "noise_max": max([num(r.get("noise")) or 0 for r in rs] or [0]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs")
    ap.add_argument("--noisy")
    ap.add_argument("--mem")
    ap.add_argument("--rss")
    ap.add_argument("--logs")
    ap.add_argument("--out")
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()

    meta = dict(m.partition("=")[::2] for m in a.meta)
    runs = read_lines(a.runs)
    noisy = read_lines(a.noisy)
    mem = {m["proxy"]: m for m in read_lines(a.mem)}
    rss = read_lines(a.rss)
    proxies = []
    for r in runs:
        t = r.get("target")
        if t and t != "direct" and t not in proxies:
            proxies.append(t)
    for p in mem:
        if p not in proxies:
            proxies.append(p)
    summary = dict(meta)
    out = []
    P = out.append

    P(f"sluice WebSocket benchmark  {meta.get('date', '')}  commit {meta.get('commit', '?')}  "
      f"nginx {meta.get('nginx', '?')}")
    P(f"layout {meta.get('layout')}: proxy on CPU {meta.get('proxy_cpus')}, upstream "
      f"({meta.get('upstream')}) on CPU {meta.get('upstream_cpus')}, load generator on CPU "
      f"{meta.get('load_cpus')}")
    P(f"{meta.get('sessions')} sessions, {meta.get('size')}-byte binary messages; "
      f"{meta.get('rounds')} rounds x {meta.get('duration')} (after {meta.get('warmup')} "
      f"warm-up), medians; noisy runs redone: {meta.get('noisy_runs_redone')} "
      f"(noise > {meta.get('noise_max')})")
    P("")

    # ---- closed loop ----
    closed = {}
    if runs:
        rows = []
        d = [r for r in runs if r.get("target") == "direct" and r.get("tag") == "closed-direct"]
        if d:
            s = stats_of(d)
            closed["direct"] = s
            rows.append(["direct (no proxy)", fmt(s["rate"], 0), "-", fmt(s["p50"] / 1e3 if s["p50"] else None, 2),
                         fmt(s["p99"] / 1e3 if s["p99"] else None, 2), "-", "-", fmt(s["up_us"], 2),
                         fmt(s["load_cpu"], 0), fmt(s["noise"], 0)])
        for p in proxies:
            rs = group(runs, "closed", p)
            if not rs:
                continue
            s = stats_of(rs)
            closed[p] = s
            rows.append([p, fmt(s["rate"], 0), fmt(s["spread"], 1, "%"), fmt(s["p50"] / 1e3, 2),
                         fmt(s["p99"] / 1e3, 2), fmt(s["proxy_cpu"], 0), fmt(s["proxy_us"], 2),
                         fmt(s["up_us"], 2), fmt(s["load_cpu"], 0), fmt(s["noise"], 0)])
            summary[f"{p}.msgs_per_s"] = fmt(s["rate"], 0).replace(",", "")
            summary[f"{p}.closed.p50_us"] = fmt(s["p50"], 1).replace(",", "")
            summary[f"{p}.closed.p99_us"] = fmt(s["p99"], 1).replace(",", "")
            summary[f"{p}.us_per_msg"] = fmt(s["proxy_us"], 2)
            summary[f"{p}.spread_pct"] = fmt(s["spread"], 1)
        if rows:
            P("Throughput: closed loop, one message in flight per session (msgs/s = echoes received/s)")
            P(table(["target", "msgs/s", "spread", "p50 ms", "p99 ms", "proxy CPU%",
                     "proxy us/msg", "upstream us/msg", "load CPU%", "noise%"], rows))
            P("")

    # ---- open loop ----
    lat = {}
    for prefix, key in (("half", "half_rate"), ("slhalf", "sluice_half_rate")):
        rate = meta.get(key)
        if not rate or rate == "NA":
            continue
        d = group(runs, prefix, "direct")
        if not d:
            continue
        ds = stats_of(d)
        rows = [["direct (no proxy)", fmt(ds["rate"], 0), fmt(ds["p50"], 1), fmt(ds["p99"], 1),
                 fmt(ds["p999"], 1), "-", "-", "-", "-", fmt(ds["lag99"], 1), fmt(ds["noise"], 0)]]
        lat[prefix] = {"direct": ds}
        for p in proxies:
            rs = group(runs, prefix, p)
            if not rs:
                continue
            s = stats_of(rs)
            s["added50"] = s["p50"] - ds["p50"] if s["p50"] is not None and ds["p50"] is not None else None
            s["added99"] = s["p99"] - ds["p99"] if s["p99"] is not None and ds["p99"] is not None else None
            lat[prefix][p] = s
            rows.append([p, fmt(s["rate"], 0), fmt(s["p50"], 1), fmt(s["p99"], 1), fmt(s["p999"], 1),
                         fmt(s["added50"], 1), fmt(s["added99"], 1), fmt(s["proxy_cpu"], 0),
                         fmt(s["proxy_us"], 2), fmt(s["lag99"], 1), fmt(s["noise"], 0)])
            tag = "half" if prefix == "half" else "sluice_half"
            for k, v in (("p50_us", s["p50"]), ("p99_us", s["p99"]), ("added_p50_us", s["added50"]),
                         ("added_p99_us", s["added99"]), ("us_per_msg", s["proxy_us"])):
                summary[f"{p}.{tag}.{k}"] = fmt(v, 1 if k != "us_per_msg" else 2).replace(",", "")
        summary[f"direct.{'half' if prefix == 'half' else 'sluice_half'}.p99_us"] = fmt(ds["p99"], 1).replace(",", "")
        what = ("half of nginx's maximum" if meta.get("rate_override", "none") == "none"
                else "RATE") if prefix == "half" else "half of sluice's own maximum"
        P(f"Latency: open loop at {int(float(rate)):,} msgs/s ({what}); round trip in us; "
          "added = proxy - direct")
        P(table(["target", "msgs/s", "p50", "p99", "p99.9", "added p50", "added p99",
                 "proxy CPU%", "proxy us/msg", "send lag p99", "noise%"], rows))
        P("")

    # ---- memory ----
    if mem:
        rows = []
        for p in proxies:
            m = mem.get(p)
            if not m:
                continue
            n_open = int(m["open"])
            idle, rss1, rssn = int(m["idle_kb"]), int(m["rss_small_kb"]), int(m["rss_kb"])
            small = int(m["small"])
            per = (rssn - idle) * 1024 / n_open if n_open else None
            marg = (rssn - rss1) * 1024 / (n_open - small) if n_open > small else None
            m["per"], m["marg"] = per, marg
            rows.append([p, f"{idle:,}", f"{rss1:,}", f"{rssn:,}", f"{int(m['rss_later_kb']):,}",
                         f"{n_open:,}", m["failed"], fmt(per, 0), fmt(marg, 0),
                         f"{int(m['master_kb']):,}" if m["master_kb"] != "0" else "-"])
            summary[f"{p}.idle_rss_kb"] = idle
            summary[f"{p}.rss_with_sessions_kb"] = rssn
            summary[f"{p}.idle_sessions"] = n_open
            summary[f"{p}.bytes_per_idle_session"] = fmt(per, 0).replace(",", "")
            summary[f"{p}.marginal_bytes_per_idle_session"] = fmt(marg, 0).replace(",", "")
        n = meta.get("idle_sessions")
        req = meta.get("idle_sessions_requested")
        note = "" if n == req else f" (of {req} asked: the open-file limit is {meta.get('nofile')}, and a proxy needs 2 per session)"
        P(f"Memory: VmRSS of the serving process (kB) idle, with N/10 and N = {n} idle sessions{note}")
        P(table(["proxy", "idle", "N/10", "N", "N, 2 s later", "open", "failed", "bytes/session",
                 "marginal", "master"], rows))
        P("bytes/session = (RSS with N - idle RSS) / N; marginal = (RSS with N - RSS with N/10) / (0.9 N)")
        P("")

    # ---- targets ----
    P("Targets (sluice vs nginx)")
    if "sluice" in closed and "nginx" in closed and closed["nginx"]["rate"]:
        r = closed["sluice"]["rate"] / closed["nginx"]["rate"]
        summary["ratio.msgs_per_s.sluice_nginx"] = f"{r:.2f}"
        P(f"  msgs/s sluice/nginx            {r:5.2f}x  (target >= {TARGET_RATIO:.2f}x)  {verdict(r >= TARGET_RATIO)}")
        su, nu = closed["sluice"]["proxy_us"], closed["nginx"]["proxy_us"]
        if su and nu:
            c = su / nu
            summary["ratio.us_per_msg.sluice_nginx"] = f"{c:.2f}"
            P(f"  CPU us/msg sluice/nginx        {c:5.2f}x  (same target as CPU cost: <= {1 / TARGET_RATIO:.2f}x)  "
              f"{verdict(c <= 1 / TARGET_RATIO)}   [{su:.2f} vs {nu:.2f} us per echoed message]")
    for prefix, label in (("half", "at half of nginx's max"), ("slhalf", "at half of sluice's max")):
        L = lat.get(prefix, {})
        if "sluice" not in L:
            continue
        s = L["sluice"]
        rate = meta.get("half_rate" if prefix == "half" else "sluice_half_rate")
        ng = L.get("nginx", {})
        ok = s["added99"] is not None and s["added99"] < TARGET_ADDED_P99_US
        P(f"  p99 added latency {label} ({int(float(rate)):,}/s): sluice {fmt(s['added99'], 0)} us"
          f" (p50 {fmt(s['added50'], 0)} us)  (target < {TARGET_ADDED_P99_US} us)  {verdict(ok)}"
          f"   [nginx: {fmt(ng.get('added99'), 0)} us, p50 {fmt(ng.get('added50'), 0)} us]")
        if ng.get("p99"):
            summary[f"ratio.{'half' if prefix == 'half' else 'sluice_half'}.p99.sluice_nginx"] = f"{s['p99'] / ng['p99']:.2f}"
    if "sluice" in mem and mem["sluice"].get("per") is not None:
        m = mem["sluice"]
        ng = mem.get("nginx", {})
        P(f"  RSS per idle session: sluice {fmt(m['per'], 0)} B (marginal {fmt(m['marg'], 0)} B)  "
          f"(target <= {TARGET_BYTES:,} B)  {verdict(m['per'] <= TARGET_BYTES)} (marginal: "
          f"{verdict(m['marg'] is not None and m['marg'] <= TARGET_BYTES)})"
          f"   [nginx: {fmt(ng.get('per'), 0)} B, marginal {fmt(ng.get('marg'), 0)} B]")
    P("")

    # ---- anomalies ----
    notes = []
    for r in runs:
        bad = [f"{k}={r[k]}" for k in ANOMALY_KEYS if r.get(k) not in (None, "0")]
        if bad:
            code = f" (early close code {r.get('early_code')})" if r.get("close_early", "0") != "0" else ""
            notes.append(f"{r.get('tag')} {r.get('target')}: {' '.join(bad)}{code}")
        lag_max = num(meta.get("lag_max", "200us").rstrip("us")) or 200
        if r.get("mode") == "open" and num(r.get("lag_p99_us")) and num(r.get("lag_p99_us")) > lag_max:
            notes.append(f"{r.get('tag')} {r.get('target')}: load generator sent late (send lag p99 "
                         f"{r.get('lag_p99_us')} us, max {r.get('lag_max_us')} us): its CPU was taken")
    for p, m in mem.items():
        if m.get("failed", "0") != "0":
            notes.append(f"memory {p}: {m['failed']} idle sessions failed their handshake")
        if int(m.get("established", 0)) < int(m.get("open", 0)):
            notes.append(f"memory {p}: only {m['established']} client connections established when "
                         f"RSS was read, {m['open']} sessions opened")
    if a.logs:
        for p in proxies:
            for phase in ("load", "mem"):
                f = os.path.join(a.logs, f"{phase}-{p}-proxy.log")
                if os.path.exists(f):
                    # nginx's start-up warning about worker_connections above the descriptor
                    # limit is expected (see run.sh)
                    lines = [l.rstrip("\n") for l in open(f)
                             if l.strip() and "exceed open file resource limit" not in l]
                    if lines:
                        notes.append(f"{p} logged {len(lines)} line(s) during the {phase} phase, "
                                     f"first: {lines[0][:200]}")
        hf = os.path.join(a.logs, "mem-holders.txt")
        if os.path.exists(hf):
            cur = None
            for l in open(hf):
                l = l.strip()
                if l.startswith("# "):
                    cur = l[2:].split(",")[0]
                elif l and not re.search(r"close frames 0 .*EOF/reset 0, errors 0", l):
                    notes.append(f"memory {cur}: idle sessions lost while held: {l}")
    by_p = {}
    for r in rss:
        by_p.setdefault(r["proxy"], {})[r["phase"]] = int(r["rss_kb"])
    for p, d in by_p.items():
        if "start" in d and "end" in d:
            summary[f"{p}.rss_after_load_kb"] = d["end"]
            P_ = f"{p}: RSS {d['start']:,} kB at start of the throughput phase, {d['end']:,} kB at its end"
            notes.append(P_)
    if noisy:
        notes.append(f"{len(noisy)} run(s) redone for noise: " +
                     ", ".join(f"{r.get('tag')} {r.get('target')} ({r.get('noise')}%)" for r in noisy))
    P("Notes and anomalies")
    for n_ in notes or ["none"]:
        P(f"  - {n_}")

    print("\n".join(out))
    if a.out:
        with open(a.out, "w") as f:
            for k, v in summary.items():
                f.write(f"{k}={v}\n")


if __name__ == "__main__":
    main()
