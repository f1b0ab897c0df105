"""The shipped monitoring files: promtool accepts and unit-tests the alert rules, and every
metric the dashboard and the rules read is one the worker exposes.

tests/e2e/test_prometheus.py runs all of it against a real Prometheus scraping a worker."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engines.drift import Distribution
from engines.types import ModelIdentity
from streams.ops.drift import DriftWatch
from streams.ops.lag import LagTracker
from streams.ops.metrics import Metrics
from tests.monitoring import (
    ALERTS,
    ALERTS_TEST,
    JOB,
    PROMETHEUS_CONFIG,
    alert_queries,
    alert_rules,
    as_bool_comparisons,
    dashboard_queries,
    grafana_substitute,
    keda_queries,
    load_dashboard,
    metric_names,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)",
)


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    assert "SUCCESS" in _promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    # Every rule has a case in alerts_test.yml: a firing series and a quiet neighbour.
    tested = set(ALERTS_TEST.read_text().split()) & {r["alert"] for r in alert_rules()}
    assert tested == {r["alert"] for r in alert_rules()}, "each alert needs a promtool test"
    assert "SUCCESS" in _promtool("test", "rules", str(ALERTS_TEST))


@needs_promtool
def test_promtool_checks_the_example_scrape_config() -> None:
    _promtool("check", "config", str(PROMETHEUS_CONFIG))


def _exposed_sample_names() -> set[str]:
    """Every sample name a worker exposes once each labelled metric has a value."""
    metrics = Metrics()
    metrics.predictions.labels(label="positive").inc()
    lag = LagTracker().update(time.monotonic(), {("t", 0): 3}, {("t", 0): 1})
    metrics.watch_lag(lambda: lag, max_age_s=60, drain_rate=lambda: 10.0)
    metrics.watch_engine(lambda: ModelIdentity("m", "v1", "onnxruntime", "int8"))
    baseline = Distribution.of_scores(["a", "b"], [[0.7, 0.3]])
    metrics.watch_drift(DriftWatch(lambda _version: baseline, window=1, min_samples=1))
    metrics.observe_prediction("v1", "a", {"a": 0.7, "b": 0.3})
    text = metrics.render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_metric_in_the_dashboard_and_rules_is_exposed() -> None:
    exposed = _exposed_sample_names()
    queries = dashboard_queries() + alert_queries() + keda_queries()
    for query in queries:
        unknown = metric_names(query.expr) - exposed
        assert not unknown, f"{query.source} reads {unknown}, which the worker does not expose"
    used = set().union(*(metric_names(q.expr) for q in queries))
    for required in (
        "inflow_consumer_lag",
        "inflow_backlog_seconds",
        "inflow_event_to_published_seconds_bucket",
        "inflow_produced_to_published_seconds_bucket",
        "inflow_engine_info",
        "inflow_dead_letters_total",
        "inflow_es_bulk_seconds_bucket",
        "inflow_batch_size_bucket",
        "inflow_ready",
        "inflow_drift_psi",
    ):
        assert required in used, f"nothing in deploy/ shows {required}"


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = load_dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_alert_rules_carry_severity_and_a_summary_and_select_the_shipped_job() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    assert f'up{{job="{JOB}"}}' in ALERTS.read_text()


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("inflow_ready == 0", "inflow_ready == bool 0"),
        ("a > 1000\nand\nb > 0", "a > bool 1000\nand\nb > bool 0"),
        ('x{code!="a",le=~"0.5"} >= 2', 'x{code!="a",le=~"0.5"} >= bool 2'),
        ("rate(x[5m]) / rate(y[5m]) > bool 0.05", "rate(x[5m]) / rate(y[5m]) > bool 0.05"),
        ('up{job="a<b"}<3 # a > b', 'up{job="a<b"}< bool 3 # a > b'),
    ],
)
def test_comparisons_become_bool_comparisons(expr: str, expected: str) -> None:
    assert as_bool_comparisons(expr) == expected


def test_grafana_variables_are_substituted_and_unknown_ones_refused() -> None:
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) + ${__range}'
    assert grafana_substitute(expr) == 'rate(x{instance=~".*"}[2m]) + 5m'
    with pytest.raises(KeyError):
        grafana_substitute('x{pod=~"$pod"}')
