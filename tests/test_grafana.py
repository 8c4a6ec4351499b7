"""docs/grafana/llm-router.json, the Grafana dashboard for a router's ``/metrics``: every query
names metrics, and labels, that a real router's ``/metrics`` exports (router/observe/metrics.py,
router/observe/cluster_metrics.py), so a renamed metric cannot leave the dashboard blank."""

from __future__ import annotations

import json
import re

from conftest import ROOT
from helpers import chat_body, request
from llm_lab_router.router.observe.metrics import RouterMetrics
from prometheus_client.metrics import MetricWrapperBase
from test_metrics import routed  # noqa: F401  (the fixture: a router, a mock engine, a fake GPU host)

DASHBOARD = ROOT / "docs" / "grafana" / "llm-router.json"
METRIC = re.compile(r"\bllm_router_\w+")
SELECTOR = re.compile(r"\b(llm_router_\w+)\{([^}]*)\}")
BY = re.compile(r"\bby \(([^)]*)\)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",)}
GRAFANA_LABELS = {"le"}  # histogram_quantile's bucket label


def queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    found += [v["query"]["query"] for v in doc["templating"]["list"] if isinstance(v.get("query"), dict)]
    return found


def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Sample names ``/metrics`` can carry (from its ``# TYPE`` lines) and the labels seen per name."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            base = family[:-len("_total")] if kind == "counter" and family.endswith("_total") else family
            names |= {base + s for s in SUFFIXES.get(kind, ("",))}
        elif line and not line.startswith("#"):
            m = re.match(r"^(\w+)(?:\{(.*)\})? ", line)
            if m:
                labels.setdefault(m[1], set()).update(re.findall(r'(\w+)="', m[2] or ""))
    return names, labels


def declared_labels() -> dict[str, set[str]]:
    """The labels of the request metrics as declared (those without samples yet included)."""
    out: dict[str, set[str]] = {}
    for metric in vars(RouterMetrics()).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in SUFFIXES.get(metric._type, ("",)):
                out[metric._name + suffix] = set(metric._labelnames)
    return out


def test_every_query_names_exported_metrics_and_labels(routed) -> None:  # noqa: F811
    router, _ = routed
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=2)).status == 200
    text = request("GET", f"{router.url}/metrics").body.decode()
    names, labels = exported(text)
    for name, declared in declared_labels().items():
        labels.setdefault(name, set()).update(declared)
    exprs = queries()
    assert len(exprs) >= 15
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used and used <= names, (expr, sorted(used - names))
        known = set().union(*(labels.get(n, set()) for n in used)) | GRAFANA_LABELS
        for metric, selector in SELECTOR.findall(expr):
            for label in re.findall(r"(\w+)\s*[=!]~?", selector):
                assert label in labels.get(metric, set()), (expr, label)
        for group in BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in known, (expr, label)


def test_the_check_catches_a_renamed_metric() -> None:
    names, _ = exported("# TYPE llm_router_requests_total counter\n# TYPE llm_router_ttft histogram\n")
    assert {"llm_router_requests_total", "llm_router_ttft_bucket"} <= names
    assert "llm_router_request_total" not in names
