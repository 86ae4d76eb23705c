"""The pair table against a Python dict doing the same operations one key at a time."""

from __future__ import annotations

import numpy as np
import pytest

from streammf.store.pair_table import PairTable


def _keys(rng: np.random.Generator, n: int, users: int, items: int) -> np.ndarray:
    return (rng.integers(0, users, n) << 32) | rng.integers(0, items, n)


def test_batches_of_sets_and_additions_match_a_dict_one_key_at_a_time_across_growth() -> None:
    rng = np.random.default_rng(7)
    table, reference = PairTable(), {}
    counts, expected_counts = np.zeros(300, dtype=np.int64), np.zeros(300, dtype=np.int64)
    for batch in range(60):  # ~60,000 keys, most distinct: the table doubles many times
        keys = _keys(rng, 1500, 300, 400)
        values = rng.normal(size=len(keys)) * 10.0 ** rng.integers(-3, 4, len(keys))
        additive = batch % 3 != 0
        table.record(keys, values, additive, new_per_owner=counts)
        for key, value in zip(keys.tolist(), values.tolist(), strict=True):
            if key not in reference:
                expected_counts[key >> 32] += 1
            reference[key] = (reference.get(key, 0.0) + value) if additive else value
        probe = np.concatenate([keys, _keys(rng, 500, 300, 400)])
        got = table.get(probe, np.nan)
        want = np.array([reference.get(key, np.nan) for key in probe.tolist()])
        np.testing.assert_array_equal(got, want)  # bit for bit: the same additions in the same order
        assert len(table) == len(reference)
    np.testing.assert_array_equal(counts, expected_counts)
    assert table.nbytes <= 16 * 4 * len(reference)  # 16 bytes a slot, at least a quarter of them used


def test_keys_sharing_their_low_bits_all_stay_distinct() -> None:
    table = PairTable()
    keys = np.arange(5000, dtype=np.int64) << 32  # item 0 of 5,000 users
    table.set(keys, np.arange(5000, dtype=np.float64))
    np.testing.assert_array_equal(table.get(keys, -1.0), np.arange(5000))
    assert table.get(np.array([1, (5000 << 32)]), -1.0).tolist() == [-1.0, -1.0]


def test_a_key_twice_in_one_set_keeps_its_last_value_and_counts_once() -> None:
    table, counts = PairTable(), np.zeros(2, dtype=np.int64)
    key = (1 << 32) | 9
    table.record(np.array([key, key, key]), np.array([1.0, 2.0, 3.0]), additive=False, new_per_owner=counts)
    assert table.get(np.array([key]), np.nan).tolist() == [3.0]
    assert counts.tolist() == [0, 1]
    table.record(np.array([key]), np.array([0.5]), additive=True, new_per_owner=counts)
    assert table.get(np.array([key]), np.nan).tolist() == [3.5]
    assert counts.tolist() == [0, 1]


def test_clear_empties_it_and_bad_input_is_refused() -> None:
    table = PairTable()
    table.set(np.array([5, 6]), np.array([1.0, 2.0]))
    table.clear()
    assert len(table) == 0 and np.isnan(table.get(np.array([5, 6]), np.nan)).all()
    with pytest.raises(ValueError, match="non-negative"):
        table.set(np.array([-1]), np.array([1.0]))
    with pytest.raises(ValueError, match="2 keys for 1 values"):
        table.set(np.array([1, 2]), np.array([1.0]))
    with pytest.raises(ValueError, match="owner 2 is past 2 counts"):
        table.record(
            np.array([2 << 32]), np.array([1.0]), additive=True, new_per_owner=np.zeros(2, dtype=np.int64)
        )
    assert len(table) == 0
