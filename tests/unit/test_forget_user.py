"""Forgetting a user on the in-memory store, through the consume loop (in stream order) and across a
refresh; tests/integration/test_forget_user.py checks the Redis store against the same expectations."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streammf.model.factors import LossParams
from streammf.model.sgd import SgdParams
from streammf.store.contract import ApplyOutcome
from streammf.store.memory import MemoryStore
from streammf.stream.consumer import ConsumeLoop, LoopSettings
from streammf.stream.events import Event, ForgetUser, decode
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.metrics import Heartbeat, Metrics
from streammf.stream.refresh import refresh
from tests.unit.test_consumer import TOPIC, TP, CountingProducer, Record, ScriptedConsumer

K = 4


def _params(mode: str) -> LearnerParams:
    return LearnerParams(SgdParams(LossParams(mode, w0=0.1)), init_std=0.1, seed=2)


def _events(n: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    return [
        Event(user_id=f"u{rng.integers(8)}", item_id=f"i{rng.integers(12)}", value=float(rng.integers(1, 6)))
        for _ in range(n)
    ]


def test_decode_reads_a_forget_event() -> None:
    assert decode(b'{"user_id": 7, "event_type": "forget_user"}', 4096) == ForgetUser("7")
    assert decode(b'{"event_type": "forget_user"}', 4096).reason == "schema"  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_forgetting_removes_every_trace_and_is_idempotent(mode: str) -> None:
    store = MemoryStore("m", mode, K)  # type: ignore[arg-type]
    events = _events(400)
    Learner(store, _params(mode)).learn(events, {0: (0, 400)})
    assert "u3" in store.user_rows
    outcome = store.forget_user("u3", {0: (400, 401)})
    assert outcome is ApplyOutcome.APPLIED
    assert "u3" not in store.user_rows and "u3" not in store.interactions
    kept = [e for e in events if e.user_id != "u3"]
    pairs = {(e.user_id, e.item_id) for e in kept}
    assert store.item_counts == {i: sum(1 for _, j in pairs if j == i) for i in {j for _, j in pairs}}
    if mode == "implicit":
        rows = np.array([r[:K] for r in store.user_rows.values()], dtype=np.float64)
        np.testing.assert_allclose(store.user_gramian, rows.T @ rows, atol=1e-6)
    else:
        latest = {(e.user_id, e.item_id): e.value for e in events}
        forgotten = [v for (u, _), v in latest.items() if u == "u3"]
        assert store.value_count == len(events) - len(forgotten)
        assert store.value_sum == pytest.approx(sum(e.value for e in events) - sum(forgotten))
    assert store.applied_offsets() == {0: 401}
    assert store.forget_user("u3", {0: (400, 401)}) is ApplyOutcome.DUPLICATE
    assert store.forget_user("u3") is ApplyOutcome.APPLIED  # unfenced: a no-op the second time


def _loop(store: MemoryStore, mode: str) -> ConsumeLoop:
    return ConsumeLoop(
        ScriptedConsumer([], threading.Event()),
        CountingProducer(),
        Learner(store, _params(mode)),
        Metrics(CollectorRegistry()),
        Heartbeat(max_silence_s=30),
        LoopSettings(topic=TOPIC, dead_letter_topic=f"{TOPIC}.dlq"),
    )


def test_a_forget_record_takes_effect_in_stream_order() -> None:
    def rec(offset: int, payload: dict) -> Record:
        return Record(offset, json.dumps(payload).encode())

    records = [
        rec(0, {"user_id": "a", "item_id": "x", "value": 4}),
        rec(1, {"user_id": "b", "item_id": "x", "value": 2}),
        rec(2, {"user_id": "a", "event_type": "forget_user"}),
        rec(3, {"user_id": "a", "item_id": "y", "value": 5}),
        rec(4, {"user_id": "b", "event_type": "forget_user"}),
    ]
    store = MemoryStore("m", "explicit", K)
    loop = _loop(store, "explicit")
    loop.process({TP: records}, threading.Event())
    assert store.interactions == {"a": {"y": 5.0}}
    assert set(store.user_rows) == {"a"}
    assert store.item_counts == {"y": 1}  # x lost both its users
    assert store.applied_offsets() == {0: 5}
    # The same records again (a redelivery after a crash) change nothing.
    before = (
        dict(store.item_counts),
        store.events_applied(),
        {u: r.copy() for u, r in store.user_rows.items()},
    )
    loop.process({TP: records}, threading.Event())
    assert (store.item_counts, store.events_applied()) == before[:2]


def test_a_user_forgotten_while_a_refresh_runs_is_not_brought_back_by_it() -> None:
    store = MemoryStore("m", "implicit", K)
    params = _params("implicit")
    Learner(store, params).learn(_events(400), {0: (0, 400)})
    original_read = store.read_all_rows

    def read_then_forget(side: str):  # type: ignore[no-untyped-def]
        rows = original_read(side)  # type: ignore[arg-type]
        if side == "items":  # the refresh has its snapshot: the user is forgotten meanwhile
            assert store.forget_user("u3") is ApplyOutcome.APPLIED
        return rows

    store.read_all_rows = read_then_forget  # type: ignore[method-assign]
    report = refresh(store, params, 2)
    assert report.published
    assert "u3" not in store.user_rows
    rows = np.array([r[:K] for r in store.user_rows.values()], dtype=np.float64)
    np.testing.assert_allclose(store.user_gramian, rows.T @ rows, atol=1e-6)
