"""The alert rules and the Grafana dashboard, written from one list of PromQL expressions.

    python deploy/observability/generate.py          # rewrites the generated files
    python deploy/observability/generate.py --check  # exit 1 if a committed file differs (tests run this)

Why generated: every alert is kept as its condition *and* the signals it compares (`signals`), so the
real-Prometheus test (tests/integration/test_promql.py) can check that each signal returns series on a
running daemon, whereas the condition itself is normally false and returns nothing. Each signal must
appear verbatim inside its condition (checked below), so the two cannot drift apart.

Outputs: deploy/prometheus/alerts.yml (Prometheus, Compose), the chart's copy under
deploy/helm/streammf/files/ (Helm's .Files.Get only reads inside the chart) and
deploy/grafana/dashboards/streammf.json (provisioned into Grafana).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
ALERTS_FILES = (DEPLOY / "prometheus" / "alerts.yml", DEPLOY / "helm" / "streammf" / "files" / "alerts.yml")
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "streammf.json"
DASHBOARD_UID = "streammf-daemon"

# The scrape job of the daemons: "streammf" in Compose and the local stack; a ServiceMonitor names it after
# the Service, e.g. "myrelease-streammf". Alerts are per job, so two deployments never mix.
JOB = 'job=~".*streammf.*"'

# Expressions shared by the dashboard and the rules.
APPLIED_RATE = "sum by (job) (rate(streammf_events_applied_total[5m]))"
CONSUMED_RATE = "sum by (job) (rate(streammf_events_consumed_total[5m]))"
DEAD_LETTER_RATE = "sum by (job) (rate(streammf_events_dead_lettered_total[5m]))"
LAG = "sum by (job) (streammf_consumer_lag_records)"
LAG_TREND = "sum by (job) (deriv(streammf_consumer_lag_records[15m]))"
FRESHNESS_P99 = "histogram_quantile(0.99, sum by (job, le) (rate(streammf_freshness_seconds_bucket[5m])))"


def mean_squared_error(window: str) -> str:
    """Prequential mean squared error over `window`, over all replicas (they train one shared model)."""
    return (
        f"sum by (job) (rate(streammf_prequential_squared_error_total[{window}]))"
        f" / sum by (job) (rate(streammf_prequential_predictions_total[{window}]))"
    )


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    signals: tuple[str, ...]  # the sub-expressions `expr` compares; each must return series on live data
    for_: str
    severity: str
    summary: str
    description: str


ALERTS = (
    Alert(
        "StreammfDown",
        f"up{{{JOB}}} == 0",
        (f"up{{{JOB}}}",),
        "2m",
        "critical",
        "streammf daemon {{ $labels.instance }} does not answer scrapes",
        "Prometheus cannot scrape /metrics: the process is gone, hung or unreachable.",
    ),
    Alert(
        "StreammfNoProgress",
        f"({LAG} > 0) and on (job) ({APPLIED_RATE} == 0)",
        (LAG, APPLIED_RATE),
        "10m",
        "critical",
        "streammf ({{ $labels.job }}) has a backlog but applies nothing",
        "Events wait in Kafka and none was applied for 10 minutes: see the daemon's log "
        "(Redis unreachable, writers paused by a stuck refresh, no partition assigned).",
    ),
    Alert(
        "StreammfKafkaSilent",
        "time() - max by (job, instance) (streammf_last_progress_timestamp_seconds) > 120",
        ("time() - max by (job, instance) (streammf_last_progress_timestamp_seconds)",),
        "5m",
        "warning",
        "streammf {{ $labels.instance }} has not heard from Kafka for over 2 minutes",
        "Neither a poll returned records nor an end-offset probe answered: the broker is unreachable or "
        "the topic is missing.",
    ),
    Alert(
        "StreammfLagGrowing",
        f"({LAG} > 10000) and on (job) ({LAG_TREND} > 0)",  # the lag first: it is the alert's $value
        (LAG_TREND, LAG),
        "15m",
        "warning",
        "streammf ({{ $labels.job }}) falls behind: lag {{ $value | humanize }} and rising",
        "The consumer lag grew for 15 minutes and is above 10,000 records: the stream outpaces the "
        "replicas (add replicas up to the partition count) or something slows every batch.",
    ),
    Alert(
        "StreammfFreshnessHigh",
        f"{FRESHNESS_P99} > 30",
        (FRESHNESS_P99,),
        "10m",
        "warning",
        "streammf ({{ $labels.job }}) freshness p99 is {{ $value | humanizeDuration }}",
        "Over the last 5 minutes, more than 1% of events took over 30 s from Kafka to an effect in Redis.",
    ),
    Alert(
        "StreammfDeadLetterRateHigh",
        f"{DEAD_LETTER_RATE} / {CONSUMED_RATE} > 0.01",
        (f"{DEAD_LETTER_RATE} / {CONSUMED_RATE}",),
        "10m",
        "warning",
        "streammf ({{ $labels.job }}) dead-letters {{ $value | humanizePercentage }} of its records",
        "More than 1% of consumed records were invalid (see streammf_events_invalid_total by reason and "
        "the .dlq topic): a producer sends a wrong schema or out-of-bounds values.",
    ),
    Alert(
        "StreammfRefreshFailing",
        'sum by (job) (increase(streammf_refreshes_total{outcome="failed"}[1h])) > 0',
        ('sum by (job) (increase(streammf_refreshes_total{outcome="failed"}[1h]))',),
        "0m",
        "warning",
        "streammf ({{ $labels.job }}) WALS refresh failed",
        "A periodic WALS refresh raised (see the daemon's log); the live model keeps learning by SGD.",
    ),
    Alert(
        "StreammfRefreshNotPublishing",
        'sum by (job) (increase(streammf_refreshes_total{outcome="published"}[3h])) == 0'
        " and on (job) sum by (job) (increase(streammf_refreshes_total[3h])) > 0",
        (
            'sum by (job) (increase(streammf_refreshes_total{outcome="published"}[3h]))',
            "sum by (job) (increase(streammf_refreshes_total[3h]))",
        ),
        "30m",
        "warning",
        "streammf ({{ $labels.job }}) refreshes ran, none published in the last 3 h",
        "Refreshes run but none becomes the live version (lost the race with the stream, or the writers' "
        "pause would exceed its limit): the model only ever gets SGD updates.",
    ),
    Alert(
        "StreammfPrequentialLossRegressing",
        f"({mean_squared_error('15m')}) > 1.5 * ({mean_squared_error('6h')})",
        (mean_squared_error("15m"), mean_squared_error("6h")),
        "30m",
        "warning",
        "streammf ({{ $labels.job }}) prequential loss 50% above its 6 h level",
        "The mean squared error of predictions made before learning each event rose: a shift in the data, "
        "a bad refresh, or a bad producer.",
    ),
)


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]
    description: str = ""
    kind: str = "timeseries"
    extra: dict[str, object] = field(default_factory=dict)


def _quantiles(histogram: str, by: str, legend_suffix: str = "") -> tuple[Target, ...]:
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({by}le) (rate({histogram}_bucket[5m])))",
            f"p{round(q * 100)}{legend_suffix}",
        )
        for q in (0.5, 0.99)
    )


PANELS = (
    Panel(
        "Events/s",
        "ops",
        (
            Target("sum(rate(streammf_events_consumed_total[1m]))", "consumed"),
            Target("sum(rate(streammf_events_applied_total[1m]))", "applied"),
            Target("sum(rate(streammf_events_dead_lettered_total[1m]))", "dead-lettered"),
        ),
        "Records polled from Kafka, events applied to the model, and records sent to the .dlq topic.",
    ),
    Panel(
        "Update latency (poll -> Redis acknowledged)",
        "s",
        _quantiles("streammf_update_latency_seconds", ""),
    ),
    Panel(
        "Freshness (in Kafka -> effect in Redis)",
        "s",
        _quantiles("streammf_freshness_seconds", ""),
        "How stale the model is: from the record's Kafka timestamp to its effect committed in Redis.",
    ),
    Panel(
        "Prequential RMSE, 5 min window",
        "none",
        (
            Target(
                "sqrt(sum(rate(streammf_prequential_squared_error_total[5m]))"
                " / sum(rate(streammf_prequential_predictions_total[5m])))",
                "RMSE 5m",
            ),
            Target("sqrt(avg(streammf_prequential_loss_ema))", "sqrt(loss EMA)"),
        ),
        "Every event is predicted before it is learned. Explicit mode: the RMSE of ratings. Implicit "
        "mode: the root of the confidence-weighted squared loss on preferences (the daemon exports no "
        "hit rate; `streammf evaluate` reports recall@10 offline).",
    ),
    Panel(
        "Consumer lag per partition",
        "short",
        (Target("sum by (partition) (streammf_consumer_lag_records)", "partition {{partition}}"),),
    ),
    Panel(
        "WALS refreshes (per hour)",
        "short",
        (Target("sum by (outcome) (increase(streammf_refreshes_total[1h]))", "{{outcome}}"),),
        kind="timeseries",
        extra={"custom": {"drawStyle": "bars"}},
    ),
    Panel(
        "Refresh duration and writers' pause",
        "s",
        (
            Target(
                "max(rate(streammf_refresh_seconds_sum[1h]) / rate(streammf_refresh_seconds_count[1h]))",
                "refresh duration (mean, 1h)",
            ),
            Target(
                "max(rate(streammf_refresh_pause_seconds_sum[1h])"
                " / rate(streammf_refresh_pause_seconds_count[1h]))",
                "writers paused (mean, 1h)",
            ),
        ),
        "The writers wait only while a refresh hands the live version over.",
    ),
    Panel(
        "Model version",
        "none",
        (Target("max by (instance) (streammf_model_version)", "{{instance}}"),),
        "Live model version; it moves when a refresh publishes.",
        kind="stat",
    ),
    Panel(
        "Redis call latency p99 by operation",
        "s",
        (
            Target(
                "histogram_quantile(0.99, sum by (op, le) (rate(streammf_redis_call_seconds_bucket[5m])))",
                "{{op}}",
            ),
        ),
    ),
    Panel(
        "Retries/s by dependency",
        "ops",
        (Target("sum by (dependency) (rate(streammf_retries_total[5m]))", "{{dependency}}"),),
    ),
)


def alert_rules() -> dict[str, object]:
    for alert in ALERTS:
        for signal in alert.signals:
            if signal not in alert.expr:
                raise ValueError(f"{alert.name}: signal {signal!r} is not part of its expr")
    rules = [
        {
            "alert": alert.name,
            "expr": alert.expr,
            **({"for": alert.for_} if alert.for_ != "0m" else {}),
            "labels": {"severity": alert.severity},
            "annotations": {"summary": alert.summary, "description": alert.description},
        }
        for alert in ALERTS
    ]
    return {"groups": [{"name": "streammf", "rules": rules}]}


def dashboard() -> dict[str, object]:
    panels = []
    for index, panel in enumerate(PANELS):
        width = 12
        panels.append(
            {
                "id": index + 1,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
                "fieldConfig": {"defaults": {"unit": panel.unit, **panel.extra}, "overrides": []},
                "targets": [
                    {
                        "refId": chr(ord("A") + position),
                        "datasource": {"type": "prometheus", "uid": "prometheus"},
                        "expr": target.expr,
                        "legendFormat": target.legend,
                    }
                    for position, target in enumerate(panel.targets)
                ],
            }
        )
    return {
        "uid": DASHBOARD_UID,
        "title": "streammf",
        "description": "The streaming recommender: throughput, latency, freshness, learning, refreshes",
        "tags": ["streammf"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": panels,
        "templating": {"list": []},
        "annotations": {
            "list": [
                {
                    "name": "Refresh published",
                    "datasource": {"type": "prometheus", "uid": "prometheus"},
                    "enable": True,
                    "iconColor": "orange",
                    "expr": f"{dashboard_annotation_signal()} > 0",
                    "step": "30s",
                }
            ]
        },
    }


def expressions() -> list[str]:
    """Every PromQL expression the dashboard queries (for the real-Prometheus test)."""
    exprs = [target.expr for panel in PANELS for target in panel.targets]
    exprs.append(dashboard_annotation_signal())
    return exprs


def dashboard_annotation_signal() -> str:
    """The annotation's condition without its comparison (normally false, as an alert's is)."""
    return "changes(max(streammf_model_version)[1m:])"


def rendered() -> dict[Path, str]:
    header = "# Generated by deploy/observability/generate.py: edit that file, then run it.\n"
    rules = header + yaml.safe_dump(alert_rules(), sort_keys=False, width=110, allow_unicode=True)
    files = {path: rules for path in ALERTS_FILES}
    files[DASHBOARD_FILE] = json.dumps(dashboard(), indent=2) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is not up to date")
    check = parser.parse_args().check
    stale = []
    for path, text in rendered().items():
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"out of date: {path} (run: python deploy/observability/generate.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
