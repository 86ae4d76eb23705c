"""Where each assigned partition stands, kept by one owner: the rebalance listener tells it what was
assigned or revoked, the loop asks it what to seek, what a poll holds that is already applied, and how
far behind each partition is.

The store is the truth about what is applied (each batch writes its offsets with its effect); this object
is the process's view of it: `next offset applied` per partition, learnt from the store on assignment
(`sync`) and advanced by every batch this process applies.

A store split in shards may hold a partition's batch on some shards only (a crash fell between their
writes): it resumes from the smallest offset, and the first batch must end where the furthest shard stands
(`ahead`), so every shard sees either all of that batch or none of it. Records past such a cap, and the
other partitions' records while a capped batch is pending, are held back and fetched again
(`take_reseeks`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka.structs import TopicPartition

from streammf.store.contract import StoreLostStateError

log = logging.getLogger(__name__)


class Positions:
    def __init__(self) -> None:
        self._unsynced: set[TopicPartition] = set()  # assigned, not yet moved to the store's offset
        self._next: dict[int, int] = {}  # partition -> next offset applied (store's, or this process's)
        self._cap: dict[int, int] = {}  # partition -> the offset its next batch must end at (torn batch)
        self._reseek: dict[TopicPartition, int] = {}  # held back records: fetch again from here
        self._resyncing: set[TopicPartition] = set()  # waiting for a resync, not a first sync

    # --------------------------------------------------------------------------------- rebalances

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        self._unsynced.update(partitions)

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._unsynced.discard(tp)
            self._next.pop(tp.partition, None)
            self._cap.pop(tp.partition, None)
            self._reseek.pop(tp, None)
            self._resyncing.discard(tp)

    def resync(self, partitions: Iterable[TopicPartition]) -> None:
        """Someone else applied part of these partitions' offsets: learn them from the store again."""
        partitions = set(partitions)
        self._unsynced.update(partitions)
        self._resyncing.update(partitions)

    @property
    def needs_sync(self) -> bool:
        return bool(self._unsynced)

    @property
    def capped(self) -> bool:
        """Some partition's next batch must end at a cap (a torn batch is being completed)."""
        return bool(self._cap)

    def sync(
        self, consumer: Any, stored: dict[int, int], rebuild: bool, ahead: dict[int, int] | None = None
    ) -> set[TopicPartition]:
        """Seek the partitions waiting for it to the offsets `stored` (the store's); returns those moved.
        `ahead`: where some shard of the store stands further on (the first batch must end there).

        A partition the store has no offset for is new (it keeps Kafka's position, the earliest offset; on
        a resync it is sought there), or one whose state the store lost: the group committed offsets for
        it, which happens only after an apply. That raises `StoreLostStateError`, or with `rebuild` moves
        it to its earliest offset. Kafka errors (reading a committed offset) propagate; partitions not yet
        handled stay waiting."""
        moved = set()
        for tp in sorted(self._unsynced, key=lambda tp: tp.partition):
            # Not ours (any more): a resync after a conflict names the partitions of the batch in flight,
            # which a rebalance may have taken away since, and a Kafka call below (`committed`) may run
            # the rebalance listener itself. Seeking one raises in the client; its owner syncs it.
            if tp not in self._unsynced or tp not in consumer.assignment():
                self._unsynced.discard(tp)
                self._resyncing.discard(tp)
                continue
            self._reseek.pop(tp, None)
            if ahead and tp.partition in ahead:
                self._cap[tp.partition] = ahead[tp.partition]
                log.warning(
                    "a batch was applied on some shards only: consuming up to the furthest first",
                    extra={
                        "partition": tp.partition,
                        "from": stored.get(tp.partition),
                        "to": ahead[tp.partition],
                    },
                )
            else:
                self._cap.pop(tp.partition, None)
            if tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
                self._next[tp.partition] = stored[tp.partition]
                moved.add(tp)
            else:
                self._next.pop(tp.partition, None)
                committed = consumer.committed(tp)
                if committed is not None:
                    if not rebuild:
                        raise StoreLostStateError(
                            f"the store has no offset for partition {tp.partition} of {tp.topic}, but the "
                            f"consumer group committed offset {committed} there: the store lost the state "
                            "of that partition"
                        )
                    log.warning(
                        "rebuild: partition %d is consumed again from its earliest offset", tp.partition
                    )
                    consumer.seek_to_beginning(tp)
                    moved.add(tp)
                elif tp in self._resyncing:
                    # Nothing of it is applied, and Kafka's position lies past records this process polled
                    # without applying them (a batch refused as a conflict): from the earliest offset.
                    consumer.seek_to_beginning(tp)
                    moved.add(tp)
            self._resyncing.discard(tp)
            self._unsynced.discard(tp)
        return moved

    # --------------------------------------------------------------------------------- processing

    def drop_applied(self, polled: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """`polled` without the records known to be applied: a redelivery (e.g. a fetch that raced a
        seek) must not reach the dead-letter topic or the learner again."""
        fresh: dict[TopicPartition, list[Any]] = {}
        for tp, records in polled.items():
            applied_below = self._next.get(tp.partition)
            if applied_below is None or not records or records[0].offset >= applied_below:  # offsets ascend
                kept = records
            else:
                kept = [r for r in records if r.offset >= applied_below]
            cap = self._cap.get(tp.partition)
            if cap is not None and kept and kept[-1].offset >= cap:
                kept = [r for r in kept if r.offset < cap]
                self._reseek[tp] = cap
            if len(kept) < len(records):
                log.info(
                    "dropped %d redelivered records already applied",
                    len(records) - len(kept),
                    extra={"partition": tp.partition, "applied_below": applied_below},
                )
            if kept:
                fresh[tp] = kept
        capped = sorted((tp for tp in fresh if tp.partition in self._cap), key=lambda tp: tp.partition)
        if capped:
            # A torn batch is completed alone: with records of another partition in it, a shard that has
            # the torn part would see one partition applied and one not, and refuse the whole (conflict).
            for tp in [tp for tp in fresh if tp != capped[0]]:
                self._reseek[tp] = fresh.pop(tp)[0].offset
        return fresh

    def take_reseeks(self) -> dict[TopicPartition, int]:
        """Partitions whose records past a cap were held back by `drop_applied`: seek them there."""
        reseeks, self._reseek = self._reseek, {}
        return reseeks

    def applied(self, partition: int, next_offset: int) -> None:
        self._next[partition] = next_offset
        if self._cap.get(partition, next_offset + 1) <= next_offset:
            del self._cap[partition]

    def next_offset(self, partition: int) -> int | None:
        return self._next.get(partition)

    def lag(self, ends: dict[TopicPartition, int | None]) -> dict[int, int]:
        """partition -> records behind the given end offsets (partitions with a known position only)."""
        return {
            tp.partition: max(0, end - self._next[tp.partition])
            for tp, end in ends.items()
            if end is not None and tp.partition in self._next
        }
