"""The monitoring examples (examples/monitoring/) against the metric catalogue
(docs/metrics.md): the alerting rules pass `promtool check rules` and their unit tests
(`promtool test rules`), the scrape config passes `promtool check config`, the Grafana
dashboard is valid JSON whose every query parses as PromQL, and every metric name (and label
in a selector) used by the dashboard or the alerts is one the catalogue documents.

Standard library only; needs promtool (Debian package `prometheus`, installed by
scripts/setup.sh) and fails, never skips, without it. No servers are started."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("SLUICE_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))
MON = os.path.join(SOURCE_DIR, "examples", "monitoring")
DASHBOARD = os.path.join(MON, "grafana-dashboard.json")
ALERTS = os.path.join(MON, "alerts.yml")
ALERTS_TEST = os.path.join(MON, "alerts_test.yml")
PROM_CONFIG = os.path.join(MON, "prometheus.yml")

# Series Prometheus itself adds for every target: allowed in expressions, not in the doc.
SCRAPE_SERIES = {"up": {"job", "instance"}}
# Labels every scraped series carries (target labels).
TARGET_LABELS = {"job", "instance"}

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "atan2", "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool():
    path = shutil.which("promtool")
    if not path:
        raise AssertionError("promtool not found: install Debian's `prometheus` package "
                             "(scripts/setup.sh does)")
    return path


def run_promtool(*args):
    p = subprocess.run([promtool()] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120, cwd=MON)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def selectors(expr):
    """(metric name, {label names in its {...} matcher}) for every series selector in a PromQL
    expression, ignoring function names, keywords and grouping label lists."""
    e = re.sub(r"#[^\n]*", " ", strip_strings(expr))  # comments
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    out = []
    ident = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
    for m in ident.finditer(e):
        name, matcher = m.group(1), m.group(2)
        if not matcher and re.match(r"\s*\(", e[m.end():]):
            continue  # a function or aggregation
        if name.lower() in PROMQL_KEYWORDS:
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matcher or ""))
        out.append((name, labels))
    # Selectors with only a matcher ({__name__="..."}) are not used here; flag them.
    if re.search(r"(?<![\w}])\{", e):
        raise AssertionError("selector without a metric name in: %s" % expr)
    return out


def rule_exprs(path):
    """(kind, name, expr) for each rule in a Prometheus rules file. A small reader for the
    subset of YAML rule files use (expr as a plain, quoted or block scalar)."""
    rules, name, kind = [], None, None
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*-?\s*(alert|record):\s*(\S+)", line)
        if m:
            kind, name = m.group(1), m.group(2)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in ("|", "|-", ">", ">-"):
                body = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    body.append(lines[i])
                    i += 1
                rules.append((kind, name, "\n".join(body)))
                continue
            if value[:1] in ("'", '"'):
                value = json.loads(value) if value[0] == '"' else value[1:-1].replace("''", "'")
            else:
                value = re.sub(r"\s+#.*$", "", value)
            rules.append((kind, name, value))
        i += 1
    return rules


def dashboard_queries(dash):
    """(where, expr) for every panel target, and (where, metric, label) for label_values()
    template variables."""
    exprs, label_values = [], []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append(("panel %r" % p.get("title"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*([a-zA-Z_]\w*)\s*\)\s*", q or "")
        if not m:
            raise AssertionError("variable %s: unsupported query %r" % (v.get("name"), q))
        label_values.append(("variable $%s" % v["name"], m.group(1), m.group(2)))
    return exprs, label_values


def to_promql(expr):
    """Dashboard variables replaced so promtool can parse the expression."""
    e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    e = e.replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", e)


class MonitoringAssetsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.catalogue = h.metrics_catalogue()
        with open(DASHBOARD, encoding="utf-8") as f:
            cls.dashboard = json.load(f)
        cls.alert_rules = rule_exprs(ALERTS)
        cls.recorded = {name for kind, name, _ in cls.alert_rules if kind == "record"}

    def check_selectors(self, where, expr, seen):
        for name, labels in selectors(expr):
            if name in self.recorded:
                continue
            if name in SCRAPE_SERIES:
                allowed = SCRAPE_SERIES[name]
            else:
                base, mtype = name, None
                if name in self.catalogue:
                    mtype, allowed = self.catalogue[name]
                    self.assertNotEqual(mtype, "histogram",
                                        "%s: histogram %s used without _bucket/_sum/_count"
                                        % (where, name))
                else:
                    for suffix in HISTOGRAM_SUFFIXES:
                        if name.endswith(suffix) and name[:-len(suffix)] in self.catalogue:
                            base = name[:-len(suffix)]
                            mtype, allowed = self.catalogue[base]
                            break
                    self.assertIsNotNone(mtype, "%s: metric %s is not documented in "
                                         "docs/metrics.md" % (where, name))
                    self.assertEqual(mtype, "histogram", "%s: %s is a %s, it has no %s series"
                                     % (where, base, mtype, name[len(base):]))
                    if name.endswith("_bucket"):
                        allowed = allowed | {"le"}
                seen.add(base)
            extra = labels - allowed - TARGET_LABELS
            self.assertFalse(extra, "%s: %s has no label %s (docs/metrics.md)"
                             % (where, name, ", ".join(sorted(extra))))

    def test_catalogue_parsed(self):
        # The table must cover the whole catalogue; a formatting slip would silently drop rows.
        self.assertGreaterEqual(len(self.catalogue), 30)
        for name, (mtype, _) in self.catalogue.items():
            if mtype == "counter":
                self.assertTrue(name.endswith("_total"), "counter %s must end in _total" % name)
            else:
                self.assertFalse(name.endswith("_total"), "%s %s ends in _total" % (mtype, name))
        print("\n  docs/metrics.md: %d metrics in the catalogue" % len(self.catalogue))

    def test_promtool_check_rules(self):
        rc, out = run_promtool("check", "rules", ALERTS)
        self.assertEqual(rc, 0, out)
        print("\n  promtool check rules alerts.yml: " + out.strip().splitlines()[-1].strip())

    def test_promtool_test_rules(self):
        rc, out = run_promtool("test", "rules", ALERTS_TEST)
        self.assertEqual(rc, 0, out)
        self.assertIn("SUCCESS", out)
        print("\n  promtool test rules alerts_test.yml: SUCCESS")

    def test_promtool_check_config(self):
        rc, out = run_promtool("check", "config", PROM_CONFIG)
        self.assertEqual(rc, 0, out)
        print("\n  promtool check config prometheus.yml: valid")

    def test_alerts_use_documented_metrics(self):
        seen = set()
        alerts = 0
        for kind, name, expr in self.alert_rules:
            self.check_selectors("alerts.yml %s %s" % (kind, name), expr, seen)
            alerts += kind == "alert"
        self.assertGreaterEqual(alerts, 6)
        for needed in ("sluice_pool_queued", "sluice_request_duration_seconds",
                       "sluice_endpoint_inflight", "sluice_endpoint_max_inflight",
                       "sluice_breaker_state", "sluice_queue_timeouts_total",
                       "sluice_reloads_total"):
            self.assertIn(needed, seen, "no alert uses %s" % needed)
        print("\n  alerts.yml: %d rules, metrics used: %s" % (len(self.alert_rules),
                                                          ", ".join(sorted(seen))))

    def test_alerts_have_severity_and_annotations(self):
        with open(ALERTS, encoding="utf-8") as f:
            text = f.read()
        blocks = re.split(r"\n\s*- alert:", text)[1:]
        self.assertEqual(len(blocks), sum(k == "alert" for k, _, _ in self.alert_rules))
        for b in blocks:
            name = b.split()[0]
            self.assertRegex(b, r"\n\s+severity:\s*(critical|warning|info)\b", name)
            self.assertRegex(b, r"\n\s+summary:", name)
            self.assertRegex(b, r"\n\s+description:", name)

    def test_dashboard_uses_documented_metrics(self):
        exprs, label_values = dashboard_queries(self.dashboard)
        self.assertGreaterEqual(len(exprs), 20)
        seen = set()
        for where, expr in exprs:
            self.check_selectors("dashboard " + where, expr, seen)
        for where, selector, label in label_values:
            sels = selectors(selector)
            self.assertEqual(len(sels), 1, where)
            self.check_selectors("dashboard " + where, selector, seen)
            name = sels[0][0]
            self.assertIn(label, self.catalogue[name][1], "%s: %s has no label %s"
                          % (where, name, label))
        # Everything in the catalogue shows up somewhere on the dashboard.
        missing = set(self.catalogue) - seen
        self.assertFalse(missing, "not on the dashboard: %s" % ", ".join(sorted(missing)))
        print("\n  grafana-dashboard.json: %d queries, %d of %d catalogue metrics used"
              % (len(exprs), len(seen), len(self.catalogue)))

    def test_dashboard_queries_parse(self):
        # promtool parses PromQL only inside rule files: one recording rule per query.
        exprs, _ = dashboard_queries(self.dashboard)
        lines = ["groups:", "  - name: dashboard", "    rules:"]
        for i, (_, expr) in enumerate(exprs):
            lines.append("      - record: dashboard:query%d" % i)
            lines.append("        expr: %s" % json.dumps(to_promql(expr)))
        with tempfile.TemporaryDirectory(prefix="sluice-monitoring-") as d:
            path = os.path.join(d, "dashboard-queries.yml")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            rc, out = run_promtool("check", "rules", path)
        self.assertEqual(rc, 0, out)
        print("\n  grafana-dashboard.json: %d queries parse as PromQL" % len(exprs))

    def test_dashboard_shape(self):
        d = self.dashboard
        self.assertGreaterEqual(d.get("schemaVersion", 0), 36)
        names = {v["name"]: v for v in d["templating"]["list"]}
        self.assertEqual(names["DS_PROMETHEUS"]["type"], "datasource")
        self.assertEqual(names["DS_PROMETHEUS"]["query"], "prometheus")
        self.assertIn("pool", names)
        self.assertIn("route", names)
        ids, titles = set(), []

        def walk(panels):
            for p in panels:
                self.assertNotIn(p["id"], ids, "duplicate panel id %s" % p["id"])
                ids.add(p["id"])
                titles.append(p["title"])
                if p["type"] != "row":
                    self.assertEqual(p["datasource"]["uid"], "${DS_PROMETHEUS}", p["title"])
                    for t in p["targets"]:
                        self.assertEqual(t["datasource"]["uid"], "${DS_PROMETHEUS}", p["title"])
                gp = p["gridPos"]
                self.assertLessEqual(gp["x"] + gp["w"], 24, p["title"])
                walk(p.get("panels", []))

        walk(d["panels"])
        print("\n  grafana-dashboard.json: %d panels, variables %s"
              % (len(titles), ", ".join(sorted(names))))


if __name__ == "__main__":
    unittest.main(verbosity=2)
