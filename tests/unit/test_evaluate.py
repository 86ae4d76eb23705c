"""`streammf evaluate`: prequential RMSE / MAE and per-event exact recall@10 / NDCG@10 through the daemon's
Learner on the in-memory store; the decayed popularity kernel and the fallback rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from streammf.cli import cli
from streammf.config import ModelSettings
from streammf.model.popularity import add_events, decayed_counts, serve_popularity, top_items
from streammf.model.prequential import NOT_SCORED, UNRANKABLE
from streammf.store.memory import MemoryStore
from streammf.stream.events import Event
from streammf.stream.learner import Learner, LearnerParams
from streammf.tools.evaluate import EvaluationReport, Ranking, evaluate
from streammf.tools.ratings import RatingsLog, load_ratings


def _explicit_log(
    seed: int, n: int = 4000, n_users: int = 150, n_items: int = 100, rank: int = 3
) -> RatingsLog:
    """Ratings 1..5 from μ + b_u + c_i + ⟨u, v⟩ + noise, in random (user, item) order."""
    rng = np.random.default_rng(seed)
    U = rng.normal(0.0, 0.6, (n_users, rank))
    V = rng.normal(0.0, 0.6, (n_items, rank))
    bu = rng.normal(0.0, 0.5, n_users)
    bi = rng.normal(0.0, 0.5, n_items)
    u = rng.integers(0, n_users, n)
    i = rng.integers(0, n_items, n)
    clean = 3.5 + bu[u] + bi[i] + np.sum(U[u] * V[i], axis=1)
    values = np.clip(np.round(clean + rng.normal(0.0, 0.3, n)), 1, 5)
    users = np.array([f"u{x}" for x in u])
    items = np.array([f"i{x}" for x in i])
    return RatingsLog(users, items, values, np.arange(n, dtype=np.float64))


def _implicit_log(
    seed: int, n: int = 3000, n_users: int = 100, n_items: int = 200, groups: int = 10
) -> RatingsLog:
    """Each user belongs to one of `groups` groups and consumes that group's 8 items, 90% of the time;
    otherwise any item (so the whole catalogue shows up and a random ranking has many candidates)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, n_users)
    favourites = rng.permutation(n_items)[: groups * 8].reshape(groups, 8)
    u = rng.integers(0, n_users, n)
    noise = rng.random(n) < 0.1
    i = np.where(noise, rng.integers(0, n_items, n), favourites[group[u], rng.integers(0, 8, n)])
    users = np.array([f"u{x}" for x in u])
    items = np.array([f"i{x}" for x in i])
    return RatingsLog(users, items, np.ones(n), np.arange(n, dtype=np.float64))


def _run(
    log: RatingsLog, model: ModelSettings, batch_size: int = 500, **kwargs: float
) -> tuple[EvaluationReport, MemoryStore]:
    store = MemoryStore(model.name, model.mode, model.factors)
    params = LearnerParams.from_settings(model)
    return evaluate(log, store, params, batch_size=batch_size, **kwargs), store  # type: ignore[arg-type]


def _global_mean_rmse(values: np.ndarray) -> float:
    """Prequential RMSE of predicting the mean of all earlier values (0 for the first, as the model does)."""
    earlier = np.concatenate([[0.0], np.cumsum(values)[:-1] / np.arange(1, len(values))])
    return float(np.sqrt(np.mean((values - earlier) ** 2)))


# -------------------------------------------------------------------------------------------- explicit


@pytest.mark.parametrize("seed", [0, 1])
def test_explicit_rmse_beats_global_mean(seed: int) -> None:
    log = _explicit_log(seed)
    report, store = _run(log, ModelSettings())
    baseline = _global_mean_rmse(log.values)
    assert report.mode == "explicit"
    assert report.events == len(log)
    assert report.recall_at_10 is None
    assert report.refreshes == 0
    assert store.events_applied() == len(log)
    assert report.rmse is not None and np.isfinite(report.rmse)
    assert report.rmse < 0.9 * baseline, (report.rmse, baseline)
    assert report.baseline_rmse == pytest.approx(baseline, rel=1e-12)
    assert report.mae is not None and report.mae < report.rmse


def test_explicit_is_deterministic_and_batch_size_free() -> None:
    log = _explicit_log(3, n=2000)
    model = ModelSettings(factors=8)
    first, store_a = _run(log, model)
    second, store_b = _run(log, model)
    assert first.rmse == second.rmse
    assert store_a.user_rows.keys() == store_b.user_rows.keys()
    for ident, row in store_a.user_rows.items():
        np.testing.assert_array_equal(row, store_b.user_rows[ident])
    for ident, row in store_a.item_rows.items():
        np.testing.assert_array_equal(row, store_b.item_rows[ident])
    # The same events in other batch sizes: the same predictions (only the summation order of the squared
    # errors differs).
    small, store_c = _run(log, model, batch_size=37)
    assert small.rmse == pytest.approx(first.rmse, rel=1e-12)
    for ident, row in store_a.item_rows.items():
        np.testing.assert_array_equal(row, store_c.item_rows[ident])


