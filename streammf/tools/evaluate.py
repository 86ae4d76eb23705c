"""Offline prequential evaluation through the daemon's own update code (`Learner` on a `MemoryStore`).

Every event is predicted before it is learned (explicit: per event, inside the SGD kernel; implicit:
recall@10 against the factors as they stand before the event's batch). Optionally a WALS refresh runs
every N events, exactly as the daemon's refresh would.

A baseline is scored under the same rules, so the figure has a reference: explicit, the mean of all
earlier ratings; implicit, the most popular items (by users so far) the user has not seen, counted only
where the model could score too (user and item known before the batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from streammf.store.memory import MemoryStore
from streammf.stream.events import Event
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.refresh import refresh
from streammf.tools.ratings import RatingsLog


@dataclass(frozen=True)
class EvaluationReport:
    mode: str
    events: int
    rmse: float | None  # explicit
    recall_at_10: float | None  # implicit
    baseline: float  # explicit: RMSE of the mean of earlier ratings; implicit: popularity recall@10
    events_per_second: float
    refreshes: int
    seconds: float

    def lines(self) -> list[str]:
        if self.rmse is not None:
            metric = f"prequential RMSE {self.rmse:.4f}"
            baseline = f"RMSE {self.baseline:.4f} predicting the mean of earlier ratings"
        else:
            metric = f"prequential recall@10 {self.recall_at_10:.4f}"
            baseline = f"recall@10 {self.baseline:.4f} ranking unseen items by popularity so far"
        return [
            f"mode {self.mode}: {metric} over {self.events:,} events",
            f"baseline: {baseline}",
            f"throughput {self.events_per_second:,.0f} events/s "
            f"({self.seconds:.1f} s, {self.refreshes} refreshes)",
        ]


def evaluate(
    log: RatingsLog,
    store: MemoryStore,
    params: LearnerParams,
    batch_size: int = 500,
    refresh_every: int = 0,
    refresh_iterations: int = 5,
    progress: bool = False,
) -> EvaluationReport:
    learner = Learner(store, params)
    implicit = params.loss.mode == "implicit"
    squared_error = 0.0
    hits = popular_hits = 0
    refreshes = 0
    next_refresh = refresh_every if refresh_every > 0 else len(log) + 1
    started = time.perf_counter()
    bar = tqdm(total=len(log), unit="ev", disable=not progress, mininterval=0.5)
    position = 0
    while position < len(log):
        end = min(position + batch_size, len(log), next_refresh)
        chunk = zip(log.users[position:end], log.items[position:end], log.values[position:end], strict=True)
        events = [Event(user_id=u, item_id=i, value=v) for u, i, v in chunk]
        if implicit:
            model_hits, popularity_hits = _hits_at_10(store, events)
            hits += model_hits
            popular_hits += popularity_hits
        result = learner.learn(events, {0: (position, end)})
        squared_error += float(np.sum(result.errors**2))
        bar.update(end - position)
        position = end
        if position >= next_refresh:
            refresh(store, params, refresh_iterations)
            refreshes += 1
            next_refresh += refresh_every
    bar.close()
    seconds = time.perf_counter() - started
    n = len(log)
    return EvaluationReport(
        mode=params.loss.mode,
        events=n,
        rmse=None if implicit else float(np.sqrt(squared_error / max(n, 1))),
        recall_at_10=hits / max(n, 1) if implicit else None,
        baseline=popular_hits / max(n, 1) if implicit else _mean_so_far_rmse(log.values),
        events_per_second=n / seconds if seconds > 0 else float("inf"),
        refreshes=refreshes,
        seconds=seconds,
    )


def _mean_so_far_rmse(values: np.ndarray) -> float:
    """Prequential RMSE of predicting the mean of all earlier values (0 before any, like the model's μ)."""
    n = len(values)
    if n == 0:
        return float("nan")
    earlier = np.concatenate([[0.0], np.cumsum(values)[:-1] / np.arange(1, n)])
    return float(np.sqrt(np.mean((values - earlier) ** 2)))


def _hits_at_10(store: MemoryStore, events: list[Event]) -> tuple[int, int]:
    """How many events' items are in their user's top-10 (seen items excluded), before learning: by the
    model, and by popularity (number of users so far)."""
    if not store.item_rows:
        return 0, 0
    items = list(store.item_rows)
    position = {item: row for row, item in enumerate(items)}
    matrix = np.stack([store.item_rows[i] for i in items])  # (n_items, k+1): factors then bias
    popularity = np.array([store.item_counts.get(i, 0) for i in items], dtype=np.float64)
    hits = popular_hits = 0
    for event in events:
        user = store.user_rows.get(event.user_id)
        if user is None or event.item_id not in position:
            continue
        target = position[event.item_id]
        seen = [position[i] for i in store.interactions.get(event.user_id, ()) if i != event.item_id]
        hits += _in_top_10(matrix[:, :-1] @ user[:-1] + matrix[:, -1], seen, target)
        popular_hits += _in_top_10(popularity.copy(), seen, target)
    return hits, popular_hits


def _in_top_10(scores: np.ndarray, seen: list[int], target: int) -> bool:
    scores[seen] = -np.inf
    return target in np.argpartition(-scores, min(10, len(scores) - 1))[:10]
