"""Reading the operator kit (deploy/observability): every alert and panel expression, the metrics and labels it
uses, and what an exposition exports (series name -> label names), for the tests that hold the kit to what the
appliance really serves."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client.parser import text_string_to_metric_families

from appliance.settings import REPO_ROOT

KIT = REPO_ROOT / "deploy" / "observability"
PROMETHEUS_LABELS = {"job", "instance", "le", "node"}
_METRIC = re.compile(r"(?<![\w:])(appliance_[a-z0-9_]+|vllm:[a-z0-9_:]+|up)\b(?!\s*\()")


def expressions() -> list[tuple[str, str]]:
    found = []
    for group in yaml.safe_load((KIT / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            found.append((f"alert {rule['alert']}", rule["expr"]))
    dashboard = json.loads((KIT / "grafana" / "appliance.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']}", target["expr"]))
    return found


def used(expr: str) -> tuple[set[str], set[str]]:
    """The metrics an expression reads and the labels it selects or groups by."""
    metrics = set(_METRIC.findall(expr))
    labels = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", selector))
    for grouping in re.findall(r"\b(?:by|on|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    return metrics, labels


def series(text: str) -> dict[str, set[str]]:
    """series name (as PromQL names it: counters with _total, histograms with _bucket/_sum/_count) -> labels."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
        if family.type == "counter":
            found.setdefault(f"{family.name}_total", set())
        elif family.type == "histogram":
            for suffix in ("bucket", "sum", "count"):
                found.setdefault(f"{family.name}_{suffix}", set())
        else:  # a gauge with no sample yet is still exported
            found.setdefault(family.name, set())
    return found


def problems(kit: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every metric of ``kit`` missing from ``exported``, and every label that no metric it uses carries."""
    found: list[tuple[str, str]] = []
    for where, expr in kit:
        metrics, labels = used(expr)
        for metric in metrics - {"up"}:
            if metric not in exported:
                found.append((where, f"metric {metric} is not exported"))
        known = set().union(*(exported.get(metric, set()) for metric in metrics)) | PROMETHEUS_LABELS
        if all(exported.get(metric) for metric in metrics - {"up"}):  # labels are known only for sampled metrics
            found.extend((where, f"label {label} is not a label of {sorted(metrics)}") for label in labels - known)
    return found
