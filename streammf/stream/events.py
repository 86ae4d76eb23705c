"""The event schema and `decode(bytes, max_bytes, limits) -> Event | ForgetUser | Invalid` (`decode_row`:
the same with an event as the `EventRow` the daemon learns from).

Parsing happens here, in application code, never in a kafka-python deserializer: a raising deserializer
makes `poll()` fetch the same record forever. Bad input becomes an `Invalid` value that travels as data
(to the dead-letter topic), never an exception.

Example event (producers key the record by user id, so a user's events stay in order on one partition):

    {"user_id": "u123", "item_id": 42, "value": 4.5, "weight": 1.0,
     "timestamp": 1700000000.0, "event_type": "rating"}

The wire format is strict: a JSON object in UTF-8 (no byte-order mark, no UTF-16/32), no duplicate keys,
numbers as JSON numbers (not strings, not booleans), ids as strings or integers. Unknown fields are ignored.
Constructing an `Event` in Python stays lax (numpy scalars and the like are fine); only `decode` is strict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter
from typing import Annotated, Any, Literal, cast, get_args

import msgspec
import numpy as np
import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

MAX_ID_LENGTH = 128
InvalidReason = Literal["oversized", "undecodable", "schema", "non_finite", "out_of_range", "diverged"]
INVALID_REASONS: tuple[InvalidReason, ...] = get_args(InvalidReason)
_MAX_DETAIL = 300


def _encodable(value: str) -> str:
    # JSON escapes can spell lone surrogates ("\ud800"): a Python str, but not Unicode text, and
    # every later `.encode()` (Redis keys, the dead-letter detail) would raise.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (lone surrogate)") from None
    return value


def _id_to_str(value: object) -> object:
    # Integers and strings name the same id ("42" == 42): the store keys by string.
    if isinstance(value, bool):
        raise ValueError("ids must be strings or integers, not booleans")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _encodable(value)
    return value  # anything else fails the str validation: floats, lists, objects, null


def _text(value: object) -> object:
    return _encodable(value) if isinstance(value, str) else value


def _int_to_float(value: object) -> object:
    # An integer literal beyond the float range (10**400) is a schema error with a clear message, rather
    # than pydantic's "Input should be a valid number". Booleans pass through: strict decoding rejects them.
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ValueError("integer too large for a float") from None
    return value


Identifier = Annotated[
    str,
    BeforeValidator(_id_to_str),
    Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^\x00-\x1f]+$"),
]
Number = Annotated[float, BeforeValidator(_int_to_float)]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False, strict=False)

    user_id: Identifier
    item_id: Identifier
    value: Number = 1.0
    weight: Number = Field(1.0, ge=0.0)
    timestamp: Number | None = Field(None, ge=0.0, description="unix seconds; else the Kafka record time")
    event_type: Annotated[str, BeforeValidator(_text), Field(max_length=64)] | None = None


# `{"user_id": "u1", "event_type": "forget_user"}`: delete everything the model holds about the user,
# in stream order with the user's other events (see README, "Forgetting a user").
FORGET_USER = "forget_user"


class _ForgetUserPayload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    user_id: Identifier
    event_type: Literal["forget_user"]


@dataclass(frozen=True)
class ForgetUser:
    user_id: str


@dataclass(frozen=True)
class Invalid:
    reason: InvalidReason
    detail: str


@dataclass(frozen=True)
class EventLimits:
    """Bounds on an event's numbers: `value` within [value_min, value_max], `weight` at most weight_max
    (and, by the schema, at least 0). Bounds are inclusive. The defaults are permissive."""

    value_min: float = -1e6
    value_max: float = 1e6
    weight_max: float = 1e6

    def __post_init__(self) -> None:
        bounds = (self.value_min, self.value_max, self.weight_max)
        if not all(
            isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) for b in bounds
        ):
            raise ValueError(f"event limits must be finite numbers: {self}")
        if self.value_min > self.value_max:
            raise ValueError(f"value_min {self.value_min} > value_max {self.value_max}")
        if self.weight_max < 0:
            raise ValueError(f"weight_max {self.weight_max} < 0")


DEFAULT_LIMITS = EventLimits()


class _DuplicateKeyError(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json's default is last-wins; a record that says two things is rejected (in nested objects too).
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _out_of_range(event: Event, limits: EventLimits) -> str | None:
    problems = []
    if event.value < limits.value_min:
        problems.append(f"value: {event.value!r} < value_min {limits.value_min!r}")
    elif event.value > limits.value_max:
        problems.append(f"value: {event.value!r} > value_max {limits.value_max!r}")
    if event.weight > limits.weight_max:
        problems.append(f"weight: {event.weight!r} > weight_max {limits.weight_max!r}")
    return "; ".join(problems) or None


# One decoder for every record: json.loads with a hook builds a new JSONDecoder per call (~2 us each).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_ID_TYPES = (str, int)
_FIELD_NAMES = frozenset(Event.model_fields)
_new_event = object.__new__
_set = object.__setattr__


# A valid event as the consumer carries it to the learner: user, item, value, weight, timestamp (NaN: none).
# A tuple is built several times faster than an `Event`, and rows transpose into columns in one `zip`.
EventRow = tuple[str, str, float, float, float]
_NO_TIME = math.nan


@dataclass(frozen=True)
class EventColumns:
    """A batch of valid events, column by column (what the learner takes)."""

    user_ids: Sequence[str]
    item_ids: Sequence[str]
    values: np.ndarray  # float64
    weights: np.ndarray  # float64
    timestamps: np.ndarray  # float64 unix seconds, NaN where the event has none

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def of_rows(cls, rows: Sequence[EventRow]) -> EventColumns:
        if not rows:
            return cls([], [], *(np.zeros(0) for _ in range(3)))
        users, items, values, weights, stamps = zip(*rows, strict=True)
        return cls(users, items, *(np.array(c, dtype=np.float64) for c in (values, weights, stamps)))

    @classmethod
    def of(cls, events: Sequence[Event]) -> EventColumns:
        return cls.of_rows([event_row(e) for e in events])

    def take(self, positions: Sequence[int]) -> EventColumns:
        at = np.asarray(positions, dtype=np.int64)
        return EventColumns(
            [self.user_ids[t] for t in positions],
            [self.item_ids[t] for t in positions],
            self.values[at],
            self.weights[at],
            self.timestamps[at],
        )

    def row(self, t: int) -> EventRow:
        return (self.user_ids[t], self.item_ids[t], float(self.values[t]), float(self.weights[t]),
                float(self.timestamps[t]))  # fmt: skip


def decode(
    raw: bytes | None, max_bytes: int, limits: EventLimits = DEFAULT_LIMITS
) -> Event | ForgetUser | Invalid:
    """The record's event, or why it is invalid."""
    plain = _plain_event(raw, max_bytes, limits)
    return plain if plain is not None else _checked(raw, max_bytes, limits)


