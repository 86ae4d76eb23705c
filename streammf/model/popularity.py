"""Decayed item popularity, the cold-start ranking, and the rule for when a user gets it.

An item's decayed popularity at clock c is P_j(c) = Σ_{events e of j} 2^{−(c − c_e)/h}: each event counts
1 when it happens and half as much every `h` clock units later (h = ∞: plain counts). Ranking only needs
the order at one clock, so it is kept in *forward-decay* form (Cormode et al. 2009):

    S_j = Σ_e 2^{(c_e − o)/h} = 2^{(c − o)/h} · P_j(c)

An event adds one weight to one item's S_j and nothing else changes: no pass over the catalogue per event
or per batch, and a sorted set (`ZINCRBY`, `ZREVRANGE`) can hold S as it is. The origin o only moves
when the weights grow large (2^{(c − o)/h} > 2^RESCALE_BITS): then every S_j is multiplied by
2^{−(c − o)/h} and o = c, which leaves the ranking unchanged.

The clock is the model's event count (the events applied so far): deterministic, the same in every
replica and in `streammf evaluate`, and stored already.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Rescale once the newest weight exceeds 2^RESCALE_BITS: far from float64's range (2^1023), so sums of
# millions of such weights stay exact enough to rank, and rescales are rare (every 60 half-lives).
RESCALE_BITS = 60.0


def forward_weight(clock: float, origin: float, half_life: float) -> float:
    """2^{(clock − origin)/h}: the weight an event at `clock` adds to its item's S_j (1 when h = ∞)."""
    return 1.0 if math.isinf(half_life) else float(2.0 ** ((clock - origin) / half_life))


def add_events(
    scores: np.ndarray, items: np.ndarray, clocks: np.ndarray, origin: float, half_life: float
) -> float:
    """S_j += 2^{(c_e − o)/h} for each event (item index, clock), in order, in place; returns the origin
    afterwards (moved, and every score rescaled, only when the weights grew past 2^RESCALE_BITS)."""
    return float(
        _add_events_kernel(
            scores,
            np.asarray(items, dtype=np.int64),
            np.asarray(clocks, dtype=np.float64),
            float(origin),
            float(half_life),
        )
    )


@njit(cache=True)
def _add_events_kernel(scores, items, clocks, origin, half_life):  # fmt: skip
    for e in range(items.shape[0]):
        origin = add_event(scores, items[e], clocks[e], origin, half_life)
    return origin


@njit(cache=True)
def add_event(scores, item, clock, origin, half_life):  # fmt: skip
    """One event of `add_events` (numba, for kernels that interleave it with other work)."""
    if np.isinf(half_life):
        scores[item] += 1.0
        return origin
    exponent = (clock - origin) / half_life
    if exponent > RESCALE_BITS:
        shrink = 2.0 ** (-exponent)
        for j in range(scores.shape[0]):
            scores[j] *= shrink
        origin = clock
        exponent = 0.0
    scores[item] += 2.0**exponent
    return origin


def batch_item_weights(event_items: np.ndarray, n_items: int, half_life: float) -> np.ndarray:
    """A batch's contribution to S, relative to its last event: per item, Σ 2^{(p − (n−1))/h} over the
    item's events at positions p = 0 … n−1 (each ≤ 1, so no batch size overflows). The store multiplies
    by 2^{(c_last − o)/h}, c_last the clock of the batch's last event (see `batch_origin`)."""
    n = len(event_items)
    weights = np.ones(n) if math.isinf(half_life) else np.exp2((np.arange(n) - (n - 1)) / half_life)
    return np.bincount(np.asarray(event_items, dtype=np.int64), weights=weights, minlength=n_items)


def batch_scale(clock_last: float, origin: float, half_life: float) -> tuple[float, float, float]:
    """For a batch whose last event has clock `clock_last`: (shrink, origin, scale). Every stored S_j is
    first multiplied by `shrink` (1, or < 1 when the weights would pass 2^RESCALE_BITS: then the origin
    moves to `clock_last`), then the batch's weights are added times `scale`."""
    if math.isinf(half_life):
        return 1.0, origin, 1.0
    exponent = (clock_last - origin) / half_life
    if exponent > RESCALE_BITS:
        return float(2.0 ** (-exponent)), clock_last, 1.0
    return 1.0, origin, float(2.0**exponent)


def decayed_counts(scores: np.ndarray, clock: float, origin: float, half_life: float) -> np.ndarray:
    """P_j(clock) = S_j / 2^{(clock − o)/h}: the decayed counts themselves (for display and tests)."""
    return np.asarray(scores, dtype=np.float64) / forward_weight(clock, origin, half_life)


def top_items(scores: np.ndarray, exclude: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, best first, leaving out `exclude` (e.g. the user's items). Ties go
    to the lower index, as in the evaluation's ranks."""
    masked = np.asarray(scores, dtype=np.float64).copy()
    masked[np.asarray(exclude, dtype=np.int64)] = -np.inf
    order = np.lexsort((np.arange(masked.size), -masked))
    kept = order[np.isfinite(masked[order])]
    return kept[:n]


def serve_popularity(user_events: int, min_user_events: int) -> bool:
    """The fallback rule: a user with fewer than `min_user_events` interactions of their own (0 for a
    user the model has no row for) is served the decayed popularity instead of ⟨u, v⟩ scores.

    With min_user_events = 1 only unknown users fall back: measured on ML-100k (implicit, README), a user
    row after one event already ranks better than popularity."""
    return user_events < min_user_events


__all__ = [
    "RESCALE_BITS",
    "add_event",
    "add_events",
    "batch_item_weights",
    "batch_scale",
    "decayed_counts",
    "forward_weight",
    "serve_popularity",
    "top_items",
]
