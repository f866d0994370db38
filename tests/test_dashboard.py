"""
``deploy/grafana/hammal.json`` queries only what hammal exposes: every
metric name, every label in a matcher, a ``by``/``without`` clause or a
legend exists in hammal's ``/metrics`` exposition.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from twisted.trial.unittest import SynchronousTestCase

from hammal import metrics

DASHBOARD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "grafana", "hammal.json"
)

#: Labels Prometheus adds at scrape time, and the histogram bucket label.
_SCRAPE_LABELS = {"instance", "job"}

_METRIC = re.compile(r"\b(hammal_[a-zA-Z0-9_]+)")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*,?')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_LABEL_VALUES = re.compile(
    r"label_values\(\s*(hammal_[a-zA-Z0-9_]+)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)"
)


def exposition() -> dict[str, set[str]]:
    """
    Every series name in hammal's exposition, with the labels it carries:
    names from the text ``/metrics`` serves, labels from the metric
    definitions (a labelled metric has no sample before its first use).
    """
    text = generate_latest(metrics.REGISTRY).decode()
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = kind
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value._name] = tuple(value._labelnames)
    names: dict[str, set[str]] = {}
    for name, kind in families.items():
        base = name[: -len("_total")] if kind == "counter" else name
        own = set(labels.get(base, labels.get(name, ()))) | _SCRAPE_LABELS
        if kind == "histogram":
            names[name + "_bucket"] = own | {"le"}
            names[name + "_sum"] = own
            names[name + "_count"] = own
        else:
            names[name] = own
    return names


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expression, legend) for every query in the dashboard."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", "")
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            yield f"variable {variable['name']!r}", query["query"], ""


def _labels_used(expression: str, legend: str) -> set[str]:
    used: set[str] = set()
    for selector in _MATCHERS.findall(expression):
        used.update(m.group(1) for m in _MATCHER.finditer(selector))
    for group in _GROUPING.findall(expression):
        used.update(label.strip() for label in group.split(",") if label.strip())
    used.update(_LEGEND.findall(legend))
    used.update(label for _, label in _LABEL_VALUES.findall(expression))
    return used


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dashboard = json.load(f)
        self.exposed = exposition()

    def test_metrics_exist(self) -> None:
        """Every metric a query names is in hammal's exposition."""
        missing = [
            (where, name)
            for where, expression, _ in queries(self.dashboard)
            for name in _METRIC.findall(expression)
            if name not in self.exposed
        ]
        self.assertEqual(missing, [])

    def test_labels_exist(self) -> None:
        """Every label a query or legend uses is carried by a metric of that query."""
        problems = []
        for where, expression, legend in queries(self.dashboard):
            names = _METRIC.findall(expression)
            self.assertTrue(names, f"{where}: {expression} queries no hammal metric")
            known = set().union(*(self.exposed.get(name, set()) for name in names))
            unknown = _labels_used(expression, legend) - known
            if unknown:
                problems.append((where, sorted(unknown), expression))
        self.assertEqual(problems, [])

    def test_covers_the_essentials(self) -> None:
        """Hit ratio, savings, routes, latency, upstream errors, failovers, fills, size, quota."""
        every = " ".join(expression for _, expression, _ in queries(self.dashboard))
        for name in (
            "hammal_cache_responses_total",
            "hammal_upstream_bytes_total",
            "hammal_requests_total",
            "hammal_request_duration_seconds_bucket",
            "hammal_upstream_errors_total",
            "hammal_upstream_failovers_total",
            "hammal_blob_fills_in_flight",
            "hammal_blob_cache_size_bytes",
            "hammal_upstream_ratelimit_remaining",
        ):
            self.assertIn(name, every)

    def test_checker_catches_mistakes(self) -> None:
        """The label check is not vacuous: a wrong label or metric is found."""
        self.assertEqual(
            _labels_used('sum by (kind) (x{host="a",b!~"c"})', "{{d}}"), {"kind", "host", "b", "d"}
        )
        self.assertNotIn("hammal_requests", self.exposed)
        self.assertNotIn("kind", self.exposed["hammal_requests_total"])
        self.assertIn("le", self.exposed["hammal_request_duration_seconds_bucket"])

    def test_well_formed(self) -> None:
        """Unique panel ids, every panel on the dashboard's Prometheus variable."""
        ids = [panel["id"] for panel in self.dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in self.dashboard["panels"]:
            self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel["title"])
        self.assertEqual(self.dashboard["templating"]["list"][0]["type"], "datasource")