def decode_row(
    raw: bytes | None, max_bytes: int, limits: EventLimits = DEFAULT_LIMITS
) -> EventRow | ForgetUser | Invalid:
    """`decode`, an event given as its `EventRow` (what the daemon learns from). Plain records (the stream's
    bulk) take a short path that accepts exactly what the full checks accept; anything else takes the full
    checks, which also name what is wrong."""
    row = _plain_row(raw, max_bytes, limits)
    if row is not None:
        return row
    decoded = _checked(raw, max_bytes, limits)
    return event_row(decoded) if isinstance(decoded, Event) else decoded


def decode_rows(
    raws: Sequence[bytes | None], max_bytes: int, limits: EventLimits = DEFAULT_LIMITS
) -> list[EventRow | ForgetUser | Invalid]:
    """`decode_row` of each record, in order. Runs of plain records (the stream's bulk) are decoded in one
    call each; a run holding a record that call cannot vouch for takes `decode_row` record by record. A run
    is short enough that a failed call (at worst one whole run decoded, then thrown away) costs little
    beside the record-by-record path it falls back to, and every record gets exactly what `decode_row`
    gives it."""
    rows: list[EventRow | ForgetUser | Invalid] = []
    for first in range(0, len(raws), _RUN_RECORDS):
        run = raws[first : first + _RUN_RECORDS]
        plain = _plain_rows(run, max_bytes, limits)
        rows.extend(plain if plain is not None else [decode_row(raw, max_bytes, limits) for raw in run])
    return rows


