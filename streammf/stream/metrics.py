"""The daemon's metric set, registered on an injected registry, and the /metrics + /healthz server.

No user or item ids ever become labels (unbounded cardinality); partitions and reasons are bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from streammf.stream.refresh import RefreshReport

# Milliseconds matter for update latency; freshness spans ms (live) to hours (a backlog being worked off).
# Quantiles are interpolated linearly inside a bucket, so the buckets are dense where live tails fall
# (latency 10 ms to 0.3 s, freshness 50 ms to 0.5 s): with 50 / 100 ms and 250 / 500 ms neighbours a p99
# could read up to twice what it was.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
FRESHNESS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
)  # fmt: skip
# The age of the data: seconds (live) to years (a replayed history).
EVENT_AGE_BUCKETS = (1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0, 365 * 86400.0)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
REFRESH_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
LOSS_EMA_DECAY = 0.999
REFRESH_OUTCOMES = ("published", "not_published", "failed")
DEPENDENCIES = ("kafka", "redis")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.events_consumed = Counter(
            "streammf_events_consumed_total", "Records polled from Kafka", registry=r
        )
        self.events_applied = Counter(
            "streammf_events_applied_total", "Events applied to the model", registry=r
        )
        self.events_invalid = Counter(
            "streammf_events_invalid_total", "Records that failed validation", ["reason"], registry=r
        )
        self.events_dead_lettered = Counter(
            "streammf_events_dead_lettered_total", "Records written to the dead-letter topic", registry=r
        )
        self.batches = Counter("streammf_batches_total", "Batches by store outcome", ["outcome"], registry=r)
        self.batch_size = Histogram(
            "streammf_batch_size_events", "Valid events per batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.update_latency = Histogram(
            "streammf_update_latency_seconds",
            "Poll returned -> Redis apply acknowledged",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.freshness = BatchHistogram(
            "streammf_freshness_seconds",
            "How stale the model is: record entered Kafka (its timestamp) -> its effect committed in Redis",
            FRESHNESS_BUCKETS,
            r,
        )
        self.event_age = BatchHistogram(
            "streammf_event_age_seconds",
            "How old the data is: the event's own time -> applied (years for a replayed history)",
            EVENT_AGE_BUCKETS,
            r,
        )
        self.redis_latency = Histogram(
            "streammf_redis_call_seconds", "Redis call latency", ["op"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.squared_error = Counter(
            "streammf_prequential_squared_error_total",
            "Sum of squared prequential errors (predict before learn); RMSE = sqrt(rate(this)/rate(count))",
            registry=r,
        )
        self.predictions = Counter(
            "streammf_prequential_predictions_total", "Number of prequential predictions", registry=r
        )
        self.loss_ema = Gauge(
            "streammf_prequential_loss_ema", "Exponential moving average of the squared error", registry=r
        )
        self.lag = Gauge(
            "streammf_consumer_lag_records", "High watermark - position", ["partition"], registry=r
        )
        self.model_version = Gauge(
            "streammf_model_version",
            "Live model version (set by each batch and by a published refresh)",
            registry=r,
        )
        self.retries = Counter(
            "streammf_retries_total", "Retries after a dependency failed", ["dependency"], registry=r
        )
        self.refreshes = Counter(
            "streammf_refreshes_total", "WALS refreshes by outcome", ["outcome"], registry=r
        )
        self.refresh_seconds = Histogram(
            "streammf_refresh_seconds", "WALS refresh duration", buckets=REFRESH_BUCKETS, registry=r
        )
        self.refresh_pause_seconds = Histogram(
            "streammf_refresh_pause_seconds",
            "How long writers waited while a refresh handed the live version over",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refresh_caught_up_rows = Counter(
            "streammf_refresh_caught_up_rows_total",
            "Rows a refresh folded in because the stream changed them while it ran",
            registry=r,
        )
        self.last_progress = Gauge(
            "streammf_last_progress_timestamp_seconds",
            "When the loop last heard from Kafka (records polled, or end offsets fetched)",
            registry=r,
        )
        self.users_forgotten = Counter(
            "streammf_users_forgotten_total",
            "forget_user events applied (users deleted from the model)",
            registry=r,
        )
        self.dead_letters_lost = Counter(
            "streammf_dead_letters_lost_total",
            "Bad records the dead-letter topic refused for good, even as metadata only (logged)",
            registry=r,
        )
        self.store_lost_state = Gauge(
            "streammf_store_lost_state",
            "1 when the daemon refused to run because the store lost state it had (see the log)",
            registry=r,
        )
        # Labelled series exist from the start at 0: otherwise a counter's first increment creates it at 1,
        # `increase()` sees no change and an alert on the first failed refresh or retry never fires.
        for outcome in REFRESH_OUTCOMES:
            self.refreshes.labels(outcome)
        for dependency in DEPENDENCIES:
            self.retries.labels(dependency)
        self._ema: float | None = None

    def observe_refresh(self, outcome: str, report: RefreshReport | None) -> None:
        self.refreshes.labels(outcome).inc()
        if report is not None and report.version is not None:
            self.refresh_seconds.observe(report.seconds)
            self.refresh_pause_seconds.observe(report.paused_seconds)
            self.refresh_caught_up_rows.inc(report.caught_up_rows)
        if report is not None and report.published and report.version is not None:
            # The live version changed now, not when the next batch lands (an idle stream would show the
            # old one for as long as it stays idle).
            self.model_version.set(report.version)

    def observe_errors(self, total: float, count: int) -> None:
        """Record prequential squared errors (sum and count for PromQL, plus an EMA for dashboards)."""
        if count == 0:
            return
        self.squared_error.inc(total)
        self.predictions.inc(count)
        mean = total / count
        # One EMA step per batch, weighted as `count` individual steps would be.
        decay = LOSS_EMA_DECAY**count
        self._ema = mean if self._ema is None else decay * self._ema + (1 - decay) * mean
        self.loss_ema.set(self._ema)


class BatchHistogram:
    """A Prometheus histogram fed a whole batch's values at once. The per-event histograms (freshness, event
    age) cost ~2.5 us per `Histogram.observe`, a quarter of the loop's Python time per event; here a batch
    is one searchsorted + bincount. Exposed through prometheus_client's public custom-collector API, with
    the same series and label formatting as a `Histogram`."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.array([*buckets, np.inf], dtype=np.float64)
        self._counts = np.zeros(len(self._bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        # Bucket `le` holds values <= its bound: the first bound not below the value.
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value]))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts), self._sum
        buckets = [
            (floatToGoString(bound), int(count))
            for bound, count in zip(self._bounds, cumulative, strict=True)
        ]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class Heartbeat:
    """Liveness for /healthz: the poll loop beats after every poll, and notes each dependency round trip
    that succeeded (`saw`). Healthy while beats are recent and every dependency seen so far was seen
    recently: an empty poll looks the same for an idle topic and a dead broker, a probe does not.

    Readiness for /readyz is stricter: alive, and every condition given to `ready_when` met (the daemon
    adds "partitions assigned" and "Redis answers" once its loop exists; until then it is starting). A
    replica without partitions is alive but not ready, so an orchestrator sees an over-scaled group."""

    def __init__(
        self,
        max_silence_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_dependency_silence_s: float = 5.0,
    ) -> None:
        self.max_silence_s = max_silence_s
        self.max_dependency_silence_s = max_dependency_silence_s
        self._clock = clock
        self._last = clock()
        self._seen: dict[str, float] = {}
        self._readiness: list[Callable[[], str | None]] = []

    def ready_when(self, condition: Callable[[], str | None]) -> None:
        """Add a readiness condition: it returns None when met, else why not. It runs on the HTTP thread,
        once per /readyz request, so it must be thread-safe and bounded in time."""
        self._readiness.append(condition)

    def beat(self) -> None:
        self._last = self._clock()

    def saw(self, dependency: str) -> None:
        self._seen[dependency] = self._clock()

    def problems(self) -> list[str]:
        now = self._clock()
        stalled = now - self._last > self.max_silence_s
        found = [f"poll loop stalled for {now - self._last:.1f}s"] if stalled else []
        found += [
            f"{name} unreachable for {now - seen:.1f}s"
            for name, seen in sorted(self._seen.items())
            if now - seen > self.max_dependency_silence_s
        ]
        return found

    def not_ready(self) -> list[str]:
        """Why /readyz should answer 503; empty when ready."""
        if not self._readiness:
            return ["starting: not consuming yet"]
        found = self.problems()
        for condition in self._readiness:
            try:
                why = condition()
            except Exception as exc:  # a failing check means not ready, never a crashed HTTP handler
                why = f"readiness check failed: {exc}"
            if why is not None:
                found.append(why)
        return found


def serve_metrics(
    registry: CollectorRegistry, heartbeat: Heartbeat, host: str, port: int
) -> ThreadingHTTPServer:
    """Start /metrics, /healthz (liveness) and /readyz (readiness) on a daemon thread; returns the server
    (to read its address, stop it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith(("/healthz", "/readyz")):
                check = heartbeat.problems if self.path.startswith("/healthz") else heartbeat.not_ready
                problems = check()
                body = ("; ".join(problems) if problems else "ok").encode() + b"\n"
                status, kind = (503 if problems else 200), "text/plain; charset=utf-8"
            else:
                body, status, kind = b"not found\n", 404, "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not operator news
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
