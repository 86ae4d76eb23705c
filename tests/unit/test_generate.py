"""The synthetic stream: determinism, value ranges, popularity and growth, poison records, ground truth,
and the `generate` command."""

from __future__ import annotations

from collections import Counter

import click
import numpy as np
import pytest
from click.testing import CliRunner

from streammf.cli.stream import generate
from streammf.config import Settings
from streammf.stream.events import Event, Invalid, decode, encode
from streammf.tools.generate import POISON_KINDS, Mode, SyntheticStream, _event_json, item_id, user_id

MAX_BYTES = Settings().kafka.max_record_bytes
N_USERS, N_ITEMS, N_EVENTS = 1000, 500, 20_000


@pytest.fixture(scope="module")
def explicit_events() -> list[Event]:
    return list(SyntheticStream("explicit", N_USERS, N_ITEMS, seed=11).events(N_EVENTS))


@pytest.fixture(scope="module")
def implicit_events() -> list[Event]:
    return list(SyntheticStream("implicit", N_USERS, N_ITEMS, seed=11).events(N_EVENTS))


def _user_index(event: Event) -> int:
    return int(event.user_id.removeprefix("u"))


def _item_index(event: Event) -> int:
    return int(event.item_id.removeprefix("i"))


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_records_and_other_seed_differs() -> None:
    first = list(SyntheticStream("explicit", 200, 100, seed=5, poison_rate=0.1).records(3000))
    again = list(SyntheticStream("explicit", 200, 100, seed=5, poison_rate=0.1).records(3000))
    other = list(SyntheticStream("explicit", 200, 100, seed=6, poison_rate=0.1).records(3000))
    assert first == again
    assert first != other


def test_repeated_calls_on_one_stream_repeat_the_events() -> None:
    stream = SyntheticStream("implicit", 100, 50, seed=2)
    assert list(stream.events(500)) == list(stream.events(500))


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_records_without_poison_are_the_encoded_events_keyed_by_user(mode: Mode) -> None:
    stream = SyntheticStream(mode, 100, 50, seed=3)
    records = list(stream.records(1000))
    events = list(stream.events(1000))
    assert [value for _, value in records] == [encode(event) for event in events]
    assert [key for key, _ in records] == [event.user_id.encode() for event in events]


def test_event_payloads_are_written_as_the_model_writes_them_whatever_the_numbers() -> None:
    # Records are formatted without the Event model; numbers Python and pydantic write differently
    # (exponents: 1e-05 against 0.00001) must take the model's path.
    rng = np.random.default_rng(4)
    numbers = [
        0.0,
        1e-4,
        9.99e-5,
        1e-5,
        1e15,
        1e16,
        123456789.123,
        1.7e9 + 0.5,
        5e-324,
        1.7976931348623157e308,
    ]
    numbers += (10.0 ** rng.uniform(-8, 20, 3000) * rng.choice([-1, 1], 3000)).tolist()
    for n, value in enumerate(numbers):
        timestamp = abs(numbers[-1 - n])
        event = Event(
            user_id="u7", item_id="i9", value=value, weight=1.0, timestamp=timestamp, event_type="click"
        )
        assert _event_json("u7", "i9", value, timestamp, "click") == encode(event), (value, timestamp)


# ----------------------------------------------------------------------------------------- value ranges


def test_explicit_ratings_are_whole_stars_from_1_to_5(explicit_events: list[Event]) -> None:
    assert len(explicit_events) == N_EVENTS
    assert {event.value for event in explicit_events} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert {event.event_type for event in explicit_events} == {"rating"}
    assert {event.weight for event in explicit_events} == {1.0}
    assert 3.0 < np.mean([event.value for event in explicit_events]) < 4.2


def test_implicit_events_are_clicks_with_occasional_purchases(implicit_events: list[Event]) -> None:
    kinds = Counter((event.event_type, event.value) for event in implicit_events)
    assert set(kinds) == {("click", 1.0), ("purchase", 5.0)}
    assert 0.01 < kinds["purchase", 5.0] / len(implicit_events) < 0.2


def test_timestamps_never_decrease(explicit_events: list[Event]) -> None:
    stamps = np.array([event.timestamp for event in explicit_events])
    assert stamps[0] >= 1_700_000_000.0
    assert np.all(np.diff(stamps) >= 0)
    assert stamps[-1] > stamps[0]


def test_ids_are_within_the_configured_populations(explicit_events: list[Event]) -> None:
    assert all(0 <= _user_index(event) < N_USERS for event in explicit_events)
    assert all(0 <= _item_index(event) < N_ITEMS for event in explicit_events)


# ------------------------------------------------------------------------------ popularity and growth


