"""Property-based test of the whole path a record takes (decode -> dead letter or learn -> apply), with
the consume loop, the learner and the in-memory store, under the daemon's default settings: whatever
arrives, every record is applied or dead-lettered exactly once, nothing raises, every stored coordinate
stays finite and within bounds. tests/integration/test_hardening.py drives the same through Kafka/Redis."""

from __future__ import annotations

import json
import threading

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streammf.config import ModelSettings
from streammf.store.memory import MemoryStore
from streammf.stream.consumer import ConsumeLoop, LoopSettings
from streammf.stream.events import EventLimits
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.metrics import Heartbeat, Metrics
from tests.unit.test_consumer import TOPIC, TP, CountingProducer, Record, ScriptedConsumer

_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-12, max_value=12),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, 1, 5, 1e4, -1e4, 1e308, 1e-308, 100]),
    st.text(max_size=3),
    st.booleans(),
    st.none(),
)
_event = st.fixed_dictionaries(
    {
        "user_id": st.sampled_from(["u1", "u2", "u3", 7, "x" * 129, True, ""]),
        "item_id": st.sampled_from(["i1", "i2", 3, "i4", 4.0, None]),
    },
    optional={"value": _numbers, "weight": _numbers, "timestamp": _numbers},
)
_record = st.one_of(
    _event.map(lambda e: json.dumps(e).encode()),
    st.binary(max_size=64),
    st.just(b'{"user_id": "u1", "item_id": "i1", "value": NaN}'),
    st.just(b'{"user_id": "u1", "item_id": "i1", "user_id": "u2"}'),
    st.none(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["explicit", "implicit"]),
    values=st.lists(_record, min_size=1, max_size=60),
    cut=st.integers(min_value=1, max_value=60),
)
def test_every_record_is_applied_or_dead_lettered_once_and_the_model_stays_sound(
    mode: str, values: list[bytes | None], cut: int
) -> None:
    model = ModelSettings(mode=mode)  # type: ignore[arg-type]
    store = MemoryStore("m", model.mode, 4)
    producer = CountingProducer()
    metrics = Metrics(CollectorRegistry())
    value_min, value_max, weight_max = model.bounds
    loop = ConsumeLoop(
        ScriptedConsumer([], threading.Event()),
        producer,
        Learner(store, LearnerParams.from_settings(model)),
        metrics,
        Heartbeat(max_silence_s=30),
        LoopSettings(
            topic=TOPIC,
            dead_letter_topic=f"{TOPIC}.dlq",
            limits=EventLimits(value_min, value_max, weight_max),
        ),
    )
    records = [Record(offset, value) for offset, value in enumerate(values)]  # type: ignore[arg-type]
    for batch in (records[:cut], records[cut:]):
        if batch:
            assert loop.process({TP: batch}, threading.Event()) is not None
    assert store.events_applied() + len(producer.sent) == len(records)
    assert store.applied_offsets() == {0: len(records)}
    rows = np.array([*store.user_rows.values(), *store.item_rows.values()]).reshape(-1, 5)
    assert np.isfinite(rows).all() and (np.abs(rows) <= model.max_abs_factor).all()
    for gramian in (store.item_gramian, store.user_gramian):
        assert gramian is None or np.isfinite(gramian).all()
    # Replaying the same records (a redelivery) changes nothing.
    applied, dead = store.events_applied(), len(producer.sent)
    loop.process({TP: records}, threading.Event())
    assert (store.events_applied(), len(producer.sent)) == (applied, dead)
