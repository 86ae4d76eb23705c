"""`streammf bench` at a small size on the real stack: it runs, prints its table and writes the JSON the
README's figures come from. No timing is asserted (shared, noisy machines): only that every figure is
there and is a measurement (positive, finite)."""

from __future__ import annotations

import json
import math

from click.testing import CliRunner

from streammf.cli import cli

FIELDS = (
    "mode", "events", "raw_consume_events_per_s", "daemon_events_per_s", "ratio_to_raw",
    "update_latency_p50_ms", "update_latency_p99_ms", "freshness_p99_ms", "redis_us_per_event",
    "kafka_client",
)  # fmt: skip


def test_bench_prints_a_table_and_writes_every_figure(kafka_bootstrap, redis_url, tmp_path, kafka_client):
    out = tmp_path / "bench.json"
    env = {
        "STREAMMF_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAMMF_REDIS__URL": redis_url,
        "STREAMMF_KAFKA__CLIENT": kafka_client,
    }
    args = ["bench", "--events", "3000", "--offered-rate", "1000", "--live-seconds", "2", "--json", str(out)]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    assert "raw consume/s" in result.output and "daemon/s" in result.output
    report = json.loads(out.read_text())
    assert [run["mode"] for run in report["runs"]] == ["explicit", "implicit"]
    for run in report["runs"]:
        assert set(FIELDS) <= set(run)
        assert run["events"] == 3000 and run["kafka_client"] == kafka_client
        for field in FIELDS[2:-1]:
            assert math.isfinite(run[field]) and run[field] > 0, (run["mode"], field, run[field])
