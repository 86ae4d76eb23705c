"""The confluent-kafka adapter's own logic, without a broker: records grouped as kafka-python's poll
returns them, confluent errors as kafka-python's, our settings as librdkafka properties, and the consumer
and producer against scripted stand-ins (the seek fallback, rebalance callbacks, commits, deliveries).
tests/integration runs the daemon against both clients on the real broker. Needs the confluent extra
(deploy/local/test installs it)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import KafkaError as CError
from confluent_kafka import TopicPartition as CPartition
from kafka import ConsumerRebalanceListener
from kafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotCoordinatorError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import SecretStr

from streammf.config import KafkaSettings
from streammf.stream.confluent_client import (
    PARTITIONS_MAX_AGE_S,
    ConfluentConsumer,
    ConfluentProducer,
    LibrdkafkaError,
    Record,
    consumer_config,
    group_records,
    kafka_error,
    producer_config,
)
from streammf.stream.consumer import _transient_kafka_error
from streammf.tools.replay import replay

T = "events"
P0, P1 = TopicPartition(T, 0), TopicPartition(T, 1)


def _message(partition: int, offset: int, value: bytes | None = b"{}", **extra: Any) -> Message:
    fields: dict[str, Any] = {"timestamp": (TIMESTAMP_CREATE_TIME, 1_700_000_000_000)} | extra
    return Message(topic=T, partition=partition, offset=offset, key=b"u", value=value, **fields)


# ------------------------------------------------------------------------------------ records


def test_records_are_grouped_by_partition_in_offset_order_with_kafka_pythons_attributes() -> None:
    messages = [
        _message(0, 10),
        _message(0, 11, headers=[("h", b"1")]),
        _message(1, 3, value=None, timestamp=(TIMESTAMP_NOT_AVAILABLE, 0)),
        _message(0, 12, timestamp=(TIMESTAMP_LOG_APPEND_TIME, 5)),
        _message(1, 4),
    ]
    polled = group_records(messages, on_error=pytest.fail)
    assert list(polled) == [P0, P1]
    assert all(isinstance(tp, TopicPartition) for tp in polled)  # kafka-python's, as the loop compares
    assert [r.offset for r in polled[P0]] == [10, 11, 12]
    assert [r.offset for r in polled[P1]] == [3, 4]
    first = polled[P0][0]
    assert first == Record(T, 0, 10, b"u", b"{}", 1_700_000_000_000, ())
    assert polled[P0][1].headers == [("h", b"1")]
    assert polled[P0][2].timestamp == 5  # broker time counts as well
    assert polled[P1][0].timestamp is None and polled[P1][0].value is None  # a null record stays null


def test_a_message_carrying_an_error_goes_to_on_error_and_not_into_the_records() -> None:
    errors: list[CError] = []
    messages = [_message(0, 1), Message(error=CError(CError._PARTITION_EOF)), _message(0, 2)]
    polled = group_records(messages, on_error=errors.append)
    assert [r.offset for r in polled[P0]] == [1, 2]
    assert [e.code() for e in errors] == [CError._PARTITION_EOF]


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("code", "expected", "transient"),
    [
        (CError._TIMED_OUT, KafkaTimeoutError, True),
        (CError._MSG_TIMED_OUT, KafkaTimeoutError, True),
        (CError._TRANSPORT, KafkaConnectionError, True),
        (CError._ALL_BROKERS_DOWN, KafkaConnectionError, True),
        (CError._UNKNOWN_TOPIC, UnknownTopicOrPartitionError, True),
        (CError.NOT_COORDINATOR, NotCoordinatorError, True),
        (CError.MSG_SIZE_TOO_LARGE, MessageSizeTooLargeError, False),  # the broker's, or librdkafka's
        (CError.TOPIC_AUTHORIZATION_FAILED, TopicAuthorizationFailedError, False),
        (CError._WAIT_COORD, LibrdkafkaError, True),
        (CError._MAX_POLL_EXCEEDED, LibrdkafkaError, True),
        (CError._INVALID_ARG, LibrdkafkaError, False),
        (CError._SSL, LibrdkafkaError, False),
    ],
)
def test_confluent_errors_become_kafka_pythons_and_the_loop_judges_them_the_same(
    code: int, expected: type[KafkaError], transient: bool
) -> None:
    for raised in (CError(code), KafkaException(CError(code))):
        error = kafka_error(raised)
        assert type(error) is expected
        assert isinstance(error, KafkaError)  # what the loop catches
        assert _transient_kafka_error(error) is transient


def test_a_librdkafka_error_marked_retriable_is_transient() -> None:
    error = kafka_error(CError(CError._FAIL, "flaky", retriable=True))
    assert isinstance(error, LibrdkafkaError) and _transient_kafka_error(error)
    assert error.code == CError._FAIL and "flaky" in str(error)


# ------------------------------------------------------------------------------------ config


def test_defaults_map_to_librdkafka_properties() -> None:
    config = consumer_config(KafkaSettings(), group_id="streammf")
    assert config["bootstrap.servers"] == "127.0.0.1:9092"
    assert config["client.id"] == "streammf"
    assert config["security.protocol"] == "plaintext"
    assert config["group.id"] == "streammf"
    assert config["enable.auto.commit"] is False
    assert config["auto.offset.reset"] == "earliest"
    assert (config["session.timeout.ms"], config["heartbeat.interval.ms"]) == (10000, 3333)
    assert config["reconnect.backoff.max.ms"] == 1000
    assert not any(key.startswith(("sasl.", "ssl.")) for key in config)
    producer = producer_config(KafkaSettings())
    assert producer["linger.ms"] == 5 and producer["acks"] == "all"
    # Keys on the partitions kafka-python and the Java client choose; no idempotence (see kafka_producer).
    assert producer["partitioner"] == "murmur2_random" and "enable.idempotence" not in producer
    assert not any(key.startswith(("group.", "session.")) for key in producer)


def test_a_consumer_without_a_group_gets_a_throwaway_group_id() -> None:
    first, second = (consumer_config(KafkaSettings(), group_id=None)["group.id"] for _ in range(2))
    assert first.startswith("streammf-unjoined-") and first != second


def test_security_settings_pass_through_with_the_secret_revealed() -> None:
    settings = KafkaSettings(
        bootstrap_servers="b1:9093, b2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="svc",
        sasl_plain_password=SecretStr("hunter2"),
        ssl_cafile="/etc/ca.pem",
        ssl_certfile="/etc/cert.pem",
        ssl_keyfile="/etc/key.pem",
    )
    for config in (consumer_config(settings, "g"), producer_config(settings)):
        assert config["bootstrap.servers"] == "b1:9093,b2:9093"
        assert config["security.protocol"] == "sasl_ssl"
        assert (config["sasl.mechanism"], config["sasl.username"]) == ("SCRAM-SHA-512", "svc")
        assert config["sasl.password"] == "hunter2"
        assert (
            config["ssl.ca.location"],
            config["ssl.certificate.location"],
            config["ssl.key.location"],
        ) == (
            "/etc/ca.pem",
            "/etc/cert.pem",
            "/etc/key.pem",
        )
    assert "hunter2" not in repr(settings)


def test_librdkafka_accepts_every_property() -> None:
    """librdkafka refuses an unknown property or value when the client is created (no broker needed)."""
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_plain_username="u",
        sasl_plain_password=SecretStr("p"),
    )
    consumer = Consumer(consumer_config(settings, "g"))
    consumer.close()
    Producer(producer_config(settings)).close()
    ConfluentConsumer(consumer_config(KafkaSettings(), None)).close()  # with our callbacks added
    ConfluentProducer(producer_config(KafkaSettings())).close(timeout=0)


# ------------------------------------------------------------------------------------ consumer


class FakeConsumer:
    """confluent_kafka.Consumer as far as the adapter calls it, scripted."""

    def __init__(self) -> None:
        self.batches: list[list[Message]] = []  # ready: what a consume gets without waiting
        self.arriving: list[Message] = []  # ready once a consume waits
        self.consumed: list[tuple[int, float]] = []
        self.callbacks: dict[str, Any] = {}
        self.refuse_seeks = 0  # that many seeks fail with _STATE
        self.refuse_assigns = 0
        self.seeks: list[tuple[int, int]] = []
        self.assigns: list[list[tuple[int, int]]] = []
        self.commits: list[list[tuple[int, int]]] = []
        self.watermarks: dict[int, tuple[int, int] | None] = {}
        self.committed_offsets: dict[int, int] = {}
        self.metadata_error: KafkaException | None = None
        self.metadata_calls = 0
        self.partitions = {0: None, 1: None}

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.consumed.append((num_messages, timeout))
        if timeout > 0 and self.arriving:
            self.batches.append(self.arriving)
            self.arriving = []
        if not self.batches:
            return []
        batch = self.batches[0][:num_messages]
        self.batches[0] = self.batches[0][num_messages:]
        if not self.batches[0]:
            self.batches.pop(0)
        return batch

    def seek(self, partition: CPartition) -> None:
        if self.refuse_seeks:
            self.refuse_seeks -= 1
            raise KafkaException(CError(CError._STATE, "Failed to seek: Local: Erroneous state"))
        self.seeks.append((partition.partition, partition.offset))

    def assign(self, partitions: list[CPartition]) -> None:
        if self.refuse_assigns:
            self.refuse_assigns -= 1
            raise KafkaException(CError(CError._STATE))
        self.assigns.append([(p.partition, p.offset) for p in partitions])

    def commit(self, offsets: list[CPartition], asynchronous: bool) -> None:
        assert asynchronous
        self.commits.append([(p.partition, p.offset) for p in offsets])

    def get_watermark_offsets(
        self, partition: CPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int] | None:
        return self.watermarks.get(partition.partition, (-1001, -1001))

    def committed(self, partitions: list[CPartition], timeout: float) -> list[CPartition]:
        return [
            CPartition(p.topic, p.partition, self.committed_offsets.get(p.partition, -1001))
            for p in partitions
        ]

    def list_topics(self, topic: str, timeout: float) -> Any:
        self.metadata_calls += 1
        if self.metadata_error is not None:
            raise self.metadata_error

        class Topic:
            partitions = self.partitions
            error = None

        class Metadata:
            def __init__(self) -> None:
                self.topics = {T: Topic()}

        return Metadata()

    def close(self) -> None:
        pass


class Listener(ConsumerRebalanceListener):
    def __init__(self, consumer: ConfluentConsumer) -> None:
        self.consumer = consumer
        self.calls: list[tuple[str, list[TopicPartition], frozenset[TopicPartition]]] = []

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.calls.append(("assigned", assigned, self.consumer.assignment()))

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.calls.append(("revoked", revoked, self.consumer.assignment()))


def _subscribed(fake: FakeConsumer) -> tuple[ConfluentConsumer, Listener]:
    consumer = ConfluentConsumer({}, consumer=fake)
    listener = Listener(consumer)
    consumer.subscribe([T], listener=listener)
    fake.callbacks["on_assign"](fake, [CPartition(T, 0), CPartition(T, 1)])
    return consumer, listener


def test_rebalance_callbacks_drive_the_listener_with_kafka_pythons_partitions() -> None:
    fake = FakeConsumer()
    consumer, listener = _subscribed(fake)
    assert listener.calls == [("assigned", [P0, P1], frozenset({P0, P1}))]
    fake.callbacks["on_revoke"](fake, [CPartition(T, 0), CPartition(T, 1)])
    # still assigned while the listener runs (as with kafka-python), gone after
    assert listener.calls[-1] == ("revoked", [P0, P1], frozenset({P0, P1}))
    assert consumer.assignment() == frozenset()
    fake.callbacks["on_assign"](fake, [CPartition(T, 1)])
    fake.callbacks["on_lost"](fake, [CPartition(T, 1)])  # a lost assignment is revoked too
    assert listener.calls[-1][:2] == ("revoked", [P1])
    assert consumer.assignment() == frozenset()


def test_poll_returns_what_is_there_without_waiting() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.batches = [[_message(0, 0), _message(1, 0), _message(0, 1)]]
    polled = consumer.poll(timeout_ms=200, max_records=2000)
    assert {tp: [r.offset for r in records] for tp, records in polled.items()} == {P0: [0, 1], P1: [0]}
    assert fake.consumed == [(2000, 0)]


def test_poll_with_nothing_there_waits_for_the_first_record_then_takes_what_came_with_it() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    assert consumer.poll(timeout_ms=200, max_records=50) == {}
    assert fake.consumed == [(50, 0), (1, 0.2)]  # never consume(50, 0.2): that waits for all 50
    fake.consumed.clear()
    fake.arriving = [_message(0, 0), _message(0, 1), _message(0, 2)]  # while a consume waits
    polled = consumer.poll(timeout_ms=200, max_records=50)
    assert [r.offset for r in polled[P0]] == [0, 1, 2]
    assert fake.consumed == [(50, 0), (1, 0.2), (49, 0)]


def test_a_record_level_error_raises_unless_transient() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.batches = [[Message(error=CError(CError._TRANSPORT)), _message(0, 0)]]
    assert [r.offset for r in consumer.poll(timeout_ms=0, max_records=10)[P0]] == [0]
    fake.batches = [[Message(error=CError(CError.TOPIC_AUTHORIZATION_FAILED))]]
    with pytest.raises(TopicAuthorizationFailedError):
        consumer.poll(timeout_ms=0, max_records=10)


def test_a_seek_librdkafka_refuses_falls_back_to_assigning_explicit_offsets() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.batches = [[_message(1, 40), _message(1, 41)]]
    consumer.poll(timeout_ms=0, max_records=10)  # partition 1 is at 42 now; partition 0 never consumed
    fake.refuse_seeks = 1
    consumer.seek(P0, 7)
    # The whole assignment again: partition 0 where it was sought, 1 where it was, nothing pending.
    assert fake.assigns == [[(0, 7), (1, 42)]]
    fake.batches = [[_message(0, 7)]]
    assert [r.offset for r in consumer.poll(timeout_ms=0, max_records=10)[P0]] == [7]


def test_a_seek_still_refused_stays_pending_its_records_are_dropped_and_it_is_retried() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.refuse_seeks, fake.refuse_assigns = 1, 1
    consumer.seek(P0, 7)
    assert fake.assigns == [] and fake.seeks == []
    # Retried before the next poll, refused again: records fetched from where partition 0 was before are
    # not returned, the other partition's are.
    fake.refuse_seeks, fake.refuse_assigns = 1, 1
    fake.batches = [[_message(0, 0), _message(0, 1), _message(1, 0)]]
    assert list(consumer.poll(timeout_ms=0, max_records=10)) == [P1]
    # Retried again: the seek goes through, and partition 0's records come from there.
    fake.batches = [[_message(0, 7)]]
    assert [r.offset for r in consumer.poll(timeout_ms=0, max_records=10)[P0]] == [7]
    assert fake.seeks == [(0, 7)]


def test_positions_of_an_earlier_assignment_are_forgotten_on_a_new_one() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.batches = [[_message(1, 40), _message(1, 41)]]
    consumer.poll(timeout_ms=0, max_records=10)
    both = [CPartition(T, 0), CPartition(T, 1)]
    fake.callbacks["on_revoke"](fake, both)
    fake.callbacks["on_assign"](fake, both)  # starts again from the committed offsets
    fake.refuse_seeks = 1
    consumer.seek(P0, 7)
    assert fake.assigns == [[(0, 7), (1, OFFSET_STORED)]]


def test_a_refused_retry_reassigns_from_the_tracked_positions() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.refuse_seeks, fake.refuse_assigns = 1, 1
    consumer.seek(P0, 7)
    fake.refuse_seeks = 1  # the retry before the poll is refused, its re-assign is not
    consumer.poll(timeout_ms=0, max_records=10)
    assert fake.assigns == [[(0, 7), (1, OFFSET_STORED)]]  # partition 1: never consumed nor sought


def test_a_pending_seek_succeeds_on_retry() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.refuse_seeks, fake.refuse_assigns = 1, 1
    consumer.seek_to_beginning(P1)
    fake.batches = [[_message(1, 500)]]
    assert consumer.poll(timeout_ms=0, max_records=10) == {P1: [_record(1, 500)]}
    assert fake.seeks == [(1, OFFSET_BEGINNING)]


def _record(partition: int, offset: int) -> Record:
    return group_records([_message(partition, offset)], pytest.fail)[TopicPartition(T, partition)][0]


def test_seeking_a_partition_not_assigned_is_an_error_like_kafka_pythons() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    with pytest.raises(IllegalStateError):
        consumer.seek(TopicPartition(T, 9), 0)


def test_records_of_partitions_revoked_meanwhile_are_not_returned() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.callbacks["on_revoke"](fake, [CPartition(T, 1)])
    fake.batches = [[_message(0, 0), _message(1, 0)]]
    assert list(consumer.poll(timeout_ms=0, max_records=10)) == [P0]


def test_commit_callbacks_get_the_offsets_or_kafka_pythons_error() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    seen: list[tuple[Any, Any]] = []
    consumer.commit_async({P0: OffsetAndMetadata(5, "", -1)}, callback=lambda o, r: seen.append((o, r)))
    consumer.commit_async({P1: OffsetAndMetadata(9, "", -1)}, callback=lambda o, r: seen.append((o, r)))
    assert fake.commits == [[(0, 5)], [(1, 9)]]
    on_commit = consumer._on_commit
    on_commit(None, [CPartition(T, 0, 5)])
    on_commit(CError(CError._WAIT_COORD), [CPartition(T, 1, 9)])
    assert seen[0] == ({P0: OffsetAndMetadata(5, "", -1)}, {P0: OffsetAndMetadata(5, "", -1)})
    assert isinstance(seen[1][1], LibrdkafkaError) and seen[1][1].retriable


def test_committed_offsets_watermarks_and_partitions() -> None:
    fake = FakeConsumer()
    consumer, _ = _subscribed(fake)
    fake.committed_offsets = {0: 12}
    assert consumer.committed(P0) == 12 and consumer.committed(P1) is None
    assert consumer.highwater(P0) is None  # nothing fetched yet
    fake.watermarks = {0: (0, 100), 1: (0, 7)}
    assert consumer.highwater(P0) == 100
    assert consumer.end_offsets([P0, P1], timeout_ms=1000) == {P0: 100, P1: 7}
    fake.watermarks = {0: None}  # confluent-kafka's answer on a timeout
    with pytest.raises(KafkaTimeoutError):
        consumer.end_offsets([P0], timeout_ms=1000)
    assert consumer.partitions_for_topic(T) == {0, 1}


def test_partitions_are_cached_and_a_stale_answer_beats_none_when_the_broker_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("streammf.stream.confluent_client.time.monotonic", lambda: now[0])
    fake = FakeConsumer()
    consumer = ConfluentConsumer({}, consumer=fake)
    assert consumer.partitions_for_topic(T) == {0, 1}
    assert consumer.partitions_for_topic(T) == {0, 1} and fake.metadata_calls == 1
    now[0] += PARTITIONS_MAX_AGE_S + 1
    fake.metadata_error = KafkaException(CError(CError._TRANSPORT))
    assert consumer.partitions_for_topic(T) == {0, 1} and fake.metadata_calls == 2
    assert consumer.partitions_for_topic(T) == {0, 1} and fake.metadata_calls == 2  # not asked every call
    assert consumer.partitions_for_topic("other") == set()  # never known: nothing


# ------------------------------------------------------------------------------------ producer


class FakeProducer:
    def __init__(self) -> None:
        self.queued: list[tuple[Any, ...]] = []
        self.fail_with: CError | None = None
        self.full = 0
        self.refuse: KafkaException | None = None
        self.left_after_flush = 0

    def produce(self, topic: str, value: Any, key: Any, headers: Any, on_delivery: Any) -> None:
        if self.refuse is not None:
            raise self.refuse
        if self.full:
            self.full -= 1
            raise BufferError("queue full")
        self.queued.append((topic, key, value, headers, on_delivery))

    def _deliver(self) -> None:
        for *_, on_delivery in self.queued:
            on_delivery(self.fail_with, None)
        self.queued.clear()

    def poll(self, timeout: float) -> int:
        if timeout > 0:
            self._deliver()
        return 0

    def flush(self, timeout: float) -> int:
        if self.left_after_flush:
            return self.left_after_flush
        self._deliver()
        return 0

    def purge(self) -> None:
        self.queued.clear()

    def close(self) -> bool:
        return True


def test_send_returns_a_future_that_raises_kafka_pythons_error_on_failure() -> None:
    fake = FakeProducer()
    producer = ConfluentProducer({}, producer=fake)
    ok = producer.send("dlq", key=b"k", value=None, headers=[("streammf.reason", b"schema")])
    assert fake.queued[0][:4] == ("dlq", b"k", None, [("streammf.reason", b"schema")])
    producer.flush(timeout=10)
    ok.get(timeout=10)
    fake.fail_with = CError(CError.MSG_SIZE_TOO_LARGE)
    failed = producer.send("dlq", value=b"x" * 10)
    with pytest.raises(MessageSizeTooLargeError):
        failed.get(timeout=10)  # waits through the producer's poll


def test_send_never_raises_and_a_full_queue_is_waited_out() -> None:
    fake = FakeProducer()
    producer = ConfluentProducer({}, producer=fake)
    fake.full = 2
    producer.send("dlq", value=b"v").get(timeout=5)
    fake.refuse = KafkaException(CError(CError.MSG_SIZE_TOO_LARGE))
    refused = producer.send("dlq", value=b"v")
    with pytest.raises(MessageSizeTooLargeError):
        refused.get(timeout=5)
    fake.refuse, fake.full = None, 10**9
    with pytest.raises(KafkaTimeoutError):
        ConfluentProducer({}, producer=fake, block_s=0.0).send("dlq", value=b"v").get(timeout=1)


def test_replay_counts_deliveries_and_failures_through_the_futures_callbacks() -> None:
    fake = FakeProducer()
    producer = ConfluentProducer({}, producer=fake)
    report = replay([(b"u1", b"{}"), (b"u2", b"{}")], producer, "t")
    assert (report.sent, report.failed) == (2, 0)
    fake.fail_with = CError(CError._MSG_TIMED_OUT)
    report = replay([(b"u1", b"{}")], producer, "t")
    assert (report.sent, report.failed) == (0, 1) and "KafkaTimeoutError" in (report.first_error or "")
    fake.fail_with, fake.refuse = None, KafkaException(CError(CError.MSG_SIZE_TOO_LARGE))
    report = replay([(b"u1", b"{}")], producer, "t")  # refused at once: its errback runs when added
    assert (report.sent, report.failed) == (0, 1) and "MessageSizeTooLarge" in (report.first_error or "")


def test_a_futures_callbacks_run_once_each() -> None:
    fake = FakeProducer()
    delivery = ConfluentProducer({}, producer=fake).send("t", value=b"v")
    seen: list[object] = []
    delivery.add_callback(seen.append)
    delivery.add_errback(lambda error: seen.append(("error", error)))
    assert seen == []
    fake.flush(timeout=1)
    delivery.add_callback(seen.append)  # added after the report: runs now
    fake.flush(timeout=1)
    assert seen == [None, None]


def test_a_callback_that_raises_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeProducer()
    delivery = ConfluentProducer({}, producer=fake).send("t", value=b"v")
    seen: list[object] = []
    delivery.add_callback(lambda _: 1 / 0).add_callback(seen.append)  # chained, as kafka-python's
    fake.flush(timeout=1)  # the delivery report runs the callbacks inside the producer's flush
    assert seen == [None]
    assert "a delivery callback raised" in caplog.text and "ZeroDivisionError" in caplog.text


def test_a_flush_that_leaves_records_behind_is_a_timeout() -> None:
    fake = FakeProducer()
    producer = ConfluentProducer({}, producer=fake)
    pending = producer.send("dlq", value=b"v")
    fake.left_after_flush = 1
    with pytest.raises(KafkaTimeoutError):
        producer.flush(timeout=0.01)
    fake.poll = lambda timeout: 0  # type: ignore[method-assign]  # never delivered
    with pytest.raises(KafkaTimeoutError):
        pending.get(timeout=0.05)
    producer.close(timeout=0.01)  # undelivered: purged, not waited for
    assert fake.queued == []


# ------------------------------------------------------------------------------------ the factory


def test_the_daemon_and_replay_build_the_configured_client() -> None:
    from streammf.stream.clients import kafka_consumer, kafka_producer, replay_producer

    settings = KafkaSettings(client="confluent")
    consumer = kafka_consumer(settings, group_id="g")
    producer, replaying = kafka_producer(settings), replay_producer(settings)  # librdkafka checks them
    try:
        assert isinstance(consumer, ConfluentConsumer)
        assert isinstance(producer, ConfluentProducer) and isinstance(replaying, ConfluentProducer)
    finally:
        consumer.close()
        producer.close(timeout=0)
        replaying.close(timeout=0)


def test_a_missing_confluent_kafka_is_named_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from streammf.cli import cli
    from streammf.stream.clients import KafkaClientMissingError, kafka_consumer

    monkeypatch.delitem(sys.modules, "streammf.stream.confluent_client")
    monkeypatch.delattr("streammf.stream.confluent_client")  # the package's attribute for it
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import fails as if not installed
    with pytest.raises(KafkaClientMissingError, match=r"pip install 'streammf\[confluent\]'"):
        kafka_consumer(KafkaSettings(client="confluent"), group_id="g")
    # streammf replay says so too, before it creates any topic (no broker is asked).
    args = ["replay", "--synthetic", "5", "--partitions", "2", "--no-progress"]
    result = CliRunner().invoke(cli, args, env={"STREAMMF_KAFKA__CLIENT": "confluent"})
    assert result.exit_code == 1 and "pip install 'streammf[confluent]'" in result.output, result.output
