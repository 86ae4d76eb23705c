"""Replay against the real broker: everything sent arrives, each user on one partition in time order; a
MovieLens file through the `replay` command; rate pacing; delivery errors counted, not raised."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from streammf.cli.stream import generate, replay_command
from streammf.config import KafkaSettings, Settings
from streammf.stream.clients import replay_producer
from streammf.stream.events import Event, Invalid, decode
from streammf.tools.generate import SyntheticStream
from streammf.tools.replay import ensure_topic, replay

MAX_BYTES = Settings().kafka.max_record_bytes


def _consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list[ConsumerRecord]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-replay-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(received) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
        # A short extra poll: anything beyond `expected` would be a duplicate.
        for records in consumer.poll(timeout_ms=500).values():
            received.extend(records)
    finally:
        consumer.close()
    return received


def _assert_users_ordered_within_one_partition(received: list[ConsumerRecord]) -> dict[bytes, set[int]]:
    partitions_of_user: dict[bytes, set[int]] = defaultdict(set)
    stamps_of_user: dict[bytes, list[float]] = defaultdict(list)
    for record in sorted(received, key=lambda r: (r.partition, r.offset)):
        event = decode(record.value, MAX_BYTES)
        assert isinstance(event, Event)
        assert record.key == event.user_id.encode()
        partitions_of_user[record.key].add(record.partition)
        assert event.timestamp is not None
        stamps_of_user[record.key].append(event.timestamp)
    assert all(len(partitions) == 1 for partitions in partitions_of_user.values()), "a user spans partitions"
    for user, stamps in stamps_of_user.items():
        assert stamps == sorted(stamps), f"{user!r}: events out of time order"
    return partitions_of_user


def _producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10)


@pytest.fixture
def created_topics(kafka_admin: KafkaAdminClient) -> Iterator[list[str]]:
    """Topic names a test lets the code under test create; deleted afterwards (best effort)."""
    names: list[str] = []
    yield names
    if names:
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics(names)


def _cli(bootstrap: str, client: str = "kafka-python") -> click.Group:
    @click.group()
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap, client=client))

    group.add_command(generate)
    group.add_command(replay_command)
    return group


def test_synthetic_replay_arrives_complete_and_per_user_ordered(
    kafka_bootstrap, make_topic, topic_name, kafka_client
):
    topic = make_topic(topic_name, 4)
    records = list(SyntheticStream("explicit", n_users=300, n_items=200, seed=21).records(5000))
    producer = replay_producer(KafkaSettings(bootstrap_servers=kafka_bootstrap, client=kafka_client))
    try:
        report = replay(records, producer, topic, rate=None, progress=False, total=len(records))
    finally:
        producer.close()
    assert (report.sent, report.failed) == (5000, 0)
    assert report.seconds > 0 and report.events_per_s > 0

    received = _consume(kafka_bootstrap, topic, len(records))
    assert len(received) == len(records)
    assert sorted((r.key, r.value) for r in received) == sorted(records)
    partitions_of_user = _assert_users_ordered_within_one_partition(received)
    assert set().union(*partitions_of_user.values()) == {0, 1, 2, 3}


def test_both_clients_put_a_key_on_the_same_partition(kafka_bootstrap, make_topic, topic_name):
    """A user's events share one partition whichever client produced them (and Kafka's Java client: murmur2;
    librdkafka's default would hash them elsewhere)."""
    topic = make_topic(topic_name, 4)
    records = [(f"u{n}".encode(), b"{}") for n in range(200)]
    for client in ("kafka-python", "confluent"):
        producer = replay_producer(KafkaSettings(bootstrap_servers=kafka_bootstrap, client=client))
        try:
            assert replay(records, producer, topic).sent == len(records)
        finally:
            producer.close(timeout=30)
    partitions: dict[bytes, set[int]] = {}
    for record in _consume(kafka_bootstrap, topic, 2 * len(records)):
        partitions.setdefault(record.key, set()).add(record.partition)
    assert len(partitions) == len(records) and all(len(p) == 1 for p in partitions.values())
    assert len(set().union(*partitions.values())) == 4


