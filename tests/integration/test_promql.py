"""Every PromQL expression of the dashboard and of the alert rules, evaluated by a real Prometheus that
scrapes a real daemon consuming a stream (with poison records and WALS refreshes): no expression may error,
and each must return series, at least one of them a finite number (not a quantile of nothing).

An alert's condition is normally false on a healthy daemon, so it returns nothing by design; what must
return series are the signals it compares (each alert lists them beside its condition in
deploy/observability/generate.py, which refuses a signal that is not part of its condition). The conditions
themselves are still evaluated (they must parse and run), and Prometheus must load the rules file.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from streammf.config import RefreshSettings
from tests.deploy.tools import observability
from tests.integration.prometheus import PrivatePrometheus
from tests.integration.test_daemon import _free_port, _InProcessDaemon, _produce, _settings, _wait_for

pytestmark = pytest.mark.integration

STREAM_SECONDS = 40


def _payloads(count: int) -> list[tuple[bytes, bytes]]:
    payloads = []
    for n in range(count):
        user, item = f"u{n % 97}", f"i{(n * 7) % 53}"
        event = {"user_id": user, "item_id": item, "value": 1 + (n * 31) % 5}
        payloads.append((user.encode(), json.dumps(event).encode()))
        if n % 200 == 0:  # poison: the dead-letter series must carry data
            payloads.append((b"poison", b"{not json"))
    return payloads


def test_every_dashboard_and_alert_expression_returns_series(
    kafka_bootstrap, redis_url, make_topic, topic_name, model, tmp_path
):
    module = observability()
    topic = make_topic(topic_name, 2)
    port = _free_port()
    settings = _settings(kafka_bootstrap, redis_url, topic, model, port).model_copy(
        update={"refresh": RefreshSettings(every_s=4, iterations=2)}
    )
    prometheus = PrivatePrometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"]).start()
    try:
        with _InProcessDaemon(settings):
            # A stream that lasts: rates, lag and freshness have data while Prometheus scrapes them.
            events = _payloads(8000)
            producer = threading.Thread(
                target=_produce,
                args=(kafka_bootstrap, topic, events, 200, STREAM_SECONDS * 200 / len(events)),
                daemon=True,
            )
            producer.start()
            _wait_for(
                lambda: bool(prometheus.query('streammf_refreshes_total{outcome="published"} > 0')),
                STREAM_SECONDS,
                "a published refresh, scraped",
            )
            time.sleep(5)  # a few more scrapes after it, so the 1h-window rates see it move
            missing, failing, no_number = [], [], []
            for expr in module.expressions() + [s for alert in module.ALERTS for s in alert.signals]:
                try:
                    result = prometheus.query(expr)
                except AssertionError as exc:
                    failing.append(str(exc))
                    continue
                if not result:
                    missing.append(expr)
                elif not any(math.isfinite(float(series["value"][1])) for series in result):
                    no_number.append(expr)  # e.g. a quantile of a histogram that saw nothing: NaN
            for alert in module.ALERTS:  # evaluates without error; normally empty
                try:
                    prometheus.query(alert.expr)
                except AssertionError as exc:
                    failing.append(str(exc))
            some_values = [
                float(series["value"][1])
                for series in prometheus.query(module.PANELS[0].targets[1].expr)  # applied events/s
            ]
            producer.join(timeout=STREAM_SECONDS * 3)
        assert not failing, "expressions Prometheus rejected:\n" + "\n".join(failing)
        assert not missing, "expressions that returned no series:\n" + "\n".join(missing)
        assert not no_number, "expressions whose series are all NaN or infinite:\n" + "\n".join(no_number)
        assert some_values and all(v > 0 and math.isfinite(v) for v in some_values), some_values
        (group,) = prometheus.rule_groups()  # Prometheus loaded the rules file itself
        assert {rule["name"] for rule in group["rules"]} == {alert.name for alert in module.ALERTS}
        assert all(rule["health"] == "ok" for rule in group["rules"]), group["rules"]
    finally:
        prometheus.stop()
