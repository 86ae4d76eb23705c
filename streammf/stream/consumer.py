"""The daemon's loop: poll → validate → dead-letter the bad → SGD step → atomic apply to Redis → commit.

Redis holds the truth about what has been applied: each batch's partition offsets are written in the
same atomic call as its effect, and on assignment a partition resumes from the offset stored there.
Kafka commits are for lag tooling only, so a failed commit loses nothing, and a batch replayed after a
crash is recognised by its offsets and skipped (exactly-once effect).

A batch that cannot be finished (Redis down past the retry budget, dead-letter topic unwritable, stop
requested) is abandoned whole: nothing of it was applied, its partitions are rewound to its first offset
and the next poll fetches it again. Polling goes on meanwhile, so the consumer keeps its group membership.

Pipelining: a batch is learnt (Redis read, SGD step, Redis apply) while the loop polls and decodes the
next one, which it hands to the learner behind it (`BatchLearner.submit` with `after`) before the first
is answered: the learner goes from one to the next without waiting for the loop. A worker thread waits
for the answers in order and records each batch's metrics; the loop accounts for a batch (positions,
commit) once it is answered, and waits for every batch in flight before anything else that depends on
their outcome (a batch with records to dead-letter, a rebalance, a forget, shutdown). Batches are still
learnt strictly one after the other, and one handed over behind a batch that was not applied is not
learnt at all (it and everything polled after it are fetched again), so the effect is the same as
without the overlap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streammf.config import KafkaSettings, Settings
from streammf.store.contract import ApplyOutcome, StoreUnavailableError
from streammf.stream.events import (
    DEFAULT_LIMITS,
    EventColumns,
    EventLimits,
    EventRow,
    ForgetUser,
    Invalid,
    decode_rows,
)
from streammf.stream.learner import (
    BatchLearner,
    BatchSkipped,
    DamagedGramianError,
    PendingBatch,
    StepResult,
    VersionChurnError,
)
from streammf.stream.metrics import Heartbeat, Metrics
from streammf.stream.positions import Positions

log = logging.getLogger(__name__)
_KAFKA = KafkaSettings()
# StoreUnavailableError covers Redis out of memory too (noeviction at maxmemory refuses writes; a script
# fails at its first write, before it changed anything): backing off lets memory be freed, nothing lost.
TRANSIENT_STORE_ERRORS = (StoreUnavailableError, VersionChurnError, DamagedGramianError)
# Batches handed to the learner and not yet accounted for: one being learnt, and behind it one, or two
# while there is a backlog (a poll of at least BACKLOG_SHARE_OF_MAX_POLL of max_poll_records). With one
# waiting, the next is often handed over a moment after the learner's process sent the apply, too late to
# be computed while Redis works (`Learner.learn_ahead`); a second one waiting is there in time:
# `streammf bench --events 300000 --mode implicit`, confluent-kafka, alternated: 81,749 / 76,579 ->
# 90,944 / 93,385 events/s (a third: 90,761). At a live rate, polls are small and a batch would only wait
# longer behind two (latency p99 19.4 / 28.8 -> 58.7 / 56.8 ms, kafka-python, 20,000 events/s): one.
MAX_IN_FLIGHT = 3
BACKLOG_SHARE_OF_MAX_POLL = 0.25


@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs. Those that are settings take their defaults from `KafkaSettings` (the one place
    defaults live); `from_settings` is the daemon's conversion. The rest are internal timings."""

    topic: str
    dead_letter_topic: str
    poll_timeout_ms: int = _KAFKA.poll_timeout_ms
    max_poll_records: int = _KAFKA.max_poll_records
    max_record_bytes: int = _KAFKA.max_record_bytes
    limits: EventLimits = DEFAULT_LIMITS
    retry_budget_s: float = (
        60.0  # then abandon the batch and poll again (stays well inside max.poll.interval)
    )
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    # How often the loop asks the broker for the topic's end offsets: the lag gauge, and the proof that
    # Kafka answers (an empty poll looks the same whether the topic is idle or the broker is gone).
    probe_every_s: float = 1.0
    probe_timeout_s: float = 1.0
    # Records waiting but none fetched for this long: the partitions are sought again (see `_unwedge`).
    refetch_after_s: float = 30.0
    # How often `store_guard` runs (e.g. the eviction-policy check).
    guard_every_s: float = 30.0
    # A partition the store has no offset for, though the group committed one, means the store lost
    # state: refuse (StoreLostStateError), or with `rebuild` consume it again from the earliest offset.
    rebuild: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, rebuild: bool = False) -> LoopSettings:
        kafka = settings.kafka
        return cls(
            topic=kafka.topic,
            dead_letter_topic=kafka.dead_letter_topic,
            poll_timeout_ms=kafka.poll_timeout_ms,
            max_poll_records=kafka.max_poll_records,
            max_record_bytes=kafka.max_record_bytes,
            limits=EventLimits(*settings.model.bounds),
            rebuild=rebuild,
        )