# -------------------------------------------------------------------------------------------- implicit


def _ranks(log: RatingsLog, model: ModelSettings, batch_size: int, **kwargs: float) -> np.ndarray:
    report, _ = _run(log, model, batch_size, **kwargs)
    assert report.ranks is not None
    return report.ranks


def _hand_log() -> RatingsLog:
    """w takes c0..c10 (items numbered by first appearance), x takes c10, c9, c8, y takes c0, then an
    item nobody had; finally x takes c9 again."""
    users = ["w"] * 11 + ["x", "x", "x", "y", "y", "x"]
    items = [f"c{j}" for j in range(11)] + ["c10", "c9", "c8", "c0", "new", "c9"]
    n = len(users)
    return RatingsLog(np.array(users), np.array(items), np.ones(n), np.arange(n, dtype=np.float64))


def test_protocol_on_a_hand_checked_log() -> None:
    """Which events are hits, worked out by hand (popularity = users so far; ties to the item seen first;
    the user's own items left out; decayed popularity with a half-life of one event)."""
    log = _hand_log()
    model = ModelSettings(mode="implicit", factors=4)
    ranks = _ranks(log, model, batch_size=4, popularity_half_life=1.0)
    model_rank, popular, decayed = ranks
    # Events 0-10: each item is new when w takes it: nothing can rank it.
    assert (popular[:11] == UNRANKABLE).all() and (decayed[:11] == UNRANKABLE).all()
    # 11: x's first event, c10; all 11 items have one user, so the 10 seen before c10 beat it: a miss.
    # 12: c9; x has c10 (left out), c0..c8 win the tie: rank 9, the last hit.
    # 13: c8; c9 and c10 have two users now but x has them both: c0..c7 beat c8, rank 8.
    # 14: y's first event, c0 (one user); c8, c9, c10 have two: rank 3.
    assert popular[11:15].tolist() == [10, 9, 8, 3]
    # Decayed (half-life one event): an event at t weighs 2^t, so recency rules. At 11, c10 (taken at 10)
    # is first: a hit where popularity misses; at 14, c0 (taken at 0) is last of all 11: a miss.
    assert decayed[11] == 0
    assert decayed[14] == 10
    # 15: an item nobody had; 16: a pair x already has: learned, not scored.
    assert popular[15] == UNRANKABLE
    assert popular[16] == NOT_SCORED and decayed[16] == NOT_SCORED and model_rank[16] == NOT_SCORED
    # Cold events (11, 14) get the fallback: the model's rank is decayed popularity's.
    assert model_rank[11] == decayed[11] and model_rank[14] == decayed[14]
    # Hits and segments as reported: popularity hits 12, 13, 14 out of 16 scored events (11 cold-or-new
    # misses among them); cold events are 0 (w), 11 (x) and 14 (y).
    report, _ = _run(log, model, 4, popularity_half_life=1.0)
    assert report.rankings[("popularity", "all")] == Ranking(3 / 16, pytest.approx(_ndcg([9, 8, 3]) / 16), 16)
    assert report.rankings[("popularity", "cold")].events == 3
    assert report.rankings[("popularity", "cold")].recall == pytest.approx(1 / 3)  # event 14
    assert report.rankings[("decayed popularity", "cold")] == Ranking(1 / 3, 1 / 3, 3)  # event 11
    assert report.rankings[("model", "cold")] == report.rankings[("decayed popularity", "cold")]


def _ndcg(hit_ranks: list[int]) -> float:
    return float(sum(1.0 / np.log2(r + 2.0) for r in hit_ranks))


def _reference_model_ranks(log: RatingsLog, model: ModelSettings) -> np.ndarray:
    """The model's rank of each warm event's item, the slow way: the learner one event per batch, and
    before each event a full numpy ranking from the store's rows (-1 where not a warm scored event)."""
    store = MemoryStore(model.name, model.mode, model.factors)
    learner = Learner(store, LearnerParams.from_settings(model))
    k = model.factors
    ranks = np.full(len(log), -1, dtype=np.int64)
    order: list[str] = []  # items in order of first appearance (the tie rule)
    for t, (user, item) in enumerate(zip(log.users.tolist(), log.items.tolist(), strict=True)):
        row = store.user_rows.get(user)
        held = store.interactions.get(user, {})
        if row is not None and item in store.item_rows and item not in held:
            scores = {j: float(store.item_rows[j][:k] @ row[:k]) for j in order if j not in held}
            target = scores[item]
            index = {j: n for n, j in enumerate(order)}
            ranks[t] = sum(
                1
                for j, s in scores.items()
                if j != item and (s > target or (s == target and index[j] < index[item]))
            )
        learner.learn([Event(user_id=user, item_id=item, value=1.0)], {0: (t, t + 1)})
        if item not in order:
            order.append(item)
    return ranks


