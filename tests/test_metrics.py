"""Metrics: own registry, names and labels of DESIGN §3.4, HTTP exposition, promtool check."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mergewatch import __version__
from mergewatch.daemon.metrics import Metrics, parse_listen


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError((name, labels))


def exercised() -> Metrics:
    m = Metrics(policy="zs-ema-wa")
    m.set_queue(3)
    m.count_expert("merged")
    m.count_expert("merged")
    m.count_expert("duplicate")
    m.set_step(2)
    m.set_version("deploy", 4)
    m.set_version("init", 3, latest=4)
    m.observe_merge(1.5)
    m.observe_publish(0.2)
    m.observe_evaluate(30.0)
    m.observe_drop_to_publish(95.0)
    m.mark_success(1_700_000_000.0)
    m.set_eval(acc=0.81, bwt=-0.02)
    m.count_job_failure("rescan")
    return m


def test_names_labels_and_initial_values():
    text = Metrics(policy="zs-ema-wa").render().decode()
    fams = families(text)
    expected = {
        "mergewatch_queue_depth": "gauge",
        "mergewatch_experts": "counter",
        "mergewatch_step": "gauge",
        "mergewatch_current_version": "gauge",
        "mergewatch_latest_version": "gauge",
        "mergewatch_merge_duration_seconds": "histogram",
        "mergewatch_publish_duration_seconds": "histogram",
        "mergewatch_evaluate_duration_seconds": "histogram",
        "mergewatch_prepare_duration_seconds": "histogram",
        "mergewatch_drop_to_publish_seconds": "histogram",
        "mergewatch_last_success_timestamp_seconds": "gauge",
        "mergewatch_job_failures": "counter",
        "mergewatch_build_info": "gauge",  # the text format carries Info as a gauge
    }
    for name, kind in expected.items():
        assert fams[name].type == kind, name
    assert all(name.startswith("mergewatch_") for name in fams)
    # Every label value is pre-initialised: absent series would break rate() and alerts.
    for outcome in ("merged", "rejected", "duplicate"):
        assert sample(text, "mergewatch_experts_total", outcome=outcome) == 0
    for job in ("rescan", "retention", "heartbeat", "evaluate"):
        assert sample(text, "mergewatch_job_failures_total", job=job) == 0
    for view in ("deploy", "init"):
        assert sample(text, "mergewatch_current_version", view=view) == 0
    assert sample(text, "mergewatch_build_info", version=__version__, policy="zs-ema-wa") == 1
    # The top bucket reaches hours (a large model on a CPU).
    buckets = [float(s.labels["le"]) for s in fams["mergewatch_merge_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert min(buckets) <= 0.1 and max(b for b in buckets if b != float("inf")) >= 3600


def test_updates_and_label_sets_are_closed():
    m = exercised()
    text = m.render().decode()
    assert sample(text, "mergewatch_queue_depth") == 3
    assert sample(text, "mergewatch_experts_total", outcome="merged") == 2
    assert sample(text, "mergewatch_experts_total", outcome="duplicate") == 1
    assert sample(text, "mergewatch_experts_total", outcome="rejected") == 0
    assert sample(text, "mergewatch_step") == 2
    assert sample(text, "mergewatch_current_version", view="deploy") == 4
    assert sample(text, "mergewatch_latest_version", view="deploy") == 4
    assert sample(text, "mergewatch_current_version", view="init") == 3
    assert sample(text, "mergewatch_latest_version", view="init") == 4
    assert sample(text, "mergewatch_merge_duration_seconds_count") == 1
    assert sample(text, "mergewatch_merge_duration_seconds_sum") == 1.5
    assert sample(text, "mergewatch_drop_to_publish_seconds_bucket", le="120.0") == 1
    assert sample(text, "mergewatch_last_success_timestamp_seconds") == 1_700_000_000.0
    assert sample(text, "mergewatch_acc", policy="zs-ema-wa") == pytest.approx(0.81)
    assert sample(text, "mergewatch_bwt", policy="zs-ema-wa") == pytest.approx(-0.02)
    assert sample(text, "mergewatch_job_failures_total", job="rescan") == 1
    with pytest.raises(ValueError, match="outcome"):
        m.count_expert("exploded")
    with pytest.raises(ValueError, match="reason"):  # the reason label is a closed set too
        m.count_expert("rejected", "cosmic-rays")
    with pytest.raises(ValueError, match="reason class"):  # and a rejection always has one
        m.count_expert("rejected")
    with pytest.raises(ValueError, match="view"):
        m.set_version("staging", 1)
    with pytest.raises(ValueError, match="job"):
        m.count_job_failure("some-new-job")


def test_timed_observes_even_on_error():
    m = Metrics()
    with pytest.raises(RuntimeError):
        with m.timed(m.publish_duration_seconds):
            raise RuntimeError("disk full")
    assert sample(m.render().decode(), "mergewatch_publish_duration_seconds_count") == 1


def test_registries_are_per_daemon():
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.count_expert("merged")
    assert sample(b.render().decode(), "mergewatch_experts_total", outcome="merged") == 0
    assert not any(n.startswith("mergewatch_") for n in REGISTRY._names_to_collectors)


def test_parse_listen():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9464", ":9464", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_http_endpoint_serves_live_values():
    m = Metrics(policy="p")
    with m.serve("127.0.0.1:0") as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        m.count_expert("rejected", "pickle")
        m.set_queue(7)
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        assert sample(text, "mergewatch_experts_total", outcome="rejected", reason="pickle") == 1
        assert sample(text, "mergewatch_experts_total", outcome="rejected", reason="truncated") == 0
        assert sample(text, "mergewatch_queue_depth") == 7
        m.set_queue(0)
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert sample(resp.read().decode(), "mergewatch_queue_depth") == 0
        port = server.port
    # Closed: the port is released.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def find_promtool() -> str | None:
    env = os.environ.get("MERGEWATCH_PROMTOOL")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("promtool")
    if found:
        return found
    # Where .ci/run caches the binary it extracts from the Debian package.
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cached = Path(os.environ.get("MERGEWATCH_CACHE", Path(cache) / "mergewatch-ci")) / "bin" / "promtool"
    return str(cached) if os.access(cached, os.X_OK) else None


def test_promtool_check_metrics():
    promtool = find_promtool()
    if promtool is None:
        pytest.skip("promtool not found (PATH, $MERGEWATCH_PROMTOOL or the .ci/run cache); run .ci/run to fetch it")
    text = exercised().render()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    # promtool prints lint problems and exits 1 on any of them (naming, units, help text, ...).
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout + proc.stderr).decode()