def test_item_popularity_is_power_law(explicit_events: list[Event]) -> None:
    counts = sorted(Counter(event.item_id for event in explicit_events).values(), reverse=True)
    top_share = sum(counts[: N_ITEMS // 10]) / len(explicit_events)
    assert top_share > 0.4, f"top 10% of items get only {top_share:.0%} of the events"


def test_user_activity_is_heavy_tailed(explicit_events: list[Event]) -> None:
    counts = sorted(Counter(event.user_id for event in explicit_events).values(), reverse=True)
    top_share = sum(counts[: N_USERS // 10]) / len(explicit_events)
    assert top_share > 0.25, f"top 10% of users make only {top_share:.0%} of the events"


def test_new_users_and_items_appear_over_time(explicit_events: list[Event]) -> None:
    early, late = explicit_events[: N_EVENTS // 10], explicit_events[N_EVENTS // 2 :]
    # At 10% of the stream, 20% + 0.1 * 80% = 28% of each population exists.
    assert max(_user_index(event) for event in early) < 0.3 * N_USERS
    assert max(_item_index(event) for event in early) < 0.3 * N_ITEMS
    first_half = explicit_events[: N_EVENTS // 2]
    new_users = {e.user_id for e in late} - {e.user_id for e in first_half}
    new_items = {e.item_id for e in late} - {e.item_id for e in first_half}
    assert len(new_users) > 50 and len(new_items) > 20
    assert max(_user_index(event) for event in late) > 0.9 * N_USERS


def test_growth_events_fixes_when_everyone_exists() -> None:
    stream = SyntheticStream("explicit", 1000, 500, seed=4, initial_fraction=0.1, growth_events=100)
    users = {_user_index(event) for event in list(stream.events(5000))[:50]}
    assert max(users) < 0.6 * 1000  # half way through the growth: 10% + 0.5 * 90% = 55% exist


# ------------------------------------------------------------------------------------------------ poison


def test_poison_records_are_invalid_and_the_others_are_the_events() -> None:
    stream = SyntheticStream("explicit", 300, 200, seed=9, poison_rate=0.2)
    labelled = list(stream.labelled_records(4000))
    events = list(stream.events(4000))
    reasons: Counter[str] = Counter()
    for record, event in zip(labelled, events, strict=True):
        decoded = decode(record.value, MAX_BYTES)
        assert b"\n" not in record.value
        assert record.key == event.user_id.encode()
        if record.poison is None:
            assert decoded == event
        else:
            assert isinstance(decoded, Invalid), record.value[:200]
            assert decoded.reason == record.poison
            reasons[decoded.reason] += 1
    assert set(reasons) == set(POISON_KINDS)
    assert 0.15 < sum(reasons.values()) / len(labelled) < 0.25


def test_no_poison_by_default() -> None:
    records = SyntheticStream("implicit", 300, 200, seed=9).records(3000)
    assert not any(isinstance(decode(value, MAX_BYTES), Invalid) for _, value in records)


# ------------------------------------------------------------------------------------------ ground truth


def test_true_score_correlates_with_ratings(explicit_events: list[Event]) -> None:
    stream = SyntheticStream("explicit", N_USERS, N_ITEMS, seed=11)
    truth = [stream.true_score(event.user_id, event.item_id) for event in explicit_events]
    ratings = [event.value for event in explicit_events]
    assert np.corrcoef(truth, ratings)[0, 1] > 0.6


def test_implicit_choices_follow_the_true_affinity(implicit_events: list[Event]) -> None:
    stream = SyntheticStream("implicit", N_USERS, N_ITEMS, seed=11)
    chosen = np.array([stream.true_score(e.user_id, e.item_id) for e in implicit_events])
    rng = np.random.default_rng(0)
    pairs = zip(rng.integers(0, N_USERS, 5000).tolist(), rng.integers(0, N_ITEMS, 5000).tolist(), strict=True)
    random_pairs = [stream.true_score(u, i) for u, i in pairs]
    assert chosen.mean() > np.mean(random_pairs) + 0.3
    purchased = np.array([e.event_type == "purchase" for e in implicit_events])
    assert chosen[purchased].mean() > chosen[~purchased].mean()


def test_true_score_takes_ids_or_indices_and_matches_true_scores() -> None:
    stream = SyntheticStream("explicit", 50, 40, k_true=4, seed=1)
    assert stream.true_score(user_id(7), item_id(3)) == stream.true_score(7, 3)
    np.testing.assert_allclose(stream.true_scores("u7"), [stream.true_score(7, i) for i in range(40)])
    for bad_user in ("x7", "u50", 50, -1):
        with pytest.raises(KeyError):
            stream.true_score(bad_user, 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "ordinal"}, {"n_users": 0}, {"k_true": 0}, {"poison_rate": 1.5}, {"initial_fraction": -0.1}],
)
def test_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SyntheticStream(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- `generate` command


def _cli() -> click.Group:
    @click.group()
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = Settings()

    group.add_command(generate)
    return group


def test_generate_command_prints_json_lines(tmp_path) -> None:
    args = [
        "generate",
        "--events",
        "300",
        "--mode",
        "implicit",
        "--users",
        "40",
        "--items",
        "30",
        "--seed",
        "2",
        "--fixed-clock",
    ]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    lines = result.stdout_bytes.splitlines()
    expected = [value for _, value in SyntheticStream("implicit", 40, 30, seed=2).records(300)]
    assert lines == expected

    output = tmp_path / "events.jsonl"
    result = CliRunner().invoke(_cli(), [*args, "--poison-rate", "0.3", "--output", str(output)])
    assert result.exit_code == 0, result.output
    decoded = [decode(line, MAX_BYTES) for line in output.read_bytes().splitlines()]
    assert len(decoded) == 300
    assert 50 < sum(isinstance(d, Invalid) for d in decoded) < 130


def test_generate_stamps_events_with_the_time_they_are_made_unless_the_clock_is_fixed() -> None:
    import json
    import time

    before = time.time()
    result = CliRunner().invoke(_cli(), ["generate", "--events", "50", "--seed", "2"])
    after = time.time()
    stamps = [json.loads(line)["timestamp"] for line in result.stdout_bytes.splitlines()]
    assert all(before <= t <= after for t in stamps), "now-stamped by default"
    fixed = CliRunner().invoke(_cli(), ["generate", "--events", "50", "--seed", "2", "--fixed-clock"])
    assert next(json.loads(line)["timestamp"] for line in fixed.stdout_bytes.splitlines()) < 1_800_000_000