_RUN_RECORDS = 512
# msgspec 0.23 reads a float literal of ~100,000 digits as 0.0: long records take the record-by-record path.
_PLAIN_RECORD_MAX_BYTES = 4096
_FORGET_USER_BYTES = FORGET_USER.encode()
_UNSET = msgspec.UNSET
# Each field of every record as one list: the counts below are C-level list scans, not Python per record.
_COLUMNS = tuple(map(attrgetter, ("user_id", "item_id", "value", "weight", "timestamp", "event_type")))


def _float_bounds(limits: EventLimits) -> tuple[float, float, float] | None:
    """The limits as floats, or None when one is not exactly a float (an int past 2**53): msgspec compares
    doubles, `decode_row` the numbers themselves."""
    bounds = (limits.value_min, limits.value_max, limits.weight_max)
    floats = (float(limits.value_min), float(limits.value_max), float(limits.weight_max))
    return floats if floats == bounds else None


@lru_cache(maxsize=8)
def _plain_decoder(value_min: float, value_max: float, weight_max: float) -> msgspec.json.Decoder:
    """A flat record of the schema's fields only, its types and bounds checked in C. The optional fields
    default to UNSET so that `_plain_rows` can count the keys a record wrote (a duplicate key is one more
    than the fields decoded). Unknown fields are refused: the count relies on it, and no field takes an
    object or an array, so a record is one flat object."""
    ident = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)] | int
    value = Annotated[float, msgspec.Meta(ge=value_min, le=value_max)]
    weight = Annotated[float, msgspec.Meta(ge=0.0, le=weight_max)]
    timestamp = Annotated[float, msgspec.Meta(ge=0.0)] | None
    event_type = Annotated[str, msgspec.Meta(max_length=64)] | None
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        ("user_id", ident),
        ("item_id", ident),
        ("value", value, _UNSET),
        ("weight", weight, _UNSET),
        ("timestamp", timestamp, _UNSET),
        ("event_type", event_type, _UNSET),
    ]
    return msgspec.json.Decoder(msgspec.defstruct("PlainRecord", fields, forbid_unknown_fields=True))


