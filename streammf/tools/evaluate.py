"""Offline prequential evaluation through the daemon's own update code (`Learner` on a `MemoryStore`).

Every event is scored with the model as it stands after every earlier event, then learned, whatever the
batch size the learner uses (the protocol of incremental MF, e.g. ISGD, Vinagre et al. 2014, and River's
progressive validation):

- explicit: the SGD kernel predicts each event before its own step, and events run strictly in order, so
  the learner's predictions already are per-event exact. RMSE and MAE, beside the mean of all earlier
  ratings (0 before any, like the model's μ).
- implicit: a mirror of the model in dense arrays (`streammf.model.prequential`) runs each batch's events
  one by one — rank, then the same SGD step the learner takes — while the learner applies the batch to
  the store. After the batch the mirror is compared with the store (the largest difference is reported:
  0 when the two took the same steps) and re-read from it for the rows the batch touched; after a WALS
  refresh it is re-read entirely. recall@10 and NDCG@10 on all / warm (the user had events before) /
  cold (the user's first event) events, for the model (cold-start fallback included), popularity by
  running counts and decayed popularity, under identical rules: items the user already has excluded,
  ties to the item seen first, an item nobody had before is a miss.

Optionally a WALS refresh runs after exactly every N events, as the daemon's event-count trigger would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from streammf.model.factors import DTYPE, init_rows
from streammf.model.prequential import NOT_SCORED, prequential_implicit_kernel
from streammf.store.memory import MemoryStore
from streammf.stream.events import Event
from streammf.stream.learner import Learner, LearnerParams
from streammf.stream.refresh import refresh
from streammf.tools.ratings import RatingsLog

TOP_N = 10
METHODS = ("model", "popularity", "decayed popularity")
SEGMENTS = ("all", "warm", "cold")


@dataclass(frozen=True)
class Ranking:
    """recall@10 and NDCG@10 of one method on one segment of the scored events."""

    recall: float
    ndcg: float
    events: int


@dataclass(frozen=True)
class EvaluationReport:
    mode: str
    events: int
    seconds: float
    refreshes: int
    # explicit
    rmse: float | None = None
    mae: float | None = None
    baseline_rmse: float | None = None  # the mean of earlier ratings
    baseline_mae: float | None = None
    # implicit: (method, segment) -> Ranking
    rankings: dict[tuple[str, str], Ranking] = field(default_factory=dict)
    mirror_drift: float = 0.0  # largest |mirror − store| over rows after a batch (0: exact)
    # implicit: (3, events) 0-based ranks of each event's item by model, popularity, decayed popularity
    # (NOT_SCORED for a repeated pair, UNRANKABLE for an item nobody had before)
    ranks: np.ndarray | None = field(default=None, repr=False)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    @property
    def recall_at_10(self) -> float | None:
        ranking = self.rankings.get(("model", "all"))
        return None if ranking is None else ranking.recall

    def lines(self) -> list[str]:
        tail = (
            f"throughput {self.events_per_second:,.0f} events/s "
            f"({self.seconds:.1f} s, {self.refreshes} refreshes)"
        )
        if self.mode == "explicit":
            return [
                f"mode explicit: prequential RMSE {self.rmse:.4f}, MAE {self.mae:.4f} "
                f"over {self.events:,} events",
                f"baseline: RMSE {self.baseline_rmse:.4f}, MAE {self.baseline_mae:.4f} "
                "predicting the mean of earlier ratings",
                tail,
            ]
        counts = {s: self.rankings[("model", s)].events for s in SEGMENTS}
        lines = [
            f"mode implicit: prequential top-{TOP_N} over {self.events:,} events, each scored with the state "
            f"after every earlier event ({counts['all']:,} scored: {counts['warm']:,} warm, "
            f"{counts['cold']:,} cold)",
            f"{'':<20}" + "".join(f"{s + ' R@10':>12}{s + ' NDCG':>12}" for s in SEGMENTS),
        ]
        for method in METHODS:
            cells = "".join(
                f"{self.rankings[(method, s)].recall:>12.4f}{self.rankings[(method, s)].ndcg:>12.4f}"
                for s in SEGMENTS
            )
            lines.append(f"{method:<20}{cells}")
        lines.append(tail + f", mirror drift {self.mirror_drift:.1e}")
        return lines


def evaluate(
    log: RatingsLog,
    store: MemoryStore,
    params: LearnerParams,
    batch_size: int = 500,
    refresh_every: int = 0,
    refresh_iterations: int = 5,
    progress: bool = False,
    *,
    popularity_half_life: float = float("inf"),
    min_user_events: int = 1,
) -> EvaluationReport:
    """Score then learn every event of `log` (in its order) with `Learner` on `store`, `batch_size` events
    a batch. `popularity_half_life` (in events) and `min_user_events` configure the cold-start fallback
    (`streammf.model.popularity`), scored in implicit mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    learner = Learner(store, params)
    implicit = params.loss.mode == "implicit"
    mirror = _Mirror.of(log, store, params, popularity_half_life, min_user_events) if implicit else None
    errors: list[np.ndarray] = []
    refreshes = 0
    next_refresh = refresh_every if refresh_every > 0 else len(log) + 1
    started = time.perf_counter()
    bar = tqdm(total=len(log), unit="ev", disable=not progress, mininterval=0.5)
    position = 0
    while position < len(log):
        end = min(position + batch_size, len(log), next_refresh)
        events = _events(log, position, end)
        if mirror is not None:
            mirror.score_and_learn(position, end)
        result = learner.learn(events, {0: (position, end)})
        if mirror is not None:
            mirror.sync(store, position, end)
        else:
            errors.append(result.errors)
        bar.update(end - position)
        position = end
        if position >= next_refresh:
            refresh(store, params, refresh_iterations)
            refreshes += 1
            next_refresh += refresh_every
            if mirror is not None:
                mirror.sync(store, 0, position, after_refresh=True)
    bar.close()
    seconds = time.perf_counter() - started
    if mirror is not None:
        return EvaluationReport(
            "implicit",
            len(log),
            seconds,
            refreshes,
            rankings=mirror.rankings(),
            mirror_drift=mirror.drift,
            ranks=mirror.ranks,
        )
    error = np.concatenate(errors) if errors else np.array([])
    baseline = _mean_so_far_errors(log.values)
    return EvaluationReport(
        "explicit",
        len(log),
        seconds,
        refreshes,
        rmse=_rms(error),
        mae=float(np.mean(np.abs(error))) if error.size else float("nan"),
        baseline_rmse=_rms(baseline),
        baseline_mae=float(np.mean(np.abs(baseline))) if baseline.size else float("nan"),
    )


