"""The WALS refresh against real Redis: new version published, old one collected, one lease holder."""

from __future__ import annotations

import threading
import time

import numpy as np
import redis
from click.testing import CliRunner

from streammf.cli import cli
from streammf.model.factors import LossParams
from streammf.model.sgd import SgdParams
from streammf.store.contract import ApplyOutcome
from streammf.store.layout import ModelKeys
from streammf.store.redis_store import RedisStore
from streammf.stream.events import Event
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.refresh import refresh


def test_refresh_flips_version_and_old_one_is_collected(redis_client: redis.Redis, model_name: str) -> None:
    params = LearnerParams(SgdParams(LossParams("implicit")), init_std=0.1, seed=5)
    store = RedisStore.open(redis_client, model_name, "implicit", 8)
    rng = np.random.default_rng(0)
    events = [Event(user_id=f"u{rng.integers(50)}", item_id=f"i{rng.integers(30)}") for _ in range(1500)]
    learner = Learner(store, params)
    assert learner.learn(events[:1000], {0: (0, 1000)}).outcome is ApplyOutcome.APPLIED

    report = refresh(store, params, 3)
    assert report.published and report.version == store.current_version() == 2
    assert report.objective_after < report.objective_before
    # The stream goes on against the new version (its writer re-reads after the flip).
    result = learner.learn(events[1000:], {0: (1000, 1500)})
    assert result.outcome is ApplyOutcome.APPLIED and result.version == 2
    assert store.events_applied() == 1500

    keys = ModelKeys(model_name)
    assert redis_client.exists(keys.rows(1, "users"))
    assert store.collect_garbage(grace_s=0.0) == [1]
    assert not redis_client.exists(keys.rows(1, "users"))
    assert redis_client.exists(keys.rows(2, "users"))


def test_refresh_lease_has_one_holder(redis_client: redis.Redis, model_name: str) -> None:
    store = RedisStore.open(redis_client, model_name, "explicit", 4)
    assert store.hold_refresh_lease("a", 5.0)
    assert not store.hold_refresh_lease("b", 5.0)
    assert store.hold_refresh_lease("a", 5.0), "the holder extends its lease"
    redis_client.delete(ModelKeys(model_name).refresh_lease)  # as if it expired
    assert store.hold_refresh_lease("b", 5.0)


def test_refreshes_during_a_stream_lose_no_update(redis_client: redis.Redis, model_name: str) -> None:
    params = LearnerParams(SgdParams(LossParams("implicit")), init_std=0.1, seed=5)
    store = RedisStore.open(redis_client, model_name, "implicit", 8)
    rng = np.random.default_rng(1)
    warm = [Event(user_id=f"u{rng.integers(200)}", item_id=f"i{rng.integers(80)}") for _ in range(3000)]
    Learner(store, params).learn(warm, {0: (0, len(warm))})
    batches = [
        [Event(user_id=f"s{b}-{j % 7}", item_id=f"i{rng.integers(99)}") for j in range(50)] for b in range(60)
    ]

    def stream() -> None:  # another replica: its own store object and learner
        learner = Learner(RedisStore.attach(redis_client, model_name), params)
        first = len(warm)
        for batch in batches:
            assert learner.learn(batch, {0: (first, first + len(batch))}).outcome is ApplyOutcome.APPLIED
            first += len(batch)
            time.sleep(0.02)  # a stream, not a burst: it should span a refresh or two

    writer = threading.Thread(target=stream)
    writer.start()
    reports = []
    while writer.is_alive():
        reports.append(refresh(store, params, 2))
    writer.join()

    assert store.events_applied() == len(warm) + sum(len(b) for b in batches)
    assert all(r.published for r in reports)
    assert sum(r.caught_up_rows for r in reports) > 0, "the stream never overlapped a refresh"
    live = store.current_version()
    stored_users = {u.decode() for u in redis_client.hkeys(ModelKeys(model_name).rows(live, "users"))}
    expected = {e.user_id for e in warm} | {e.user_id for batch in batches for e in batch}
    assert stored_users == expected, f"users missing after the flips: {sorted(expected - stored_users)[:5]}"


