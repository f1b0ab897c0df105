"""The PromQL shipped in deploy/: read from the dashboard and the alert rules, ready to query.

Dashboard queries: Grafana substitutes its variables before it sends a query; we do the same
with fixed values (`$__rate_interval` -> 1m, the `instance` variable -> its All value `.*`).
An unknown variable raises, so a new one has to be taught here before the tests pass.

Alert rules: an alert expression such as `inflow_ready == 0` returns nothing while the alert
does not fire, which would prove nothing. Each comparison is therefore turned into a `bool`
comparison (`inflow_ready == bool 0`), which keeps every series and yields 0 or 1. The result
is non-empty exactly when every series the rule reads exists and the expression evaluates, and
its value says whether the alert condition holds now. The rules are written so that this works:
comparisons only against numbers, no `absent()`, no `unless`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "inflow-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SCALED_OBJECT = ROOT / "deploy" / "k8s" / "keda-scaledobject.yaml"
JOB = "inflow"  # the scrape job the alerts select (`up{job="inflow"}`)

GRAFANA_VARIABLES = {
    "__rate_interval": "2m",
    "__interval": "15s",
    "__range": "5m",
    "instance": ".*",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.+),\s*(?P<label>\w+)\s*\)$", re.S)
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_METRIC = re.compile(r"\b(inflow_[a-z0-9_]+)")


@dataclass(frozen=True, slots=True)
class Query:
    source: str  # where it comes from, for failure messages
    expr: str  # PromQL, ready for /api/v1/query


def grafana_substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"Grafana variable ${name} has no test value in tests/monitoring.py")
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_queries() -> list[Query]:
    """Every panel target, and every templating query (label_values(expr, label))."""
    dashboard = load_dashboard()
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            source = f"dashboard panel {panel['title']!r} target {target['refId']}"
            queries.append(Query(source, grafana_substitute(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        raw = variable["query"]
        text = raw["query"] if isinstance(raw, dict) else raw
        match = _LABEL_VALUES.match(text.strip())
        if match is None:
            raise ValueError(f"variable {variable['name']}: only label_values(expr, label) known")
        expr = f"count by ({match['label']}) ({grafana_substitute(match['expr'])})"
        queries.append(Query(f"dashboard variable {variable['name']!r}", expr))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"] if "alert" in rule]


def alert_queries() -> list[Query]:
    return [
        Query(f"alert {rule['alert']}", as_bool_comparisons(rule["expr"])) for rule in alert_rules()
    ]


def keda_queries() -> list[Query]:
    """The PromQL of every prometheus trigger of the shipped ScaledObject."""
    doc: dict[str, Any] = yaml.safe_load(SCALED_OBJECT.read_text())
    return [
        Query(f"KEDA trigger {n}", trigger["metadata"]["query"])
        for n, trigger in enumerate(doc["spec"]["triggers"])
        if trigger["type"] == "prometheus"
    ]


def as_bool_comparisons(expr: str) -> str:
    """Add `bool` after every binary comparison outside label matchers, strings and comments."""
    out: list[str] = []
    i, n = 0, len(expr)
    braces = 0
    while i < n:
        c = expr[i]
        if c in "\"'`":  # a string: copy through its closing quote
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" else 1
            out.append(expr[i : j + 1])
            i = j + 1
            continue
        if c == "#":  # a comment runs to the end of the line
            j = expr.find("\n", i)
            j = n if j < 0 else j
            out.append(expr[i:j])
            i = j
            continue
        if c == "{":
            braces += 1
        elif c == "}":
            braces -= 1
        elif braces == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is not None:
                out.append(op)
                i += len(op)
                if not re.match(r"\s*bool\b", expr[i:]):
                    out.append(" bool" if i < n and expr[i].isspace() else " bool ")
                continue
        out.append(c)
        i += 1
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """The inflow_* sample names an expression reads (e.g. `inflow_batch_size_bucket`)."""
    return set(_METRIC.findall(expr))
