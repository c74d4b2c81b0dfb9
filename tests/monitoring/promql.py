"""Metric names in PromQL expressions and Grafana dashboards, and the names the code exports.

No PromQL parser exists for Python here; `metric_names` strips what cannot be a metric name
(strings, label matchers, ranges, grouping clauses, function calls, keywords, numbers) and
the tests check the expressions' syntax with promtool separately.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")
# Grafana variable queries: label_values(metric{...}, label) / label_values(label)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:([A-Za-z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,)?\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in KEYWORDS:
            names.add(match.group(0))
    return names


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as plain PromQL: Grafana's variables replaced by values."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    out = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = _LABEL_VALUES.match(query)
            assert match, f"variable {variable['name']}: unsupported query {query!r}"
            if match.group(1):
                out.append((f"variable {variable['name']}", query[query.index("(") + 1:query.rindex(",")]))
    return out


def load_dashboards(folder: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def exposed_names(registry) -> set[str]:
    """Sample names a registry's metrics appear under on /metrics (with the suffixes
    prometheus_client adds: counters _total, histograms _bucket/_sum/_count)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "gauge": ("",), "untyped": ("",), "info": ("_info",)}
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names
