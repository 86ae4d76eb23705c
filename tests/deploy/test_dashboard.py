"""The provisioned Grafana dashboard: generated, well-formed, and querying only metrics the daemon exports."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry

from streammf.stream.metrics import Metrics
from tests.deploy.tools import DEPLOY, observability

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streammf.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"


def _exported_series() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    # By type, not by sample: a labelled metric has no sample until its first label value is used.
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def test_committed_dashboard_is_the_generated_one():
    assert json.loads(DASHBOARD.read_text()) == observability().dashboard()


def test_every_query_names_only_exported_metrics():
    exported = _exported_series() | {"up"}
    module = observability()
    names = set()
    for expr in module.expressions() + [s for a in module.ALERTS for s in a.signals]:
        names |= set(re.findall(r"\b(streammf_[a-z_]+)", expr))
    assert names, "no streammf metric found in the queries"
    assert names <= exported, f"queried but never exported: {sorted(names - exported)}"


def test_dashboard_covers_what_an_operator_watches():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for metric in [
        "streammf_events_consumed_total",
        "streammf_events_applied_total",
        "streammf_events_dead_lettered_total",
        "streammf_update_latency_seconds_bucket",
        "streammf_freshness_seconds_bucket",
        "streammf_prequential_squared_error_total",
        "streammf_consumer_lag_records",
        "streammf_refreshes_total",
        "streammf_refresh_pause_seconds",
        "streammf_model_version",
        "streammf_redis_call_seconds_bucket",
        "streammf_retries_total",
    ]:
        assert metric in queries, metric
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    import yaml

    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"  # the uid the panels use
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "streammf.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
