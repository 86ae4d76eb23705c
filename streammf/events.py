"""The event schema and `decode(bytes) -> Event | Invalid`.

Parsing happens here, in application code, never in a kafka-python deserializer: a raising deserializer
makes `poll()` fetch the same record forever. Bad input becomes an `Invalid` value that travels as data
(to the dead-letter topic), never an exception.

Example event (producers key the record by user id, so a user's events stay in order on one partition):

    {"user_id": "u123", "item_id": 42, "value": 4.5, "weight": 1.0,
     "timestamp": 1700000000.0, "event_type": "rating"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

MAX_ID_LENGTH = 128
InvalidReason = Literal["oversized", "undecodable", "schema", "non_finite"]


def _id_to_str(value: object) -> object:
    # Integers and strings name the same id ("42" == 42): the store keys by string.
    if isinstance(value, bool):
        raise ValueError("ids must be strings or integers, not booleans")
    if isinstance(value, int):
        return str(value)
    return value


Identifier = Annotated[
    str,
    BeforeValidator(_id_to_str),
    Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^\x00-\x1f]+$"),
]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False, strict=False)

    user_id: Identifier
    item_id: Identifier
    value: float = 1.0
    weight: float = Field(1.0, ge=0.0)
    timestamp: float | None = Field(None, ge=0.0, description="unix seconds; else the Kafka record time")
    event_type: Annotated[str, Field(max_length=64)] | None = None


@dataclass(frozen=True)
class Invalid:
    reason: InvalidReason
    detail: str


def decode(raw: bytes | None, max_bytes: int) -> Event | Invalid:
    if raw is None:
        return Invalid("undecodable", "record has no value")
    if len(raw) > max_bytes:
        return Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, over-long int literal
        return Invalid("undecodable", f"not JSON: {exc}"[:200])
    if not isinstance(payload, dict):
        return Invalid("schema", f"expected a JSON object, got {type(payload).__name__}")
    try:
        return Event.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        reason: InvalidReason = (
            "non_finite" if any(e["type"] == "finite_number" for e in errors) else "schema"
        )
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return Invalid(reason, detail[:300])


def encode(event: Event) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()
