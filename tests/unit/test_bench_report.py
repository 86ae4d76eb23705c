"""`streammf bench`'s report of a sharded run: each server's share of the one-shard total, and the
per-server table (the figures themselves come from the integration test on the real cluster)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner

from streammf.cli import cli
from streammf.tools import bench
from streammf.tools.bench import BenchPlan, BenchRun, main_thread_cpu_us, sum_samples, table, with_shares

NODES = ("10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.3:7003")


def _run(mode: str, shards: int, by_node: dict[str, float]) -> BenchRun:
    return BenchRun(
        mode=mode, shards=shards, events=1000, partitions=1, replicas=1, kafka_client="kafka-python",
        raw_consume_events_per_s=1e5, daemon_events_per_s=1e4, ratio_to_raw=0.1,
        redis_us_per_event=sum(by_node.values()), redis_us_per_event_by_node=by_node,
        redis_share_of_single_by_node=None, offered_events_per_s=1e3, live_events=100,
        update_latency_p50_ms=1.0, update_latency_p99_ms=2.0, freshness_p99_ms=3.0, events_by_replica=[1100],
        cpu_us_per_event={"daemon": 20.0, "redis": 8.0, "kafka_broker": None}, cpu_cores=2,
        cpu_ceiling_events_per_s=None, sent_events_per_s=990.0, load_kafka_client="confluent",
    )  # fmt: skip


def test_redis_time_is_the_main_threads_cpu_or_the_processs_on_old_servers():
    """INFO cpu as redis-py parses it (seconds, floats): the main thread's user + system time in µs when the
    server reports it (Redis ≥ 6.2), else the whole process's."""
    cpu = {"used_cpu_sys": 9.5, "used_cpu_user": 20.25, "used_cpu_sys_children": 1.0,
           "used_cpu_sys_main_thread": 2.5, "used_cpu_user_main_thread": 12.125}  # fmt: skip
    assert main_thread_cpu_us(cpu) == 14_625_000.0
    old = {"used_cpu_sys": 9.5, "used_cpu_user": 20.25, "used_cpu_sys_children": 1.0}
    assert main_thread_cpu_us(old) == 29_750_000.0


def test_shares_are_of_the_same_modes_one_shard_total():
    runs = with_shares(
        [
            _run("explicit", 1, {NODES[0]: 0.0, NODES[1]: 30.0, NODES[2]: 0.0}),
            _run("explicit", 3, {NODES[0]: 12.0, NODES[1]: 9.0, NODES[2]: 15.0}),
            _run("implicit", 1, {NODES[0]: 40.0, NODES[1]: 0.0, NODES[2]: 0.0}),
            _run("implicit", 3, {NODES[0]: 10.0, NODES[1]: 14.0, NODES[2]: 16.0}),
        ]
    )
    shares = [run.redis_share_of_single_by_node for run in runs]
    assert shares[0] == {NODES[0]: 0.0, NODES[1]: 1.0, NODES[2]: 0.0}
    assert shares[1] is not None and math.isclose(shares[1][NODES[2]], 0.5)
    assert shares[3] == {NODES[0]: 0.25, NODES[1]: 0.35, NODES[2]: 0.4}


def test_no_shares_without_a_one_shard_and_a_sharded_run_of_the_mode():
    alone = with_shares([_run("explicit", 1, {NODES[0]: 30.0}), _run("implicit", 3, {NODES[0]: 30.0})])
    assert [run.redis_share_of_single_by_node for run in alone] == [None, None]


def test_the_table_gives_each_server_a_column_with_its_share():
    runs = with_shares(
        [
            _run("explicit", 1, {NODES[0]: 0.0, NODES[1]: 30.0, NODES[2]: 0.0}),
            _run("explicit", 3, {NODES[0]: 12.0, NODES[1]: 9.0, NODES[2]: 15.0}),
        ]
    )
    lines = table(runs)
    title = lines.index("") + 1
    assert lines[title].startswith("redis us/event on each server")
    assert lines[title + 1].split() == ["mode", "shards", *NODES, "total"]
    assert lines[title + 2].split() == [
        "explicit",
        "1",
        "0.0",
        "(0.00)",
        "30.0",
        "(1.00)",
        "0.0",
        "(0.00)",
        "30.0",
    ]
    assert lines[title + 3].split() == [
        "explicit",
        "3",
        "12.0",
        "(0.40)",
        "9.0",
        "(0.30)",
        "15.0",
        "(0.50)",
        "36.0",
    ]


def test_one_server_and_one_shard_print_the_main_table_and_the_cpu_table():
    run = replace(
        _run("explicit", 1, {NODES[0]: 30.0}),
        cpu_us_per_event={"daemon": 25.0, "redis": 10.0, "kafka_broker": 5.0},
        cpu_ceiling_events_per_s=50_000.0,
        learner_cpu_us_per_event=15.0,
    )
    lines = table(with_shares([run]))
    assert len(lines) == 6 and lines[0].split()[:2] == ["mode", "shards"]
    assert lines[3].startswith("CPU us/event") and lines[4].split()[:4] == [
        "mode",
        "shards",
        "replicas",
        "daemon",
    ]
    # The learner's process is part of the daemon's figure, not added to the total.
    assert lines[5].split() == ["explicit", "1", "1", "25.0", "15.0", "5.0", "10.0", "40.0", "2", "50,000",
                                "10,000"]  # fmt: skip
    unknown = table([_run("explicit", 1, {NODES[0]: 30.0})])[-1].split()
    # No learner process measured, no local broker: no ceiling; the total is what is known.
    assert unknown == ["explicit", "1", "1", "20.0", "n/a", "n/a", "8.0", "28.0", "2", "n/a", "10,000"]


def test_the_ceiling_is_the_cores_over_the_cpu_per_event_and_unknown_without_every_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "_cores", lambda: 2)
    assert bench._ceiling({"daemon": 25.0, "redis": 10.0, "kafka_broker": 5.0}) == 50_000.0
    assert bench._ceiling({"daemon": 25.0, "redis": 10.0, "kafka_broker": None}) is None


def test_a_process_cpu_time_is_read_from_proc_and_grows_with_work() -> None:
    before = bench._process_cpu_s(os.getpid())
    assert before is not None
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = bench._process_cpu_s(os.getpid())
    assert after is not None and after - before >= 0.1
    assert bench._process_cpu_s(2**22 + 1) is None  # beyond pid_max: no such process


def test_a_plan_with_more_replicas_than_partitions_is_refused():
    with pytest.raises(ValueError, match="2 replicas need at least as many partitions"):
        BenchPlan(partitions=1, replicas=2)
    assert BenchPlan(partitions=4, replicas=2).replicas == 2


def test_replicas_histograms_add_up_bucket_by_bucket():
    a = {'lat_bucket{le="0.1"}': 2.0, 'lat_bucket{le="+Inf"}': 5.0, "applied_total": 5.0}
    b = {'lat_bucket{le="0.1"}': 1.0, 'lat_bucket{le="+Inf"}': 1.0, "applied_total": 1.0, "only_b": 7.0}
    assert sum_samples([a, b]) == {
        'lat_bucket{le="0.1"}': 3.0, 'lat_bucket{le="+Inf"}': 6.0, "applied_total": 6.0, "only_b": 7.0,
    }  # fmt: skip


def test_the_cli_refuses_more_replicas_than_partitions_before_touching_any_service():
    result = CliRunner().invoke(cli, ["bench", "--replicas", "3", "--partitions", "2"])
    assert result.exit_code == 2 and "3 replicas need at least as many partitions" in result.output
