"""confluent-kafka (librdkafka) behind the part of kafka-python's client interface the loop uses.

`STREAMMF_KAFKA__CLIENT=confluent` (with `pip install 'streammf[confluent]'`) swaps kafka-python's
`KafkaConsumer`/`KafkaProducer` for `ConfluentConsumer`/`ConfluentProducer`. The loop does not know which
one it drives: they take and return kafka-python's `TopicPartition`, records with the attributes of
kafka-python's (`topic partition offset key value timestamp headers`), and raise kafka-python's
`KafkaError` types (`kafka_error`), so the loop's error handling (`retriable` or a timeout: back off and
try again; anything else: give up) is the same for both. librdkafka fetches and parses records on its
own threads, in C; what is left for Python is one small tuple per record.

Differences that matter, and what is done about them:

- `Consumer.consume(n, timeout)` waits the whole timeout unless `n` records arrive; kafka-python's `poll`
  returns as soon as it has any. `poll` takes what is there without waiting, and only when nothing is
  there waits for the first record, then takes what arrived with it: the latency of kafka-python's poll,
  batches as large as the backlog allows.
- A rebalance runs the subscription's `on_assign`/`on_revoke`/`on_lost` inside `consume`, on the loop's
  thread, like kafka-python's listener inside `poll`; they drive the same `ConsumerRebalanceListener`.
  `assignment()` is this object's copy of what those callbacks said, so readiness checks may read it
  from another thread.
- `seek` on a partition librdkafka is not fetching yet (an assignment still being applied) can fail with
  `_STATE`. Then the whole assignment is handed to `assign()` again with explicit offsets: the sought
  one, and for every other partition the position this object tracked (the offset after the last record
  it returned, or the last one sought). Should that fail too, the seek stays pending and is retried
  before each `consume`; records of a partition whose seek is pending are dropped, never returned.
- Errors not tied to a record (a broker going away) come to `error_cb`; librdkafka retries them itself,
  as kafka-python does. A record-level error raises unless it is transient (logged, then retried by
  librdkafka); end-of-partition events are not enabled.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import KafkaError as ConfluentError
from confluent_kafka import TopicPartition as ConfluentPartition
from kafka import ConsumerRebalanceListener
from kafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    UnknownTopicOrPartitionError,
    for_code,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from streammf.config import KafkaSettings
from streammf.stream.kafka_config import bootstrap_list

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("streammf.librdkafka")

# How long the blocking calls kafka-python makes without a timeout argument wait here.
METADATA_TIMEOUT_S = 2.0
COMMITTED_TIMEOUT_S = 10.0
# A topic's partitions are asked again after this long (kafka-python answers from its metadata cache,
# refreshed every 5 minutes and whenever something looks off): a partition added later is seen within it.
PARTITIONS_MAX_AGE_S = 30.0

_TIMEOUTS = frozenset(
    {ConfluentError._TIMED_OUT, ConfluentError._MSG_TIMED_OUT, ConfluentError._TIMED_OUT_QUEUE}
)
_CONNECTION = frozenset(
    {ConfluentError._TRANSPORT, ConfluentError._ALL_BROKERS_DOWN, ConfluentError._RESOLVE}
)
_UNKNOWN = frozenset({ConfluentError._UNKNOWN_TOPIC, ConfluentError._UNKNOWN_PARTITION})
# librdkafka's own (negative) codes for conditions it recovers from by itself.
_TRANSIENT_LOCAL = frozenset(
    {
        ConfluentError._WAIT_COORD,
        ConfluentError._WAIT_CACHE,
        ConfluentError._RETRY,
        ConfluentError._PREV_IN_PROGRESS,
        ConfluentError._IN_PROGRESS,
        ConfluentError._NODE_UPDATE,
        ConfluentError._QUEUE_FULL,
        ConfluentError._UNKNOWN_BROKER,
        ConfluentError._MAX_POLL_EXCEEDED,
        ConfluentError._ASSIGNMENT_LOST,
        ConfluentError._ISR_INSUFF,
        ConfluentError._OUTDATED,
    }
)


class LibrdkafkaError(KafkaError):
    """A librdkafka error with no kafka-python counterpart; `retriable` says whether it recovers."""

    def __init__(self, message: str, code: int, retriable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


def kafka_error(error: ConfluentError | KafkaException) -> KafkaError:
    """kafka-python's error for a confluent-kafka error: timeouts are `KafkaTimeoutError`, a lost
    connection `KafkaConnectionError`, a broker error code its kafka-python class (which knows whether it
    is retriable), librdkafka's own codes `LibrdkafkaError` (retriable when librdkafka recovers)."""
    if isinstance(error, KafkaException):
        inner = error.args[0] if error.args else None
        if not isinstance(inner, ConfluentError):
            return LibrdkafkaError(str(error), ConfluentError._FAIL, retriable=False)
        error = inner
    code, text = error.code(), f"{error.name()}: {error.str()}"
    if code in _TIMEOUTS:
        return KafkaTimeoutError(text)
    if code in _CONNECTION:
        return KafkaConnectionError(text)
    if code in _UNKNOWN:
        return UnknownTopicOrPartitionError(text)
    if code >= 0:  # the broker's code: same numbers as kafka-python's
        return for_code(code)(text)
    return LibrdkafkaError(text, code, retriable=code in _TRANSIENT_LOCAL or error.retriable())


