"""The in-memory twin of the Redis store: same float32 storage and delta arithmetic, same contract
(`streammf.store.contract`). Backs `streammf evaluate` and the unit tests."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from streammf.model.factors import DTYPE, Mode
from streammf.model.popularity import batch_scale, forward_weight
from streammf.store.contract import (
    ApplyOutcome,
    BatchState,
    BatchUpdate,
    ModelMeta,
    Side,
    StoreError,
    fence,
    gramian_correction,
    item_rows_after,
)


class MemoryStore:
    """In-memory twin of the Redis store, with the same float32 storage and delta arithmetic."""

    def __init__(self, name: str, mode: Mode, k: int, hyper: dict[str, float] | None = None) -> None:
        self._meta = ModelMeta(name=name, mode=mode, k=k, version=1, hyper=dict(hyper or {}))
        self.user_rows: dict[str, np.ndarray] = {}  # id -> (k+1,) float32: factors then bias
        self.item_rows: dict[str, np.ndarray] = {}
        self.item_counts: dict[str, int] = {}
        self.interactions: dict[str, dict[str, float]] = {}
        self.value_sum = 0.0
        self.value_count = 0
        self._events_applied = 0
        self.popularity: dict[str, float] = {}  # forward-decay scores S_j (streammf.model.popularity)
        self.popularity_origin = 0.0
        self.popularity_half_life = float("inf")
        self.offsets: dict[int, int] = {}
        self.item_gramian = np.zeros((k, k)) if mode == "implicit" else None
        self.user_gramian = np.zeros((k, k)) if mode == "implicit" else None
        self._last_version = 1
        self._drafts: dict[int, _Draft] = {}
        self._changes: tuple[set[str], set[str]] | None = None  # tracked (users, items) of the live version
        self._paused_until: float | None = None  # time.monotonic() deadline

    def meta(self) -> ModelMeta:
        return self._meta

    def read_batch_state(
        self, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState:
        k = self._meta.k
        u = _gather(self.user_rows, users, k)
        v = _gather(self.item_rows, items, k)
        return BatchState(
            version=self._meta.version,
            user_rows=u[0],
            user_bias=u[1],
            user_present=u[2],
            user_counts=np.array([len(self.interactions.get(x, ())) for x in users], dtype=np.int64),
            item_rows=v[0],
            item_bias=v[1],
            item_present=v[2],
            item_counts=np.array([self.item_counts.get(x, 0) for x in items], dtype=np.int64),
            pair_values=np.array(
                [self.interactions.get(a, {}).get(b, np.nan) for a, b in pairs], dtype=np.float64
            ),
            value_sum=self.value_sum,
            value_count=self.value_count,
            item_gramian=None if self.item_gramian is None else self.item_gramian.copy(),
            user_gramian=None if self.user_gramian is None else self.user_gramian.copy(),
        )

    def apply(self, update: BatchUpdate) -> ApplyOutcome:
        if update.version != self._meta.version:
            return ApplyOutcome.STALE_VERSION
        if self._paused_until is not None and time.monotonic() < self._paused_until:
            return ApplyOutcome.PAUSED
        refused = fence(self.offsets, update.offsets)
        if refused is not None:
            return refused
        if self._changes is not None:
            self._changes[0].update(update.users)
            self._changes[1].update(update.items)
        for row, user in enumerate(update.users):
            self.user_rows[user] = np.append(update.user_rows[row], update.user_bias[row]).astype(DTYPE)
        k = self._meta.k
        # Each item's stored row as the Gramian holds it, and the row written (`gramian_correction`).
        counted = np.zeros((len(update.items), k), dtype=DTYPE)
        written = np.zeros((len(update.items), k), dtype=DTYPE)
        for row, item in enumerate(update.items):
            stored = self.item_rows.get(item)
            if stored is None or not (np.abs(stored) <= update.max_abs_factor).all():
                stored = np.append(update.item_base[row], 0.0).astype(DTYPE)
            else:
                counted[row] = stored[:k]
            delta = np.append(update.item_delta[row], update.item_bias_delta[row])
            self.item_rows[item] = (stored.astype(np.float64) + delta).astype(DTYPE)
            written[row] = self.item_rows[item][:k]
            self.item_counts[item] = self.item_counts.get(item, 0) + int(update.item_count_delta[row])
        additive = self._meta.mode == "implicit"
        for user, item, value in zip(update.pair_users, update.pair_items, update.pair_values, strict=True):
            held = self.interactions.setdefault(user, {})
            held[item] = held.get(item, 0.0) + float(value) if additive else float(value)
        self.value_sum += update.value_sum_delta
        self.value_count += update.value_count_delta
        if update.item_popularity is not None:
            self._add_popularity(update)
        self._events_applied += update.events_applied
        if self.item_gramian is not None and update.item_gramian_delta is not None:
            self.item_gramian += update.item_gramian_delta
            if update.item_rows_before is not None:
                correction = gramian_correction(
                    counted, written, update.item_rows_before, item_rows_after(update)
                )
                if correction is not None:
                    self.item_gramian += correction
        if self.user_gramian is not None and update.user_gramian_delta is not None:
            self.user_gramian += update.user_gramian_delta
        for partition, (_, nxt) in update.offsets.items():
            self.offsets[partition] = nxt
        return ApplyOutcome.APPLIED

    def _add_popularity(self, update: BatchUpdate) -> None:
        assert update.item_popularity is not None
        clock_last = self._events_applied + update.events_applied - 1
        shrink, self.popularity_origin, scale = batch_scale(
            clock_last, self.popularity_origin, update.popularity_half_life
        )
        if shrink != 1.0:
            self.popularity = {item: score * shrink for item, score in self.popularity.items()}
        self.popularity_half_life = update.popularity_half_life
        for item, weight in zip(update.items, update.item_popularity, strict=True):
            self.popularity[item] = self.popularity.get(item, 0.0) + float(weight) * scale

    def popular_items(self, n: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        excluded = set(exclude)
        ranked = sorted(  # Redis' ZREVRANGE order: score, then id, both descending
            ((item, score) for item, score in self.popularity.items() if item not in excluded),
            key=lambda pair: (pair[1], pair[0].encode()),
            reverse=True,
        )[:n]
        now = forward_weight(self._events_applied, self.popularity_origin, self.popularity_half_life)
        return [(item, score / now) for item, score in ranked]

    def offsets_ahead(self) -> dict[int, int]:
        return {}  # one step per batch: never torn

    def applied_offsets(self) -> dict[int, int]:
        return dict(self.offsets)

    def events_applied(self) -> int:
        return self._events_applied

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        if self._paused_until is not None and time.monotonic() < self._paused_until:
            return ApplyOutcome.PAUSED
        refused = fence(self.offsets, offsets or {})
        if refused is not None:
            return refused
        versions = [(self.user_rows, self.user_gramian)]
        versions += [(draft.users, draft.user_gramian) for draft in self._drafts.values()]
        for rows, gramian in versions:
            row = rows.pop(user, None)
            if row is not None and gramian is not None:
                factors = row[: self._meta.k].astype(np.float64)
                gramian -= np.outer(factors, factors)
        for item, value in self.interactions.pop(user, {}).items():
            self.item_counts[item] = self.item_counts.get(item, 0) - 1
            if self.item_counts[item] <= 0:
                del self.item_counts[item]
            if self._meta.mode == "explicit":
                self.value_sum -= value
                self.value_count -= 1
        if self._changes is not None:
            self._changes[0].add(user)
        for partition, (_, nxt) in (offsets or {}).items():
            self.offsets[partition] = nxt
        return ApplyOutcome.APPLIED

    def iter_interactions(self, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        users = list(self.interactions)
        for start in range(0, len(users), batch):
            yield self.read_interactions(users[start : start + batch])

    def current_version(self) -> int:
        return self._meta.version

    def read_all_rows(self, side: Side) -> tuple[list[str], np.ndarray, np.ndarray]:
        rows = self.user_rows if side == "users" else self.item_rows
        ids = list(rows)
        factors, bias, _ = _gather(rows, ids, self._meta.k)
        return ids, factors, bias

    def global_mean(self) -> float:
        return self.value_sum / self.value_count if self.value_count else 0.0

    def begin_version(self, source: str = "wals") -> int:
        self._last_version += 1
        implicit = self._meta.mode == "implicit"
        k = self._meta.k
        self._drafts[self._last_version] = _Draft(
            item_gramian=np.zeros((k, k)) if implicit else None,
            user_gramian=np.zeros((k, k)) if implicit else None,
        )
        return self._last_version

    def write_rows(
        self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray, biases: np.ndarray | None = None
    ) -> None:
        target = self._draft(version).users if side == "users" else self._draft(version).items
        bias = np.zeros(len(ids)) if biases is None else biases
        for row, ident in enumerate(ids):
            target[ident] = np.append(rows[row], bias[row]).astype(DTYPE)

    def delete_rows(self, version: int, side: Side, ids: Sequence[str]) -> None:
        target = self._draft(version).users if side == "users" else self._draft(version).items
        for ident in ids:
            target.pop(ident, None)

    def write_gramian(self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray) -> None:
        if self._meta.mode != "implicit":
            raise ValueError("explicit models keep no Gramians")
        draft = self._draft(version)
        wide = np.asarray(rows, dtype=np.float64).reshape(len(ids), self._meta.k)
        value = wide.T @ wide
        if side == "users":
            draft.user_gramian = value
        else:
            draft.item_gramian = value

    def publish(self, version: int, expected_current: int) -> bool:
        draft = self._drafts.get(version)
        if self._meta.version != expected_current or version <= expected_current or draft is None:
            return False
        if self._paused_until is not None and time.monotonic() >= self._paused_until:
            return False  # the pause expired: writes may have slipped in that the new version lacks
        self._changes = self._paused_until = None
        self.user_rows, self.item_rows = draft.users, draft.items
        self.user_gramian, self.item_gramian = draft.user_gramian, draft.item_gramian
        self._meta = replace(self._meta, version=version)
        # Older drafts can never be published now (a publish must be newer than the current version).
        self._drafts = {v: d for v, d in self._drafts.items() if v > version}
        return True

    def discard_version(self, version: int) -> bool:
        return self._drafts.pop(version, None) is not None

    def collect_garbage(self, grace_s: float) -> list[int]:
        return []  # published versions replace the old rows in place; nothing is retired

    def track_changes(self, version: int) -> bool:
        if version != self._meta.version:
            return False
        if self._changes is None:
            self._changes = (set(), set())
        return True

    def stop_tracking(self, version: int) -> None:
        if version == self._meta.version:
            self._changes = None

    def take_changes(self, version: int) -> tuple[list[str], list[str]]:
        if version != self._meta.version or self._changes is None:
            return [], []
        users, items = self._changes
        self._changes = (set(), set())
        return sorted(users), sorted(items)

    def read_interactions(self, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        triples = [(u, i, v) for u in users for i, v in self.interactions.get(u, {}).items()]
        return (
            np.array([t[0] for t in triples], dtype=object),
            np.array([t[1] for t in triples], dtype=object),
            np.array([t[2] for t in triples], dtype=np.float64),
        )

    def pause_writes(self, version: int, ttl_s: float) -> bool:
        if version != self._meta.version:
            return False
        self._paused_until = time.monotonic() + ttl_s
        return True

    def resume_writes(self, version: int) -> None:
        if version == self._meta.version:
            self._paused_until = None

    def _draft(self, version: int) -> _Draft:
        draft = self._drafts.get(version)
        if draft is None:
            raise StoreError(f"version {version} of model {self._meta.name!r} is not being built")
        return draft


@dataclass
class _Draft:
    """A version being built by a refresh, invisible to `read_batch_state` until published."""

    item_gramian: np.ndarray | None
    user_gramian: np.ndarray | None
    users: dict[str, np.ndarray] = field(default_factory=dict)
    items: dict[str, np.ndarray] = field(default_factory=dict)


def _gather(rows: dict[str, np.ndarray], ids: list[str], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = np.zeros((len(ids), k + 1), dtype=DTYPE)
    present = np.zeros(len(ids), dtype=bool)
    for i, ident in enumerate(ids):
        stored = rows.get(ident)
        if stored is not None:
            out[i] = stored
            present[i] = True
    return out[:, :k].copy(), out[:, k].copy(), present
