"""The daemon's learner in a process of its own (streammf.stream.learner_process) on a real Redis: it
writes the model an in-process learner writes, byte for byte; diverged events reach the parent before
anything is applied, and nothing is applied if the parent cannot take them; a child that is killed is
replaced, and the batch it was serving is either applied whole or not at all; a batch handed over behind
another is learnt only if that one was applied; the store's errors cross the pipe as themselves; its store
calls are timed in the parent's metrics."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from streammf.config import ModelSettings, RedisSettings, Settings
from streammf.store.contract import ApplyOutcome, StoreLostStateError, StoreUnavailableError
from streammf.store.layout import delete_model
from streammf.store.redis_store import RedisStore
from streammf.stream.daemon import open_store
from streammf.stream.events import EventColumns
from streammf.stream.learner import BatchSkipped, Learner, LearnerParams
from streammf.stream.learner_process import MAX_DEATHS_IN_A_ROW, LearnerProcess, LearnerProcessError
from streammf.stream.metrics import Metrics
from tests.integration.private_services import PrivateRedis
from tests.integration.test_user_cache import model_contents

BATCH = 300


def _settings(redis_url: str, name: str, mode: str = "explicit") -> Settings:
    # Bounds opened wide (an operator's choice), so that an event can drive a row out of bounds.
    low = -1e6 if mode == "explicit" else 0.0
    model = ModelSettings(name=name, mode=mode, factors=8, value_min=low, value_max=1e6)  # type: ignore[arg-type]
    return Settings(redis=RedisSettings(url=redis_url), model=model)


def _batches(n_batches: int, seed: int, mode: str = "explicit") -> list[EventColumns]:
    rng = np.random.default_rng(seed)
    high = 6 if mode == "explicit" else 4
    return [
        EventColumns(
            [f"u{u}" for u in rng.integers(60, size=BATCH)],
            [f"i{i}" for i in rng.integers(40, size=BATCH)],
            rng.integers(1, high, size=BATCH).astype(float),
            np.ones(BATCH),
            np.full(BATCH, np.nan),
        )
        for _ in range(n_batches)
    ]


def _offsets(batch: int) -> dict[int, tuple[int, int]]:
    return {0: (batch * BATCH, (batch + 1) * BATCH)}


@pytest.fixture
def names(redis_client: redis.Redis, model_name: str) -> Iterator[tuple[str, str]]:
    """Two models: one written through the learner process, one by an in-process learner."""
    yield model_name, model_name + "-inproc"
    delete_model(redis_client, model_name + "-inproc")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_the_learner_process_writes_the_model_an_in_process_learner_writes(
    redis_url: str, redis_client: redis.Redis, names: tuple[str, str], registry: CollectorRegistry, mode: str
) -> None:
    remote_name, local_name = names
    metrics = Metrics(registry)
    remote_settings = _settings(redis_url, remote_name, mode)
    params = LearnerParams.from_settings(remote_settings.model)
    local = Learner(open_store(_settings(redis_url, local_name, mode), redis_client), params)
    open_store(remote_settings, redis_client)
    remote = LearnerProcess(remote_settings, params, metrics.redis_latency)
    try:
        for t, events in enumerate(_batches(6, seed=5, mode=mode)):
            got = remote.learn(events, _offsets(t))
            want = local.learn(events, _offsets(t))
            assert got.outcome is want.outcome is ApplyOutcome.APPLIED
            np.testing.assert_array_equal(got.predictions, want.predictions)
        assert remote.applied_offsets() == {0: 6 * BATCH}
        assert remote.learn(_batches(1, seed=5, mode=mode)[0], _offsets(0)).outcome is ApplyOutcome.DUPLICATE
        assert remote.forget_user("u1", {1: (0, 1)}) is ApplyOutcome.APPLIED
        local.forget_user("u1", {1: (0, 1)})
    finally:
        remote.close()
    assert model_contents(redis_client, remote_name) == model_contents(redis_client, local_name)
    # The child's store calls were timed into the parent's histogram.
    calls = registry.get_sample_value("streammf_redis_call_seconds_count", {"op": "apply"})
    assert calls is not None and calls >= 7


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_batches_handed_over_ahead_write_the_model_batches_one_by_one_write(
    redis_url: str, redis_client: redis.Redis, names: tuple[str, str], registry: CollectorRegistry, mode: str
) -> None:
    """Every batch handed over before the one ahead of it is answered: the child computes each while
    the one before applies (from the state that apply leaves), and the model is byte for byte the one an
    in-process learner writes batch by batch."""
    remote_name, local_name = names
    remote_settings = _settings(redis_url, remote_name, mode)
    params = LearnerParams.from_settings(remote_settings.model)
    local = Learner(open_store(_settings(redis_url, local_name, mode), redis_client), params)
    open_store(remote_settings, redis_client)
    remote = LearnerProcess(remote_settings, params, Metrics(registry).redis_latency)
    batches = _batches(12, seed=8, mode=mode)
    try:
        pending = []
        for t, events in enumerate(batches):
            pending.append(remote.submit(events, _offsets(t), after=pending[-1] if pending else None))
        for t, events in enumerate(batches):
            got, want = pending[t].wait(), local.learn(events, _offsets(t))
            assert got.outcome is want.outcome is ApplyOutcome.APPLIED
            np.testing.assert_array_equal(got.predictions, want.predictions)
    finally:
        remote.close()
    assert model_contents(redis_client, remote_name) == model_contents(redis_client, local_name)


def _diverging(events: EventColumns, at: int) -> EventColumns:
    """`events` with one event whose value drives its rows out of bounds."""
    values = events.values.copy()
    values[at] = 1e4
    return EventColumns(events.user_ids, events.item_ids, values, events.weights, events.timestamps)


def _refuse_dead_letters(positions: list[int]) -> None:
    """What the loop's `on_diverged` does when the dead-letter topic cannot take the events."""
    raise ConnectionError("the dead-letter topic is down")