def test_replay_command_sends_a_movielens_file_in_time_order(
    kafka_bootstrap, topic_name, created_topics, tmp_path, kafka_client
):
    # u.data layout: user, item, rating, time; deliberately not in time order.
    rows = [
        (196, 242, 3, 881250949),
        (186, 302, 3, 891717742),
        (22, 377, 1, 878887116),
        (196, 51, 2, 881250940),
    ]
    rows += [(user, 1000 + n, 1 + n % 5, 880000000 + n) for n, user in enumerate([7, 8, 9, 7, 8, 9, 7] * 5)]
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    created_topics.append(topic_name)

    args = ["replay", str(path), "--topic", topic_name, "--partitions", "3", "--no-progress"]
    result = CliRunner().invoke(_cli(kafka_bootstrap, kafka_client), args)
    assert result.exit_code == 0, result.output
    assert f"sent {len(rows)} records to {topic_name}" in result.output

    received = _consume(kafka_bootstrap, topic_name, len(rows))
    assert len(received) == len(rows)
    _assert_users_ordered_within_one_partition(received)
    events = {(e.user_id, e.item_id): e for e in (decode(r.value, MAX_BYTES) for r in received)}
    assert events["196", "242"] == Event(
        user_id="196", item_id="242", value=3.0, timestamp=881250949.0, event_type="rating"
    )
    assert {e.value for e in events.values()} <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_replay_command_synthetic_with_poison_sends_bad_records_too(kafka_bootstrap, make_topic, topic_name):
    topic = make_topic(topic_name, 2)
    args = ["replay", "--synthetic", "400", "--poison-rate", "0.25", "--users", "50", "--items", "40"]
    result = CliRunner().invoke(_cli(kafka_bootstrap), [*args, "--topic", topic, "--no-progress"])
    assert result.exit_code == 0, result.output

    received = _consume(kafka_bootstrap, topic, 400)
    assert len(received) == 400
    invalid = [decode(r.value, MAX_BYTES) for r in received]
    assert 50 < sum(isinstance(d, Invalid) for d in invalid) < 150


def test_generate_then_replay_a_jsonl_file(kafka_bootstrap, make_topic, topic_name, tmp_path):
    topic = make_topic(topic_name, 2)
    path = tmp_path / "events.jsonl"
    cli = _cli(kafka_bootstrap)
    generated = CliRunner().invoke(cli, ["generate", "-n", "250", "--seed", "4", "-o", str(path)])
    assert generated.exit_code == 0, generated.output
    result = CliRunner().invoke(cli, ["replay", str(path), "--topic", topic, "--no-progress"])
    assert result.exit_code == 0, result.output

    received = _consume(kafka_bootstrap, topic, 250)
    assert sorted(r.value for r in received) == sorted(path.read_bytes().splitlines())
    _assert_users_ordered_within_one_partition(received)


def test_replay_command_needs_exactly_one_source(kafka_bootstrap, tmp_path):
    cli = _cli(kafka_bootstrap)
    assert CliRunner().invoke(cli, ["replay"]).exit_code == 2
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n")
    assert CliRunner().invoke(cli, ["replay", str(path), "--synthetic", "5"]).exit_code == 2


def test_rate_paces_the_replay(kafka_bootstrap, make_topic, topic_name):
    topic = make_topic(topic_name, 1)
    records = list(SyntheticStream("implicit", 50, 40, seed=1).records(500))
    producer = _producer(kafka_bootstrap)
    try:
        report = replay(records, producer, topic, rate=2000.0, progress=False)
    finally:
        producer.close()
    assert report.sent == 500
    # 499 events after the first at 2,000/s take 0.25 s; a lower bound only (slow machines take longer).
    assert report.seconds >= 0.2


def test_broker_rejections_are_counted_not_raised(kafka_bootstrap, kafka_admin, topic_name, created_topics):
    # The topic accepts only small batches; the producer (1 MB limit) sends a larger record anyway.
    kafka_admin.create_topics(
        {
            topic_name: {
                "num_partitions": 1,
                "replication_factor": 1,
                "configs": {"max.message.bytes": "2000"},
            }
        },
        wait_for_metadata=True,
    )
    created_topics.append(topic_name)
    records = [(b"u1", b'{"user_id":"u1","item_id":"i1"}'), (b"u2", b"x" * 50_000)]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, retries=0)
    try:
        report = replay(records, producer, topic_name)
    finally:
        producer.close()
    assert (report.sent, report.failed) == (1, 1)
    assert report.first_error is not None


def test_ensure_topic_creates_once_and_reports_existing_partitions(
    kafka_bootstrap, kafka_admin, topic_name, created_topics
):
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    created_topics.append(topic_name)
    assert ensure_topic(settings, topic_name, 3) == 3
    assert ensure_topic(settings, topic_name, 5) == 3
    (described,) = kafka_admin.describe_topics([topic_name])
    assert len(described["partitions"]) == 3


def test_replay_of_a_missing_file_is_a_usage_error(kafka_bootstrap):
    result = CliRunner().invoke(_cli(kafka_bootstrap), ["replay", str(Path("/nonexistent/u.data"))])
    assert result.exit_code == 2
