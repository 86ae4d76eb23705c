"""How one batch is split over the shards of a model and its state merged back: pure functions on numpy
arrays, no I/O (`streammf.store.redis_store` sends the parts).

A batch on S shards has an item part and a user part per shard. The item part carries the shard's items
(rows as deltas, popularity), the batch's stats deltas (every shard keeps a copy of the stats) and the
change of the shard's item Gramian partial sum; the user part carries the shard's users (rows, their
interactions), the item counts of their new pairs (a pair is counted on its user's shard, where its
newness is known) and the change of the shard's user Gramian partial sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from streammf.store.contract import BatchState, BatchUpdate
from streammf.store.shards import shard_indices


@dataclass(frozen=True)
class BatchSplit:
    """Positions of a batch's users, items and pairs (by their user) held by each shard."""

    users: list[np.ndarray]
    items: list[np.ndarray]
    pairs: list[np.ndarray]

    @classmethod
    def of(
        cls, shards: int, users: Sequence[str], items: Sequence[str], pair_users: Sequence[str]
    ) -> BatchSplit:
        def positions(ids: Sequence[str]) -> list[np.ndarray]:
            held = shard_indices(ids, shards)
            return [np.flatnonzero(held == s) for s in range(shards)]

        return cls(positions(users), positions(items), positions(pair_users))

    def merge(self, version: int, parts: list[BatchState], k: int) -> BatchState:
        """The shards' states as one, in the order of the batch; stats from the first shard (each holds a
        copy), Gramians and item counts summed (each holds the partial sum over its rows, its users)."""
        n_users, n_items, n_pairs = (
            sum(len(at) for at in side) for side in (self.users, self.items, self.pairs)
        )

        def gather(side: list[np.ndarray], field: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            out = np.zeros(shape, dtype=dtype)
            for at, part in zip(side, parts, strict=True):
                out[at] = getattr(part, field)
            return out

        def total(field: str) -> np.ndarray | None:
            grams = [getattr(part, field) for part in parts]
            return None if grams[0] is None else np.sum(grams, axis=0)

        return BatchState(
            version=version,
            user_rows=gather(self.users, "user_rows", (n_users, k), np.float32),
            user_bias=gather(self.users, "user_bias", (n_users,), np.float32),
            user_present=gather(self.users, "user_present", (n_users,), bool),
            user_counts=gather(self.users, "user_counts", (n_users,), np.int64),
            item_rows=gather(self.items, "item_rows", (n_items, k), np.float32),
            item_bias=gather(self.items, "item_bias", (n_items,), np.float32),
            item_present=gather(self.items, "item_present", (n_items,), bool),
            item_counts=np.sum([part.item_counts for part in parts], axis=0, dtype=np.int64).reshape(n_items),
            pair_values=gather(self.pairs, "pair_values", (n_pairs,), np.float64),
            value_sum=parts[0].value_sum,
            value_count=parts[0].value_count,
            item_gramian=total("item_gramian"),
            user_gramian=total("user_gramian"),
        )


Counts = tuple[list[str], np.ndarray]  # items and the increments of their counts


def shard_parts(
    update: BatchUpdate, shards: int, k: int
) -> tuple[list[BatchUpdate], list[BatchUpdate], list[Counts]]:
    """Each shard's parts of a batch, both with the batch's offsets: the item part (its items' rows and
    popularity, the stats deltas: every shard keeps a copy of the stats, the change of its item Gramian
    partial sum), the user part (its users' rows and interactions, its user Gramian's change), and the
    user part's item counts: each shard counts the new pairs of its own users, whose newness it holds, so
    a replay after a crash or after a shard lost writes finds the same pairs new where they are counted."""
    split = BatchSplit.of(shards, update.users, update.items, update.pair_users)
    by_rows = update.user_rows_before is not None and update.item_rows_before is not None
    user_after = np.asarray(update.user_rows, dtype=np.float64).reshape(len(update.users), k)
    item_after = np.asarray(update.item_base, dtype=np.float64).reshape(len(update.items), k) + np.asarray(
        update.item_delta, dtype=np.float64
    ).reshape(len(update.items), k)

    def partial(delta: np.ndarray | None, after: np.ndarray, before: np.ndarray | None, s: int) -> Any:
        """Shard s's change: by its rows when the rows before are known (so each partial sum stays the
        Gramian of the shard's rows, also when a torn batch is recomputed); else all on shard 0."""
        if delta is None:
            return None
        if not by_rows:
            return delta if s == 0 else None
        at = (split.users if after is user_after else split.items)[s]
        start = np.asarray(before, dtype=np.float64).reshape(after.shape)[at]
        return after[at].T @ after[at] - start.T @ start

    no_rows = np.zeros((0, k), dtype=np.float32)
    item_parts, user_parts = [], []
    for s in range(shards):
        u, i, p = split.users[s], split.items[s], split.pairs[s]
        item_parts.append(
            replace(
                update,
                users=[],
                user_rows=no_rows,
                user_bias=np.zeros(0, dtype=np.float32),
                items=[update.items[r] for r in i],
                item_base=np.asarray(update.item_base)[i],
                item_delta=np.asarray(update.item_delta)[i],
                item_bias_delta=np.asarray(update.item_bias_delta)[i],
                item_count_delta=np.asarray(update.item_count_delta)[i],
                pair_users=[],
                pair_items=[],
                pair_values=np.zeros(0),
                item_gramian_delta=partial(update.item_gramian_delta, item_after, update.item_rows_before, s),
                user_gramian_delta=None,
                item_popularity=None
                if update.item_popularity is None
                else np.asarray(update.item_popularity)[i],
                user_rows_before=None,
                item_rows_before=None if update.item_rows_before is None else update.item_rows_before[i],
            )
        )
        user_parts.append(
            replace(
                update,
                users=[update.users[r] for r in u],
                user_rows=np.asarray(update.user_rows)[u],
                user_bias=np.asarray(update.user_bias)[u],
                items=[],
                item_base=no_rows,
                item_delta=np.zeros((0, k)),
                item_bias_delta=np.zeros(0),
                item_count_delta=np.zeros(0, dtype=np.int64),
                pair_users=[update.pair_users[r] for r in p],
                pair_items=[update.pair_items[r] for r in p],
                pair_values=np.asarray(update.pair_values)[p],
                value_sum_delta=0.0,
                value_count_delta=0,
                events_applied=0,
                item_gramian_delta=None,
                user_gramian_delta=partial(update.user_gramian_delta, user_after, update.user_rows_before, s),
                item_popularity=None,
                user_rows_before=None,
                item_rows_before=None,
            )
        )
    return item_parts, user_parts, shard_counts(update, split)


def shard_counts(update: BatchUpdate, split: BatchSplit) -> list[Counts]:
    """Per shard, the count increments of the items of its users' new pairs; without `pair_new`, each
    item's increment goes to its own shard (the sums are right, a torn replay may miss a count)."""
    if update.pair_new is None:
        deltas = np.asarray(update.item_count_delta)
        return [([update.items[r] for r in at], deltas[at]) for at in split.items]
    new = np.asarray(update.pair_new, dtype=bool)
    counted = []
    for at in split.pairs:
        items = [update.pair_items[r] for r in at[new[at]]]
        unique = list(dict.fromkeys(items))
        index = {item: i for i, item in enumerate(unique)}
        counted.append(
            (unique, np.bincount([index[i] for i in items], minlength=len(unique)).astype(np.int64))
        )
    return counted