def test_model_ranks_are_per_event_exact_at_any_batch_size() -> None:
    """Within a batch an event sees the steps of the events before it: the mirror's ranks equal a slow
    reference that learns one event at a time and ranks from the store, for batch sizes 1, 7 and 500."""
    log = _implicit_log(2, n=400, n_users=30, n_items=40, groups=4)
    model = ModelSettings(mode="implicit", factors=4)
    reference = _reference_model_ranks(log, model)
    warm = reference >= 0
    assert warm.sum() > 100
    for batch_size in (1, 7, 500):
        ranks = _ranks(log, model, batch_size)
        np.testing.assert_array_equal(ranks[0][warm], reference[warm])
    # Not a vacuous comparison: ranks spread over the catalogue (40 items, top-10 hits and misses both).
    assert 0.2 < (reference[warm] < 10).mean() < 1.0 and reference[warm].max() >= 10


def test_implicit_model_beats_popularity_and_is_deterministic() -> None:
    log = _implicit_log(0)
    model = ModelSettings(mode="implicit", factors=8)
    report, _ = _run(log, model, batch_size=100)
    assert report.mode == "implicit" and report.rmse is None
    model_all = report.rankings[("model", "all")]
    popular_all = report.rankings[("popularity", "all")]
    # Scored: each (user, item) pair's first event.
    assert model_all.events == len(set(zip(log.users.tolist(), log.items.tolist(), strict=True)))
    assert report.mirror_drift == 0.0
    assert 0.0 <= popular_all.recall < model_all.recall <= 1.0, (model_all, popular_all)
    assert model_all.ndcg <= model_all.recall
    again, _ = _run(log, model, batch_size=100)
    assert again.rankings == report.rankings
    # With WALS refreshes in between, the mirror re-reads the refit and still takes the learner's steps.
    refreshed, _ = _run(log, model, batch_size=100, refresh_every=1000)  # type: ignore[arg-type]
    assert refreshed.refreshes == 3 and refreshed.mirror_drift == 0.0  # after 1,000, 2,000, 3,000
    assert refreshed.rankings != report.rankings


def test_the_mirror_leaves_out_the_steps_the_learner_leaves_out() -> None:
    """A bound tight enough that the learner leaves out (dead-letters) many steps: the mirror leaves out the
    same ones, keeps their pairs new for the next event (scored then, as the learner's store has no such
    pair) and does not count them in popularity or μ, so it stays exactly on the learner's rows."""
    log = _implicit_log(3, n=1500, n_users=60, n_items=80)
    model = ModelSettings(mode="implicit", factors=4, learning_rate=0.5, max_abs_factor=0.6)
    report, store = _run(log, model, batch_size=100)
    left_out = len(log) - store.events_applied()
    assert 100 < left_out < len(log) // 2
    assert report.mirror_drift == 0.0
    stored_pairs = sum(len(items) for items in store.interactions.values())
    assert report.rankings[("model", "all")].events >= stored_pairs


def test_decayed_popularity_kernel() -> None:
    scores = np.zeros(3)
    origin = add_events(scores, np.array([0, 1, 1, 2]), np.array([0.0, 1.0, 2.0, 3.0]), 0.0, 1.0)
    # P_j(3) = Σ 2^-(3 - c_e): item 0: 1/8, item 1: 1/4 + 1/2, item 2: 1.
    np.testing.assert_allclose(decayed_counts(scores, 3.0, origin, 1.0), [0.125, 0.75, 1.0])
    # Far in the future the weights would overflow: the origin moves and the counts are unchanged.
    late = add_events(scores, np.array([0]), np.array([200.0]), origin, 1.0)
    assert late == 200.0
    np.testing.assert_allclose(decayed_counts(scores, 200.0, late, 1.0), [1.0, 0.75 * 2.0**-197, 2.0**-197])
    counts = np.zeros(2)
    add_events(counts, np.array([1, 1, 0]), np.zeros(3), 0.0, float("inf"))
    np.testing.assert_array_equal(counts, [1.0, 2.0])
    assert top_items(np.array([1.0, 3.0, 3.0, 2.0]), np.array([1]), 2).tolist() == [2, 3]
    assert serve_popularity(0, 1) and not serve_popularity(1, 1) and serve_popularity(2, 3)


