"""A map from non-negative int64 keys to float64 values in two numpy arrays (open addressing, linear
probing), with whole-batch operations compiled by numba.

The writer's copy of users (`streammf.store.user_cache`) keeps every interaction of its users here, keyed
by user id << 32 | item id. A Python dict of int → float costs ~100 bytes per entry and a Python call per
look-up; this table costs 16 bytes per slot (at most half the slots are used: 32–64 bytes per entry) and
one compiled loop per batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EMPTY = -1  # keys are non-negative
_MIN_SLOTS = 1024
# Fibonacci hashing: multiply by 2^64 / golden ratio and keep the top bits, so that keys differing only in
# their low bits (one user's items) spread over the whole table.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class PairTable:
    """int64 key (≥ 0) → float64 value. Holds at most half its slots; grows by doubling."""

    def __init__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def clear(self) -> None:
        """Empty, at the smallest size."""
        self._keys = np.full(_MIN_SLOTS, EMPTY, dtype=np.int64)
        self._values = np.zeros(_MIN_SLOTS, dtype=np.float64)
        self._size = 0

    def get(self, keys: np.ndarray, default: float) -> np.ndarray:
        """The value of each key, `default` for a key not in the table."""
        out = np.empty(len(keys), dtype=np.float64)
        _get(self._keys, self._values, _shift(self._keys), _as_keys(keys), default, out)
        return out

    def set(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Each key's value becomes its value (a key listed twice: its last)."""
        self.record(keys, values, additive=False, new_per_owner=None)

    def record(
        self, keys: np.ndarray, values: np.ndarray, additive: bool, new_per_owner: np.ndarray | None
    ) -> None:
        """Values one after the other in order: added to the stored value (0 for a new key) when
        `additive`, else set. Each key not in the table before adds 1 to `new_per_owner[key >> 32]`."""
        keys = _as_keys(keys)
        values = np.asarray(values, dtype=np.float64)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        # The kernel indexes `new_per_owner` unchecked (numba does not check bounds): check here, once.
        if new_per_owner is not None and len(keys) and int(keys.max()) >> 32 >= len(new_per_owner):
            raise ValueError(f"a key's owner {int(keys.max()) >> 32} is past {len(new_per_owner)} counts")
        self._reserve(self._size + len(keys))
        count = new_per_owner is not None
        counts = new_per_owner if count else np.zeros(0, dtype=np.int64)
        shift = _shift(self._keys)
        self._size += _record(self._keys, self._values, shift, keys, values, additive, count, counts)

    def _reserve(self, entries: int) -> None:
        """Room for `entries` keys at most half the slots."""
        slots = len(self._keys)
        if 2 * entries <= slots:
            return
        while 2 * entries > slots:
            slots *= 2
        keys = np.full(slots, EMPTY, dtype=np.int64)
        values = np.zeros(slots, dtype=np.float64)
        _rehash(self._keys, self._values, keys, values, _shift(keys))
        self._keys, self._values = keys, values


def _as_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) and int(keys.min()) < 0:
        raise ValueError("pair table keys are non-negative")
    return keys


def _shift(slots: np.ndarray) -> int:
    """64 − log2(number of slots): the top bits of the hash index the table."""
    return 64 - (len(slots).bit_length() - 1)


@njit(cache=True, nogil=True)
def _slot(table, key, shift):  # fmt: skip
    """The slot holding `key`, or the empty slot where it would go (the table always has one)."""
    mask = table.shape[0] - 1
    i = np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(shift))
    while table[i] != key and table[i] != EMPTY:
        i = (i + 1) & mask
    return i


@njit(cache=True, nogil=True)
def _get(table, values, shift, keys, default, out):  # fmt: skip
    for t in range(keys.shape[0]):
        i = _slot(table, keys[t], shift)
        out[t] = values[i] if table[i] == keys[t] else default


@njit(cache=True, nogil=True)
def _record(table, values, shift, keys, new_values, additive, count, counts):  # fmt: skip
    added = 0
    for t in range(keys.shape[0]):
        key = keys[t]
        i = _slot(table, key, shift)
        if table[i] == EMPTY:
            table[i] = key
            values[i] = 0.0
            added += 1
            if count:
                counts[key >> 32] += 1
        if additive:
            values[i] += new_values[t]
        else:
            values[i] = new_values[t]
    return added


@njit(cache=True, nogil=True)
def _rehash(old_table, old_values, table, values, shift):  # fmt: skip
    for j in range(old_table.shape[0]):
        if old_table[j] != EMPTY:
            i = _slot(table, old_table[j], shift)
            table[i] = old_table[j]
            values[i] = old_values[j]