def _plain_rows(
    raws: Sequence[bytes | None], max_bytes: int, limits: EventLimits
) -> list[EventRow | ForgetUser | Invalid] | None:
    """The rows of a run of records when every one is plainly valid, else None. The records are joined one
    a line and decoded by msgspec in one call. It checks UTF-8, the JSON grammar (numbers included, no
    raw control characters), the types and the bounds, and parses floats to the same bits as json (a
    property test holds all of this to `decode_row`). What it does not check is checked over the bytes:
    - one record a line: every record starts with '{' and holds no newline (JSON allows one between
      tokens); with one flat object a line and as many objects as records, no record's bytes can
      complete another's;
    - no backslash, so no escapes (no lone surrogates), and every '"' opens or closes a key or a string:
      a duplicate key (msgspec keeps the last) leaves more quotes than the decoded fields account for;
    - no "forget_user" anywhere (such a record is no event)."""
    n = len(raws)
    bounds = _float_bounds(limits)
    if n == 0 or bounds is None or None in raws:
        return None
    records_bytes = cast(Sequence[bytes], raws)
    if max(map(len, records_bytes)) > min(max_bytes, _PLAIN_RECORD_MAX_BYTES):
        return None
    joined = b"\n".join(records_bytes)
    if (
        joined[:1] != b"{"
        or joined.count(b"\n{") != n - 1
        or joined.count(b"\n") != n - 1
        or b"\\" in joined
        or _FORGET_USER_BYTES in joined
    ):
        return None
    try:
        records = _plain_decoder(*bounds).decode_lines(joined)
    except msgspec.MsgspecError:
        return None
    if len(records) != n:
        return None
    users, items, values, weights, stamps, kinds = (list(map(column, records)) for column in _COLUMNS)
    user_types, item_types = list(map(type, users)), list(map(type, items))
    keys = 2 * n + sum(n - column.count(_UNSET) for column in (values, weights, stamps, kinds))
    user_strings, item_strings = user_types.count(str), item_types.count(str)
    strings = user_strings + item_strings + n - kinds.count(_UNSET) - kinds.count(None)
    if joined.count(b'"') != 2 * (keys + strings):
        return None
    if user_strings != n:
        users = [u if type(u) is str else str(u) for u in users]
        if max(map(len, users)) > MAX_ID_LENGTH:
            return None
    if item_strings != n:
        items = [i if type(i) is str else str(i) for i in items]
        if max(map(len, items)) > MAX_ID_LENGTH:
            return None
    if _UNSET in values:  # the default is checked against the bounds too
        if not limits.value_min <= 1.0 <= limits.value_max:
            return None
        values = [1.0 if v is _UNSET else v for v in values]
    if _UNSET in weights:
        if limits.weight_max < 1.0:
            return None
        weights = [1.0 if w is _UNSET else w for w in weights]
    if _UNSET in stamps or None in stamps:
        stamps = [_NO_TIME if s is _UNSET or s is None else s for s in stamps]
    return list(zip(users, items, values, weights, stamps, strict=True))


def event_row(event: Event) -> EventRow:
    stamp = _NO_TIME if event.timestamp is None else event.timestamp
    return (event.user_id, event.item_id, event.value, event.weight, stamp)


def row_event(row: EventRow) -> Event:
    """The `Event` of a row (without its event_type, which learning does not use)."""
    user, item, value, weight, stamp = row
    timestamp = None if math.isnan(stamp) else stamp
    return Event(user_id=user, item_id=item, value=value, weight=weight, timestamp=timestamp)


