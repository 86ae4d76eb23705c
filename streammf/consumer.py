"""The daemon's loop: poll → validate → dead-letter the bad → SGD step → atomic apply to Redis → commit.

Redis holds the truth about what has been applied: each batch's partition offsets are written in the
same atomic call as its effect, and on assignment a partition resumes from the offset stored there.
Kafka commits are for lag tooling only, so a failed commit loses nothing, and a batch replayed after a
crash is recognised by its offsets and skipped (exactly-once effect).

A batch that cannot be finished (Redis down past the retry budget, dead-letter topic unwritable, stop
requested) is abandoned whole: nothing of it was applied, its partitions are rewound to its first offset
and the next poll fetches it again. Polling goes on meanwhile, so the consumer keeps its group membership.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streammf.events import Event, Invalid, decode
from streammf.learner import Learner, StepResult, VersionChurnError
from streammf.metrics import Heartbeat, Metrics
from streammf.store import ApplyOutcome

log = logging.getLogger(__name__)
TRANSIENT_STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, VersionChurnError)


@dataclass(frozen=True)
class LoopSettings:
    topic: str
    dead_letter_topic: str
    poll_timeout_ms: int = 200
    max_poll_records: int = 500
    max_record_bytes: int = 4096
    retry_budget_s: float = (
        60.0  # then abandon the batch and poll again (stays well inside max.poll.interval)
    )
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0


class _ResumeFromStore(ConsumerRebalanceListener):
    """Marks newly assigned partitions; the loop seeks them to the store's offsets before using them.

    Callbacks run inside poll() and must stay short, so no Redis call happens here.
    """

    def __init__(self, loop: ConsumeLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Every applied batch is already in Redis with its offsets: nothing to flush before giving up.
        for tp in revoked:
            self.loop.unsynced.discard(tp)
            with contextlib.suppress(KeyError):  # no lag series yet for this partition
                self.loop.metrics.lag.remove(str(tp.partition))
        if revoked:
            log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.loop.unsynced.update(assigned)
        if assigned:
            log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})
        else:
            log.warning("no partitions assigned: idle until a rebalance (more replicas than partitions?)")


class ConsumeLoop:
    def __init__(
        self,
        consumer: Any,  # kafka.KafkaConsumer (duck-typed for clarity of what is used)
        producer: Any,  # kafka.KafkaProducer, for dead letters
        learner: Learner,
        metrics: Metrics,
        heartbeat: Heartbeat,
        settings: LoopSettings,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.learner = learner
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.unsynced: set[TopicPartition] = set()
        self.next_offsets: dict[int, int] = {}  # partition -> next offset applied by this process

    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe([self.settings.topic], listener=_ResumeFromStore(self))
        log.info("consuming", extra={"topic": self.settings.topic})
        while not stop.is_set():
            polled = self.consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_poll_records
            )
            self.heartbeat.beat()
            self.metrics.last_progress.set(self.clock())
            repositioned: set[TopicPartition] = set()
            if self.unsynced:
                synced = self._sync_offsets(stop)
                if synced is None:
                    continue  # the store is unreachable: whatever was polled is fetched again after the seek
                repositioned = synced
            if polled:
                # Records polled before a seek came from Kafka's committed offset, which may lag the store's;
                # the next poll fetches from the seek.
                self.process({tp: recs for tp, recs in polled.items() if tp not in repositioned}, stop)
            self._update_lag()
        log.info("stop requested: loop finished its last batch")

    def _sync_offsets(self, stop: threading.Event) -> set[TopicPartition] | None:
        """Seek newly assigned partitions to the offsets applied in the store; returns those it moved
        (None if the store is unreachable). Partitions the store knows nothing of keep Kafka's position."""
        try:
            applied = self._with_retry(self.learner.store.applied_offsets, stop)
        except _Abandoned:
            return None
        moved = set()
        for tp in list(self.unsynced):
            if tp.partition in applied:
                self.consumer.seek(tp, applied[tp.partition])
                self.next_offsets[tp.partition] = applied[tp.partition]
                moved.add(tp)
            else:
                self.next_offsets.pop(tp.partition, None)
            self.unsynced.discard(tp)
        return moved

    def process(self, polled: dict[TopicPartition, list[Any]], stop: threading.Event) -> StepResult | None:
        """One batch. Returns the step result, or None when the batch was abandoned (to be re-polled)."""
        polled = self._drop_applied(polled)
        if not polled:
            return None
        received = time.perf_counter()
        events: list[Event] = []
        dead: list[tuple[Any, Invalid]] = []
        offsets: dict[int, tuple[int, int]] = {}
        for tp, records in polled.items():
            offsets[tp.partition] = (records[0].offset, records[-1].offset + 1)
            for record in records:
                decoded = decode(record.value, self.settings.max_record_bytes)
                if isinstance(decoded, Invalid):
                    dead.append((record, decoded))
                    self.metrics.events_invalid.labels(decoded.reason).inc()
                elif decoded.timestamp is None:
                    events.append(decoded.model_copy(update={"timestamp": record.timestamp / 1000.0}))
                else:
                    events.append(decoded)
        self.metrics.events_consumed.inc(sum(len(r) for r in polled.values()))
        try:
            if dead:
                self._with_retry(lambda: self._dead_letter(dead), stop, dependency="kafka")
            result = self._with_retry(lambda: self.learner.learn(events, offsets), stop)
        except _Abandoned:
            self._rewind(polled)
            return None
        self._account(result, events, offsets, received)
        self._commit(polled)
        return result

    def _drop_applied(self, polled: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """Without records this process knows are applied: a redelivery (e.g. a fetch that raced a seek)
        must not reach the dead-letter topic or the learner again."""
        fresh: dict[TopicPartition, list[Any]] = {}
        for tp, records in polled.items():
            applied_below = self.next_offsets.get(tp.partition)
            kept = records if applied_below is None else [r for r in records if r.offset >= applied_below]
            if len(kept) < len(records):
                log.info(
                    "dropped %d redelivered records already applied",
                    len(records) - len(kept),
                    extra={"partition": tp.partition, "applied_below": applied_below},
                )
            if kept:
                fresh[tp] = kept
        return fresh

    def _account(
        self, result: StepResult, events: list[Event], offsets: dict[int, tuple[int, int]], received: float
    ) -> None:
        self.metrics.batches.labels(result.outcome.value).inc()
        if result.outcome is ApplyOutcome.CONFLICT:
            # Someone else applied part of these offsets (a zombie or a rebalance race): resync and re-poll.
            log.warning("offset conflict: resyncing partitions", extra={"offsets": offsets})
            self.unsynced.update(TopicPartition(self.settings.topic, p) for p in offsets)
            return
        if result.outcome is ApplyOutcome.DUPLICATE:
            log.info("batch already applied (replay after a restart): skipped", extra={"offsets": offsets})
        else:
            self.metrics.events_applied.inc(len(events))
            self.metrics.batch_size.observe(len(events))
            self.metrics.observe_errors(float((result.errors**2).sum()), len(events))
            now = self.clock()
            for event in events:
                self.metrics.freshness.observe(max(0.0, now - (event.timestamp or now)))
        self.metrics.update_latency.observe(time.perf_counter() - received)
        self.metrics.model_version.set(result.version)
        for partition, (_, nxt) in offsets.items():
            self.next_offsets[partition] = nxt

    def _dead_letter(self, dead: list[tuple[Any, Invalid]]) -> None:
        """Produce bad records with their original bytes; raises unless every one is acknowledged."""
        futures = [
            self.producer.send(
                self.settings.dead_letter_topic,
                key=record.key,
                value=record.value if record.value is not None else b"",
                headers=[
                    ("streammf.reason", invalid.reason.encode()),
                    ("streammf.detail", invalid.detail.encode()),
                    ("streammf.source.topic", record.topic.encode()),
                    ("streammf.source.partition", str(record.partition).encode()),
                    ("streammf.source.offset", str(record.offset).encode()),
                ],
            )
            for record, invalid in dead
        ]
        self.producer.flush(timeout=10)
        for future in futures:
            future.get(timeout=10)  # raises KafkaError if the write failed
        self.metrics.events_dead_lettered.inc(len(dead))
        log.info(
            "dead-lettered %d records", len(dead), extra={"reasons": sorted({i.reason for _, i in dead})}
        )

    def _with_retry(self, call: Callable[[], Any], stop: threading.Event, dependency: str = "redis") -> Any:
        deadline = time.monotonic() + self.settings.retry_budget_s
        delay = self.settings.backoff_initial_s
        while True:
            try:
                return call()
            except (*TRANSIENT_STORE_ERRORS, KafkaError) as exc:
                self.metrics.retries.labels(dependency).inc()
                if stop.is_set() or time.monotonic() + delay > deadline:
                    log.warning("giving up on this batch for now: %s", exc, extra={"dependency": dependency})
                    raise _Abandoned from exc
                log.warning("retrying in %.2fs: %s", delay, exc, extra={"dependency": dependency})
                self.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)

    def _rewind(self, polled: dict[TopicPartition, list[Any]]) -> None:
        for tp, records in polled.items():
            self.consumer.seek(tp, records[0].offset)

    def _commit(self, polled: dict[TopicPartition, list[Any]]) -> None:
        offsets = {tp: OffsetAndMetadata(records[-1].offset + 1, "", -1) for tp, records in polled.items()}
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:  # Redis is authoritative; the next commit catches up
            log.warning("kafka offset commit failed (lag tooling only): %s", exc)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            nxt = self.next_offsets.get(tp.partition)
            if highwater is not None and nxt is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, highwater - nxt))


class _Abandoned(Exception):
    """A batch could not be finished now; it was not applied and will be polled again."""