def _killing(pid: int) -> Callable[[list[int]], None]:
    """An `on_diverged` that kills the learner process `pid` while it waits to hear whether it may apply."""

    def kill(positions: list[int]) -> None:
        os.kill(pid, signal.SIGKILL)

    return kill


@contextlib.contextmanager
def _learner_process(redis_url: str, client: redis.Redis, name: str) -> Iterator[LearnerProcess]:
    """A learner process on a model created (as the daemon does) before it starts; closed on exit."""
    settings = _settings(redis_url, name)
    open_store(settings, client)
    learner = LearnerProcess(settings, LearnerParams.from_settings(settings.model))
    try:
        yield learner
    finally:
        learner.close()


@pytest.fixture
def learner(redis_url: str, redis_client: redis.Redis, model_name: str) -> Iterator[LearnerProcess]:
    with _learner_process(redis_url, redis_client, model_name) as process:
        yield process


@pytest.fixture
def store(learner: LearnerProcess, redis_client: redis.Redis, model_name: str) -> RedisStore:
    return RedisStore.attach(redis_client, model_name)


def test_diverged_events_reach_the_parent_before_the_apply_and_a_refusal_applies_nothing(
    learner: LearnerProcess, store: RedisStore
) -> None:
    heard: list[list[int]] = []

    def refuse(positions: list[int]) -> None:
        heard.append(positions)
        raise ConnectionError("the dead-letter topic is down")

    events = _diverging(_batches(1, seed=9)[0], at=17)
    with pytest.raises(ConnectionError, match="dead-letter topic is down"):
        learner.learn(events, _offsets(0), refuse)
    assert heard == [[17]]
    assert store.events_applied() == 0 and store.applied_offsets() == {}

    def accept(positions: list[int]) -> None:
        assert store.events_applied() == 0  # heard before the apply
        heard.append(positions)

    result = learner.learn(events, _offsets(0), accept)
    assert heard[-1] == [17] and result.diverged == (17,)
    assert store.events_applied() == BATCH - 1 and store.applied_offsets() == {0: BATCH}