def test_cli_refresh_publishes_and_respects_a_daemons_lease(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    params = LearnerParams(SgdParams(LossParams("explicit")), init_std=0.1, seed=5)
    store = RedisStore.open(redis_client, model_name, "explicit", 32, {})
    events = [Event(user_id=f"u{i % 13}", item_id=f"i{i % 17}", value=float(1 + i % 5)) for i in range(400)]
    Learner(store, params).learn(events, {0: (0, len(events))})
    env = {"STREAMMF_REDIS__URL": redis_url, "STREAMMF_MODEL__NAME": model_name}

    assert store.hold_refresh_lease("daemon-a", 30.0)
    refused = CliRunner().invoke(cli, ["refresh", "--iterations", "1"], env=env)
    assert refused.exit_code == 1 and "held by daemon-a" in refused.output
    assert store.current_version() == 1

    redis_client.delete(ModelKeys(model_name).refresh_lease)
    result = CliRunner().invoke(cli, ["refresh", "--iterations", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert "version 2 published" in result.output and store.current_version() == 2
    assert store.refresh_lease_holder() is None, "the command gives its lease back"


def test_a_refresh_that_does_not_publish_leaves_no_tracking_behind(
    redis_client: redis.Redis, model_name: str
) -> None:
    """Regression: a discarded (or failed) refresh left the live version 'tracking', so every later batch
    kept adding ids to v<N>:changed:* until the next refresh; and a failed one left its build forever."""
    params = LearnerParams(SgdParams(LossParams("implicit")), init_std=0.1, seed=5)
    store = RedisStore.open(redis_client, model_name, "implicit", 4)
    rng = np.random.default_rng(2)
    events = [Event(user_id=f"u{rng.integers(30)}", item_id=f"i{rng.integers(20)}") for _ in range(600)]
    learner = Learner(store, params)
    learner.learn(events[:400], {0: (0, 400)})
    keys = ModelKeys(model_name)
    live = store.current_version()

    original_publish = store.publish
    store.publish = lambda version, expected: False  # type: ignore[method-assign]  # lost a race
    report = refresh(store, params, 1)
    store.publish = original_publish  # type: ignore[method-assign]
    assert not report.published and store.current_version() == live

    def fail(*_args: object) -> None:
        raise RuntimeError("refresh died half-way")

    store.write_gramian = fail  # type: ignore[method-assign]
    try:
        refresh(store, params, 1)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the refresh should have failed")
    learner.learn(events[400:], {0: (400, 600)})
    assert redis_client.hget(keys.version_meta(live), "tracking") is None
    assert not redis_client.exists(keys.changed(live, "users"), keys.changed(live, "items"))
    retired = {int(v) for v in redis_client.zrange(keys.retired, 0, -1)}
    assert retired == {live + 1, live + 2}, "both unpublished builds are handed to garbage collection"


def test_a_writer_reads_in_one_call_and_finds_a_version_another_replica_published(
    redis_client: redis.Redis, model_name: str, monkeypatch
) -> None:
    """A single-shard writer tries the version its last read found (the read script checks `current`
    itself): one call per read while the version holds, and the new version as soon as it moves."""
    params = LearnerParams(SgdParams(LossParams("implicit")), init_std=0.1, seed=5)
    writer = RedisStore.open(redis_client, model_name, "implicit", 8)
    rng = np.random.default_rng(2)
    events = [Event(user_id=f"u{rng.integers(50)}", item_id=f"i{rng.integers(30)}") for _ in range(1500)]
    learner = Learner(writer, params)
    assert learner.learn(events[:1000], {0: (0, 1000)}).version == 1

    commands: list[str] = []
    execute = redis_client.execute_command

    def counted(*args, **options):
        commands.append(str(args[0]))
        return execute(*args, **options)

    monkeypatch.setattr(redis_client, "execute_command", counted)
    assert writer.read_batch_state(["u1"], ["i1"], [("u1", "i1")]).version == 1
    assert commands == ["EVALSHA"]

    other = RedisStore.attach(redis_client, model_name)  # another replica, running the refresh
    assert refresh(other, params, 2).published
    commands.clear()
    assert writer.read_batch_state(["u1"], ["i1"], [("u1", "i1")]).version == 2
    assert commands == ["EVALSHA", "GET", "EVALSHA"]  # the guess missed: `current` is read, then v2
    result = learner.learn(events[1000:], {0: (1000, 1500)})
    assert result.outcome is ApplyOutcome.APPLIED and result.version == 2
    assert writer.events_applied() == 1500


def test_a_lost_version_counter_never_hands_out_a_version_the_model_holds(
    redis_client: redis.Redis, model_name: str
) -> None:
    """`next_version` deleted (or evicted) after two refreshes: INCR would hand out 1, marking a retired
    version 'building' and zeroing its Gramian. The refresh takes a number past every version instead,
    and the live version's Gramian and rows stay as they were."""
    params = LearnerParams(SgdParams(LossParams("implicit")), init_std=0.1, seed=5)
    store = RedisStore.open(redis_client, model_name, "implicit", 8)
    rng = np.random.default_rng(1)
    events = [Event(user_id=f"u{rng.integers(50)}", item_id=f"i{rng.integers(30)}") for _ in range(600)]
    assert Learner(store, params).learn(events, {0: (0, 600)}).outcome is ApplyOutcome.APPLIED
    assert refresh(store, params, 2).version == 2
    assert refresh(store, params, 2).version == 3
    keys = ModelKeys(model_name)
    live_gramian = redis_client.get(keys.gramian(3, "items"))
    retired_gramian = redis_client.get(keys.gramian(2, "items"))
    redis_client.delete(keys.next_version)

    version = store.begin_version()
    assert version == 4
    assert redis_client.hget(keys.version_meta(3), "state") != b"building"
    assert redis_client.get(keys.gramian(3, "items")) == live_gramian
    assert redis_client.get(keys.gramian(2, "items")) == retired_gramian
    assert store.discard_version(version)
    report = refresh(store, params, 2)
    assert report.published and report.version == 5 == store.current_version()