def _events(log: RatingsLog, start: int, end: int) -> list[Event]:
    """Events [start, end) of the log. Built without pydantic's per-field validation (2 s per 100k events):
    `load_ratings` already parsed every field, and ids are taken as the strings it read."""
    columns = (log.users[start:end].tolist(), log.items[start:end].tolist(), log.values[start:end].tolist())
    return [
        Event.model_construct(user_id=str(u), item_id=str(i), value=float(v), weight=1.0)
        for u, i, v in zip(*columns, strict=True)
    ]


def _rms(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors * errors))) if errors.size else float("nan")


def _mean_so_far_errors(values: np.ndarray) -> np.ndarray:
    """Errors of predicting the mean of all earlier values (0 before any, like the model's μ)."""
    n = len(values)
    if n == 0:
        return np.array([])
    earlier = np.concatenate([[0.0], np.cumsum(values)[:-1] / np.arange(1, n)])
    return values - earlier


def first_seen_codes(ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer codes of `ids` numbered in order of first appearance, and the ids in that order."""
    ids = np.asarray(ids).astype(str)
    uniques, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty(len(uniques), dtype=np.int64)
    renumber[order] = np.arange(len(uniques))
    return renumber[inverse.reshape(-1)], uniques[order].tolist()


@dataclass
class _Mirror:
    """The model in dense arrays indexed by first-seen codes, plus the log's per-event facts."""

    params: LearnerParams
    user_ids: list[str]
    item_ids: list[str]
    ev_u: np.ndarray
    ev_i: np.ndarray
    values: np.ndarray
    weights: np.ndarray
    ev_pair: np.ndarray  # (n_events,) the event's (user, item) pair
    pair_new: np.ndarray  # (n_pairs,) no event of the pair applied yet
    seen: np.ndarray
    seen_lo: np.ndarray
    seen_hi: np.ndarray
    user_rows: np.ndarray
    user_bias: np.ndarray
    user_counts: np.ndarray
    item_rows: np.ndarray
    item_bias: np.ndarray
    item_counts: np.ndarray
    user_present: np.ndarray
    item_present: np.ndarray
    user_init: np.ndarray
    item_init: np.ndarray
    item_gramian: np.ndarray
    user_gramian: np.ndarray
    decayed: np.ndarray
    half_life: float
    min_user_events: int
    ranks: np.ndarray  # (3, n_events): model, popularity, decayed popularity
    value_sum: float = 0.0
    value_count: int = 0
    origin: float = 0.0
    drift: float = 0.0

    @classmethod
    def of(
        cls,
        log: RatingsLog,
        store: MemoryStore,
        params: LearnerParams,
        half_life: float,
        min_user_events: int,
    ) -> _Mirror:
        if store.value_count or store.user_rows or store.item_rows:
            raise ValueError("the implicit evaluation starts from an empty store")
        ev_u, user_ids = first_seen_codes(log.users)
        ev_i, item_ids = first_seen_codes(log.items)
        n, k = len(log), store.meta().k
        pair_codes, ev_pair = np.unique(ev_u * max(len(item_ids), 1) + ev_i, return_inverse=True)
        # A user's earlier items: their events sorted by user (stable, so in time order within a user).
        by_user = np.argsort(ev_u, kind="stable")
        starts = np.searchsorted(ev_u[by_user], np.arange(len(user_ids)))
        position = np.empty(n, dtype=np.int64)
        position[by_user] = np.arange(n)
        zeros = np.zeros
        return cls(
            params=params,
            user_ids=user_ids,
            item_ids=item_ids,
            ev_u=ev_u,
            ev_i=ev_i,
            values=np.asarray(log.values, dtype=np.float64),
            weights=np.ones(n),
            ev_pair=ev_pair.astype(np.int64),
            pair_new=np.ones(len(pair_codes), dtype=bool),
            seen=ev_i[by_user],
            seen_lo=starts[ev_u],
            seen_hi=position,
            user_rows=zeros((len(user_ids), k), DTYPE),
            user_bias=zeros(len(user_ids), DTYPE),
            user_counts=zeros(len(user_ids), np.int64),
            item_rows=zeros((len(item_ids), k), DTYPE),
            item_bias=zeros(len(item_ids), DTYPE),
            item_counts=zeros(len(item_ids), np.int64),
            user_present=zeros(len(user_ids), bool),
            item_present=zeros(len(item_ids), bool),
            user_init=init_rows(user_ids, k, params.init_std, params.seed, "user"),
            item_init=init_rows(item_ids, k, params.init_std, params.seed, "item"),
            item_gramian=zeros((k, k)),
            user_gramian=zeros((k, k)),
            decayed=zeros(len(item_ids)),
            half_life=float(half_life),
            min_user_events=int(min_user_events),
            ranks=np.full((3, n), NOT_SCORED, dtype=np.int64),
        )

    def score_and_learn(self, start: int, end: int) -> None:
        loss = self.params.loss
        window = slice(start, end)
        self.value_sum, self.value_count, self.origin = prequential_implicit_kernel(
            self.ev_u[window], self.ev_i[window], self.ev_pair[window], self.values[window],
            self.weights[window], self.pair_new, self.seen, self.seen_lo[window], self.seen_hi[window],
            self.user_rows, self.user_bias, self.user_counts, self.item_rows, self.item_bias,
            self.item_counts, self.user_present, self.item_present, self.user_init, self.item_init,
            float(self.value_sum), int(self.value_count), self.item_gramian, self.user_gramian,
            self.params.sgd.learning_rate, loss.reg, loss.reg_prior, loss.alpha, loss.w0,
            float(self.params.max_abs_factor), self.decayed, float(self.origin), self.half_life,
            self.min_user_events,
            self.ranks[0, window], self.ranks[1, window], self.ranks[2, window],
        )  # fmt: skip

    def sync(self, store: MemoryStore, start: int, end: int, after_refresh: bool = False) -> None:
        """Re-read from `store` the rows of the users and items of events [start, end), the counters and
        the Gramians. After a batch, the largest difference from what the mirror computed goes into
        `drift`; after a refresh the rows are the refit's, so nothing is compared."""
        users = np.unique(self.ev_u[start:end])
        items = np.unique(self.ev_i[start:end])
        k = self.user_rows.shape[1]
        for codes, ids, rows, bias, present in (
            (users, self.user_ids, self.user_rows, self.user_bias, self.user_present),
            (items, self.item_ids, self.item_rows, self.item_bias, self.item_present),
        ):
            held = store.user_rows if ids is self.user_ids else store.item_rows
            for code in codes.tolist():
                stored = held.get(ids[code])
                if stored is None:
                    present[code] = False
                    continue
                if present[code] and not after_refresh:
                    self.drift = max(self.drift, float(np.max(np.abs(rows[code] - stored[:k]))))
                rows[code], bias[code], present[code] = stored[:k], stored[k], True
        for code in users.tolist():
            self.user_counts[code] = len(store.interactions.get(self.user_ids[code], ()))
        for code in items.tolist():
            self.item_counts[code] = store.item_counts.get(self.item_ids[code], 0)
        self.value_sum, self.value_count = store.value_sum, store.value_count
        if store.item_gramian is not None and store.user_gramian is not None:
            self.item_gramian[:] = store.item_gramian
            self.user_gramian[:] = store.user_gramian

    def rankings(self) -> dict[tuple[str, str], Ranking]:
        scored = self.ranks[0] != NOT_SCORED
        n = len(self.ev_u)
        earlier = np.empty(n, dtype=np.int64)  # the user's events before this one
        by_user = np.argsort(self.ev_u, kind="stable")
        earlier[by_user] = np.arange(n) - np.searchsorted(self.ev_u[by_user], self.ev_u[by_user])
        segments = {"all": scored, "warm": scored & (earlier > 0), "cold": scored & (earlier == 0)}
        out = {}
        for m, method in enumerate(METHODS):
            for segment, mask in segments.items():
                out[(method, segment)] = ranking_of(self.ranks[m][mask])
        return out


def ranking_of(ranks: np.ndarray) -> Ranking:
    """recall@10 and NDCG@10 (one relevant item per event: 1/log2(rank + 2) for a hit) of 0-based ranks."""
    if ranks.size == 0:
        return Ranking(float("nan"), float("nan"), 0)
    hit = ranks < TOP_N
    gain = np.where(hit, 1.0 / np.log2(np.minimum(ranks, TOP_N) + 2.0), 0.0)
    return Ranking(float(hit.mean()), float(gain.mean()), int(ranks.size))
