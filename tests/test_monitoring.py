"""The shipped monitoring files (monitoring/): Prometheus scrape config, alerting rules and their unit
tests (promtool), the Grafana dashboard, and every PromQL query checked against what a real daemon
exports on /metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mergewatch.daemon.inbox import submit
from tests.daemon_support import REPO, DaemonProcess, fetch_metrics, free_port, ledger_rows, metric_value, wait_for, write_config
from tests.helpers import make_expert, make_open_clip_base
from tests.test_metrics import find_promtool

MONITORING = REPO / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
RULES = MONITORING / "mergewatch.rules.yml"
RULES_TEST = MONITORING / "mergewatch.rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

HISTOGRAMS = ("merge_duration_seconds", "publish_duration_seconds", "evaluate_duration_seconds", "drop_to_publish_seconds")
#: Labels Prometheus attaches to every scraped series (a scraped `job` label becomes `exported_job`).
TARGET_LABELS = ("job", "instance")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![\w:])(mergewatch_[A-Za-z0-9_:]*)")
_SELECTOR = re.compile(r"(?<![\w:])(mergewatch_[A-Za-z0-9_]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


# PromQL extraction -------------------------------------------------------------------------------


def rule_exprs() -> dict[str, str]:
    """``alert (or record) name -> expr`` of every rule in the rules file."""
    groups = yaml.safe_load(RULES.read_text("utf-8"))["groups"]
    return {r.get("alert") or r["record"]: r["expr"] for g in groups for r in g["rules"]}


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text("utf-8"))["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text("utf-8"))


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels inside collapsed rows


def dashboard_exprs() -> dict[str, str]:
    """``"panel title / refId" -> expr`` of every panel query (PromQL with Grafana variables)."""
    return {f"{p['title']} / {t['refId']}": t["expr"] for p in _panels(dashboard()["panels"]) for t in p.get("targets", [])}


def variable_queries() -> dict[str, str]:
    """``"variable name" -> query`` of the query variables (``label_values(<PromQL selector>, label)``)."""
    out = {}
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out[f"${v['name']}"] = q["query"] if isinstance(q, dict) else q
    return out


def all_queries() -> dict[str, str]:
    return {**{f"rule {k}": v for k, v in rule_exprs().items()}, **{f"panel {k}": v for k, v in dashboard_exprs().items()},
            **{f"variable {k}": v for k, v in variable_queries().items()}}


def metric_names(expr: str) -> set[str]:
    """Names starting with ``mergewatch_`` used in a PromQL expression (not inside strings)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def equality_matchers(expr: str) -> set[tuple[str, str, str]]:
    """``(metric, label, value)`` of every ``label="value"`` matcher on a ``mergewatch_`` selector,
    without Grafana variables; ``exported_X`` is the daemon's own label ``X`` after the scrape."""
    out = set()
    for name, body in _SELECTOR.findall(expr):
        for label, op, value in _MATCHER.findall(body):
            if op != "=" or "$" in value or label in TARGET_LABELS:
                continue
            out.add((name, label.removeprefix("exported_"), value))
    return out


def family(name: str) -> str:
    """The metric a series name belongs to: histogram series lose ``_bucket`` / ``_sum`` / ``_count``."""
    return re.sub(r"_(bucket|sum|count)$", "", name) if name.removeprefix("mergewatch_").startswith(HISTOGRAMS) else name


def missing_from(scrape: str, queries: dict[str, str]) -> list[str]:
    """Every name or ``label="value"`` a query uses that the scraped exposition has no sample of."""
    samples = [s for fam in text_string_to_metric_families(scrape) for s in fam.samples]
    names = {s.name for s in samples}
    problems = []
    for where, expr in sorted(queries.items()):
        for name in sorted(metric_names(expr)):
            if name not in names:
                problems.append(f"{where}: {name} (metric {family(name)}) is not exported")
        for name, label, value in sorted(equality_matchers(expr)):
            if name in names and not any(s.name == name and s.labels.get(label) == value for s in samples):
                problems.append(f'{where}: {name} has no series with {label}="{value}"')
    return problems


def test_extraction_finds_names_and_matchers():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(mergewatch_merge_duration_seconds_bucket{job=~"$job"}[5m])))'
            ' / on() mergewatch_job_failures_total{exported_job="rescan", instance="x"}'
            ' and up{job="mergewatch_not_a_metric"}')
    assert metric_names(expr) == {"mergewatch_merge_duration_seconds_bucket", "mergewatch_job_failures_total"}
    assert equality_matchers(expr) == {("mergewatch_job_failures_total", "job", "rescan")}
    assert family("mergewatch_merge_duration_seconds_bucket") == "mergewatch_merge_duration_seconds"
    assert family("mergewatch_experts_total") == "mergewatch_experts_total"


# Static checks -----------------------------------------------------------------------------------


def test_rules_cover_the_required_alerts():
    rules = alerts()
    required = {
        "MergewatchDown": "up",
        "MergewatchNoRecentPublish": "mergewatch_last_success_timestamp_seconds",
        "MergewatchExpertsRejected": 'mergewatch_experts_total{outcome="rejected"}',
        "MergewatchEvaluationsFailing": 'mergewatch_evaluations_total{outcome="failed"}',
        "MergewatchDeployHeldBack": "mergewatch_deploy_held_back",
        "MergewatchQueueGrowing": "mergewatch_queue_depth",
    }
    for name, needle in required.items():
        assert name in rules and needle in rules[name]["expr"], name
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert r["annotations"]["summary"].strip() and r["annotations"]["description"].strip(), name
    # A `reason` label on rejected experts must not split or break the rejection alert: it is summed away.
    assert "sum by (job, instance)" in rules["MergewatchExpertsRejected"]["expr"]
    # The rules' job selector is the job the scrape config defines.
    config = yaml.safe_load(PROMETHEUS_YML.read_text("utf-8"))
    jobs = [c["job_name"] for c in config["scrape_configs"]]
    assert jobs == ["mergewatch"] and 'up{job="mergewatch"}' in rules["MergewatchDown"]["expr"]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]  # metrics.listen's default
    assert config["rule_files"] == [RULES.name]


