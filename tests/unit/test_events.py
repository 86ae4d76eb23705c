"""`decode(bytes, max_bytes, limits) -> Event | Invalid`: valid events, every invalid reason, the strict wire
format and the bounds. The property-based tests are in test_events_fuzz.py."""

from __future__ import annotations

import json

import pytest

from streammf.stream.events import (
    DEFAULT_LIMITS,
    INVALID_REASONS,
    MAX_ID_LENGTH,
    Event,
    EventLimits,
    Invalid,
    decode,
    encode,
)

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


def test_duplicate_key_inside_an_ignored_field_is_rejected_too() -> None:
    result = decode(b'{"user_id": "a", "item_id": "b", "extra": {"k": 1, "k": 2}}', LIMIT)
    assert result == Invalid("schema", "duplicate key 'k'")


def test_reasons() -> None:
    assert INVALID_REASONS == ("oversized", "undecodable", "schema", "non_finite", "out_of_range", "diverged")


# ------------------------------------------------------------------------------------ strict wire format

_EVENT = {"user_id": "a", "item_id": "b", "value": 2.0}


def _assert_invalid(raw: bytes, reason: str, *in_detail: str) -> None:
    result = decode(raw, LIMIT)
    assert isinstance(result, Invalid), result
    assert result.reason == reason, result
    for text in in_detail:
        assert text in result.detail, result


def test_valid_event_is_also_valid_utf8_json() -> None:
    # The control for the encoding tests below: the same object in UTF-8 decodes.
    assert decode(json.dumps(_EVENT).encode("utf-8"), LIMIT) == Event(user_id="a", item_id="b", value=2.0)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_is_undecodable(codec: str) -> None:
    # json.loads(bytes) would auto-detect UTF-16 and accept these.
    assert json.loads(json.dumps(_EVENT).encode(codec)) == _EVENT
    _assert_invalid(json.dumps(_EVENT).encode(codec), "undecodable")


@pytest.mark.parametrize("codec", ["utf-32", "utf-32-le", "utf-32-be"])
def test_utf32_is_undecodable(codec: str) -> None:
    assert json.loads(json.dumps(_EVENT).encode(codec)) == _EVENT
    _assert_invalid(json.dumps(_EVENT).encode(codec), "undecodable")


def test_utf8_byte_order_mark_is_undecodable() -> None:
    raw = json.dumps(_EVENT).encode("utf-8-sig")
    assert raw.startswith(b"\xef\xbb\xbf")
    assert decode(raw, LIMIT) == Invalid("undecodable", "UTF-8 byte-order mark")


@pytest.mark.parametrize("field", ["value", "weight", "timestamp"])
def test_number_as_string_is_schema(field: str) -> None:
    _assert_invalid(_raw({**_EVENT, field: "4"}), "schema", field)


@pytest.mark.parametrize("field", ["value", "weight", "timestamp"])
@pytest.mark.parametrize("flag", [True, False])
def test_boolean_as_number_is_schema(field: str, flag: bool) -> None:
    _assert_invalid(_raw({**_EVENT, field: flag}), "schema", field)


@pytest.mark.parametrize("stamp", ["1700000000", "1700000000.0", "2023-11-14T22:13:20Z"])
def test_string_timestamp_is_schema(stamp: str) -> None:
    _assert_invalid(_raw({**_EVENT, "timestamp": stamp}), "schema", "timestamp")


@pytest.mark.parametrize("field", ["user_id", "item_id", "value", "weight", "timestamp", "event_type"])
def test_duplicate_key_is_schema_not_last_wins(field: str) -> None:
    raw = b'{"user_id": "a", "item_id": "b", "value": 1, "weight": 1, "timestamp": 1, "event_type": "x", '
    raw += f'"{field}": {json.dumps(_EVENT.get(field, 2))}}}'.encode()
    assert decode(raw, LIMIT) == Invalid("schema", f"duplicate key {field!r}")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("field", ["value", "weight", "timestamp"])
