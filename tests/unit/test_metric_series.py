"""Series the dashboard and the alert rules rely on exist before the first event of their kind."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from streammf.stream.metrics import Metrics


def test_labelled_counters_that_alerts_watch_exist_at_zero_from_the_start():
    """An alert on `increase(...{outcome="failed"}[1h]) > 0` must see the first failure as an increase."""
    registry = CollectorRegistry()
    Metrics(registry)
    for outcome in ("published", "not_published", "failed"):
        assert registry.get_sample_value("streammf_refreshes_total", {"outcome": outcome}) == 0
    for dependency in ("kafka", "redis"):
        assert registry.get_sample_value("streammf_retries_total", {"dependency": dependency}) == 0