def test_dashboard_structure():
    d = dashboard()
    assert d["schemaVersion"] >= 39 and d["uid"] == "mergewatch"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(d["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    # No two panels overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    exprs = list(dashboard_exprs().values())
    for h in HISTOGRAMS:
        for q in ("0.5", "0.95"):
            assert any(f"histogram_quantile({q}," in e and f"mergewatch_{h}_bucket" in e for e in exprs), (h, q)
    used = set().union(*map(metric_names, exprs))
    for name in ("step", "current_version", "queue_depth", "experts_total", "acc", "bwt", "evaluations_total",
                 "last_success_timestamp_seconds"):
        assert f"mergewatch_{name}" in used, name


# promtool ----------------------------------------------------------------------------------------


@pytest.fixture
def promtool() -> str:
    found = find_promtool()
    if found is None:
        pytest.skip("promtool not found (PATH, $MERGEWATCH_PROMTOOL or the .ci/run cache); run .ci/run to fetch it")
    return found


def run_promtool(promtool: str, *args: str, cwd: Path = MONITORING) -> str:
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_check_config_and_rules(promtool):
    out = run_promtool(promtool, "check", "config", PROMETHEUS_YML.name)
    assert "SUCCESS" in out and "1 rule files found" in out, out
    out = run_promtool(promtool, "check", "rules", RULES.name)
    assert f"SUCCESS: {len(rule_exprs())} rules found" in out, out


def test_promtool_rule_unit_tests(promtool):
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", RULES_TEST.name)


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    # promtool parses PromQL only inside rule files: every panel query becomes a recording rule, with
    # Grafana's variables replaced by what Grafana would put there.
    def concrete(expr: str) -> str:
        return re.sub(r"\$\w+", ".*", re.sub(r"\$__(rate_)?interval", "5m", expr))

    rules = [{"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, e in enumerate(dashboard_exprs().values())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8")
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool(promtool, "check", "rules", str(path), cwd=tmp_path)


# Live daemon -------------------------------------------------------------------------------------

CONSTANT_PLUGIN = '''
def evaluate(model_view, task, settings):
    return {"accuracy": 0.75, "n": 4}
'''


def test_every_query_names_metrics_a_live_daemon_exports(tmp_path):
    """Run a real daemon until every metric has a sample (two experts merged and evaluated, so ACC and
    BWT exist; one drop rejected), scrape /metrics, and check each name used by the rules, the panels
    and the dashboard variables."""
    base = make_open_clip_base(tmp_path / "base.safetensors")
    (tmp_path / "constplug.py").write_text(CONSTANT_PLUGIN, "utf-8")
    tasks = ("t1", "t2")
    extra = '[eval]\nevaluator = "plugin"\nplugin = "constplug:evaluate"\nretry_seconds = 1.0\n'
    for t in tasks:
        (tmp_path / f"{t}.jsonl").write_text('{"text": "x", "label": 0}\n', "utf-8")
        (tmp_path / f"{t}.classes.txt").write_text("a\nb\n", "utf-8")
        extra += f'[[eval.tasks]]\nname = "{t}"\ndata = "{t}.jsonl"\n'
    port = free_port()
    cfg = write_config(tmp_path, port=port, extra=extra)
    ws = tmp_path / "ws"
    d = DaemonProcess(cfg, env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    try:
        d.wait_ready()
        for i, t in enumerate(tasks, 1):
            submit(make_expert(base, tmp_path / "src" / f"{t}.safetensors", seed=i), ws / "inbox", meta={"task": t})
        junk = tmp_path / "junk.safetensors"
        junk.write_bytes(b"not a safetensors file")
        submit(junk, ws / "inbox")
        wait_for(lambda: sorted(r.status for r in ledger_rows(ws)) == ["merged", "merged", "rejected"], 180, "2 merged, 1 rejected")

        def evaluated() -> str | None:
            text = fetch_metrics(port)
            # θ0 and deploy versions 1 and 2 evaluated; BWT exists once version 2 is current and evaluated.
            done = (metric_value(text, "mergewatch_evaluations_total", 'outcome="ok"') or 0) >= 3
            return text if done and "\nmergewatch_bwt{" in text else None

        scrape = wait_for(evaluated, 180, "evaluations of θ0 and versions 1, 2", interval=0.5)
    finally:
        assert d.stop() == 0, d.log()

    queries = all_queries()
    assert len(queries) >= 30, sorted(queries)
    used = set().union(*map(metric_names, queries.values()))
    assert {family(n) for n in used} >= {f"mergewatch_{h}" for h in HISTOGRAMS}
    assert len(used) >= 15, sorted(used)  # the extraction really found the queries' names
    assert missing_from(scrape, queries) == []
    # The check itself catches a query on a metric the daemon does not export, or a wrong label value.
    assert missing_from(scrape, {"bogus": 'rate(mergewatch_mergesss_total[5m]) + mergewatch_experts_total{outcome="exploded"}'}) == [
        "bogus: mergewatch_mergesss_total (metric mergewatch_mergesss_total) is not exported",
        'bogus: mergewatch_experts_total has no series with outcome="exploded"',
    ]
