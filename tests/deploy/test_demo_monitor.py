"""The demo's watcher: the figures it reads from /metrics and the PNG it writes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

from tests.deploy.tools import DEPLOY


def _monitor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_monitor", DEPLOY / "local" / "demo_monitor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quantile_bound_and_totals_read_prometheus_text_samples():
    monitor = _monitor()
    samples = {
        'h_bucket{le="0.01"}': 50.0,
        'h_bucket{le="0.1"}': 98.0,
        'h_bucket{le="1.0"}': 100.0,
        'h_bucket{le="+Inf"}': 100.0,
        'dead_total{reason="schema"}': 2.0,
        'dead_total{reason="oversized"}': 3.0,
    }
    assert monitor.quantile_bound(samples, "h", 0.5) == 0.01
    assert monitor.quantile_bound(samples, "h", 0.99) == 1.0
    assert math.isnan(monitor.quantile_bound({}, "h", 0.5))
    assert monitor.total(samples, "dead_total") == 5.0


def test_plot_writes_a_png_with_the_refreshes(tmp_path: Path):
    monitor = _monitor()
    timeline = monitor.Timeline([2.0, 4.0, 6.0], [0.9, 0.8, 0.75], [2500.0, 2800.0, 2700.0], [(5.0, 2)])
    path = monitor.plot(timeline, tmp_path / "demo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
