"""A real Prometheus server scrapes a running worker: every dashboard query, every alert rule and
the KEDA ScaledObject's query shipped in deploy/ return data from it.

The Prometheus here is our own process (Debian's `prometheus` binary) on a free loopback port,
with the shipped deploy/prometheus/prometheus.yml turned into a test config: the `inflow` job
points at the worker, every second, and the shipped alerts.yml is loaded as its rule file. The
queries come from the shipped files themselves (tests/monitoring.py explains how the dashboard's
Grafana variables are filled in and why alert expressions are evaluated with `bool`).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas import encode_event
from streams.dev.process import free_port
from streams.ops.metrics import CONTENT_TYPE_LATEST
from tests.e2e.conftest import Names, WorkerFactory
from tests.e2e.test_pipeline import _produce
from tests.monitoring import (
    ALERTS,
    JOB,
    PROMETHEUS_CONFIG,
    Query,
    alert_queries,
    alert_rules,
    dashboard_queries,
    keda_queries,
    metric_names,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
MALFORMED = [(b"bad-json", b'{"text": "unterminated'), (b"bad-empty", b'{"text": ""}')]


@dataclass
class PrometheusServer:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector result of /api/v1/query (a scalar becomes one unlabelled sample)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] == "vector":
            result: list[dict[str, Any]] = data["result"]
            return result
        return [{"metric": {}, "value": data["result"]}]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape_config(target: str) -> dict[str, Any]:
    """The shipped prometheus.yml with the `inflow` job aimed at `target`, scraping every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(ALERTS)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]
    job["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], PrometheusServer]]:
    """Starts our own Prometheus scraping one target; stopped by PID after the test."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    started: list[PrometheusServer] = []

    def start(target: str) -> PrometheusServer:
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(target)))
        port = free_port()
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(proc, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    yield start
    for server in started:
        server.stop()


def _content_type(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.headers["Content-Type"])


def _has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample, and at least one that is a number (not NaN: e.g. a quantile of
    a histogram that saw nothing in the window)."""
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


async def _wait_for(
    server: PrometheusServer, queries: list[Query], timeout_s: float
) -> dict[str, list[dict[str, Any]]]:
    """Poll until every query returns data; return the results (the missing ones stay empty)."""
    results: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for query in queries:
            if not _has_data(results.get(query.source, [])):
                results[query.source] = await asyncio.to_thread(server.query, query.expr)
        if all(_has_data(r) for r in results.values()) or time.monotonic() > deadline:
            return results
        await asyncio.sleep(1)


async def test_every_dashboard_query_and_alert_rule_returns_data_from_a_real_prometheus(
    workers: WorkerFactory,
    names: Names,
    kafka_bootstrap: str,
    prometheus: Callable[[str], PrometheusServer],
) -> None:
    worker = workers.start(INFLOW_HEALTH_POLL_S="1")  # lag sampled every second
    content_type = await asyncio.to_thread(_content_type, f"{worker.url}/metrics")
    assert content_type == CONTENT_TYPE_LATEST  # the text format, as prometheus_client names it
    target = urllib.parse.urlsplit(worker.url).netloc
    server = prometheus(target)
    # Prometheus scrapes a new target only after its discovery settles (about 5 s): wait for
    # scrapes of the idle worker, so that the traffic below shows as an increase.
    scraped = Query("scraped", f'count_over_time(up{{job="{JOB}"}}[1m]) >= 2')
    assert (await _wait_for(server, [scraped], timeout_s=60))["scraped"], server.log.read_text()

    now_ms = int(time.time() * 1000)
    valid = [
        (f"ev-{i}".encode(), encode_event(f"event number {i} was great", id=f"ev-{i}", ts=now_ms))
        for i in range(200)
    ]
    await _produce(kafka_bootstrap, names.texts, valid + MALFORMED)

    # Through Prometheus: the worker answered everything (indexed, dead-lettered) and was seen.
    done = [
        Query("indexed", f"sum(inflow_documents_indexed_total) >= {len(valid)}"),
        Query("dead letters", 'sum(inflow_dead_letters_total{code="invalid_json"}) >= 1'),
        Query("latency", f"sum(inflow_event_to_published_seconds_count) >= {len(valid)}"),
        Query("ready", "min(inflow_ready) == 1"),
        Query("lag sampled", "count(count_over_time(inflow_consumer_lag[1m]) >= 3) >= 1"),
    ]
    progress = await _wait_for(server, done, timeout_s=240)
    assert all(progress.values()), (progress, worker.log.read_text()[-3000:])

    queries = dashboard_queries() + alert_queries() + keda_queries()
    assert keda_queries(), "the ScaledObject scales on a Prometheus query"
    results = await _wait_for(server, queries, timeout_s=60)
    empty = [q for q in queries if not _has_data(results[q.source])]
    if empty:
        # Show what Prometheus holds for the metrics behind the first failure.
        raw = {name: server.query(f"{name}[30s]") for name in sorted(metric_names(empty[0].expr))}
        failing = "\n".join(f"{q.source}: {q.expr} -> {results[q.source]}" for q in empty)
        pytest.fail(f"no data from Prometheus for:\n{failing}\nraw: {raw}")

    # The rule file is loaded, and Prometheus evaluates every rule without error.
    groups = server.get("/api/v1/rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule["alert"] for rule in alert_rules()}
    assert all(rule["health"] == "ok" for rule in loaded.values()), loaded

    # On this healthy worker the alert conditions read 0 (bool comparisons: 1 would fire).
    # Consumer lag is left out: it is whatever the broker says at this moment.
    quiet = ("InflowWorkerNotReady", "InflowWorkerDown", "InflowEngineSwapFailed")
    for name in quiet:
        values = {float(s["value"][1]) for s in results[f"alert {name}"]}
        assert values == {0.0}, (name, results[f"alert {name}"])
    dead_share = {float(s["value"][1]) for s in results["alert InflowDeadLetterRateHigh"]}
    assert dead_share == {0.0}, "2 bad records of 202 is below the 5 % threshold"
