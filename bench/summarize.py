#!/usr/bin/python3
"""Turn bench/proxy.sh's raw records into the printed table and the key=value summary.

Inputs (tab-separated, written by proxy.sh):
  --runs:      tag proxy rps p50_ms p99_ms max_ms non2xx sockerr requests cpu_pct
               cpu_us_per_req cpus_busy          (tag "direct" = upstream alone, "roundN")
  --mem:       proxy idle_kb rss_small_kb n_small rss_kb n open failed non2xx master_kb
  --callgrind: proxy total_ir requests
The table goes to stdout; --out gets one key=value per line (stable names, for scripts).
"""

import argparse
import statistics
import sys

REFS = ("nginx", "haproxy")
KEYS = {"rps": "rps", "p50": "p50_ms", "p99": "p99_ms", "max": "max_ms", "cpu": "cpu_pct",
        "us": "cpu_us_per_req"}


def read_tsv(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{nd}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--mem", required=True)
    ap.add_argument("--callgrind", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()

    kv = {}
    for m in a.meta:  # each --meta is one KEY=VALUE; the value may contain spaces
        k, _, v = m.partition("=")
        kv[k] = v
    meta_line = "  ".join(f"{k}={v}" if " " not in v else f"{k}='{v}'" for k, v in kv.items())
    out = []
    p = out.append

    # ---- throughput
    runs = read_tsv(a.runs)
    by = {}
    order = []
    for r in runs:
        tag, name = r[0], r[1]
        if name not in by:
            by[name] = []
            order.append(name)
        by[name].append({
            "tag": tag, "rps": float(r[2]), "p50": float(r[3]), "p99": float(r[4]),
            "max": float(r[5]), "non2xx": int(r[6]), "err": int(r[7]), "reqs": int(r[8]),
            "cpu": float(r[9]), "us": float(r[10]), "busy": r[11],
            "other": float(r[12]) if len(r) > 12 and r[12] != "NA" else None,
        })
    load_cpu = kv.get("load_cpus", "")

    def load_busy(busy):  # busy % of the wrk CPU, when wrk was pinned to one CPU
        for part in busy.split(","):
            k, _, v = part.partition("=")
            if load_cpu.isdigit() and k == "cpu" + load_cpu:
                return float(v)
        return None

    med = {}
    for name, rs in by.items():
        for x in rs:
            x["load"] = load_busy(x["busy"])
        med[name] = {k: statistics.median(x[k] for x in rs)
                     for k in ("rps", "p50", "p99", "max", "cpu", "us")}
        med[name]["non2xx"] = sum(x["non2xx"] for x in rs)
        med[name]["err"] = sum(x["err"] for x in rs)
        med[name]["reqs"] = sum(x["reqs"] for x in rs)
        med[name]["n"] = len(rs)
        loads = [x["load"] for x in rs if x["load"] is not None]
        med[name]["load"] = statistics.median(loads) if loads else None
        others = [x["other"] for x in rs if x["other"] is not None]
        med[name]["other"] = max(others) if others else None
        rps = [x["rps"] for x in rs]
        med[name]["spread"] = (max(rps) - min(rps)) / statistics.median(rps) * 100 if rps else 0

    p(f"sluice proxy benchmark   {meta_line}")
    p("")
    if by:
        p(f"Throughput and latency: GET {kv.get('path', '/echo')}, wrk {kv.get('wrk', '')} (+{kv.get('warmup', '?')} warm-up), "
          f"median of {kv.get('rounds', '?')} alternating rounds")
        hdr = (f"{'':9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU%':>5} {'load%':>5} "
               f"{'CPU us/req':>10} {'noise%':>6} {'non-2xx':>8} {'sock err':>8} {'spread':>7}  req/s per round")
        p(hdr)
        p("-" * len(hdr))
        for name in order:
            m = med[name]
            rounds = " ".join(f"{x['rps']:.0f}" for x in by[name])
            label = "upstream" if name == "upstream" else name
            cpu = "-" if name == "upstream" else f"{m['cpu']:.0f}"
            us = "-" if name == "upstream" else f"{m['us']:.2f}"
            noise = "-" if m["other"] is None else f"{m['other']:.0f}"
            load = "-" if m["load"] is None else f"{m['load']:.0f}"
            p(f"{label:9} {m['rps']:>10,.0f} {m['p50']:>8.3f} {m['p99']:>8.3f} {m['max']:>8.2f} "
              f"{cpu:>5} {load:>5} {us:>10} {noise:>6} {m['non2xx']:>8,} {m['err']:>8,} {m['spread']:>6.1f}%  "
              f"{rounds}")
        p(f"  CPUs: proxy {kv.get('proxy_cpus', '?')}, mocks {kv.get('mock_cpus', '?')}, "
          f"wrk {kv.get('load_cpus', '?')} (layout {kv.get('layout', '?')}).")
        p("  upstream = one sluice-mock hit directly by wrk with the same pinning (context only).")
        p("  CPU% = proxy process CPU over the measured run (100 = one core); load% = busy % of the")
        p("  CPU running wrk; CPU us/req = proxy CPU time / requests; noise% = worst round's busy")
        p("  time on the proxy's or wrk's CPU not charged to the proxy, wrk or mocks (other tenants,")
        p("  uncharged softirq); spread = (max-min)/median of req/s across rounds.")
        bound = [n for n in order if n != "upstream" and med[n]["load"] is not None
                 and med[n]["load"] >= 95 and med[n]["cpu"] < 95]
        if bound:
            p(f"  LOAD-BOUND: {', '.join(bound)}: own CPU not full while the wrk/mock CPU was; req/s is")
            p("  capped by the load side there, so compare CPU us/req (and callgrind) as well.")
        busy = {}
        for name in order:
            busy[name] = " | ".join(x["busy"] for x in by[name])
        p("  CPUs busy % per round: " + "; ".join(f"{n}: {busy[n]}" for n in order))
        p("")

        if "sluice" in med:
            p(f"{'sluice / reference':34} " + " ".join(f"{r:>9}" for r in REFS if r in med))
            rows = [("req/s          (higher is better)", "rps"),
                    ("p50            (lower is better)", "p50"),
                    ("p99            (lower is better)", "p99"),
                    ("CPU us/request (lower is better)", "us")]
            for label, key in rows:
                cells = []
                for ref in REFS:
                    if ref in med:
                        x = ratio(med["sluice"][key], med[ref][key])
                        cells.append(f"{x:>8.2f}x" if x is not None else f"{'-':>9}")
                        kv[f"ratio.{KEYS[key]}.sluice_{ref}"] = f"{x:.3f}" if x is not None else "NA"
                p(f"{label:34} " + " ".join(cells))
            if "nginx" in med:
                rr = ratio(med["sluice"]["rps"], med["nginx"]["rps"])
                pr = ratio(med["sluice"]["p99"], med["nginx"]["p99"])
                ok_rps = rr is not None and rr >= 1.3
                ok_p99 = pr is not None and pr <= 1.0
                p(f"target: req/s >= 1.3x nginx: {'MET' if ok_rps else 'NOT MET'} ({rr:.2f}x); "
                  f"p99 no worse than nginx: {'MET' if ok_p99 else 'NOT MET'} ({pr:.2f}x)")
                kv["target.rps_1.3x_nginx"] = "met" if ok_rps else "not_met"
                kv["target.p99_le_nginx"] = "met" if ok_p99 else "not_met"
                ur = ratio(med["sluice"]["us"], med["nginx"]["us"])
                if ur is not None:
                    ok_us = ur <= 1 / 1.3
                    p(f"same target as CPU cost (independent of the load side): CPU us/req <= "
                      f"{1 / 1.3:.2f}x nginx: {'MET' if ok_us else 'NOT MET'} ({ur:.2f}x, i.e. "
                      f"{1 / ur:.2f}x nginx's requests per CPU second)")
                    kv["target.cpu_per_req_le_0.77x_nginx"] = "met" if ok_us else "not_met"
            p("")
        for name in order:
            m = med[name]
            for k, key in KEYS.items():
                kv[f"{name}.{key}"] = f"{m[k]:.3f}"
            if m["load"] is not None:
                kv[f"{name}.load_cpu_busy_pct"] = f"{m['load']:.0f}"
            kv[f"{name}.non2xx"] = str(m["non2xx"])
            kv[f"{name}.socket_errors"] = str(m["err"])
            kv[f"{name}.rounds_rps"] = ",".join(f"{x['rps']:.0f}" for x in by[name])

    # ---- memory
    mem = read_tsv(a.mem)
    if mem:
        p("Memory: VmRSS of the process serving connections (nginx: its one worker)")
        hdr = (f"{'':9} {'idle RSS':>10} {'+N/10 conns':>12} {'+N conns':>11} {'N':>7} "
               f"{'bytes/conn':>11} {'marginal':>10} {'open':>7} {'failed':>7} {'non-2xx':>8}")
        p(hdr)
        p("-" * len(hdr))
        for r in mem:
            name, idle, rss1, n1, rss, n, opened, failed, non2xx, master = r
            idle, rss1, n1, rss, n = int(idle), int(rss1), int(n1), int(rss), int(n)
            per = (rss - idle) * 1024 / n if n else None
            marg = (rss - rss1) * 1024 / (n - n1) if n > n1 else None
            p(f"{name:9} {idle / 1024:>8.1f}MB {rss1 / 1024:>10.1f}MB {rss / 1024:>9.1f}MB {n:>7,} "
              f"{fmt(per, 0):>11} {fmt(marg, 0):>10} {int(opened):>7,} {int(failed):>7,} {int(non2xx):>8,}")
            kv[f"{name}.rss_idle_kb"] = str(idle)
            kv[f"{name}.rss_{n1}conns_kb"] = str(rss1)
            kv[f"{name}.rss_{n}conns_kb"] = str(rss)
            kv[f"{name}.bytes_per_idle_conn"] = f"{per:.0f}"
            kv[f"{name}.bytes_per_idle_conn_marginal"] = f"{marg:.0f}" if marg is not None else "NA"
            kv[f"{name}.idle_conns_open"] = opened
            kv[f"{name}.idle_conns_failed"] = failed
            if int(master):
                kv[f"{name}.master_rss_kb"] = master
        masters = [f"{r[0]} master {int(r[9]) / 1024:.1f}MB" for r in mem if int(r[9])]
        p("  bytes/conn = (RSS with N - idle RSS) / N; marginal = (RSS with N - RSS with N/10)")
        p("  / (N - N/10), which leaves out one-time costs of the first requests."
          + (f" Not counted: {', '.join(masters)}." if masters else ""))
        p("")

    # ---- callgrind
    cg = read_tsv(a.callgrind)
    for name, ir, reqs in cg:
        per = int(ir) / int(reqs)
        p(f"callgrind: {name} {int(ir):,} Ir over {int(reqs):,} keep-alive requests "
          f"(10 connections, {kv.get('path', '/echo')}) = {per:,.0f} instructions/request")
        kv[f"{name}.callgrind_ir_per_req"] = f"{per:.0f}"
        kv[f"{name}.callgrind_ir_total"] = ir
        kv[f"{name}.callgrind_requests"] = reqs

    sys.stdout.write("\n".join(out) + "\n")
    with open(a.out, "w") as f:
        for k, v in kv.items():
            f.write(f"{k}={v}\n")


if __name__ == "__main__":
    main()
