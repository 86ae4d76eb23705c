"""Learning quality sweeps behind the defaults in streammf/config.py (README: "Figures").

Every figure is `streammf evaluate`'s exact per-event protocol (`streammf.tools.evaluate.evaluate`, the
same function the command runs), on ML-100k in timestamp order or on a synthetic long-tail catalogue.

    python bench/quality.py explicit      # SGD lr / λ_b / η_b, then λ with and without refresh (ML-100k)
    python bench/quality.py implicit      # α × w0 (ML-100k ratings as strengths)
    python bench/quality.py cold-start    # decayed popularity half-life; model vs popularity by history
    python bench/quality.py long-tail     # refresh or not on a catalogue where most items have 1-3 ratings
    python bench/quality.py all

Options: --data DIR (holding ml-100k/; default $STREAMMF_DATA_DIR or ../shared/data beside the repo).
Each setting is printed as a markdown table row as soon as it is measured. Sweeps are coordinate-wise and
small (a few minutes in all on 2 cores), not a grid search.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from streammf.config import ModelSettings
from streammf.model.prequential import NOT_SCORED
from streammf.store.memory import MemoryStore
from streammf.stream.learner import LearnerParams
from streammf.tools.evaluate import EvaluationReport, evaluate, first_seen_codes, ranking_of
from streammf.tools.generate import SyntheticStream
from streammf.tools.ratings import RatingsLog, load_ratings

REFRESH_EVERY = 10_000


def run(log: RatingsLog, refresh_every: int = 0, **overrides: Any) -> EvaluationReport:
    model = ModelSettings(**overrides)
    store = MemoryStore(model.name, model.mode, model.factors)
    return evaluate(
        log,
        store,
        LearnerParams.from_settings(model),
        refresh_every=refresh_every,
        popularity_half_life=model.popularity_half_life_events,
        min_user_events=model.fallback_below_events,
    )


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def header(*names: str) -> None:
    row(*names)
    row(*("---" for _ in names))


def explicit(log: RatingsLog) -> None:
    print("\n### explicit, ML-100k: SGD step sizes and init (no refresh)\n")
    header("learning_rate", "init_std", "bias_learning_rate", "RMSE", "MAE")
    best: tuple[float, dict[str, float]] = (np.inf, {})
    for lr in (0.05, 0.1, 0.15, 0.2):
        for init_std in (0.05, 0.1):
            for bias_lr in (0.02, 0.04):
                settings = {"learning_rate": lr, "init_std": init_std, "bias_learning_rate": bias_lr}
                report = run(log, **settings)
                row(lr, init_std, bias_lr, f"{report.rmse:.4f}", f"{report.mae:.4f}")
                if report.rmse is not None and report.rmse < best[0]:
                    best = (report.rmse, settings)
    print(f"\nbest: {best[1]} (RMSE {best[0]:.4f})")
    every = f"{REFRESH_EVERY:,}"
    print(f"\n### explicit, ML-100k: the objective's λ, λ_0, λ_b, without and with a refresh every {every}\n")
    header(
        "reg",
        "reg_prior",
        "reg_bias",
        "RMSE no refresh",
        f"RMSE refresh every {REFRESH_EVERY:,}",
        "refresh − none",
    )
    grid = [(reg, prior, 5.0) for reg in (0.02, 0.05, 0.1) for prior in (2.0, 5.0, 10.0)]
    grid += [(0.05, 5.0, 2.0), (0.05, 5.0, 10.0)]
    for reg, prior, reg_bias in grid:
        settings = {**best[1], "reg": reg, "reg_prior": prior, "reg_bias": reg_bias}
        plain, refreshed = run(log, **settings), run(log, REFRESH_EVERY, **settings)
        assert plain.rmse is not None and refreshed.rmse is not None
        diff = f"{refreshed.rmse - plain.rmse:+.4f}"
        row(reg, prior, reg_bias, f"{plain.rmse:.4f}", f"{refreshed.rmse:.4f}", diff)


def implicit(log: RatingsLog) -> None:
    print("\n### implicit, ML-100k (ratings as strengths): confidence α and unobserved weight w0\n")
    header("alpha", "w0", "learning_rate", "recall@10", "NDCG@10", "popularity recall@10")
    for alpha in (1.0, 3.0, 10.0, 30.0):
        for w0 in (1.0, 3.0, 10.0, 30.0):
            _implicit_row(log, alpha=alpha, w0=w0)
    defaults = ModelSettings(mode="implicit")
    for lr in (0.003, 0.03):
        _implicit_row(log, alpha=defaults.alpha, w0=defaults.w0, learning_rate=lr)
    print(f"\n### implicit, ML-100k, defaults: refresh every {REFRESH_EVERY:,} events or not\n")
    header("refresh", "recall@10", "NDCG@10", "popularity recall@10")
    for every in (0, REFRESH_EVERY):
        report = run(log, every, mode="implicit")
        model, popular = report.rankings[("model", "all")], report.rankings[("popularity", "all")]
        row(every or "none", f"{model.recall:.4f}", f"{model.ndcg:.4f}", f"{popular.recall:.4f}")


def _implicit_row(log: RatingsLog, **settings: float) -> None:
    report = run(log, mode="implicit", **settings)
    model, popular = report.rankings[("model", "all")], report.rankings[("popularity", "all")]
    lr = settings.get("learning_rate", ModelSettings(mode="implicit").factor_learning_rate)
    row(
        settings["alpha"],
        settings["w0"],
        lr,
        f"{model.recall:.4f}",
        f"{model.ndcg:.4f}",
        f"{popular.recall:.4f}",
    )


def cold_start(log: RatingsLog) -> None:
    print("\n### implicit, ML-100k: cold events (a user's first) by decayed popularity half-life\n")
    header("half-life (events)", "cold recall@10", "cold NDCG@10", "popularity cold recall@10")
    reports = {}
    for half_life in (1_000.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0, float("inf")):
        report = run(log, mode="implicit", popularity_half_life_events=half_life)
        reports[half_life] = report
        cold, popular = report.rankings[("model", "cold")], report.rankings[("popularity", "cold")]
        row(half_life, f"{cold.recall:.4f}", f"{cold.ndcg:.4f}", f"{popular.recall:.4f}")
    default = run(log, mode="implicit")
    print("\n### implicit, ML-100k: model vs decayed popularity by the user's number of earlier events\n")
    header("earlier events", "scored events", "model recall@10", "decayed popularity recall@10")
    assert default.ranks is not None
    users, _ = first_seen_codes(log.users)
    earlier = _earlier_events(users)
    scored = default.ranks[0] != NOT_SCORED
    for low, high in ((1, 1), (2, 2), (3, 4), (5, 9), (10, 10**9)):
        mask = scored & (earlier >= low) & (earlier <= high)
        model, decayed = ranking_of(default.ranks[0][mask]), ranking_of(default.ranks[2][mask])
        label = f"{low}" if low == high else (f"{low}-{high}" if high < 10**9 else f"{low}+")
        row(label, f"{model.events:,}", f"{model.recall:.4f}", f"{decayed.recall:.4f}")


def _earlier_events(users: np.ndarray) -> np.ndarray:
    order = np.argsort(users, kind="stable")
    earlier = np.empty(len(users), dtype=np.int64)
    earlier[order] = np.arange(len(users)) - np.searchsorted(users[order], users[order])
    return earlier


def long_tail_log(events: int = 60_000, seed: int = 1) -> RatingsLog:
    """Explicit ratings from the synthetic generator with a wide, flat-tailed catalogue: 3,000 users,
    20,000 items, popularity exponent 0.6, two candidates per pick. About 64% of the items that get rated
    get 1-3 ratings, and 27% of the events fall on such items."""
    stream = SyntheticStream(
        "explicit", n_users=3000, n_items=20000, seed=seed, popularity_exponent=0.6, candidates=2
    )
    drawn = list(stream.events(events))
    return RatingsLog(
        np.array([e.user_id for e in drawn]),
        np.array([e.item_id for e in drawn]),
        np.array([e.value for e in drawn], dtype=np.float64),
        np.arange(len(drawn), dtype=np.float64),
    )


def long_tail() -> None:
    print(f"\n### explicit, synthetic long tail: refresh every {REFRESH_EVERY:,} events or not\n")
    header(
        "seed", "items with 1-3 ratings", "RMSE no refresh", f"RMSE refresh every {REFRESH_EVERY:,}", "diff"
    )
    for seed in (1, 2):
        log = long_tail_log(seed=seed)
        counts = np.array(list(Counter(log.items.tolist()).values()))
        plain, refreshed = run(log), run(log, REFRESH_EVERY)
        assert plain.rmse is not None and refreshed.rmse is not None
        share = f"{(counts <= 3).mean():.0%} of {len(counts):,}"
        row(seed, share, f"{plain.rmse:.4f}", f"{refreshed.rmse:.4f}", f"{refreshed.rmse - plain.rmse:+.4f}")


def _movielens(data: Path) -> RatingsLog:
    path = data / "ml-100k" / "u.data"
    if not path.exists():
        sys.exit(f"{path} not found: pass --data DIR holding ml-100k/ (MovieLens 100k)")
    return load_ratings(path)


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["explicit", "implicit", "cold-start", "long-tail", "all"])
    default_data = (
        os.environ.get("STREAMMF_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--data", type=Path, default=Path(default_data))
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    if args.what in ("explicit", "all"):
        explicit(_movielens(args.data))
    if args.what in ("implicit", "all"):
        implicit(_movielens(args.data))
    if args.what in ("cold-start", "all"):
        cold_start(_movielens(args.data))
    if args.what in ("long-tail", "all"):
        long_tail()
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