def test_a_killed_learner_process_is_replaced_and_its_batch_is_applied_whole_or_not_at_all(
    learner: LearnerProcess, store: RedisStore
) -> None:
    batches = _batches(4, seed=11)
    learner.learn(batches[0], _offsets(0))
    first = learner.pid
    assert first is not None
    with pytest.raises(StoreUnavailableError, match="learner process died"):
        learner.learn(_diverging(batches[1], at=3), _offsets(1), _killing(first))
    assert store.applied_offsets() == {0: BATCH}  # the killed batch applied nothing
    # The next call starts another child, which goes on from what the store holds.
    for t in (1, 2, 3):
        assert learner.learn(batches[t], _offsets(t)).outcome is ApplyOutcome.APPLIED
    assert learner.pid not in (None, first)
    assert store.applied_offsets() == {0: 4 * BATCH}
    assert store.events_applied() == 4 * BATCH


def test_the_stores_errors_cross_the_pipe_as_themselves(
    learner: LearnerProcess, redis_client: redis.Redis, model_name: str
) -> None:
    learner.learn(_batches(1, seed=2)[0], _offsets(0))
    delete_model(redis_client, model_name)  # Redis lost the model under a running learner
    with pytest.raises(StoreLostStateError) as raised:
        learner.learn(_batches(1, seed=3)[0], _offsets(1))
    assert any("in the learner process" in note for note in raised.value.__notes__)
    learner.close()
    assert learner.pid is None


def test_a_child_that_cannot_start_again_is_transient_and_a_model_gone_meanwhile_is_lost_state(
    tmp_path: Path,
) -> None:
    server = PrivateRedis(tmp_path / "redis").start()  # no persistence: it restarts empty
    try:
        with _learner_process(server.url, server.client(), "restarts") as learner:
            learner.learn(_batches(1, seed=4)[0], _offsets(0))
            first = learner.pid
            assert first is not None
            server.kill()
            os.kill(first, signal.SIGKILL)
            with pytest.raises(StoreUnavailableError, match="died"):
                learner.learn(_batches(1, seed=5)[0], _offsets(1))
            # Redis is down: the new child cannot open the store. Transient (the loop backs off), not a crash.
            with pytest.raises(StoreUnavailableError, match="could not be started again"):
                learner.learn(_batches(1, seed=5)[0], _offsets(1))
            server.start()
            # Redis came back without the model: the child refuses, as lost state, and creates nothing.
            with pytest.raises(StoreLostStateError, match="missing"):
                learner.learn(_batches(1, seed=5)[0], _offsets(1))
            assert server.client().dbsize() == 0
    finally:
        server.kill()


def test_a_child_that_keeps_dying_stops_the_daemon_loudly(learner: LearnerProcess, store: RedisStore) -> None:
    """A batch that kills the child every time (say, out of memory): not restarted forever."""

    def kill_the_child(positions: list[int]) -> None:
        assert learner.pid is not None
        os.kill(learner.pid, signal.SIGKILL)

    events = _diverging(_batches(1, seed=6)[0], at=0)
    for _ in range(MAX_DEATHS_IN_A_ROW):
        with pytest.raises(StoreUnavailableError, match="died"):
            learner.learn(events, _offsets(0), kill_the_child)
    with pytest.raises(LearnerProcessError, match="died 3 times in a row"):
        learner.learn(events, _offsets(0), kill_the_child)
    assert store.events_applied() == 0


def test_deaths_count_only_in_a_row(learner: LearnerProcess) -> None:
    for t in range(MAX_DEATHS_IN_A_ROW + 1):
        assert learner.pid is not None
        os.kill(learner.pid, signal.SIGKILL)
        with pytest.raises(StoreUnavailableError, match="died"):
            learner.learn(_batches(1, seed=t)[0], _offsets(t))
        assert learner.learn(_batches(1, seed=t)[0], _offsets(t)).outcome is ApplyOutcome.APPLIED


