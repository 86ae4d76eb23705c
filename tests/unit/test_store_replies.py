"""How the Redis store reads its scripts' replies, without a server: pair values."""

from __future__ import annotations

import numpy as np
import pytest

from streammf.store.contract import StoreError
from streammf.store.layout import ModelKeys
from streammf.store.redis_store import _pair_values


def test_pair_values_read_as_floats_nan_for_absent_and_a_value_python_cannot_read_named() -> None:
    keys = ModelKeys("m")
    pairs = [("alice", "x"), ("alice", "y"), ("bob", "x"), ("bob", "z")]
    values = _pair_values(keys, pairs, b"4,,-2.5e1,17")
    np.testing.assert_array_equal(values, [4.0, np.nan, -25.0, 17.0])
    assert _pair_values(keys, [], b"").shape == (0,)
    # Lua's tonumber (which checked every value of the reply) reads hex; Python's float does not.
    with pytest.raises(StoreError, match=r"inter:bob field 'z': not a number: b'0x10'"):
        _pair_values(keys, pairs, b"4,,1,0x10")