def test_nan_and_infinity_literals_are_non_finite(field: str, literal: bytes) -> None:
    raw = b'{"user_id": "a", "item_id": "b", "' + field.encode() + b'": ' + literal + b"}"
    _assert_invalid(raw, "non_finite", field)


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"1.5e309"])
def test_float_literal_beyond_float_range_is_non_finite(literal: bytes) -> None:
    # Python parses it to +-inf: a non-finite number, not a bound violation.
    _assert_invalid(b'{"user_id": "a", "item_id": "b", "value": ' + literal + b"}", "non_finite", "value")


@pytest.mark.parametrize("field", ["value", "weight", "timestamp"])
@pytest.mark.parametrize("sign", [b"", b"-"])
def test_integer_literal_beyond_float_range_is_schema(field: str, sign: bytes) -> None:
    raw = b'{"user_id": "a", "item_id": "b", "' + field.encode() + b'": ' + sign + b"1" + b"0" * 400 + b"}"
    _assert_invalid(raw, "schema", field, "too large")


def test_large_finite_numbers_are_bounds_business() -> None:
    raw = b'{"user_id": "a", "item_id": "b", "value": 1e308}'
    assert decode(raw, LIMIT, EventLimits(value_max=1e308)) == Event(user_id="a", item_id="b", value=1e308)
    _assert_invalid(raw, "out_of_range", "value", "1e+308")


@pytest.mark.parametrize("field", ["user_id", "item_id"])
@pytest.mark.parametrize("flag", [True, False])
def test_bool_id_is_schema(field: str, flag: bool) -> None:
    _assert_invalid(_raw({**_EVENT, field: flag}), "schema", field)


@pytest.mark.parametrize("field", ["user_id", "item_id"])
@pytest.mark.parametrize("number", [1.5, 42.0, 0.0])
def test_float_id_is_schema(field: str, number: float) -> None:
    # Even 42.0: ids are strings or integers, and "42.0" is not "42".
    _assert_invalid(_raw({**_EVENT, field: number}), "schema", field)


@pytest.mark.parametrize("field", ["user_id", "item_id"])
@pytest.mark.parametrize("other", [None, [1], {"id": 1}])
def test_other_id_types_are_schema(field: str, other: object) -> None:
    _assert_invalid(_raw({**_EVENT, field: other}), "schema", field)


def test_int_id_means_its_decimal_string() -> None:
    assert decode(_raw({"user_id": 42, "item_id": -7}), LIMIT) == Event(user_id="42", item_id="-7")
    assert decode(_raw({"user_id": 10**127, "item_id": "b"}), LIMIT) == Event(
        user_id=str(10**127), item_id="b"
    )
    _assert_invalid(_raw({"user_id": 10**128, "item_id": "b"}), "schema", "user_id")  # 129 digits


def test_integer_numbers_are_json_numbers() -> None:
    result = decode(_raw({"user_id": "a", "item_id": "b", "value": 4, "weight": 2, "timestamp": 17}), LIMIT)
    assert result == Event(user_id="a", item_id="b", value=4.0, weight=2.0, timestamp=17.0)
    assert isinstance(result, Event) and type(result.value) is float and type(result.timestamp) is float


@pytest.mark.parametrize("field", ["user_id", "item_id", "event_type"])
def test_lone_surrogate_escape_is_schema(field: str) -> None:
    # "\ud800" is valid JSON but not Unicode text: the id could never be encoded as a Redis key.
    raw = b'{"user_id": "a", "item_id": "b", "' + field.encode() + b'": "x\\ud800"}'
    _assert_invalid(raw, "schema", field)
    # A surrogate pair is fine.
    assert isinstance(decode(b'{"user_id": "\\ud83d\\ude00", "item_id": "b"}', LIMIT), Event)


def test_unknown_fields_stay_ignored_whatever_their_type() -> None:
    payload = {**_EVENT, "score": "4", "flag": True, "when": "yesterday", "n": 1.5}
    assert decode(_raw(payload), LIMIT) == Event(user_id="a", item_id="b", value=2.0)


def test_python_construction_stays_lax() -> None:
    # Only decode is strict: application code may build events from numpy scalars and the like.
    assert Event(user_id="a", item_id=3, value=2).value == 2.0


# --------------------------------------------------------------------------------------------- bounds

_LIMITS = EventLimits(value_min=1.0, value_max=5.0, weight_max=10.0)


