"""`decode(bytes) -> Event | Invalid`: valid events, every invalid reason, and that it never raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streammf.events import MAX_ID_LENGTH, Event, Invalid, decode, encode

LIMIT = 4096


def _raw(payload: object) -> bytes:
    return json.dumps(payload).encode()


# ---------------------------------------------------------------------------------------------- valid


def test_full_event() -> None:
    event = decode(
        b'{"user_id": "u123", "item_id": 42, "value": 4.5, "weight": 2.0, '
        b'"timestamp": 1700000000.0, "event_type": "rating"}',
        LIMIT,
    )
    assert event == Event(
        user_id="u123", item_id="42", value=4.5, weight=2.0, timestamp=1700000000.0, event_type="rating"
    )


def test_int_ids_become_strings() -> None:
    event = decode(_raw({"user_id": 7, "item_id": 0}), LIMIT)
    assert isinstance(event, Event)
    assert (event.user_id, event.item_id) == ("7", "0")
    assert type(event.user_id) is str and type(event.item_id) is str
    # 42 and "42" name the same id.
    assert decode(_raw({"user_id": "7", "item_id": "0"}), LIMIT) == event


def test_defaults() -> None:
    event = decode(_raw({"user_id": "a", "item_id": "b"}), LIMIT)
    assert isinstance(event, Event)
    assert event.value == 1.0
    assert event.weight == 1.0
    assert event.timestamp is None
    assert event.event_type is None


def test_extra_fields_are_ignored() -> None:
    event = decode(
        _raw({"user_id": "a", "item_id": "b", "value": 3, "colour": "red", "nested": {"x": [1]}}), LIMIT
    )
    assert isinstance(event, Event)
    assert event == Event(user_id="a", item_id="b", value=3.0)
    assert not hasattr(event, "colour")


def test_zero_weight_and_max_length_id_are_valid() -> None:
    event = decode(_raw({"user_id": "u" * MAX_ID_LENGTH, "item_id": "b", "weight": 0}), LIMIT)
    assert isinstance(event, Event)
    assert event.weight == 0.0 and len(event.user_id) == MAX_ID_LENGTH


def test_encode_round_trips() -> None:
    event = Event(user_id="u", item_id="9", value=-2.5, weight=0.5, timestamp=12.0, event_type="click")
    assert decode(encode(event), LIMIT) == event


# -------------------------------------------------------------------------------------------- invalid


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="none-value"),
        pytest.param(b'{"user_id": "a", "item_id": "\xff\xfe"}', id="bad-utf8"),
        pytest.param(b"\xc3\x28", id="bad-utf8-only"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"user_id": "a", "item_id": "b"', id="truncated"),
        pytest.param(b"", id="empty"),
    ],
)
def test_undecodable(raw: bytes | None) -> None:
    result = decode(raw, LIMIT)
    assert isinstance(result, Invalid)
    assert result.reason == "undecodable"
    assert result.detail


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({"item_id": "b"}, "user_id", id="missing-user"),
        pytest.param({"user_id": "a"}, "item_id", id="missing-item"),
        pytest.param({"user_id": "", "item_id": "b"}, "user_id", id="empty-id"),
        pytest.param({"user_id": "a", "item_id": "x" * (MAX_ID_LENGTH + 1)}, "item_id", id="id-too-long"),
        pytest.param({"user_id": True, "item_id": "b"}, "user_id", id="bool-id"),
        pytest.param({"user_id": "a", "item_id": False}, "item_id", id="bool-item-id"),
        pytest.param({"user_id": 1.5, "item_id": "b"}, "user_id", id="float-id"),
        pytest.param({"user_id": "a\nb", "item_id": "b"}, "user_id", id="control-char-id"),
        pytest.param({"user_id": "a", "item_id": "b", "weight": -0.5}, "weight", id="negative-weight"),
        pytest.param({"user_id": "a", "item_id": "b", "value": "lots"}, "value", id="non-numeric-value"),
        pytest.param({"user_id": "a", "item_id": "b", "timestamp": -1}, "timestamp", id="negative-timestamp"),
    ],
)
def test_schema_errors(payload: dict, field: str) -> None:
    result = decode(_raw(payload), LIMIT)
    assert isinstance(result, Invalid)
    assert result.reason == "schema"
    assert field in result.detail


@pytest.mark.parametrize(
    "raw", [b"[1, 2]", b'["user_id", "item_id"]', b'"a string"', b"42", b"null", b"true"], ids=str
)
def test_non_object_json_is_schema(raw: bytes) -> None:
    result = decode(raw, LIMIT)
    assert isinstance(result, Invalid)
    assert result.reason == "schema"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"user_id": "a", "item_id": "b", "value": NaN}', id="nan-value"),
        pytest.param(b'{"user_id": "a", "item_id": "b", "value": Infinity}', id="inf-value"),
        pytest.param(b'{"user_id": "a", "item_id": "b", "value": -Infinity}', id="neg-inf-value"),
        pytest.param(b'{"user_id": "a", "item_id": "b", "value": 1e999}', id="overflow-value"),
        pytest.param(b'{"user_id": "a", "item_id": "b", "weight": Infinity}', id="inf-weight"),
        pytest.param(b'{"user_id": "a", "item_id": "b", "weight": NaN}', id="nan-weight"),
        pytest.param(b'{"user_id": "a", "item_id": "b", "timestamp": 1e999}', id="inf-timestamp"),
    ],
)
def test_non_finite(raw: bytes) -> None:
    result = decode(raw, LIMIT)
    assert isinstance(result, Invalid)
    assert result.reason == "non_finite"


def test_oversized_is_checked_before_parsing() -> None:
    valid = _raw({"user_id": "a", "item_id": "b", "pad": "x" * 200})
    assert isinstance(decode(valid, len(valid)), Event)
    result = decode(valid, len(valid) - 1)
    assert isinstance(result, Invalid) and result.reason == "oversized"
    garbage = b"\xff" * 100
    assert decode(garbage, 99) == Invalid("oversized", "100 bytes > limit 99")


def test_deep_nesting_is_undecodable_not_a_crash() -> None:
    raw = b"[" * 200_000 + b"]" * 200_000
    result = decode(raw, len(raw))
    assert isinstance(result, Invalid)
    assert result.reason in ("undecodable", "schema")


def test_details_are_bounded() -> None:
    payload = {"user_id": "x" * 1000, "item_id": "y" * 1000, "weight": -1, "value": "z" * 1000}
    result = decode(_raw(payload), 100_000)
    assert isinstance(result, Invalid)
    assert len(result.detail) <= 300


def test_huge_integer_literal_does_not_raise() -> None:
    raw = b'{"user_id": ' + b"1" * 5000 + b', "item_id": "b"}'
    result = decode(raw, 10_000)
    assert isinstance(result, Invalid)
    assert result.reason in ("undecodable", "schema")


# -------------------------------------------------------------------------------------- never raises

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=140),
)
_json = (
    _json_leaf
    | st.lists(_json_leaf, max_size=3)
    | st.dictionaries(st.text(max_size=5), _json_leaf, max_size=3)
)
_ids = st.integers(min_value=-(10**6), max_value=10**6) | st.text(min_size=1, max_size=10) | _json
_numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**30), 10**30) | _json
_events = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _ids,
        "item_id": _ids,
        "value": _numbers,
        "weight": _numbers,
        "timestamp": _numbers,
        "event_type": st.text(max_size=80) | _json,
        "extra": _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_decode_never_raises_on_arbitrary_bytes(raw: bytes, max_bytes: int) -> None:
    result = decode(raw, max_bytes)
    assert isinstance(result, Event | Invalid)
    if len(raw) > max_bytes:
        assert result == Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}")


@settings(max_examples=300, deadline=None)
@given(_events)
def test_decode_never_raises_on_json_objects(payload: dict) -> None:
    # json.dumps writes NaN/Infinity literals, which json.loads reads back: exactly what producers can send.
    raw = json.dumps(payload).encode()
    result = decode(raw, 1 << 20)
    assert isinstance(result, Event | Invalid)
    if isinstance(result, Event):
        assert 1 <= len(result.user_id) <= MAX_ID_LENGTH and 1 <= len(result.item_id) <= MAX_ID_LENGTH
        assert result.weight >= 0
        for number in (result.value, result.weight, result.timestamp or 0.0):
            assert number == number and abs(number) != float("inf")
    else:
        assert result.reason in ("schema", "non_finite")


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.integers(min_value=-(10**40), max_value=10**40), st.text(min_size=1, max_size=MAX_ID_LENGTH)
    ),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, allow_infinity=False),
)
def test_valid_events_decode(user: int | str, value: float, weight: float) -> None:
    raw = _raw({"user_id": user, "item_id": "i", "value": value, "weight": weight})
    result = decode(raw, 1 << 20)
    ident = str(user)
    if any(ord(c) < 0x20 for c in ident) or len(ident) > MAX_ID_LENGTH:
        assert isinstance(result, Invalid) and result.reason == "schema"
    else:
        assert isinstance(result, Event), result
        assert (result.user_id, result.value, result.weight) == (ident, value, weight)
