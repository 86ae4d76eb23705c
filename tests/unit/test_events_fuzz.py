"""Property-based tests of `decode`: it never raises, and whatever it accepts is within the schema and the
bounds."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from streammf.stream.events import (
    DEFAULT_LIMITS,
    INVALID_REASONS,
    MAX_ID_LENGTH,
    Event,
    EventColumns,
    EventLimits,
    Invalid,
    _checked,
    _plain_event,
    decode,
    decode_row,
    event_row,
    row_event,
)

_FAST = settings(max_examples=400, deadline=None)

# ----------------------------------------------------------------------------------------- strategies

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
# Lone surrogates: json.dumps escapes them ("\ud800"), json.loads reads them back into a str.
_surrogates = st.text(st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=4)
_ids = st.one_of(
    _surrogates,
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=-(10**200), max_value=10**200),  # up to 201 chars: some too long
    st.text(min_size=1, max_size=10),
    st.text(max_size=MAX_ID_LENGTH + 2),
    st.sampled_from(["", "a\nb", "\x00", "\x7f", "x" * MAX_ID_LENGTH, "x" * (MAX_ID_LENGTH + 1)]),
    st.floats(),
    _json,
)
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2e6, max_value=2e6),  # near the default bounds
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, 1e6, -1e6, 1e6 + 1, math.nan, math.inf, -math.inf]),
    st.integers(-(10**30), 10**30),
    st.sampled_from([10**400, -(10**400), 2**1024, 2**1024 - 1, 10**6, 10**6 + 1]),  # beyond the float range
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    _json,
)
_events = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _ids,
        "item_id": _ids,
        "value": _numbers,
        "weight": _numbers,
        "timestamp": _numbers,
        "event_type": st.text(max_size=80) | _surrogates | _json,
        "extra": _json,
    },
)

# Valid ids and mostly sane numbers: the remaining fields decide, so accepted events are common.
_near_valid = st.fixed_dictionaries(
    {"user_id": st.integers(0, 10**6) | st.text("abc", min_size=1, max_size=5), "item_id": st.just("i")},
    optional={
        "value": _numbers | st.floats(-10.0, 10.0) | st.sampled_from(["4", "4.5", True, False]),
        "weight": _numbers | st.floats(0.0, 10.0) | st.sampled_from(["1", True]),
        "timestamp": _numbers | st.floats(0.0, 2e9) | st.sampled_from(["1700000000", True]),
        "event_type": _surrogates | st.text(max_size=10) | st.integers(0, 9),
        "extra": _json,
    },
)


@st.composite
def _limits(draw: st.DrawFn) -> EventLimits:
    bound = st.floats(min_value=-1e9, max_value=1e9)
    low, high = sorted((draw(bound), draw(bound)))
    return EventLimits(
        value_min=low, value_max=high, weight_max=draw(st.floats(min_value=0.0, max_value=1e9))
    )


_any_limits = st.just(DEFAULT_LIMITS) | _limits()


def _assert_within(result: Event | Invalid, limits: EventLimits) -> None:
    assert isinstance(result, Event | Invalid)
    if isinstance(result, Invalid):
        assert result.reason in INVALID_REASONS and result.reason != "diverged"
        assert isinstance(result.detail, str) and 0 < len(result.detail) <= 300
        result.detail.encode()  # travels as a Kafka header
        return
    for ident in (result.user_id, result.item_id):
        assert type(ident) is str and 1 <= len(ident) <= MAX_ID_LENGTH
        assert not any(ord(c) < 0x20 for c in ident)
        ident.encode()  # a Redis key
    for number in (result.value, result.weight):
        assert type(number) is float and math.isfinite(number)
    assert limits.value_min <= result.value <= limits.value_max
    assert 0.0 <= result.weight <= limits.weight_max
    if result.timestamp is not None:
        assert type(result.timestamp) is float and math.isfinite(result.timestamp) and result.timestamp >= 0
    if result.event_type is not None:
        assert len(result.event_type) <= 64
        result.event_type.encode()


# ------------------------------------------------------------------------------------------ properties


@_FAST
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400), _any_limits)
def test_decode_never_raises_on_arbitrary_bytes(raw: bytes, max_bytes: int, limits: EventLimits) -> None:
    result = decode(raw, max_bytes, limits)
    _assert_within(result, limits)
    if len(raw) > max_bytes:
        assert result == Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}")


@_FAST
@given(
    st.lists(
        st.sampled_from(
            [
                b"{",
                b"}",
                b"[",
                b"]",
                b'"',
                b":",
                b",",
                b"1",
                b"-",
                b"e",
                b"\\",
                b"NaN",
                b'"user_id"',
                b'"item_id"',
                b'"value"',
                b"true",
                b"null",
                b"\xef\xbb\xbf",
                b"\x00",
                b"\xff",
                b" ",
            ]
        ),
        max_size=60,
    )
)
def test_decode_never_raises_on_json_like_bytes(parts: list[bytes]) -> None:
    _assert_within(decode(b"".join(parts), 1 << 20), DEFAULT_LIMITS)


@_FAST
@given(_events | _near_valid, _any_limits)
def test_decode_never_raises_on_json_objects(payload: dict, limits: EventLimits) -> None:
    # json.dumps writes NaN/Infinity literals, which json.loads reads back: exactly what producers can send.
    raw = json.dumps(payload).encode()
    result = decode(raw, 1 << 20, limits)
    _assert_within(result, limits)
    if isinstance(result, Invalid):
        assert result.reason in ("schema", "non_finite", "out_of_range")
    else:
        # Strict: only JSON numbers for numbers, only strings and integers for ids, only strings for text.
        for key in ("value", "weight"):
            assert key not in payload or type(payload[key]) in (int, float), payload
        # null is "absent" for the optional fields (timestamp, event_type).
        assert type(payload.get("timestamp")) in (int, float, type(None)), payload
        # What the producer meant, as JSON reads it: a surrogate pair in a Python str is one character.
        sent = json.loads(raw)
        for key in ("user_id", "item_id"):
            assert type(payload[key]) in (int, str), payload
            assert result.model_dump()[key] == str(sent[key])
        assert sent.get("event_type") == result.event_type


@_FAST
@given(_events, st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"]))
def test_only_utf8_is_accepted(payload: dict, codec: str) -> None:
    result = decode(json.dumps(payload).encode(codec), 1 << 20)
    assert isinstance(result, Invalid) and result.reason == "undecodable"


@_FAST
@given(
    _events, st.sampled_from(["user_id", "item_id", "value", "weight", "timestamp", "event_type", "extra"])
)
def test_a_duplicate_key_is_always_schema(payload: dict, key: str) -> None:
    raw = json.dumps(payload).encode()
    raw = raw[:-1] + (b", " if payload else b"") + json.dumps(key).encode() + b": 1, "
    raw += json.dumps(key).encode() + b": 2}"
    assert decode(raw, 1 << 20) == Invalid("schema", f"duplicate key {key!r}")


@_FAST
@given(
    st.one_of(
        st.integers(min_value=-(10**40), max_value=10**40), st.text(min_size=1, max_size=MAX_ID_LENGTH)
    ),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, allow_infinity=False),
    st.one_of(st.none(), st.floats(min_value=0.0, allow_infinity=False), st.integers(0, 10**12)),
    _any_limits,
)
def test_valid_events_decode(
    user: int | str, value: float, weight: float, timestamp: float | int | None, limits: EventLimits
) -> None:
    payload = {"user_id": user, "item_id": "i", "value": value, "weight": weight}
    if timestamp is not None:
        payload["timestamp"] = timestamp
    result = decode(json.dumps(payload).encode(), 1 << 20, limits)
    ident = str(user)
    if any(ord(c) < 0x20 for c in ident):
        assert isinstance(result, Invalid) and result.reason == "schema" and "user_id" in result.detail
    elif not (limits.value_min <= value <= limits.value_max and weight <= limits.weight_max):
        assert isinstance(result, Invalid) and result.reason == "out_of_range"
    else:
        assert result == Event(user_id=ident, item_id="i", value=value, weight=weight, timestamp=timestamp)
        assert isinstance(result, Event) and (result.user_id, result.value, result.weight) == (
            ident,
            value,
            weight,
        )


@settings(max_examples=1500, deadline=None)
@given(_events | _near_valid, _any_limits, st.booleans(), st.integers(min_value=0, max_value=400))
def test_the_plain_path_accepts_only_what_the_full_checks_accept_and_builds_the_same_event(
    payload: dict, limits: EventLimits, ascii_only: bool, max_bytes: int
) -> None:
    raw = json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    plain = _plain_event(raw, max_bytes, limits)
    if plain is None:
        return
    full = _checked(raw, max_bytes, limits)
    assert isinstance(full, Event)
    assert plain == full and plain.model_fields_set == full.model_fields_set
    assert [type(getattr(plain, f)) for f in Event.model_fields] == [
        type(getattr(full, f)) for f in Event.model_fields
    ]


@settings(max_examples=1000, deadline=None)
@given(_events | _near_valid, _any_limits, st.booleans(), st.integers(min_value=0, max_value=400))
def test_decode_row_is_decode_with_the_event_as_its_row(
    payload: dict, limits: EventLimits, ascii_only: bool, max_bytes: int
) -> None:
    """The daemon decodes with decode_row: it must accept, reject and read exactly what decode does."""
    raw = json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    full, row = decode(raw, max_bytes, limits), decode_row(raw, max_bytes, limits)
    if not isinstance(full, Event):
        assert row == full
        return
    assert type(row) is tuple
    assert [type(x) for x in row] == [str, str, float, float, float]
    assert row_event(row) == full.model_copy(update={"event_type": None})
    assert _same_row(row, event_row(full))


def _same_row(a: tuple, b: tuple) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))  # NaN: no timestamp


def test_event_columns_hold_rows_column_by_column_and_give_them_back() -> None:
    rows = [("u1", "i1", 4.0, 1.0, 1.7e9), ("u2", "i1", 1.0, 2.5, math.nan), ("u1", "i3", -2.0, 0.0, 0.0)]
    columns = EventColumns.of_rows(rows)
    assert len(columns) == 3
    assert list(columns.user_ids) == ["u1", "u2", "u1"] and list(columns.item_ids) == ["i1", "i1", "i3"]
    assert columns.values.tolist() == [4.0, 1.0, -2.0] and columns.weights.tolist() == [1.0, 2.5, 0.0]
    assert all(_same_row(columns.row(t), rows[t]) for t in range(3))
    some = columns.take([2, 0])
    assert [some.row(0), some.row(1)] == [rows[2], rows[0]]
    assert len(EventColumns.of_rows([])) == 0 and len(EventColumns.of_rows([]).take([])) == 0
    events = [row_event(r) for r in rows]
    assert all(_same_row(EventColumns.of(events).row(t), rows[t]) for t in range(3))


@_FAST
@given(_events, st.data())
def test_the_plain_path_never_takes_a_record_with_a_duplicate_key(payload: dict, data: st.DataObject) -> None:
    """orjson keeps the last of duplicate keys; the plain path must leave such records to the full checks
    (schema: duplicate key), whatever the kinds of the two values: strings, numbers, null, booleans."""
    key = data.draw(st.sampled_from([*payload, "extra"]))
    values = st.one_of(
        st.text(max_size=5), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans()
    )
    first, second = data.draw(values), data.draw(values)
    body = json.dumps(payload)[1:-1]
    raw = ("{" + body + (", " if body else "") + f"{json.dumps(key)}: {json.dumps(first)}, "
           f"{json.dumps(key)}: {json.dumps(second)}}}").encode()  # fmt: skip
    assert _plain_event(raw, 1 << 20, DEFAULT_LIMITS) is None, raw
    assert decode(raw, 1 << 20) == Invalid("schema", f"duplicate key {key!r}")


def test_the_plain_path_takes_ordinary_records() -> None:
    # Otherwise the property above holds vacuously.
    for raw in (
        b'{"user_id": "u1", "item_id": 42, "value": 4.5, "weight": 1, "timestamp": 1700000000.5}',
        b'{"user_id": 7, "item_id": "i", "event_type": "click", "extra": "ignored", "timestamp": null}',
        '{"user_id": "ü", "item_id": "β"}'.encode(),
    ):
        assert isinstance(_plain_event(raw, 1 << 20, DEFAULT_LIMITS), Event), raw
    for raw in (
        b'{"user_id": "u1", "item_id": "i", "value": 1, "value": 2}',
        b'{"user_id": "u\\u0041", "item_id": "i"}',
        b'{"user_id": "u", "item_id": "i", "extra": {"a": 1, "a": 2}}',
        b'{"user_id": "forget", "event_type": "forget_user"}',
        b'{"user_id": "u", "item_id": "i", "event_type": "%s"}' % (b"x" * 65),
        b'{"user_id": "u", "item_id": "i", "weight": -0.5}',
        b'{"user_id": "u", "item_id": "i", "value": 1e400}',
    ):
        assert _plain_event(raw, 1 << 20, DEFAULT_LIMITS) is None, raw