def _plain_event(raw: bytes | None, max_bytes: int, limits: EventLimits) -> Event | None:
    """The short path's `Event`: the same as the full checks build (a property test holds them equal)."""
    row = _plain_row(raw, max_bytes, limits)
    if row is None:
        return None
    fields = orjson.loads(cast(bytes, raw))
    user, item, value, weight, stamp = row
    # What Event.model_construct does, without its per-call overhead; field order as declared.
    event = _new_event(Event)
    _set(event, "__dict__", {"user_id": user, "item_id": item, "value": value, "weight": weight,
                             "timestamp": None if math.isnan(stamp) else stamp,
                             "event_type": fields.get("event_type")})  # fmt: skip
    _set(event, "__pydantic_fields_set__", set(_FIELD_NAMES.intersection(fields)))  # mutable, as in pydantic
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def _plain_row(raw: bytes | None, max_bytes: int, limits: EventLimits) -> EventRow | None:
    """An `EventRow` when the record is a flat JSON object whose fields are plainly valid; None to leave the
    decision to the full checks. No backslash in the record means no escapes, so no lone surrogates;
    invalid UTF-8, raw control characters in strings, NaN and numbers beyond the float range fail
    orjson's parse. Several times cheaper than pydantic's validation, which dominated the daemon's
    decoding, and orjson's parse than json's."""
    if raw is None or len(raw) > max_bytes or raw[:1] != b"{" or b"\\" in raw:
        return None
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    # orjson keeps the last of duplicate keys. Without a backslash no quote is escaped, so every '"'
    # opens or closes a key or a string value: a duplicate key leaves more quotes than `fields` holds.
    strings = 0
    for field in fields.values():
        kind = type(field)
        if kind is str:
            strings += 1
        elif kind is dict or kind is list:
            return None  # nested: the full checks look inside (for duplicate keys too)
    if raw.count(b'"') != 2 * (len(fields) + strings):
        return None
    get = fields.get
    user, item = get("user_id"), get("item_id")
    if type(user) not in _ID_TYPES or type(item) not in _ID_TYPES:
        return None
    if type(user) is int:
        user = str(user)
    if type(item) is int:
        item = str(item)
    # orjson's floats are finite (it refuses NaN and numbers beyond the range): only other kinds need a look.
    value, weight, timestamp, event_type = (
        get("value", 1.0),
        get("weight", 1.0),
        get("timestamp"),
        get("event_type"),
    )
    if type(value) is not float:
        value = _plain_number(value)
    if type(weight) is not float:
        weight = _plain_number(weight)
    if timestamp is None:
        timestamp = _NO_TIME
    elif type(timestamp) is not float:
        timestamp = _plain_number(timestamp)
    if (
        not (0 < len(user) <= MAX_ID_LENGTH and 0 < len(item) <= MAX_ID_LENGTH)
        or value is None
        or weight is None
        or timestamp is None
        or timestamp < 0
        or weight < 0
        or not limits.value_min <= value <= limits.value_max
        or weight > limits.weight_max
        or (event_type is not None and (type(event_type) is not str or len(event_type) > 64))
        or event_type == FORGET_USER
    ):
        return None
    return (user, item, value, weight, timestamp)


def _plain_number(number: object) -> float | None:
    """A JSON number as the schema's float, or None for anything the full checks must judge."""
    if type(number) is int:
        return float(number) if -(2**1000) < number < 2**1000 else None
    if type(number) is float and math.isfinite(number):
        return number
    return None


def _checked(raw: bytes | None, max_bytes: int, limits: EventLimits) -> Event | ForgetUser | Invalid:
    if raw is None:
        return Invalid("undecodable", "record has no value")
    if len(raw) > max_bytes:
        return Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        # Strict UTF-8 first: json.loads(bytes) would also auto-detect UTF-16 and UTF-32.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("undecodable", f"not UTF-8: {exc}"[:_MAX_DETAIL])
    if text.startswith("\ufeff"):
        return Invalid("undecodable", "UTF-8 byte-order mark")
    try:
        # NaN/Infinity literals and overflowing floats (1e400) parse to non-finite floats: non_finite below.
        payload = _DECODER.decode(text)
    except _DuplicateKeyError as exc:
        return Invalid("schema", f"duplicate key {exc.args[0]!r}"[:_MAX_DETAIL])
    except (ValueError, RecursionError) as exc:  # bad JSON, too deep, over-long int literal
        return Invalid("undecodable", f"not JSON: {exc}"[:_MAX_DETAIL])
    if not isinstance(payload, dict):
        return Invalid("schema", f"expected a JSON object, got {type(payload).__name__}")
    try:
        if payload.get("event_type") == FORGET_USER:
            return ForgetUser(_ForgetUserPayload.model_validate(payload, strict=True).user_id)
        # Strict: numbers must be JSON numbers, ids strings or integers (no "4", no true, no 1.5).
        event = Event.model_validate(payload, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        reason: InvalidReason = (
            "non_finite" if any(e["type"] == "finite_number" for e in errors) else "schema"
        )
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return Invalid(reason, detail[:_MAX_DETAIL])
    problem = _out_of_range(event, limits)
    if problem is not None:
        return Invalid("out_of_range", problem[:_MAX_DETAIL])
    return event


def encode(event: Event) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()