def test_report_lines() -> None:
    report = EvaluationReport(
        "explicit", 1234, 0.25, 0, rmse=0.91234, mae=0.7, baseline_rmse=1.1, baseline_mae=0.9
    )
    assert report.lines()[0] == "mode explicit: prequential RMSE 0.9123, MAE 0.7000 over 1,234 events"
    assert report.lines()[1] == "baseline: RMSE 1.1000, MAE 0.9000 predicting the mean of earlier ratings"
    log = _implicit_log(1, n=300)
    implicit, _ = _run(log, ModelSettings(mode="implicit", factors=4), batch_size=50)
    lines = implicit.lines()
    assert lines[0].startswith("mode implicit: prequential top-10 over 300 events")
    assert lines[2].split()[0] == "model" and lines[3].split()[0] == "popularity"
    assert float(lines[3].split()[1]) == pytest.approx(
        implicit.rankings[("popularity", "all")].recall, abs=1e-4
    )


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("STREAMMF_"):
            monkeypatch.delenv(name)


def _write_u_data(path: Path, log: RatingsLog) -> Path:
    lines = (
        f"{u[1:]}\t{i[1:]}\t{int(v)}\t{int(t)}\n"
        for u, i, v, t in zip(log.users, log.items, log.values, log.timestamps, strict=True)
    )
    path.write_text("".join(lines))
    return path


@pytest.mark.usefixtures("clean_env")
def test_cli_evaluate_prints_rmse(tmp_path: Path) -> None:
    path = _write_u_data(tmp_path / "u.data", _explicit_log(4, n=1500))
    result = CliRunner().invoke(
        cli, ["evaluate", str(path), "--no-progress", "-k", "8", "--batch-size", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "prequential RMSE" in result.output
    assert "over 1,500 events" in result.output
    rmse = float(result.output.split("prequential RMSE ")[1].split(",")[0])
    direct, _ = _run(load_ratings(path), ModelSettings(factors=8), batch_size=100)
    assert rmse == pytest.approx(direct.rmse, abs=5e-5)


@pytest.mark.usefixtures("clean_env")
def test_cli_evaluate_implicit_prints_recall(tmp_path: Path) -> None:
    path = _write_u_data(tmp_path / "u.data", _implicit_log(1, n=500))
    result = CliRunner().invoke(
        cli, ["evaluate", str(path), "--no-progress", "--mode", "implicit", "-k", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "prequential top-10" in result.output
    assert "all R@10" in result.output and "cold NDCG" in result.output
    assert [line.split()[0] for line in result.output.splitlines()[2:4]] == ["model", "popularity"]


@pytest.mark.usefixtures("clean_env")
def test_cli_evaluate_rejects_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n1\t2\n")
    result = CliRunner().invoke(cli, ["evaluate", str(path), "--no-progress"])
    assert result.exit_code != 0


# ----------------------------------------------------------------------------------- acceptance: ML-100k


def test_movielens_100k_explicit_acceptance(movielens_file: Path) -> None:
    """Issue #12: default settings, exact per-event protocol: RMSE <= 0.945, and a WALS refresh every
    10,000 events does not make it worse."""
    log = load_ratings(movielens_file)
    assert len(log) == 100_000
    model = ModelSettings()
    plain, _ = _run(log, model)
    store = MemoryStore(model.name, model.mode, model.factors)
    refreshed = evaluate(log, store, LearnerParams.from_settings(model), refresh_every=10_000)
    assert plain.rmse is not None and refreshed.rmse is not None
    assert plain.rmse <= 0.945, f"prequential RMSE {plain.rmse:.4f} > 0.945"
    assert refreshed.refreshes == 10
    assert refreshed.rmse <= plain.rmse, (refreshed.rmse, plain.rmse)


def test_movielens_100k_implicit_acceptance(movielens_file: Path) -> None:
    """Issue #12: implicit defaults (ratings as strengths) reach recall@10 >= 0.18 where popularity gets
    0.077, and cold events with the fallback do at least as well as popularity on them."""
    log = load_ratings(movielens_file)
    model = ModelSettings(mode="implicit")
    report, _ = _run(log, model, popularity_half_life=model.popularity_half_life_events, min_user_events=1)
    rankings = report.rankings
    assert rankings[("model", "all")].recall >= 0.18, rankings[("model", "all")]
    assert rankings[("popularity", "all")].recall == pytest.approx(0.077, abs=0.001)
    assert rankings[("model", "cold")].recall >= rankings[("popularity", "cold")].recall
    assert report.mirror_drift == 0.0
