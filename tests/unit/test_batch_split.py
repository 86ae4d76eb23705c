"""Splitting a batch over shards and merging its state back (streammf.store.batch_split): pure, no Redis."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from streammf.store.batch_split import BatchSplit, shard_parts
from streammf.store.contract import BatchState, BatchUpdate
from streammf.store.shards import shard_of

K, S = 3, 3


def _update(rng: np.random.Generator) -> BatchUpdate:
    users = [f"u{i}" for i in range(12)]
    items = [f"i{i}" for i in range(15)]
    pairs = [(users[rng.integers(12)], items[rng.integers(15)]) for _ in range(40)]
    pairs = list(dict.fromkeys(pairs))
    pair_new = rng.random(len(pairs)) < 0.6
    counts = Counter(item for (_, item), new in zip(pairs, pair_new, strict=True) if new)
    user_before = np.where(rng.random((12, 1)) < 0.5, rng.normal(size=(12, K)), 0).astype(np.float32)
    item_before = rng.normal(size=(15, K)).astype(np.float32)
    user_after = rng.normal(size=(12, K)).astype(np.float32)
    item_delta = rng.normal(size=(15, K))
    item_after = item_before.astype(np.float64) + item_delta
    wide = user_after.astype(np.float64), user_before.astype(np.float64)
    return BatchUpdate(
        version=3,
        offsets={0: (10, 50), 2: (4, 9)},
        users=users,
        user_rows=user_after,
        user_bias=rng.normal(size=12).astype(np.float32),
        items=items,
        item_base=item_before,
        item_delta=item_delta,
        item_bias_delta=rng.normal(size=15),
        item_count_delta=np.array([counts[i] for i in items], dtype=np.int64),
        pair_users=[u for u, _ in pairs],
        pair_items=[i for _, i in pairs],
        pair_values=rng.random(len(pairs)),
        value_sum_delta=17.5,
        value_count_delta=40,
        events_applied=45,
        item_gramian_delta=item_after.T @ item_after - item_before.astype(np.float64).T @ item_before,
        user_gramian_delta=wide[0].T @ wide[0] - wide[1].T @ wide[1],
        item_popularity=rng.random(15),
        user_rows_before=user_before,
        item_rows_before=item_before,
        pair_new=pair_new,
    )


def test_every_row_pair_and_count_goes_to_exactly_one_shard_and_the_stats_to_every_item_part() -> None:
    update = _update(np.random.default_rng(1))
    item_parts, user_parts, counts = shard_parts(update, S, K)
    assert sorted(u for part in user_parts for u in part.users) == sorted(update.users)
    assert sorted(i for part in item_parts for i in part.items) == sorted(update.items)
    for s in range(S):
        assert all(shard_of(u, S) == s for u in user_parts[s].users + user_parts[s].pair_users)
        assert all(shard_of(i, S) == s for i in item_parts[s].items)
        assert item_parts[s].users == [] and user_parts[s].items == []
        assert item_parts[s].offsets == user_parts[s].offsets == update.offsets
        assert (item_parts[s].value_sum_delta, item_parts[s].events_applied) == (17.5, 45)
        assert (user_parts[s].value_sum_delta, user_parts[s].events_applied) == (0.0, 0)
    pairs = sorted(zip((p for part in user_parts for p in part.pair_users),
                       (p for part in user_parts for p in part.pair_items), strict=True))  # fmt: skip
    assert pairs == sorted(zip(update.pair_users, update.pair_items, strict=True))
    total: Counter[str] = Counter()
    for s, (items, increments) in enumerate(counts):
        total.update(dict(zip(items, increments.tolist(), strict=True)))
        new_here = [i for u, i, new in zip(update.pair_users, update.pair_items, update.pair_new, strict=True)
                    if new and shard_of(u, S) == s]  # fmt: skip
        assert Counter(new_here) == dict(zip(items, increments.tolist(), strict=True))
    assert {i: c for i, c in total.items() if c} == {
        i: int(c) for i, c in zip(update.items, update.item_count_delta, strict=True) if c
    }


def test_gramian_partial_changes_add_up_to_the_batch_change() -> None:
    update = _update(np.random.default_rng(2))
    item_parts, user_parts, _ = shard_parts(update, S, K)
    np.testing.assert_allclose(
        sum(p.item_gramian_delta for p in item_parts), update.item_gramian_delta, atol=1e-9
    )
    np.testing.assert_allclose(
        sum(p.user_gramian_delta for p in user_parts), update.user_gramian_delta, atol=1e-9
    )
    without_rows = replace(update, user_rows_before=None, item_rows_before=None)
    item_parts, user_parts, _ = shard_parts(without_rows, S, K)
    assert item_parts[1].item_gramian_delta is None and user_parts[2].user_gramian_delta is None
    np.testing.assert_array_equal(item_parts[0].item_gramian_delta, update.item_gramian_delta)


def test_merged_shard_states_are_the_batch_state_with_counts_and_gramians_summed() -> None:
    rng = np.random.default_rng(3)
    users, items = [f"u{i}" for i in range(9)], [f"i{i}" for i in range(7)]
    pairs = [(users[i % 9], items[i % 7]) for i in range(11)]
    split = BatchSplit.of(S, users, items, [u for u, _ in pairs])
    full_rows, full_items = (
        rng.normal(size=(9, K)).astype(np.float32),
        rng.normal(size=(7, K)).astype(np.float32),
    )
    partial_counts = rng.integers(0, 4, size=(S, 7))
    partial_grams = rng.normal(size=(S, K, K))
    parts = [
        BatchState(
            version=5,
            user_rows=full_rows[split.users[s]],
            user_bias=np.zeros(len(split.users[s]), dtype=np.float32),
            user_present=np.ones(len(split.users[s]), dtype=bool),
            user_counts=np.arange(len(split.users[s])),
            item_rows=full_items[split.items[s]],
            item_bias=np.zeros(len(split.items[s]), dtype=np.float32),
            item_present=np.ones(len(split.items[s]), dtype=bool),
            item_counts=partial_counts[s],  # every shard's partial count of every item
            pair_values=np.array([float(p) for p in split.pairs[s]]),
            value_sum=4.0 + s,
            value_count=2,
            item_gramian=partial_grams[s],
            user_gramian=partial_grams[s],
        )
        for s in range(S)
    ]
    merged = split.merge(5, parts, K)
    np.testing.assert_array_equal(merged.user_rows, full_rows)
    np.testing.assert_array_equal(merged.item_rows, full_items)
    np.testing.assert_array_equal(merged.item_counts, partial_counts.sum(axis=0))
    np.testing.assert_array_equal(merged.pair_values, np.arange(len(pairs), dtype=float))
    np.testing.assert_allclose(merged.item_gramian, partial_grams.sum(axis=0))
    assert merged.value_sum == 4.0, "the first shard's copy of the stats"