def test_default_limits_are_permissive() -> None:
    assert EventLimits() == DEFAULT_LIMITS == EventLimits(value_min=-1e6, value_max=1e6, weight_max=1e6)
    event = Event(user_id="a", item_id="b", value=-1e6, weight=1e6)
    assert decode(encode(event), LIMIT) == event


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        pytest.param({"value": 5.5}, "value: 5.5 > value_max 5.0", id="value-above"),
        pytest.param({"value": 0.5}, "value: 0.5 < value_min 1.0", id="value-below"),
        pytest.param({"value": -1e300}, "value: -1e+300 < value_min 1.0", id="value-far-below"),
        pytest.param({"value": 6}, "value: 6.0 > value_max 5.0", id="int-value-above"),
        pytest.param({"weight": 10.5}, "weight: 10.5 > weight_max 10.0", id="weight-above"),
        pytest.param(
            {"value": 9.0, "weight": 11.0},
            "value: 9.0 > value_max 5.0; weight: 11.0 > weight_max 10.0",
            id="both",
        ),
    ],
)
def test_out_of_range(payload: dict, detail: str) -> None:
    result = decode(_raw({"user_id": "a", "item_id": "b", "value": 3.0, **payload}), LIMIT, _LIMITS)
    assert result == Invalid("out_of_range", detail)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"value": 1.0}, id="value-at-min"),
        pytest.param({"value": 5.0}, id="value-at-max"),
        pytest.param({"value": 5, "weight": 10}, id="ints-at-max"),
        pytest.param({"value": 3.0, "weight": 10.0}, id="weight-at-max"),
        pytest.param({"value": 3.0, "weight": 0.0}, id="weight-zero"),
    ],
)
def test_on_the_bound_is_accepted(payload: dict) -> None:
    result = decode(_raw({"user_id": "a", "item_id": "b", **payload}), LIMIT, _LIMITS)
    assert isinstance(result, Event), result
    assert (result.value, result.weight) == (float(payload["value"]), float(payload.get("weight", 1.0)))


def test_default_value_is_checked_against_the_bounds() -> None:
    # An implicit event (no value: 1.0) under limits that exclude 1.0.
    result = decode(_raw({"user_id": "a", "item_id": "b"}), LIMIT, EventLimits(value_min=2.0, value_max=3.0))
    assert result == Invalid("out_of_range", "value: 1.0 < value_min 2.0")


def test_non_finite_and_schema_come_before_bounds() -> None:
    assert decode(b'{"user_id": "a", "item_id": "b", "value": NaN}', LIMIT, _LIMITS) == Invalid(
        "non_finite", "value: Input should be a finite number"
    )
    assert (
        decode(b'{"user_id": "a", "item_id": "b", "value": Infinity}', LIMIT, _LIMITS).reason == "non_finite"
    )
    negative = decode(_raw({"user_id": "a", "item_id": "b", "weight": -1.0}), LIMIT, _LIMITS)
    assert isinstance(negative, Invalid) and negative.reason == "schema"
    missing = decode(_raw({"item_id": "b", "value": 99.0}), LIMIT, _LIMITS)
    assert isinstance(missing, Invalid) and missing.reason == "schema"


def test_timestamp_has_no_bounds() -> None:
    result = decode(_raw({"user_id": "a", "item_id": "b", "value": 3.0, "timestamp": 1e300}), LIMIT, _LIMITS)
    assert isinstance(result, Event) and result.timestamp == 1e300


@pytest.mark.parametrize(
    "kwargs",
    [
        {"value_min": 2.0, "value_max": 1.0},
        {"weight_max": -1.0},
        {"value_max": float("inf")},
        {"value_min": float("nan")},
        {"weight_max": float("nan")},
    ],
    ids=str,
)
def test_bad_limits_are_rejected_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EventLimits(**kwargs)


def test_limits_are_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.value_max = 5.0  # type: ignore[misc]


def test_null_means_absent_only_for_optional_fields() -> None:
    result = decode(_raw({"user_id": "a", "item_id": "b", "timestamp": None, "event_type": None}), LIMIT)
    assert result == Event(user_id="a", item_id="b")
    for field in ("value", "weight", "user_id"):
        _assert_invalid(_raw({"user_id": "a", "item_id": "b", field: None}), "schema", field)
