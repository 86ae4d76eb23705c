"""Forgetting a user on Redis: the same state as the in-memory twin, every version cleaned, a refresh that
runs meanwhile does not bring the user back; through the daemon in stream order; `streammf forget-user`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from streammf.cli import cli
from streammf.model.factors import LossParams
from streammf.model.sgd import SgdParams
from streammf.store.contract import ApplyOutcome
from streammf.store.layout import ModelKeys
from streammf.store.memory import MemoryStore
from streammf.store.redis_store import RedisStore
from streammf.stream.events import Event
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.refresh import refresh
from tests.integration.test_daemon import (
    _free_port,
    _InProcessDaemon,
    _produce,
    _ratings_payloads,
    _settings,
    _stored_rows,
    _wait_for,
)

K = 4


def _params(mode: str) -> LearnerParams:
    return LearnerParams(SgdParams(LossParams(mode, w0=0.1)), init_std=0.1, seed=2)


def _events(n: int) -> list[Event]:
    rng = np.random.default_rng(1)
    return [
        Event(user_id=f"u{rng.integers(8)}", item_id=f"i{rng.integers(12)}", value=float(rng.integers(1, 6)))
        for _ in range(n)
    ]


def _rows(client: redis.Redis, name: str, version: int, side: str) -> dict[str, np.ndarray]:
    raw = client.hgetall(ModelKeys(name).rows(version, side))  # type: ignore[arg-type]
    return {k.decode(): np.frombuffer(v, dtype="<f4") for k, v in raw.items()}


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_redis_forgets_exactly_as_the_in_memory_twin_in_every_version(mode, redis_client, model_name):
    params = _params(mode)
    redis_store = RedisStore.open(redis_client, model_name, mode, K)
    twin = MemoryStore("twin", mode, K)  # type: ignore[arg-type]
    events = _events(400)
    for store in (redis_store, twin):
        Learner(store, params).learn(events, {0: (0, 400)})
    old = redis_store.current_version()
    assert refresh(redis_store, params, 1).published
    assert refresh(twin, params, 1).published
    assert "u3" in _rows(redis_client, model_name, old, "users")  # the retired version still has the user
    for store in (redis_store, twin):
        assert store.forget_user("u3", {0: (400, 401)}) is ApplyOutcome.APPLIED
    keys = ModelKeys(model_name)
    live = redis_store.current_version()
    for version in (old, live):
        assert "u3" not in _rows(redis_client, model_name, version, "users"), version
    assert not redis_client.exists(keys.inter("u3"))
    stored_rows = _rows(redis_client, model_name, live, "users")
    assert stored_rows.keys() == twin.user_rows.keys()
    for user, row in twin.user_rows.items():
        np.testing.assert_allclose(stored_rows[user], row, atol=1e-6)
    counts = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.item_counts).items()}
    assert counts == {i: c for i, c in twin.item_counts.items() if c}
    stats = redis_client.hgetall(keys.stats)
    assert int(stats[b"value_count"]) == twin.value_count
    assert float(stats[b"value_sum"]) == pytest.approx(twin.value_sum)
    if mode == "implicit":
        gramian = np.frombuffer(redis_client.get(keys.gramian(live, "users")), dtype="<f8").reshape(K, K)
        np.testing.assert_allclose(gramian, twin.user_gramian, atol=1e-6)
        rows = np.array([r[:K] for r in stored_rows.values()], dtype=np.float64)
        np.testing.assert_allclose(gramian, rows.T @ rows, atol=1e-5)
    assert redis_store.applied_offsets() == {0: 401}
    assert redis_store.forget_user("u3", {0: (400, 401)}) is ApplyOutcome.DUPLICATE


def test_a_user_forgotten_during_a_refresh_stays_forgotten(redis_client, model_name):
    params = _params("implicit")
    store = RedisStore.open(redis_client, model_name, "implicit", K)
    Learner(store, params).learn(_events(400), {0: (0, 400)})
    original = store.read_all_rows

    def read_then_forget(side):  # type: ignore[no-untyped-def]
        rows = original(side)
        if side == "items":
            assert store.forget_user("u3") is ApplyOutcome.APPLIED
        return rows

    store.read_all_rows = read_then_forget  # type: ignore[method-assign]
    report = refresh(store, params, 2)
    assert report.published
    rows = _rows(redis_client, model_name, store.current_version(), "users")
    assert "u3" not in rows and len(rows) == 7
    keys = ModelKeys(model_name)
    gramian = np.frombuffer(redis_client.get(keys.gramian(store.current_version(), "users")), dtype="<f8")
    matrix = np.array([r[:K] for r in rows.values()], dtype=np.float64)
    np.testing.assert_allclose(gramian.reshape(K, K), matrix.T @ matrix, atol=1e-5)


def test_the_daemon_forgets_in_stream_order_and_the_cli_forgets_on_demand(
    kafka_bootstrap, redis_url, redis_client, make_topic, topic_name, model, movielens
):
    topic = make_topic(topic_name, 2)
    payloads = _ratings_payloads(movielens, 3000)
    first, second = payloads[0][0], payloads[1][0]
    forget = json.dumps({"user_id": first.decode(), "event_type": "forget_user"}).encode()
    later = json.dumps({"user_id": first.decode(), "item_id": "after", "value": 3}).encode()
    _produce(kafka_bootstrap, topic, [*payloads, (first, forget), (first, later)])
    port = _free_port()
    keys = ModelKeys(model)

    def offsets_total() -> int:
        return sum(int(v) for v in redis_client.hgetall(keys.offsets).values())

    with _InProcessDaemon(_settings(kafka_bootstrap, redis_url, topic, model, port)):
        _wait_for(lambda: offsets_total() == len(payloads) + 2, 60, "every record consumed")
    assert redis_client.hget(keys.stats, "events_applied") == str(len(payloads) + 1).encode()
    assert redis_client.hgetall(keys.inter(first.decode())) == {b"after": b"3"}
    assert first.decode() in _stored_rows(redis_client, model, "users")  # re-created by the later event

    env = {"STREAMMF_REDIS__URL": redis_url, "STREAMMF_MODEL__NAME": model}
    result = CliRunner().invoke(cli, ["forget-user", second.decode()], env=env)
    assert result.exit_code == 0, result.output
    assert second.decode() not in _stored_rows(redis_client, model, "users")
    assert not redis_client.exists(keys.inter(second.decode()))
    missing = CliRunner().invoke(cli, ["forget-user", "x"], env={**env, "STREAMMF_MODEL__NAME": "nope"})
    assert missing.exit_code == 1 and "forget-user failed" in missing.output