def _transient(error: KafkaError) -> bool:
    return bool(getattr(error, "retriable", False)) or isinstance(error, KafkaTimeoutError)


# ------------------------------------------------------------------------------------------ config


def common_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings as librdkafka properties (those left unset are omitted, so
    librdkafka keeps its defaults). Holds the SASL password in clear text: never log it."""
    password = kafka.sasl_plain_password.get_secret_value() if kafka.sasl_plain_password is not None else None
    candidates: dict[str, Any] = {
        "bootstrap.servers": ",".join(bootstrap_list(kafka.bootstrap_servers)),
        "client.id": kafka.client_id,
        "security.protocol": kafka.security_protocol.lower(),
        "sasl.mechanism": kafka.sasl_mechanism,
        "sasl.username": kafka.sasl_plain_username,
        "sasl.password": password,
        "ssl.ca.location": kafka.ssl_cafile,
        "ssl.certificate.location": kafka.ssl_certfile,
        "ssl.key.location": kafka.ssl_keyfile,
    }
    # librdkafka backs reconnects off up to 10 s by default; as with kafka-python (kafka_config), one
    # second is cheap and resumes within seconds of a broker coming back.
    connection = {"reconnect.backoff.max.ms": 1000}
    return connection | {key: value for key, value in candidates.items() if value is not None}


def consumer_config(kafka: KafkaSettings, group_id: str | None) -> dict[str, Any]:
    """The daemon's consumer: the group's member when `group_id` is given (no auto-commit, earliest when
    the group has no offset, the session timeout); without one a throwaway group id, as librdkafka needs
    one, for a consumer that only `assign`s (the bench's raw consume) and never commits. The rest matches
    kafka-python's defaults: uncommitted reads, CRCs checked; and fetching resumes as soon as there is
    room for more records."""
    config = common_config(kafka) | {
        "group.id": group_id if group_id is not None else f"streammf-unjoined-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.session_timeout_ms // 3,
        "isolation.level": "read_uncommitted",
        "check.crcs": True,
        # librdkafka prefetches up to queued.min.messages (100,000) per partition, then checks again
        # only after this: 1 s by default, which left a loop that drains that in less (raw consume does)
        # waiting for records. A check every 10 ms costs nothing.
        "fetch.queue.backoff.ms": 10,
    }
    return config


def producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The dead-letter producer, with kafka-python's (3.x) defaults where librdkafka's differ: acks from
    every in-sync replica, keys partitioned by murmur2 (as kafka-python and the Java client: librdkafka's
    own default, a CRC32, would put a user's records on another partition than other producers do), a
    1 MiB request limit, 2 minutes to deliver; and the daemon's 5 ms linger."""
    return common_config(kafka) | {
        "linger.ms": 5,
        "acks": "all",
        "partitioner": "murmur2_random",
        "message.max.bytes": 1_048_576,
        "message.timeout.ms": 120_000,
    }


# ---------------------------------------------------------------------------------------- consumer


class Record(NamedTuple):
    """A consumed record, with the attributes the loop reads of kafka-python's `ConsumerRecord`."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None  # ms since the epoch; None when the record has none
    headers: Any  # [(key, value), ...], or () when the record has none


def group_records(
    messages: Iterable[Message], on_error: Callable[[ConfluentError], None]
) -> dict[TopicPartition, list[Record]]:
    """consume()'s messages as kafka-python's poll returns them: records by partition, in offset order.
    A message that carries an error is passed to `on_error` instead."""
    polled: dict[TopicPartition, list[Record]] = {}
    current: tuple[str | None, int | None] = (None, None)
    records: list[Record] = []
    for message in messages:
        error = message.error()
        if error is not None:
            on_error(error)
            continue
        topic, partition = message.topic(), message.partition()
        if (topic, partition) != current:
            current = (topic, partition)
            records = polled.setdefault(TopicPartition(topic, partition), [])
        kind, timestamp = message.timestamp()
        records.append(
            Record(
                topic,  # type: ignore[arg-type]  # set on every consumed message
                partition,  # type: ignore[arg-type]
                message.offset(),  # type: ignore[arg-type]
                message.key(),
                message.value(),
                None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp,
                message.headers() or (),
            )
        )
    return polled


def _raise_unless_transient(error: ConfluentError) -> None:
    if error.code() == ConfluentError._PARTITION_EOF:
        return
    translated = kafka_error(error)
    if not _transient(translated):
        raise translated
    log.warning("kafka consumer: %s (librdkafka retries)", translated)


class ConfluentConsumer:
    """`kafka.KafkaConsumer`'s methods the loop, the daemon and the bench call, on a confluent-kafka
    `Consumer`. Driven from one thread, except `assignment()` (safe from any)."""

    def __init__(self, config: dict[str, Any], consumer: Any = None) -> None:
        """`consumer`: a stand-in for confluent_kafka.Consumer (tests); by default one built from
        `config`."""
        self._commit_callbacks: deque[Callable[[Any, Any], None] | None] = deque()
        config = config | {"on_commit": self._on_commit, "error_cb": _on_client_error}
        self._consumer = consumer if consumer is not None else Consumer(config, logger=_librdkafka_log)
        self._listener: ConsumerRebalanceListener | None = None
        self._assigned: frozenset[TopicPartition] = frozenset()
        # Where fetching resumes per assigned partition, as far as this object knows: the last offset
        # sought, or the one after the last record returned (used to re-assign with explicit offsets).
        self._position: dict[TopicPartition, int] = {}
        self._pending: dict[TopicPartition, int] = {}  # seeks librdkafka refused so far
        self._partitions: dict[str, tuple[frozenset[int], float]] = {}  # topic -> (partitions, asked at)

    # ------------------------------------------------------------------------------ assignment

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener | None = None) -> None:
        self._listener = listener
        self._consumer.subscribe(
            list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Manual assignment (no group): the bench's raw consume."""
        self._consumer.assign([ConfluentPartition(tp.topic, tp.partition) for tp in partitions])
        self._assigned = frozenset(partitions)
        self._position.clear()
        self._pending.clear()

    def assignment(self) -> frozenset[TopicPartition]:
        return self._assigned

    def _on_assign(self, _consumer: Any, partitions: list[ConfluentPartition]) -> None:
        assigned = [TopicPartition(p.topic, p.partition) for p in partitions]
        # Eager rebalancing: this is the whole new assignment, every partition starting from its committed
        # offset, so nothing known of an earlier one holds.
        self._assigned = frozenset(assigned)
        self._position.clear()
        self._pending.clear()
        if self._listener is not None:
            self._listener.on_partitions_assigned(assigned)
        # confluent-kafka assigns `partitions` (from the committed offsets) once this returns.

    def _on_revoke(self, _consumer: Any, partitions: list[ConfluentPartition]) -> None:
        revoked = [TopicPartition(p.topic, p.partition) for p in partitions]
        if self._listener is not None:  # like kafka-python: still assigned while the listener runs
            self._listener.on_partitions_revoked(revoked)
        self._assigned = self._assigned.difference(revoked)
        for tp in revoked:
            self._position.pop(tp, None)
            self._pending.pop(tp, None)

    # ------------------------------------------------------------------------------ fetching

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        """Up to `max_records` records by partition: those already fetched, or else the first to arrive
        within `timeout_ms` with whatever arrived along with it."""
        if self._pending:
            self._seek_all(dict(self._pending))
        limit = max_records or 500  # kafka-python's default max_poll_records
        messages = self._consumer.consume(limit, 0)
        if not messages and timeout_ms > 0:
            messages = self._consumer.consume(1, timeout_ms / 1000)
            if messages and limit > 1:
                messages += self._consumer.consume(limit - 1, 0)
        if not messages:
            return {}
        polled = group_records(messages, _raise_unless_transient)
        for tp in [tp for tp in polled if tp in self._pending or tp not in self._assigned]:
            del polled[tp]  # fetched from where a refused seek should have moved it: fetched again
        for tp, records in polled.items():
            self._position[tp] = records[-1].offset + 1
        return polled

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._seek_all({partition: offset})

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self._seek_all(dict.fromkeys(partitions or self._assigned, OFFSET_BEGINNING))

    def _seek_all(self, offsets: dict[TopicPartition, int]) -> None:
        refused: dict[TopicPartition, int] = {}
        for tp, offset in offsets.items():
            if tp not in self._assigned:
                raise IllegalStateError(f"cannot seek {tp}: not assigned to this consumer")
            self._position[tp] = offset
            try:
                self._consumer.seek(ConfluentPartition(tp.topic, tp.partition, offset))
            except KafkaException as exc:
                refused[tp] = offset
                log.debug("seek %s to %d refused (%s): assigning with explicit offsets", tp, offset, exc)
            else:
                self._pending.pop(tp, None)
        if refused:
            self._pending.update(refused)
            self._assign_positions()

    def _assign_positions(self) -> None:
        """The whole assignment again (eager rebalancing allows no partial change), each partition from
        its tracked position, those never consumed nor sought from their committed offsets. Refused: the
        pending seeks stay, tried again before the next consume."""
        partitions = [
            ConfluentPartition(tp.topic, tp.partition, self._position.get(tp, OFFSET_STORED))
            for tp in sorted(self._assigned)
        ]
        try:
            self._consumer.assign(partitions)
        except KafkaException as exc:
            log.warning("re-assigning with explicit offsets failed (%s): retried at the next poll", exc)
            return
        self._pending.clear()

    def highwater(self, partition: TopicPartition) -> int | None:
        """The high watermark of the last fetch (librdkafka's cached value), None before one."""
        try:
            offsets = self._consumer.get_watermark_offsets(
                ConfluentPartition(partition.topic, partition.partition), cached=True
            )
        except KafkaException:
            return None
        if offsets is None or offsets[1] < 0:
            return None
        return int(offsets[1])

    # ------------------------------------------------------------------------------ metadata, offsets

    def partitions_for_topic(self, topic: str) -> set[int]:
        """The topic's partition ids; empty when it does not exist (yet). Answered from a cache of at
        most `PARTITIONS_MAX_AGE_S`, and from the stale one when the broker does not answer."""
        now = time.monotonic()
        cached = self._partitions.get(topic)
        if cached is not None and now - cached[1] < PARTITIONS_MAX_AGE_S:
            return set(cached[0])
        try:
            metadata = self._consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            log.debug("metadata of %s not available: %s", topic, exc)
            if cached is None:
                return set()
            self._partitions[topic] = (cached[0], now)  # asked again after the same delay
            return set(cached[0])
        found = metadata.topics.get(topic)
        partitions = frozenset(found.partitions) if found is not None and found.error is None else frozenset()
        if partitions:
            self._partitions[topic] = (partitions, now)
        return set(partitions)

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        """Each partition's end offset from its leader; KafkaTimeoutError past `timeout_ms` in all."""
        deadline = time.monotonic() + timeout_ms / 1000
        ends: dict[TopicPartition, int] = {}
        for tp in partitions:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaTimeoutError(f"end offsets not received within {timeout_ms} ms")
            try:
                offsets = self._consumer.get_watermark_offsets(
                    ConfluentPartition(tp.topic, tp.partition), timeout=remaining, cached=False
                )
            except KafkaException as exc:
                raise kafka_error(exc) from exc
            if offsets is None:
                raise KafkaTimeoutError(f"end offset of {tp} not received within {timeout_ms} ms")
            ends[tp] = int(offsets[1])
        return ends

    def committed(self, partition: TopicPartition) -> int | None:
        """The group's committed offset for `partition`, None when it has none. Retriable errors (a
        coordinator moving or not elected yet, e.g. after a broker restart) are retried for up to
        COMMITTED_TIMEOUT_S, as kafka-python's `committed` waits for the coordinator."""
        deadline = time.monotonic() + COMMITTED_TIMEOUT_S
        while True:
            try:
                (answer,) = self._consumer.committed(
                    [ConfluentPartition(partition.topic, partition.partition)], timeout=COMMITTED_TIMEOUT_S
                )
                break
            except KafkaException as exc:
                error = kafka_error(exc)
                if not getattr(error, "retriable", False) or time.monotonic() > deadline:
                    raise error from exc
                time.sleep(0.2)
        if answer.error is not None:
            raise kafka_error(answer.error)
        return int(answer.offset) if answer.offset >= 0 else None

    def commit_async(
        self,
        offsets: dict[TopicPartition, OffsetAndMetadata],
        callback: Callable[[Any, Any], None] | None = None,
    ) -> None:
        """Commits `offsets`; `callback(offsets, response)` runs in a later poll, with an exception as the
        response when the commit failed (kafka-python's convention)."""
        partitions = [ConfluentPartition(tp.topic, tp.partition, meta.offset) for tp, meta in offsets.items()]
        try:
            self._consumer.commit(offsets=partitions, asynchronous=True)
        except KafkaException as exc:
            raise kafka_error(exc) from exc
        self._commit_callbacks.append(callback)  # librdkafka reports commits in the order they were made

    def _on_commit(self, error: ConfluentError | None, partitions: list[ConfluentPartition]) -> None:
        callback = self._commit_callbacks.popleft() if self._commit_callbacks else None
        if callback is None:
            return
        offsets = {
            TopicPartition(p.topic, p.partition): OffsetAndMetadata(p.offset, "", -1) for p in partitions
        }
        failure = error if error is not None else next((p.error for p in partitions if p.error), None)
        callback(offsets, kafka_error(failure) if failure is not None else offsets)

    def close(self, autocommit: bool = False) -> None:
        """Leaves the group (revoking through the listener). Nothing is committed: auto-commit is off, so
        `autocommit` (kafka-python's argument) changes nothing."""
        self._consumer.close()


def _on_client_error(error: ConfluentError) -> None:
    """Errors not tied to a record or call (a broker unreachable, ...): librdkafka logs them itself (to
    `streammf.librdkafka`) and retries; a fatal one leaves the client unusable, and calls then fail."""
    if error.fatal():
        log.error("kafka client: fatal error: %s", error)
    else:
        log.debug("kafka client: %s", error)


# ---------------------------------------------------------------------------------------- producer


class Delivery:
    """kafka-python's send() future, as far as the loop and replay use it: `get(timeout)` waits for the
    broker's acknowledgement and raises kafka-python's error if the record was not written;
    `add_callback` / `add_errback` register what runs when it is (with None) or is not (with the error)."""

    __slots__ = ("_callbacks", "_done", "_errbacks", "_error", "_producer")

    def __init__(self, producer: Any, error: KafkaError | None = None) -> None:
        self._producer = producer
        self._error = error
        self._done = error is not None
        self._callbacks: list[Callable[[None], object]] = []
        self._errbacks: list[Callable[[KafkaError], object]] = []

    def __call__(self, error: ConfluentError | None, _message: Any) -> None:
        """confluent-kafka's delivery report (runs in the producer's poll or flush)."""
        self._error = kafka_error(error) if error is not None else None
        self._done = True
        self._report()

    def add_callback(self, callback: Callable[[None], object]) -> Delivery:
        self._callbacks.append(callback)
        self._report()
        return self

    def add_errback(self, errback: Callable[[KafkaError], object]) -> Delivery:
        self._errbacks.append(errback)
        self._report()
        return self

    def _report(self) -> None:
        """Once done, each registered callback runs once; one that raises is logged, as kafka-python does,
        and the others still run (they run inside the producer's poll, which must not raise)."""
        if not self._done:
            return
        pending: list[Callable[[Any], object]]
        if self._error is None:
            pending, self._callbacks = self._callbacks, []
        else:
            pending, self._errbacks = self._errbacks, []
        for callback in pending:
            try:
                callback(self._error)
            except Exception:
                log.exception("a delivery callback raised")

    def get(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaTimeoutError(f"record not acknowledged within {timeout} s")
            self._producer.poll(min(remaining, 0.1))
        if self._error is not None:
            raise self._error


class ConfluentProducer:
    """`kafka.KafkaProducer`'s send/flush/close on a confluent-kafka `Producer`."""

    def __init__(self, config: dict[str, Any], producer: Any = None, block_s: float = 60.0) -> None:
        """`block_s`: how long `send` waits for room when librdkafka's queue is full (kafka-python's
        max_block_ms)."""
        config = config | {"error_cb": _on_client_error}
        self._producer = producer if producer is not None else Producer(config, logger=_librdkafka_log)
        self._block_s = block_s

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
    ) -> Delivery:
        """Queues the record; failures come back through the returned Delivery, never raised here."""
        record_headers: list[tuple[str, str | bytes | None]] | None = (
            None if headers is None else list(headers)
        )
        delivery = Delivery(self._producer)
        deadline = time.monotonic() + self._block_s
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=record_headers, on_delivery=delivery
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                if time.monotonic() > deadline:
                    return Delivery(self._producer, KafkaTimeoutError("producer queue full"))
                self._producer.poll(0.1)
            except KafkaException as exc:  # e.g. larger than message.max.bytes
                return Delivery(self._producer, kafka_error(exc))
        self._producer.poll(0)  # serve delivery reports already due
        return delivery

    def flush(self, timeout: float | None = None) -> None:
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records not delivered within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        if self._producer.flush(-1 if timeout is None else timeout):
            self._producer.purge()  # undelivered after the timeout: dropped, as kafka-python's close does
        self._producer.close()