class _ResumeFromStore(ConsumerRebalanceListener):
    """Marks newly assigned partitions; the loop seeks them to the store's offsets before using them.

    Callbacks run inside poll() and must stay short, so no Redis call happens here.
    """

    def __init__(self, loop: ConsumeLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Nothing waits here, not even a batch in flight: a callback that blocks holds up the group's join
        # (kafka-python then lost the membership and never rejoined, seen with a long batch in flight). The
        # batch's apply is fenced by its offsets in Redis, so whoever owns the partitions next resumes
        # from what the store holds, before or after that apply lands.
        self.loop.positions.revoked(revoked)
        for tp in revoked:
            with contextlib.suppress(KeyError):  # no lag series yet for this partition
                self.loop.metrics.lag.remove(str(tp.partition))
        if revoked:
            log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.loop.positions.assigned(assigned)
        if assigned:
            log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})
        else:
            log.warning("no partitions assigned: idle until a rebalance (more replicas than partitions?)")


class ConsumeLoop:
    def __init__(
        self,
        consumer: Any,  # kafka.KafkaConsumer (duck-typed for clarity of what is used)
        producer: Any,  # kafka.KafkaProducer, for dead letters
        learner: BatchLearner,
        metrics: Metrics,
        heartbeat: Heartbeat,
        settings: LoopSettings,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        store_guard: Callable[[], object] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.learner = learner
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.monotonic = monotonic  # retry budgets and periodic checks (tests pass a fake one with `sleep`)
        self.positions = Positions()
        self._next_probe = 0.0
        self.store_guard = store_guard
        self._next_guard = monotonic() + settings.guard_every_s
        self._worker: ThreadPoolExecutor | None = None  # set while run() runs
        self._in_flight: deque[_InFlight] = deque()  # oldest first
        self._last_fetch = monotonic()
        self._store_outage = False  # a write met an unreachable store: positions are learnt again
        self._backlog_from = max(1, int(settings.max_poll_records * BACKLOG_SHARE_OF_MAX_POLL))

    def run(self, stop: threading.Event) -> None:
        self.consumer.subscribe([self.settings.topic], listener=_ResumeFromStore(self))
        log.info("consuming", extra={"topic": self.settings.topic})
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammf-learn") as worker:
            self._worker = worker
            try:
                self._run(stop)
            finally:
                self._worker = None
        log.info("stop requested: loop finished its last batch")

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            polled = self._poll()
            self.heartbeat.beat()
            if polled:
                self._made_contact("kafka")
                self._last_fetch = self.monotonic()
            repositioned: set[TopicPartition] = set()
            if self._store_outage:
                if not self.finish_in_flight(newer=polled):
                    polled = {}  # rewound with the batch in flight
                self._store_outage = False
                self.positions.resync(self.consumer.assignment())
            if self.positions.needs_sync:
                if not self.finish_in_flight(newer=polled):
                    polled = {}  # rewound with the batch in flight
                synced = self._sync_offsets(stop)
                if synced is None:
                    continue  # the store is unreachable: whatever was polled is fetched again after the seek
                repositioned = synced
            if polled:
                # Records polled before a seek came from Kafka's committed offset, which may lag the store's;
                # the next poll fetches from the seek.
                self._pipeline({tp: recs for tp, recs in polled.items() if tp not in repositioned}, stop)
            else:
                self.finish_in_flight()
            self._update_lag()
            self._probe_kafka(heard_from_kafka=bool(polled))
            self._guard_store()
        self.finish_in_flight()

    def _poll(self) -> dict[TopicPartition, list[Any]]:
        """One poll; nothing when Kafka cannot be reached. kafka-python's poll may raise while the broker
        is gone (a metadata refresh inside the coordinator's wait, seen in CI); the end-offset probe
        reports the outage on /healthz and the next poll tries again."""
        try:
            polled: dict[TopicPartition, list[Any]] = self.consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_poll_records
            )
        except KafkaError as exc:
            if not _transient_kafka_error(exc):
                raise
            self.metrics.retries.labels("kafka").inc()
            log.warning("kafka poll failed: %s", exc, extra={"dependency": "kafka"})
            self.sleep(self.settings.backoff_initial_s)
            return {}
        return polled

    def _pipeline(self, polled: dict[TopicPartition, list[Any]], stop: threading.Event) -> None:
        """Decode this poll while the batches in flight are learnt, then hand it to the learner: behind
        them when it may be (`_may_follow`), else once they are accounted for."""
        received = time.perf_counter()
        decoded = self._decode(polled)
        follow = self._may_follow(polled, decoded)
        backlog = sum(len(records) for records in polled.values()) >= self._backlog_from
        if not self._finish(keep=(MAX_IN_FLIGHT - 1 if backlog else 1) if follow else 0, newer=polled):
            return  # a batch in flight was abandoned: it and all after it were rewound, to be fetched again
        if self.positions.needs_sync:  # one hit an offset conflict: nothing goes on before the resync
            if self.finish_in_flight(newer=polled):
                self._rewind(polled)
            return
        fresh = self._drop_applied(polled)
        # drop_applied keeps a run of each partition's records (offsets ascend within a poll).
        decoded = {tp: _same_run(decoded[tp], records) for tp, records in fresh.items()}
        if not fresh:
            return
        if self._worker is None or any(
            isinstance(d, ForgetUser) for pairs in decoded.values() for _, d in pairs
        ):
            self._process_now(fresh, decoded, stop, received)
            return
        batch = _Batch.of(decoded)
        if batch.dead:  # dead-lettered before anything of the batch is learnt (never while one is in flight)
            try:
                self._dead_letter_invalid(batch, stop)
            except _Abandoned:
                self._rewind(fresh)
                return
        after = self._in_flight[-1].pending if self._in_flight else None
        pending = self.learner.submit(batch.events, batch.offsets, after)
        future = self._worker.submit(self._await_learnt, pending, batch, stop, received)
        self._in_flight.append(_InFlight(fresh, future, pending))

    def _may_follow(
        self, polled: dict[TopicPartition, list[Any]], decoded: dict[TopicPartition, list[tuple[Any, Any]]]
    ) -> bool:
        """Whether this poll may be handed to the learner before the batches in flight are answered: it
        only holds events (nothing to dead-letter or forget first), all past the batches in flight, and no
        partition waits for a torn batch to be completed (`Positions`)."""
        if not self._in_flight or self._worker is None or self._store_outage or self.positions.capped:
            return False
        if any(type(item) is not tuple for pairs in decoded.values() for _, item in pairs):
            return False
        newest = self._in_flight[-1].polled
        return all(
            tp not in newest or records[0].offset > newest[tp][-1].offset
            for tp, records in polled.items()
            if records
        )

    def finish_in_flight(self, newer: dict[TopicPartition, list[Any]] | None = None) -> bool:
        """Wait for every batch in flight and account for it (metrics, positions, commit). False if one was
        abandoned: then its records, those of the batches after it, and `newer` ones are rewound."""
        return self._finish(keep=0, newer=newer)

    def _finish(self, keep: int, newer: dict[TopicPartition, list[Any]] | None = None) -> bool:
        """Account for the oldest batches in flight until at most `keep` are left; as `finish_in_flight`."""
        while len(self._in_flight) > keep:
            in_flight = self._in_flight.popleft()
            try:
                learnt = in_flight.future.result()
            except _Abandoned:
                self._abandon_after(in_flight, newer or {})
                return False
            if self._advance(learnt).outcome is not ApplyOutcome.CONFLICT:
                self._commit(in_flight.polled)  # a conflict applied nothing: committing would claim it did
        return True

    def _abandon_after(self, abandoned: _InFlight, newer: dict[TopicPartition, list[Any]]) -> None:
        """`abandoned` was not applied: the batches handed over behind it are not learnt either (they are
        waited for; one answered as applied all the same is accounted for), then all are rewound."""
        rewound = [abandoned.polled]
        while self._in_flight:
            later = self._in_flight.popleft()
            rewound.append(later.polled)
            with contextlib.suppress(_Abandoned):
                self._advance(later.future.result())
        self._rewind(*rewound, newer)

    def _drop_applied(self, polled: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """`Positions.drop_applied`, then the seeks for records it held back."""
        fresh = self.positions.drop_applied(polled)
        for tp, offset in self.positions.take_reseeks().items():
            self.consumer.seek(tp, offset)
        return fresh

    def _sync_offsets(self, stop: threading.Event) -> set[TopicPartition] | None:
        """Seek newly assigned partitions to the offsets applied in the store; returns those it moved, or
        None when the store or Kafka cannot answer now (tried again after the next poll)."""
        try:
            stored = self._with_retry(self.learner.applied_offsets, stop)
            ahead = self._with_retry(self.learner.offsets_ahead, stop)
        except _Abandoned:
            return None
        try:
            return self.positions.sync(self.consumer, stored, self.settings.rebuild, ahead)
        except KafkaError as exc:  # a committed offset could not be read
            self.metrics.retries.labels("kafka").inc()
            log.warning("cannot read committed offsets: %s", exc)
            return None

    def process(self, polled: dict[TopicPartition, list[Any]], stop: threading.Event) -> StepResult | None:
        """One poll's records, synchronously. Returns the (last) step result, or None when the batch was
        abandoned (to be re-polled) or held nothing new."""
        received = time.perf_counter()
        self.finish_in_flight()
        polled = self._drop_applied(polled)
        if not polled:
            return None
        return self._process_now(polled, self._decode(polled), stop, received)

    def _decode(self, polled: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[tuple[Any, Any]]]:
        self.metrics.events_consumed.inc(sum(len(r) for r in polled.values()))
        max_bytes, limits = self.settings.max_record_bytes, self.settings.limits
        return {
            tp: list(zip(records, decode_rows([r.value for r in records], max_bytes, limits), strict=True))
            for tp, records in polled.items()
        }

    def _process_now(
        self,
        polled: dict[TopicPartition, list[Any]],
        decoded: dict[TopicPartition, list[tuple[Any, Any]]],
        stop: threading.Event,
        received: float,
    ) -> StepResult | None:
        """Learn `decoded` in this thread. Normally one batch covers every partition. A `forget_user`
        record splits its partition's records around it, so it takes effect in stream order: the events
        before it are applied (with their offsets), then the forget (with its offset), then the events
        after it."""
        if not any(isinstance(d, ForgetUser) for pairs in decoded.values() for _, d in pairs):
            segments = [decoded]
        else:
            segments = [{tp: run} for tp, pairs in decoded.items() for run in _split_at_forgets(pairs)]
        result = None
        try:
            for segment in segments:
                first = next(iter(segment.values()))[0]
                if isinstance(first[1], ForgetUser):
                    self._forget(first[0], first[1], stop)
                else:
                    result = self._advance(self._learn(segment, stop, received))
                    if result.outcome is ApplyOutcome.CONFLICT:
                        self._rewind(polled)
                        return result  # nothing of it is committed: a conflict applied nothing
        except _Abandoned:
            self._rewind(polled)
            return None
        self._commit(polled)
        return result

    def _learn(
        self, decoded: dict[TopicPartition, list[tuple[Any, Any]]], stop: threading.Event, received: float
    ) -> _Learnt:
        """Dead-letter the invalid records, learn the events and record the metrics, in this thread;
        raises _Abandoned. Touches no consumer state: positions move in `_advance`."""
        batch = _Batch.of(decoded)
        if batch.dead:
            self._dead_letter_invalid(batch, stop)
        return self._await_learnt(self.learner.submit(batch.events, batch.offsets), batch, stop, received)

    def _dead_letter_invalid(self, batch: _Batch, stop: threading.Event) -> None:
        for _, invalid in batch.dead:
            self.metrics.events_invalid.labels(invalid.reason).inc()
        acknowledged: set[tuple[int, int]] = set()  # across the tries: a retry sends only the rest
        self._with_retry(lambda: self._dead_letter(batch.dead, acknowledged), stop, dependency="kafka")

    def _await_learnt(
        self, pending: PendingBatch, batch: _Batch, stop: threading.Event, received: float
    ) -> _Learnt:
        """The answer for a submitted batch and its metrics (on the worker, or inline); a try that fails
        for a transient reason submits the batch again. Raises _Abandoned."""
        events, sources = batch.events, batch.sources
        tries = iter([pending])
        acknowledged: set[tuple[int, int]] = set()  # dead letters of this batch already written

        def dead_letter_diverged(positions: list[int]) -> None:
            diverged = [(sources[t], _diverged(events.row(t))) for t in positions]
            self.metrics.events_invalid.labels("diverged").inc(len(diverged))
            self._dead_letter(diverged, acknowledged)

        def learn() -> StepResult:
            attempt = next(tries, None) or self.learner.submit(events, batch.offsets)
            return attempt.wait(dead_letter_diverged)

        try:
            result = self._with_retry(learn, stop, writes=True)
        except BatchSkipped as exc:  # the batch before it was not applied: both are fetched again
            raise _Abandoned from exc
        self._observe(result, events, sources, batch.offsets, received)
        return _Learnt(result, batch.offsets)

    def _forget(self, record: Any, forget: ForgetUser, stop: threading.Event) -> None:
        offsets = {record.partition: (record.offset, record.offset + 1)}
        outcome = self._with_retry(
            lambda: self.learner.forget_user(forget.user_id, offsets), stop, writes=True
        )
        if outcome is ApplyOutcome.CONFLICT:
            log.warning("offset conflict at a forget: resyncing", extra={"offsets": offsets})
            self.positions.resync([TopicPartition(self.settings.topic, record.partition)])
            raise _Abandoned
        if outcome is ApplyOutcome.APPLIED:
            self.metrics.users_forgotten.inc()
            log.info("forgot a user", extra={"partition": record.partition, "offset": record.offset})
        self.positions.applied(record.partition, record.offset + 1)

    def _observe(
        self,
        result: StepResult,
        events: EventColumns,
        sources: list[Any],
        offsets: dict[int, tuple[int, int]],
        received: float,
    ) -> None:
        """Metrics of one batch, as soon as its apply is acknowledged (`events` and their `sources`, the
        records: those learnt, of which `result.diverged` were not applied; `received`: when its poll
        returned)."""
        acknowledged, now = time.perf_counter(), self.clock()  # the effect is committed in Redis
        self.metrics.batches.labels(result.outcome.value).inc()
        if result.outcome is ApplyOutcome.CONFLICT:
            return
        self.metrics.update_latency.observe(acknowledged - received)
        self.metrics.model_version.set(result.version)
        if result.outcome is ApplyOutcome.DUPLICATE:
            log.info("batch already applied (replay after a restart): skipped", extra={"offsets": offsets})
            return
        applied = np.ones(len(events), dtype=bool)
        applied[list(result.diverged)] = False
        n_applied = int(applied.sum())
        self.metrics.batch_size.observe(n_applied)
        self.metrics.observe_errors(float((result.errors**2).sum()), n_applied)
        # Kafka timestamps in ms, -1 when absent; an event without its own time happened when it entered.
        entered = np.array([r.timestamp if r.timestamp is not None else -1 for r in sources], dtype=float)
        entered = np.where(entered >= 0, entered / 1000.0, np.nan)[applied]
        happened = events.timestamps[applied]
        happened = np.where(np.isnan(happened), entered, happened)
        self.metrics.freshness.observe_many(np.maximum(0.0, now - entered[~np.isnan(entered)]))
        self.metrics.event_age.observe_many(np.maximum(0.0, now - happened[~np.isnan(happened)]))
        # Last: whoever sees the count (a scraper waiting for it, like the bench) sees the batch's histograms.
        self.metrics.events_applied.inc(n_applied)

    def _advance(self, learnt: _Learnt) -> StepResult:
        """Positions after a learnt batch (on the loop's thread)."""
        if learnt.result.outcome is ApplyOutcome.CONFLICT:
            # Someone else applied part of these offsets (a zombie or a rebalance race): resync and re-poll.
            log.warning("offset conflict: resyncing partitions", extra={"offsets": learnt.offsets})
            self.positions.resync(TopicPartition(self.settings.topic, p) for p in learnt.offsets)
        else:
            for partition, (_, nxt) in learnt.offsets.items():
                self.positions.applied(partition, nxt)
        return learnt.result

    def _dead_letter(self, dead: list[tuple[Any, Invalid]], acknowledged: set[tuple[int, int]]) -> None:
        """Produce bad records with their original bytes, cut to `max_record_bytes` (a record near the
        broker's size limit plus our headers would not fit: the copy says it was truncated, and from what
        size). Raises unless every one is acknowledged; a write the broker refuses for good (too large
        after all, not authorised) is retried once as metadata only, then counted and logged, never retried
        forever. `acknowledged` holds the (partition, offset) of records an earlier try of the same batch
        wrote: they are not sent again, and it gains those this try writes, so a retry after a partial
        failure (a flush that timed out) sends only the rest instead of duplicating dead letters."""
        unsent = [(r, invalid) for r, invalid in dead if (r.partition, r.offset) not in acknowledged]
        futures = [(record, invalid, self._send_dead_letter(record, invalid)) for record, invalid in unsent]
        failed: KafkaError | None = None
        try:
            self.producer.flush(timeout=10)
        except KafkaError as exc:  # both clients raise when a record is still unacknowledged
            if not _transient_kafka_error(exc):
                raise
            failed = exc
        handled = 0
        for record, invalid, future in futures:
            try:
                # After a transient failure the others are only looked at, not waited for: the broker is
                # likely gone, and each wait would take the whole timeout.
                future.get(timeout=10 if failed is None else 0)  # raises KafkaError if the write failed
            except KafkaError as exc:
                if failed is not None or _transient_kafka_error(exc):
                    failed = failed or exc  # left for the retry (a refusal for good too: it is judged then)
                    continue
                try:
                    self._dead_letter_metadata_only(record, invalid, exc)
                except KafkaError as transient:  # it raises only transient errors
                    failed = transient
                    continue
            acknowledged.add((record.partition, record.offset))
            handled += 1
        self.metrics.events_dead_lettered.inc(handled)  # written, even by a try that fails part-way
        if failed is not None:
            raise failed
        log.info(
            "dead-lettered %d records", handled, extra={"reasons": sorted({i.reason for _, i in unsent})}
        )

    def _send_dead_letter(self, record: Any, invalid: Invalid, metadata_only: bool = False) -> Any:
        value: bytes | None = record.value
        headers = [
            ("streammf.reason", invalid.reason.encode()),
            ("streammf.detail", invalid.detail.encode()[:1024]),
            ("streammf.source.topic", record.topic.encode()),
            ("streammf.source.partition", str(record.partition).encode()),
            ("streammf.source.offset", str(record.offset).encode()),
        ]
        limit = 0 if metadata_only else self.settings.max_record_bytes
        if value is not None and len(value) > limit:
            headers += [
                ("streammf.truncated", b"1"),
                ("streammf.original.size", str(len(value)).encode()),
            ]
            value = value[:limit]
        key = record.key if record.key is None or len(record.key) <= 1024 else record.key[:1024]
        return self.producer.send(self.settings.dead_letter_topic, key=key, value=value, headers=headers)

    def _dead_letter_metadata_only(self, record: Any, invalid: Invalid, cause: Exception) -> None:
        try:
            self._send_dead_letter(record, invalid, metadata_only=True).get(timeout=10)
        except KafkaError as exc:
            if _transient_kafka_error(exc):
                raise
            # The dead-letter topic refuses this record for good: say so loudly and go on, rather than
            # blocking the partition behind it forever.
            self.metrics.dead_letters_lost.inc()
            log.error(
                "dead-letter topic refused record %s/%d@%d for good (%s; metadata only: %s): not retried",
                record.topic,
                record.partition,
                record.offset,
                cause,
                exc,
                extra={"reason": invalid.reason},
            )
            return
        log.warning(
            "dead-lettered record %s/%d@%d as metadata only: %s",
            record.topic,
            record.partition,
            record.offset,
            cause,
        )

    def _with_retry(
        self, call: Callable[[], Any], stop: threading.Event, dependency: str = "redis", writes: bool = False
    ) -> Any:
        """`call()` again on transient errors, with backoff, for at most `retry_budget_s`; then _Abandoned.

        A call that `writes` to a store that became unreachable is not retried: the store may come back
        with less than it acknowledged (a Redis killed between two AOF fsyncs, a primary that lost
        writes), so the batch is abandoned and the loop learns again from the store where each partition
        stands before going on (`_store_outage`)."""
        deadline = self.monotonic() + self.settings.retry_budget_s
        delay = self.settings.backoff_initial_s
        while True:
            try:
                return call()
            except (*TRANSIENT_STORE_ERRORS, KafkaError) as exc:
                if isinstance(exc, KafkaError) and not _transient_kafka_error(exc):
                    raise
                self.metrics.retries.labels(dependency).inc()
                if writes and isinstance(exc, StoreUnavailableError):
                    log.warning("store unreachable: %s; resuming from its offsets once it answers", exc)
                    self._store_outage = True
                    self.sleep(delay)
                    raise _Abandoned from exc
                if stop.is_set() or self.monotonic() + delay > deadline:
                    log.warning("giving up on this batch for now: %s", exc, extra={"dependency": dependency})
                    raise _Abandoned from exc
                log.warning("retrying in %.2fs: %s", delay, exc, extra={"dependency": dependency})
                self.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)

    def _rewind(self, *polled: dict[TopicPartition, list[Any]]) -> None:
        """Seek each partition still assigned back to the first offset any of `polled` holds for it (one
        revoked meanwhile resumes from the store's offsets wherever it goes)."""
        first: dict[TopicPartition, int] = {}
        for batch in polled:
            for tp, records in batch.items():
                first[tp] = min(first.get(tp, records[0].offset), records[0].offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)

    def _guard_store(self) -> None:
        """Runs `store_guard` every `guard_every_s`; what it raises (e.g. StoreUnsafeError) stops the loop,
        except a store that cannot be reached now (retried at the next period)."""
        if self.store_guard is None or self.monotonic() < self._next_guard:
            return
        self._next_guard = self.monotonic() + self.settings.guard_every_s
        try:
            self.store_guard()
        except StoreUnavailableError as exc:
            log.warning("store check skipped, the store is unreachable: %s", exc)

    def _made_contact(self, dependency: str) -> None:
        self.heartbeat.saw(dependency)
        self.metrics.last_progress.set(self.clock())

    def _probe_kafka(self, heard_from_kafka: bool) -> None:
        """Every `probe_every_s` without records: the topic's end offsets from the broker (bounded wait).
        Success proves that Kafka answers and refreshes the lag gauge; failure counts a retry and, once it
        lasts, makes /healthz unhealthy. While records arrive they prove as much, and their fetch's high
        watermark gives the lag, so the probe (a blocking round trip, ~200 ms with kafka-python when a
        fetch is in flight) is skipped."""
        now = self.monotonic()
        if heard_from_kafka:
            self._next_probe = now + self.settings.probe_every_s
        if now < self._next_probe:
            return
        self._next_probe = now + self.settings.probe_every_s
        partitions = self.consumer.partitions_for_topic(self.settings.topic) or set()
        probed = [TopicPartition(self.settings.topic, p) for p in sorted(partitions)]
        if not probed:
            return
        try:
            ends = self.consumer.end_offsets(probed, timeout_ms=int(self.settings.probe_timeout_s * 1000))
        except KafkaError as exc:
            self.metrics.retries.labels("kafka").inc()
            log.warning("kafka does not answer: %s", exc, extra={"dependency": "kafka"})
            return
        self._made_contact("kafka")
        self._update_lag(ends)

    def _update_lag(self, ends: dict[TopicPartition, int] | None = None) -> None:
        """Lag from the end offsets of the last probe, or else the high watermark of the last fetch."""
        assigned = self.consumer.assignment()
        known = {tp: (ends.get(tp) if ends is not None else self.consumer.highwater(tp)) for tp in assigned}
        lag = self.positions.lag(known)
        for partition, behind in lag.items():
            self.metrics.lag.labels(str(partition)).set(behind)
        self._unwedge({p: behind for p, behind in lag.items() if behind > 0})

    def _unwedge(self, behind: dict[int, int]) -> None:
        """Records waiting, yet none fetched for `refetch_after_s`: seek those partitions to the offsets the
        store holds, which restarts the client's fetching from a known state. Harmless when nothing can be
        fetched (e.g. a transaction marker at the end of the log counts in the end offset)."""
        now = self.monotonic()
        if not behind:
            self._last_fetch = now
            return
        if now - self._last_fetch < self.settings.refetch_after_s:
            return
        self._last_fetch = now
        log.warning("no records fetched for %.0fs while behind: seeking to the store's offsets again",
                    self.settings.refetch_after_s, extra={"behind": behind})  # fmt: skip
        self.metrics.retries.labels("kafka").inc()
        for partition in behind:
            offset = self.positions.next_offset(partition)
            if offset is not None:
                self.consumer.seek(TopicPartition(self.settings.topic, partition), offset)

    def _commit(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Asynchronous: Redis is authoritative, Kafka's committed offsets only feed lag tooling, so a
        commit must never hold the loop (a synchronous one waits out a dead coordinator for 30 s)."""
        assigned = self.consumer.assignment()
        offsets = {
            tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)
            for tp, records in polled.items()
            if tp in assigned
        }
        if not offsets:
            return
        try:
            self.consumer.commit_async(offsets, callback=_log_failed_commit)
        except KafkaError as exc:
            log.warning("kafka offset commit failed (lag tooling only): %s", exc)


def _log_failed_commit(offsets: dict[TopicPartition, OffsetAndMetadata], response: object) -> None:
    if isinstance(response, Exception):
        log.warning("kafka offset commit failed (lag tooling only; the next one catches up): %s", response)


def _same_run(decoded: list[tuple[Any, Any]], records: list[Any]) -> list[tuple[Any, Any]]:
    """The decoded pairs of `records`, a contiguous run of the polled records `decoded` was made from."""
    if not records:
        return []
    start = next(i for i, (record, _) in enumerate(decoded) if record is records[0])
    return decoded[start : start + len(records)]


def _split_at_forgets(pairs: list[tuple[Any, Any]]) -> list[list[tuple[Any, Any]]]:
    """Consecutive runs of records, each forget_user record a run of its own."""
    runs: list[list[tuple[Any, Any]]] = []
    for pair in pairs:
        if isinstance(pair[1], ForgetUser) or not runs or isinstance(runs[-1][0][1], ForgetUser):
            runs.append([pair])
        else:
            runs[-1].append(pair)
    return runs


def _transient_kafka_error(exc: KafkaError) -> bool:
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, KafkaTimeoutError)


def _diverged(row: EventRow) -> Invalid:
    user, item, value, weight, _ = row
    return Invalid(
        "diverged",
        f"the update for user {user!r}, item {item!r} (value {value:g}, weight {weight:g}) would drive "
        "a row out of bounds (STREAMMF_MODEL__MAX_ABS_FACTOR): not applied",
    )


@dataclass(frozen=True)
class _Learnt:
    result: StepResult
    offsets: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class _Batch:
    """A poll's decoded records as the learner takes them: the events and the record of each, the invalid
    records (to dead-letter first), and each partition's (first, next) offsets."""

    events: EventColumns
    sources: list[Any]
    dead: list[tuple[Any, Invalid]]
    offsets: dict[int, tuple[int, int]]

    @classmethod
    def of(cls, decoded: dict[TopicPartition, list[tuple[Any, Any]]]) -> _Batch:
        rows: list[EventRow] = []
        sources: list[Any] = []
        dead: list[tuple[Any, Invalid]] = []
        offsets: dict[int, tuple[int, int]] = {}
        for tp, pairs in decoded.items():
            offsets[tp.partition] = (pairs[0][0].offset, pairs[-1][0].offset + 1)
            for record, item in pairs:
                if type(item) is tuple:  # an EventRow
                    rows.append(item)
                    sources.append(record)
                else:  # forget_user records never reach here (see _process_now)
                    dead.append((record, item))
        return cls(EventColumns.of_rows(rows), sources, dead, offsets)


@dataclass(frozen=True)
class _InFlight:
    polled: dict[TopicPartition, list[Any]]
    future: Future[_Learnt]
    pending: PendingBatch


class _Abandoned(Exception):
    """A batch could not be finished now; it was not applied and will be polled again."""
