"""`streammf bench` at a small size on the real stack: it runs, prints its table and writes the JSON the
README's figures come from. No timing is asserted (shared, noisy machines): only that every figure is
there and is a measurement (positive, finite)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from streammf.cli import cli
from streammf.tools import bench

FIELDS = (
    "mode", "events", "raw_consume_events_per_s", "daemon_events_per_s", "ratio_to_raw",
    "update_latency_p50_ms", "update_latency_p99_ms", "freshness_p99_ms", "redis_us_per_event",
    "kafka_client", "shards", "redis_us_per_event_by_node",
)  # fmt: skip


def _bench(env: dict[str, str], out: Path, *args: str) -> tuple[Result, dict[str, Any]]:
    """`streammf bench` at CI size (2 s live at 1,000 events/s unless `args` say otherwise): its CLI
    result, which must succeed, and the JSON it wrote."""
    sized = ["--offered-rate", "1000", "--live-seconds", "2", *args, "--json", str(out)]
    result = CliRunner().invoke(cli, ["bench", *sized], env=env)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_bench_prints_a_table_and_writes_every_figure(kafka_bootstrap, redis_url, tmp_path, kafka_client):
    env = {
        "STREAMMF_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAMMF_REDIS__URL": redis_url,
        "STREAMMF_KAFKA__CLIENT": kafka_client,
    }
    result, report = _bench(env, tmp_path / "bench.json", "--events", "3000")
    assert "raw consume/s" in result.output and "daemon/s" in result.output
    assert [run["mode"] for run in report["runs"]] == ["explicit", "implicit"]
    for run in report["runs"]:
        assert set(FIELDS) <= set(run)
        assert run["events"] == 3000 and run["kafka_client"] == kafka_client
        assert run["shards"] == 1 and len(run["redis_us_per_event_by_node"]) == 1
        assert run["redis_share_of_single_by_node"] is None
        for field in FIELDS[2:-3]:
            assert math.isfinite(run[field]) and run[field] > 0, (run["mode"], field, run[field])
        cpu = run["cpu_us_per_event"]
        assert cpu["daemon"] > 0 and cpu["redis"] > 0, cpu
        # The learner's process is the daemon's child: its time is counted, and is part of the daemon's.
        assert 0 < run["learner_cpu_us_per_event"] < cpu["daemon"], run["learner_cpu_us_per_event"]
        # The local stack's broker runs here; one given by address may run elsewhere (then: unknown).
        assert cpu["kafka_broker"] is None or cpu["kafka_broker"] > 0, cpu
        assert (run["cpu_ceiling_events_per_s"] is None) == (cpu["kafka_broker"] is None)
        # The live load as the replay sent it: paced, so never above the rate offered (1,000/s here).
        assert 0 < run["sent_events_per_s"] <= 1000 * 1.01, run["sent_events_per_s"]
        assert run["load_kafka_client"] in ("kafka-python", "confluent")
        assert isinstance(run["redis_aof_rewrites_live"], int) and run["redis_aof_rewrites_live"] >= 0
    assert "CPU us/event" in result.output and "sent/s" in result.output
    assert "AOF rewrites live" in result.output


def test_aof_rewrites_are_counted_on_the_real_server(redis_client):
    """The live phase's rewrite count is the difference of `INFO persistence` counts: one BGREWRITEAOF
    shows as one more (the local stack's Redis keeps an append-only file)."""
    if redis_client.info("persistence").get("aof_enabled") != 1:
        raise AssertionError("this test needs a Redis with appendonly yes (the local stack's)")
    _wait_no_rewrite(redis_client)
    before = bench._aof_rewrites(redis_client)
    redis_client.bgrewriteaof()
    _wait_no_rewrite(redis_client)
    assert bench._aof_rewrites(redis_client) == before + 1
    # One running when the live phase begins counts as the live phase's own.
    redis_client.bgrewriteaof()
    if redis_client.info("persistence")["aof_rewrite_in_progress"]:
        assert bench._aof_rewrites(redis_client, running_as_new=True) == before + 1
    _wait_no_rewrite(redis_client)
    assert bench._aof_rewrites(redis_client, running_as_new=True) == before + 2


def _wait_no_rewrite(client: Any) -> None:
    deadline = time.monotonic() + 60
    while True:
        info = client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        assert time.monotonic() < deadline, "an AOF rewrite did not finish within 60 s"
        time.sleep(0.05)


def test_bench_with_shards_on_a_cluster_gives_each_primary_its_figure(
    kafka_bootstrap, redis_cluster_url, redis_cluster_client, tmp_path
):
    """--shards 3 on the three-primary cluster: a 1-shard reference run, then the 3-shard run; each run
    has Redis time per event on each primary, summing to its total, and the 3-shard run has every primary
    busy and its share of the reference's total. No key of either model is left on any primary."""
    env = {"STREAMMF_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "STREAMMF_REDIS__URL": redis_cluster_url}
    keys_before = set(redis_cluster_client.scan_iter(match="streammf:{bench-*", count=1000))
    result, report = _bench(
        env, tmp_path / "bench.json", "--events", "3000", "--mode", "explicit", "--shards", "3"
    )
    left = set(redis_cluster_client.scan_iter(match="streammf:{bench-*", count=1000)) - keys_before
    assert not left, f"the bench left keys of its models: {sorted(left)[:5]}"
    assert report["plan"]["shards"] == 3
    assert [(run["mode"], run["shards"]) for run in report["runs"]] == [("explicit", 1), ("explicit", 3)]
    reference, sharded = report["runs"]
    primaries = set(sharded["redis_us_per_event_by_node"])
    assert len(primaries) == 3 and set(reference["redis_us_per_event_by_node"]) == primaries
    for run in report["runs"]:
        by_node = run["redis_us_per_event_by_node"]
        assert math.isclose(sum(by_node.values()), run["redis_us_per_event"], rel_tol=1e-9)
        shares = run["redis_share_of_single_by_node"]
        assert set(shares) == primaries
        for node in primaries:
            assert math.isclose(shares[node], by_node[node] / reference["redis_us_per_event"], rel_tol=1e-9)
    assert all(us > 0 for us in sharded["redis_us_per_event_by_node"].values()), sharded
    assert max(reference["redis_us_per_event_by_node"].values()) > 0
    lines = result.output.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("redis us/event on each server"))
    header, *rows = lines[title + 1 : title + 4]
    assert header.split()[:2] == ["mode", "shards"] and header.split()[-1] == "total"
    assert all(node in header for node in primaries)
    assert [row.split()[:2] for row in rows[:2]] == [["explicit", "1"], ["explicit", "3"]]


def test_bench_with_replicas_shares_the_partitions_in_one_group(kafka_bootstrap, redis_url, tmp_path):
    """--replicas 2: two daemons in one consumer group, a topic of two partitions (the default: one per
    replica); every event applied once between them, the latency histograms of both merged."""
    env = {"STREAMMF_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "STREAMMF_REDIS__URL": redis_url}
    result, report = _bench(
        env, tmp_path / "bench.json", "--events", "4000", "--live-seconds", "3", "--mode", "explicit",
        "--replicas", "2",
    )  # fmt: skip
    assert report["plan"]["replicas"] == 2 and report["plan"]["partitions"] == 2
    (run,) = report["runs"]
    assert run["replicas"] == 2 and run["partitions"] == 2
    assert len(run["events_by_replica"]) == 2
    assert sum(run["events_by_replica"]) == run["events"] + run["live_events"]  # each event applied once
    for field in FIELDS[2:-3]:
        assert math.isfinite(run[field]) and run[field] > 0, (field, run[field])
    header = next(line.split() for line in result.output.splitlines() if line.split()[:1] == ["mode"])
    assert header[:3] == ["mode", "shards", "replicas"]
