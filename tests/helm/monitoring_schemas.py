"""JSON schemas for the prometheus-operator kinds the chart renders (monitoring.coreos.com/v1).

kubernetes-validate knows only built-in kinds and no prometheus-operator CRD can be fetched
here, so these are transcribed from the prometheus-operator CRDs (ServiceMonitor, PodMonitor,
PrometheusRule, v0.80) for the fields the chart uses, with the CRDs' own types, patterns and
enums. Unknown fields are rejected, so a misspelt or misplaced field fails the tests.
"""

from __future__ import annotations

DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABEL_NAME = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
RELABEL_ACTIONS = ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                   "lowercase", "uppercase", "keepequal", "dropequal"]


def _strict(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


OBJECT_META = _strict({
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
}, ("name", "namespace"))

LABEL_SELECTOR = _strict({
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": _strict({
        "key": {"type": "string"}, "operator": {"type": "string"},
        "values": {"type": "array", "items": {"type": "string"}}}, ("key", "operator"))},
})

NAMESPACE_SELECTOR = _strict({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}})

RELABELING = _strict({
    "action": {"enum": RELABEL_ACTIONS + [a.capitalize() for a in RELABEL_ACTIONS] + [a.upper() for a in RELABEL_ACTIONS]},
    "sourceLabels": {"type": "array", "items": LABEL_NAME},
    "separator": {"type": "string"},
    "targetLabel": {"type": "string"},
    "regex": {"type": "string"},
    "modulus": {"type": "integer"},
    "replacement": {"type": "string"},
})

SCRAPE_ENDPOINT = {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "scheme": {"enum": ["http", "https"]},
    "interval": DURATION,
    "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "relabelings": {"type": "array", "items": RELABELING},
    "metricRelabelings": {"type": "array", "items": RELABELING},
}

RULE = _strict({
    "alert": {"type": "string"},
    "record": {"type": "string"},
    "expr": {"type": ["string", "integer"]},
    "for": DURATION,
    "keep_firing_for": DURATION,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
}, ("expr",))

RULE_GROUP = _strict({
    "name": {"type": "string", "minLength": 1},
    "interval": DURATION,
    "limit": {"type": "integer"},
    "labels": STRING_MAP,
    "rules": {"type": "array", "items": RULE},
}, ("name",))


def _kind(kind: str, spec: dict) -> dict:
    return _strict({
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": kind},
        "metadata": OBJECT_META,
        "spec": spec,
    }, ("apiVersion", "kind", "metadata", "spec"))


SCHEMAS = {
    "ServiceMonitor": _kind("ServiceMonitor", _strict({
        "jobLabel": {"type": "string"},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": NAMESPACE_SELECTOR,
        "endpoints": {"type": "array", "minItems": 1, "items": _strict(SCRAPE_ENDPOINT)},
    }, ("selector", "endpoints"))),
    "PodMonitor": _kind("PodMonitor", _strict({
        "jobLabel": {"type": "string"},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": NAMESPACE_SELECTOR,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _strict(SCRAPE_ENDPOINT)},
    }, ("selector", "podMetricsEndpoints"))),
    "PrometheusRule": _kind("PrometheusRule", _strict({
        "groups": {"type": "array", "items": RULE_GROUP},
    }, ("groups",))),
}
