"""The confluent-kafka adapter's seek fallback on the real broker: when librdkafka refuses a seek, the
assignment is handed over again with explicit offsets, and every partition goes on exactly where it
should, the sought one from its new offset, the others without a gap or a repeat. (The daemon's own tests
run against both clients: test_daemon.py, test_hardening.py, test_readiness.py.)"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import KafkaError as CError
from confluent_kafka import KafkaException
from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from streammf.config import KafkaSettings
from streammf.stream.confluent_client import ConfluentConsumer, consumer_config


class _RefusesSeeks:
    """The real confluent_kafka.Consumer, except that its next `refuse` seeks fail as librdkafka's do on
    a partition it is not fetching yet."""

    def __init__(self, consumer: Any, refuse: int) -> None:
        self._consumer = consumer
        self.refuse = refuse
        self.assigns = 0

    def seek(self, partition: Any) -> None:
        if self.refuse:
            self.refuse -= 1
            raise KafkaException(CError(CError._STATE, "Failed to seek: Local: Erroneous state"))
        self._consumer.seek(partition)

    def assign(self, partitions: Any) -> None:
        self.assigns += 1
        self._consumer.assign(partitions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _Assigned(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.partitions: list[TopicPartition] = []

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.partitions = list(assigned)

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.partitions = []


def test_a_refused_seek_reassigns_and_every_partition_goes_on_where_it_should(
    kafka_bootstrap, make_topic, topic_name
):
    from kafka import KafkaProducer

    topic = make_topic(topic_name, 2)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for offset in range(200):
        for partition in (0, 1):
            producer.send(topic, value=f"{partition}:{offset}".encode(), partition=partition)
    producer.flush(timeout=30)
    producer.close()
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    settings = KafkaSettings(client="confluent", bootstrap_servers=kafka_bootstrap, topic=topic)
    consumer = ConfluentConsumer(consumer_config(settings, group_id=f"g-{topic_name}"))
    listener = _Assigned()
    seen: dict[TopicPartition, list[int]] = {p0: [], p1: []}

    def poll_until(done: Any, what: str) -> None:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {seen}"
            for tp, records in consumer.poll(timeout_ms=200, max_records=10).items():
                seen[tp] += [r.offset for r in records]

    try:
        consumer.subscribe([topic], listener=listener)
        poll_until(lambda: seen[p0] and seen[p1], "records of both partitions")
        refusing = _RefusesSeeks(consumer._consumer, refuse=1)
        consumer._consumer = refusing
        consumer.seek(p0, 150)
        assert refusing.assigns == 1, "the refused seek must fall back to assign() with explicit offsets"
        before = {tp: len(offsets) for tp, offsets in seen.items()}
        poll_until(lambda: seen[p0][-1:] == [199] and seen[p1][-1:] == [199], "both partitions' ends")
        settle = time.monotonic() + 3  # anything fetched again (a partition restarted) shows up by then
        poll_until(lambda: time.monotonic() > settle, "the end of the settling time")
    finally:
        consumer.close()
    assert seen[p0][before[p0] :] == list(range(150, 200))
    assert seen[p1] == list(range(200)), "the other partition skipped or repeated records"