def test_a_batch_handed_over_behind_another_is_learnt_only_if_that_one_was_applied(
    learner: LearnerProcess, store: RedisStore
) -> None:
    batches = _batches(6, seed=12)
    first = learner.submit(batches[0], _offsets(0))
    second = learner.submit(batches[1], _offsets(1), after=first)
    assert first.wait().outcome is second.wait().outcome is ApplyOutcome.APPLIED
    # A conflict (offsets overlapping what is applied) applies nothing, so the batch behind it, whose
    # offsets would otherwise land past a gap, is not learnt at all.
    conflicting = learner.submit(batches[2], {0: (BATCH, 3 * BATCH)})
    behind = learner.submit(batches[3], _offsets(3), after=conflicting)
    assert conflicting.wait().outcome is ApplyOutcome.CONFLICT
    with pytest.raises(BatchSkipped):
        behind.wait()
    # Nor behind a batch the parent refused (its diverged events could not be dead-lettered); calls sent
    # while the child waits for the parent's word are served after it, in order.
    refused = learner.submit(_diverging(batches[2], at=5), _offsets(2))
    behind = learner.submit(batches[3], _offsets(3), after=refused)
    later = learner.submit(batches[2], _offsets(2))

    with pytest.raises(ConnectionError):
        refused.wait(_refuse_dead_letters)
    with pytest.raises(BatchSkipped):
        behind.wait()
    assert later.wait().outcome is ApplyOutcome.APPLIED
    assert store.applied_offsets() == {0: 3 * BATCH} and store.events_applied() == 3 * BATCH


def test_a_batch_handed_over_behind_one_whose_child_died_is_not_learnt(
    learner: LearnerProcess, store: RedisStore
) -> None:
    batches = _batches(3, seed=13)
    learner.learn(batches[0], _offsets(0))
    pid = learner.pid
    assert pid is not None

    dying = learner.submit(_diverging(batches[1], at=0), _offsets(1))
    behind = learner.submit(batches[2], _offsets(2), after=dying)
    with pytest.raises(StoreUnavailableError, match="died"):
        dying.wait(_killing(pid))
    with pytest.raises(StoreUnavailableError, match="gone"):
        behind.wait()
    # Handed over behind it after the death: refused at once, and the new child never sees it.
    with pytest.raises(BatchSkipped):
        learner.submit(batches[2], _offsets(2), after=dying).wait()
    assert store.applied_offsets() == {0: BATCH}
    assert learner.learn(batches[1], _offsets(1)).outcome is ApplyOutcome.APPLIED
    assert learner.pid not in (None, pid)


def test_an_answer_read_ahead_of_its_wait_is_kept_for_it(learner: LearnerProcess, store: RedisStore) -> None:
    """A batch retried (sent again, unchained) after a batch handed over behind it: the retry's wait
    reads the skipped batch's answer first and keeps it, so that batch's own wait says skipped (its
    records are fetched again), not that the learner process is gone (which would look like an outage)."""
    batches = _batches(3, seed=14)
    learner.learn(batches[0], _offsets(0))
    refused = learner.submit(_diverging(batches[1], at=2), _offsets(1))
    behind = learner.submit(batches[2], _offsets(2), after=refused)
    retry = learner.submit(_diverging(batches[1], at=2), _offsets(1))

    with pytest.raises(ConnectionError):
        refused.wait(_refuse_dead_letters)
    assert retry.wait(lambda positions: None).outcome is ApplyOutcome.APPLIED
    with pytest.raises(BatchSkipped):
        behind.wait()
    assert store.applied_offsets() == {0: 2 * BATCH}


def test_a_child_dying_while_an_earlier_answer_is_read_ahead_is_an_outage_not_a_crash(
    learner: LearnerProcess, store: RedisStore
) -> None:
    batches = _batches(2, seed=15)
    first = learner.submit(_diverging(batches[0], at=1), _offsets(0))
    second = learner.submit(batches[1], _offsets(1), after=first)
    assert learner.pid is not None
    os.kill(learner.pid, signal.SIGKILL)
    with pytest.raises(StoreUnavailableError):
        second.wait()  # reads (and keeps) the first one's answer, and meets the death there
    with pytest.raises(StoreUnavailableError):
        first.wait()
    assert store.applied_offsets() == {}
