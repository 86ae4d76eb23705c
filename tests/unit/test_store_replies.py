"""How the Redis store reads its scripts' replies and packs its calls, without a server: pair values, users
read whole, the protocol bytes of a pipelined apply."""

from __future__ import annotations

import numpy as np
import pytest
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

from streammf.store.contract import StoreError
from streammf.store.layout import ModelKeys
from streammf.store.redis_store import _packed, _pair_values, _whole_users
from streammf.store.user_cache import NO_WHOLE_USERS


def test_pair_values_read_as_floats_nan_for_absent_and_a_value_python_cannot_read_named() -> None:
    keys = ModelKeys("m")
    pairs = [("alice", "x"), ("alice", "y"), ("bob", "x"), ("bob", "z")]
    values = _pair_values(keys, pairs, b"4,,-2.5e1,17")
    np.testing.assert_array_equal(values, [4.0, np.nan, -25.0, 17.0])
    assert _pair_values(keys, [], b"").shape == (0,)
    # Lua's tonumber (which checked every value of the reply) reads hex; Python's float does not.
    with pytest.raises(StoreError, match=r"inter:bob field 'z': not a number: b'0x10'"):
        _pair_values(keys, pairs, b"4,,1,0x10")


def test_users_read_whole_are_split_by_their_counts_and_unreadable_data_keeps_none() -> None:
    users, counts = ["a", "b", "c"], np.array([2, 7, 1])
    whole = _whole_users(users, counts, b"101", b"x\0y\0z", b"4,2.5,1")  # b has too many to read whole
    assert whole.counts == {"a": 2, "c": 1}
    assert whole.pairs == {("a", "x"): 4.0, ("a", "y"): 2.5, ("c", "z"): 1.0}
    assert _whole_users(users, counts, b"000", b"", b"") is NO_WHOLE_USERS
    # Lua's tonumber reads hex, Python does not; an item name holding NUL splits into one name too many.
    assert _whole_users(users, counts, b"101", b"x\0y\0z", b"4,0x10,1") is NO_WHOLE_USERS
    assert _whole_users(users, counts, b"101", b"x\0y\0z\0w", b"4,2.5,1") is NO_WHOLE_USERS


def test_calls_are_packed_to_the_bytes_redis_py_sends() -> None:
    calls = [
        ("EVALSHA", "f" * 40, 2, "k1", "streammf:{m}:inter:ü", "", b"\x00\r\n", 0, -17, 2**40, 0.1, "a\0b"),
        ("EVALSHA", "e" * 40, 0, *[f"i{n}" for n in range(1000)], *["%.17g" % (n / 7) for n in range(1000)]),
    ]
    # redis-py's own pure-Python packer, which it uses without hiredis: the protocol bytes, independently.
    python_packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", decode_responses=False).encode)
    assert b"".join(_packed(calls)) == b"".join(b"".join(python_packer.pack(*call)) for call in calls)
