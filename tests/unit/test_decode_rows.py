"""`decode_rows`: a poll decoded in one call must give every record exactly what `decode_row` gives it."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streammf.stream.events import (
    DEFAULT_LIMITS,
    EventLimits,
    ForgetUser,
    Invalid,
    _plain_rows,
    decode_row,
    decode_rows,
    encode,
)
from streammf.tools.generate import SyntheticStream
from tests.unit.test_events_fuzz import _any_limits, _events, _near_valid


def _same(a: object, b: object) -> bool:
    if type(a) is tuple and type(b) is tuple:
        return len(a) == len(b) and all(
            type(x) is type(y) and (x == y or (x != x and y != y)) and str(x) == str(y)  # -0.0 vs 0.0
            for x, y in zip(a, b, strict=True)
        )
    return a == b


def _assert_record_by_record(raws: list[bytes | None], max_bytes: int, limits: EventLimits) -> None:
    got = decode_rows(raws, max_bytes, limits)
    expected = [decode_row(raw, max_bytes, limits) for raw in raws]
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert _same(g, e), (t, raws[t], g, e)


def _ordinary(n: int, mode: str = "explicit") -> list[bytes]:
    return [encode(e) for e in SyntheticStream(mode, 200, 50, 4, 3).events(n)]


_ORDINARY = _ordinary(1200)  # more than two runs of the one-call path


_record = st.one_of(
    (_events | _near_valid).map(lambda p: json.dumps(p).encode("utf-8", "surrogatepass")),
    (_events | _near_valid).map(
        lambda p: json.dumps(p, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    st.builds(
        lambda u, i, v: json.dumps({"user_id": u, "item_id": i, "value": v}, separators=(",", ":")).encode(),
        st.text("uvw", min_size=1, max_size=3) | st.integers(0, 99),
        st.text("ij", min_size=1, max_size=2),
        st.floats(-5.0, 5.0) | st.integers(-5, 5),
    ),
    st.sampled_from(
        [
            None,
            b"",
            b"\n",
            b"[]",
            b'{"user_id":"u","item_id":"i","value":1',
            b"2}",
            b'{"user_id":"u","item_id":"i"},{"user_id":"v","item_id":"j"}',
            b'{"user_id":"u",\n"item_id":"i"}',
            b'{"user_id":"u","item_id":"i","item_id":"j"}',
            b'{"user_id":"u","event_type":"forget_user"}',
            b'\xef\xbb\xbf{"user_id":"u","item_id":"i"}',
            b' {"user_id":"u","item_id":"i"}',
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_record, max_size=80), _any_limits, st.sampled_from([60, 4096]))
def test_a_poll_decodes_as_its_records_do_one_by_one(
    raws: list[bytes | None], limits: EventLimits, max_bytes: int
) -> None:
    _assert_record_by_record(raws, max_bytes, limits)


@settings(max_examples=100, deadline=None)
@given(st.lists(_record, min_size=1, max_size=3), st.data())
def test_bad_records_among_plain_ones_get_what_they_get_alone(
    bad: list[bytes | None], data: st.DataObject
) -> None:
    """The bulk stays plain around a few bad records: the halving must still place each answer at its
    record."""
    raws: list[bytes | None] = list(_ORDINARY)
    for record in bad:
        raws.insert(data.draw(st.integers(0, len(raws))), record)
    _assert_record_by_record(raws, 4096, DEFAULT_LIMITS)


def test_ordinary_polls_take_the_one_call_path() -> None:
    """Otherwise the properties above would hold vacuously (and the daemon lose its speed)."""
    for mode in ("explicit", "implicit"):
        raws = _ordinary(500, mode)
        rows = _plain_rows(raws, 4096, DEFAULT_LIMITS)
        assert rows is not None
        assert all(_same(r, decode_row(raw, 4096)) for r, raw in zip(rows, raws, strict=True))
    varied = [
        b'{"user_id": 7, "item_id": "i", "event_type": "click", "timestamp": null}',
        b'{"user_id": "u1", "item_id": 42, "value": 4.5, "weight": 1, "timestamp": 1700000000.5}',
        '{"user_id": "ü", "item_id": "β", "value": -0.0}'.encode(),
        b'{"item_id":"i","user_id":"u"}',
    ]
    rows = _plain_rows(varied, 4096, DEFAULT_LIMITS)
    assert rows is not None
    assert rows[0] == ("7", "i", 1.0, 1.0, rows[0][4]) and math.isnan(rows[0][4])
    assert rows[1] == ("u1", "42", 4.5, 1.0, 1700000000.5)
    assert all(_same(r, decode_row(raw, 4096)) for r, raw in zip(rows, varied, strict=True))


def test_records_that_only_parse_when_joined_are_each_refused() -> None:
    """Joined one a line, these would read as two valid events; alone each is malformed, and so it stays."""
    raws: list[bytes | None] = [
        b'{"user_id":"u","item_id":"i","value":1',
        b'{"user_id":"v","item_id":"j"}',
        b'{"user_id":"w","item_id":"k"},{"user_id":"x","item_id":"l"}',
    ]
    got = decode_rows(raws, 4096)
    assert isinstance(got[0], Invalid) and got[0].reason == "undecodable"
    assert got[1] == ("v", "j", 1.0, 1.0, got[1][4])
    assert isinstance(got[2], Invalid) and got[2].reason == "undecodable"


def test_a_duplicate_key_or_a_forget_among_plain_records_keeps_its_own_answer() -> None:
    raws: list[bytes | None] = list(_ordinary(100))
    raws[37] = b'{"user_id":"u","item_id":"i","value":1,"value":5}'
    raws[80] = b'{"user_id":"gone","event_type":"forget_user"}'
    raws[90] = None
    got = decode_rows(raws, 4096)
    assert got[37] == Invalid("schema", "duplicate key 'value'")
    assert got[80] == ForgetUser("gone")
    assert got[90] == Invalid("undecodable", "record has no value")
    assert all(type(got[t]) is tuple for t in range(100) if t not in (37, 80, 90))
    _assert_record_by_record(raws, 4096, DEFAULT_LIMITS)


def test_what_msgspec_reads_otherwise_stays_with_decode_row() -> None:
    """Three cases where msgspec alone would differ from `decode_row` (found by review): a float literal of
    ~100,000 digits (msgspec 0.23 reads 0.0), integer limits a double cannot hold, numpy float limits."""
    huge = b'{"user_id":"u","item_id":"i","value":0.' + b"0" * 99_999 + b"5e100000}"
    (row,) = decode_rows([huge], 1 << 17)
    assert _same(row, decode_row(huge, 1 << 17)) and _same(row, ("u", "i", 5.0, 1.0, math.nan))
    limits = EventLimits(value_min=2**53 + 1, value_max=2**54, weight_max=1e6)
    raw = b'{"user_id":"u","item_id":"i","value":9007199254740992}'
    assert decode_rows([raw], 4096, limits) == [decode_row(raw, 4096, limits)]
    assert isinstance(decode_row(raw, 4096, limits), Invalid)
    numpy_limits = EventLimits(np.float64(-10.0), np.float64(10.0), np.float64(100.0))
    _assert_record_by_record(list(_ORDINARY[:50]), 4096, numpy_limits)
    assert _plain_rows(_ORDINARY[:50], 4096, numpy_limits) is not None


def test_bad_records_spread_through_a_poll() -> None:
    raws: list[bytes | None] = list(_ORDINARY)
    for t in range(0, len(raws), 9):
        raws[t] = (
            b'{"user_id":"u","item_id":"i","item_id":"j"}'
            if t % 2
            else b'{"user_id":"u","item_id":"i","x":1}'
        )
    _assert_record_by_record(raws, 4096, DEFAULT_LIMITS)
