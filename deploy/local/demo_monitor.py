"""The demo's watcher: scrapes the daemon's /metrics every 2 s while the stream runs, prints what changes
(windowed prequential RMSE, events/s, model version, each published refresh with the writers' pause), then
dead letters, freshness, and a PNG of windowed RMSE and events/s over time with the refreshes marked.

    python deploy/local/demo_monitor.py EVENTS BASELINE_RMSE PORT PLOT.png
"""

from __future__ import annotations

import math
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from streammf.tools.bench import parse_samples

TICK_S = 1.0
WAIT_FOR_REFRESH_S = 90.0  # after the stream: a refresh that started must get to publish


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return parse_samples(text)


def total(samples: dict[str, float], prefix: str) -> float:
    """Sum over every label set of a metric (e.g. all `reason`s of streammf_events_invalid_total)."""
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


@dataclass
class Timeline:
    seconds: list[float] = field(default_factory=list)
    window_rmse: list[float] = field(default_factory=list)
    events_per_s: list[float] = field(default_factory=list)
    refreshes: list[tuple[float, int]] = field(default_factory=list)  # (seconds, new version)


def quantile_bound(samples: dict[str, float], histogram: str, q: float) -> float:
    """Upper bound of the bucket holding the q-quantile (what histogram_quantile interpolates in)."""
    prefix = histogram + '_bucket{le="'
    buckets = sorted((float(k[len(prefix) : -2]), v) for k, v in samples.items() if k.startswith(prefix))
    count = buckets[-1][1] if buckets else 0
    return next((le for le, n in buckets if n >= q * count), math.nan) if count else math.nan


def milliseconds(seconds: float) -> str:
    return "over 1 day" if seconds == math.inf else f"<= {seconds * 1000:g} ms"


def watch(target: int, baseline: float, port: int) -> tuple[Timeline, dict[str, float]]:
    timeline = Timeline()
    print(
        f"{'time':>5} {'applied':>8} {'events/s':>9} {'window RMSE':>12} {'overall RMSE':>13} {'version':>8}"
    )
    started = time.monotonic()
    last: dict[str, float] = {}
    done_at: float | None = None
    deadline = started + 600
    while time.monotonic() < deadline:
        time.sleep(TICK_S)
        now = scrape(port)
        if not now:
            continue
        elapsed = time.monotonic() - started
        if not last:  # the first scrape is the reference the first window is measured from
            last = now
            continue
        previous = last
        applied = now.get("streammf_events_applied_total", 0.0)
        dn = now["streammf_prequential_predictions_total"] - previous.get(
            "streammf_prequential_predictions_total", 0
        )
        dse = now["streammf_prequential_squared_error_total"] - previous.get(
            "streammf_prequential_squared_error_total", 0
        )
        rate = (applied - previous.get("streammf_events_applied_total", 0.0)) / TICK_S
        version = int(now.get("streammf_model_version", 0))
        published_key = 'streammf_refreshes_total{outcome="published"}'
        # A refresh, not the model's first batch (which moves the version from 0, "no model yet", to 1).
        if now.get(published_key, 0) > previous.get(published_key, 0):
            was = int(previous.get("streammf_model_version", 0))
            took = now["streammf_refresh_seconds_sum"] - previous.get("streammf_refresh_seconds_sum", 0)
            paused = now["streammf_refresh_pause_seconds_sum"] - previous.get(
                "streammf_refresh_pause_seconds_sum", 0
            )
            print(
                f"      refresh published: model version {was} -> {version} "
                f"(WALS {took:.1f} s, writers paused {paused * 1000:.1f} ms)"
            )
            timeline.refreshes.append((elapsed, version))
        if dn > 0:
            window = math.sqrt(dse / dn)
            overall = math.sqrt(
                now["streammf_prequential_squared_error_total"]
                / now["streammf_prequential_predictions_total"]
            )
            print(
                f"{elapsed:5.0f} {applied:8.0f} {rate:9.0f} {window:12.4f} {overall:13.4f} {version:8d}",
                flush=True,
            )
            timeline.seconds.append(elapsed)
            timeline.window_rmse.append(window)
            timeline.events_per_s.append(rate)
        last = now
        handled = applied + total(now, "streammf_events_dead_lettered_total")
        published = now.get('streammf_refreshes_total{outcome="published"}', 0)
        if handled >= target and done_at is None:
            done_at = time.monotonic()
        if done_at is not None and (published >= 1 or time.monotonic() - done_at > WAIT_FOR_REFRESH_S):
            break
    if last and last.get("streammf_prequential_predictions_total"):
        rmse = math.sqrt(
            last["streammf_prequential_squared_error_total"] / last["streammf_prequential_predictions_total"]
        )
        print(
            f"prequential RMSE {rmse:.4f} vs {baseline:.4f} for the mean rating: "
            f"{100 * (1 - rmse / baseline):.0f}% lower, every prediction made before learning its event"
        )
    return timeline, last


def report(last: dict[str, float]) -> None:
    published = last.get('streammf_refreshes_total{outcome="published"}', 0)
    count = last.get("streammf_refresh_pause_seconds_count", 0)
    pause = last.get("streammf_refresh_pause_seconds_sum", 0)
    print(
        f"refreshes published: {published:.0f}; writers paused {pause * 1000:.1f} ms in total over "
        f"{count:.0f} hand-over(s), the only time the stream waits for a refresh"
    )
    reasons = {
        k.split('reason="')[1].rstrip('"}'): v
        for k, v in last.items()
        if k.startswith("streammf_events_invalid_total{")
    }
    dead = total(last, "streammf_events_dead_lettered_total")
    why = ", ".join(f"{reason}: {n:.0f}" for reason, n in sorted(reasons.items()) if n) or "none"
    print(f"dead letters: {dead:.0f} records sent to the .dlq topic ({why})")
    print(
        f"freshness (record in Kafka -> effect in Redis): "
        f"p50 {milliseconds(quantile_bound(last, 'streammf_freshness_seconds', 0.5))}, "
        f"p99 {milliseconds(quantile_bound(last, 'streammf_freshness_seconds', 0.99))}"
    )


def plot(timeline: Timeline, path: Path) -> Path:
    """Windowed RMSE (left axis) and events/s (right axis) against time, a dashed line per refresh."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, rmse_axis = plt.subplots(figsize=(9, 4.5), dpi=100)
    rmse_axis.plot(timeline.seconds, timeline.window_rmse, color="tab:blue", marker=".", label="window RMSE")
    rmse_axis.set_xlabel("seconds since the stream started")
    rmse_axis.set_ylabel(f"prequential RMSE ({TICK_S:g} s window)", color="tab:blue")
    rate_axis = rmse_axis.twinx()
    rate_axis.plot(timeline.seconds, timeline.events_per_s, color="tab:green", alpha=0.6, label="events/s")
    rate_axis.set_ylabel("events applied per second", color="tab:green")
    for seconds, version in timeline.refreshes:
        rmse_axis.axvline(seconds, color="tab:orange", linestyle="--")
        rmse_axis.annotate(
            f"v{version}",
            (seconds, 1.0),
            xycoords=("data", "axes fraction"),
            color="tab:orange",
            ha="left",
            va="top",
        )
    rmse_axis.set_title("streammf demo: learning while streaming (dashed: WALS refresh published)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def main() -> int:
    target, baseline, port, png = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    timeline, last = watch(target, baseline, port)
    if not last:
        print("demo: the daemon never answered on its metrics port", file=sys.stderr)
        return 1
    report(last)
    print(f"plot of windowed RMSE and events/s with the refreshes marked: {plot(timeline, png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
