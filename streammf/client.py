"""`StreamMFClient`: a small reader of a model's factors in Redis for services that recommend.

It reads the public layout (`streammf.store.redis_store`) and never writes. The item matrix is copied to the
client and refreshed when older than `item_cache_ttl_s` or when the live version changes; a user's vector,
seen items and the version number come from one Lua call, so they are from one moment. A recommendation
never combines a user vector of one version with item vectors of another: when the two differ the item
matrix of the user's version is loaded, and if that version was deleted meanwhile the user is read again.

A stored row holding NaN or inf is damaged: recommending for such a user, or items similar to such an
item, raises `DamagedRowError` (an unknown user or item gives an empty result), and damaged item rows are
left out of every ranking.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import redis
from redis.commands.core import Script

from streammf.store import scripts
from streammf.store.contract import StoreError
from streammf.store.layout import (
    ModelKeys,
    StoredModel,
    join_ids,
    parse_float,
    parse_int,
    read_current_version,
    read_model_meta,
    read_popular_items,
    require_binary_client,
    rows_from_blob,
    scan_version_rows,
    shard_keys,
    split_ids,
    store_error_from,
)
from streammf.store.shards import shard_indices, shard_of

log = logging.getLogger(__name__)


class VersionUnavailableError(RuntimeError):
    """Every version the reader was pointed at was deleted before it could be read."""


class DamagedRowError(StoreError):
    """The stored row of the user or item asked about holds NaN or inf, so nothing can be ranked from it."""

    def __init__(self, model: str, version: int, side: Literal["user", "item"], ident: str) -> None:
        self.model, self.version, self.side, self.ident = model, version, side, ident
        super().__init__(
            f"row of {side} {ident!r} in model {model!r} version {version} is damaged (non-finite factors)"
        )


@dataclass(frozen=True)
class _UserRead:
    version: int
    row: np.ndarray | None  # (k+1,) float32: factors then bias
    seen: list[str]
    global_mean: float


@dataclass(frozen=True)
class _ItemMatrix:
    """The client-side copy of one version's item rows."""

    version: int
    loaded_at: float  # time.monotonic()
    ids: list[str]
    index: dict[str, int]
    factors: np.ndarray  # (n, k) float32
    bias: np.ndarray  # (n,) float32
    damaged: list[int]  # rows whose factors or bias are not all finite: never ranked

    @cached_property
    def unit_factors(self) -> np.ndarray:
        """Rows scaled to unit length (zero and damaged rows are zero), for cosine similarity."""
        norms = np.linalg.norm(self.factors, axis=1, keepdims=True)
        sound = (norms > 0) & np.isfinite(norms)
        return np.divide(self.factors, norms, out=np.zeros_like(self.factors), where=sound)


class StreamMFClient:
    """Read-only access to one model. Safe to share between threads."""

    def __init__(
        self,
        redis_client: redis.Redis,
        name: str,
        item_cache_ttl_s: float = 1.0,
        max_attempts: int = 5,
        fallback_below_events: int = 1,
    ) -> None:
        require_binary_client(redis_client)
        self._redis = redis_client
        self.keys = ModelKeys(name)
        self.model: StoredModel = read_model_meta(redis_client, self.keys)
        self.shards = shard_keys(self.keys, self.model)
        self._ttl_s = item_cache_ttl_s
        self._max_attempts = max_attempts
        # Users with fewer interactions than this get the decayed popularity (cold start); 1: users the
        # model has no row for (STREAMMF_MODEL__FALLBACK_BELOW_EVENTS).
        self._fallback_below = fallback_below_events
        self._read_user_script = scripts.READ_USER.register(redis_client)
        self._read_items_script = scripts.READ_ITEMS.register(redis_client)
        self._scan_rows_script = scripts.SCAN_ROWS.register(redis_client)
        self._cache: _ItemMatrix | None = None

    def current_version(self) -> int:
        return read_current_version(self._redis, self.keys)

    def user_vector(self, user: str) -> np.ndarray | None:
        """The user's k factors (float32) in the live version, as stored (NaN/inf if the row is damaged);
        None for an unknown user."""
        row = self._read_user(user, with_seen=False).row
        return None if row is None else row[: self.model.k].copy()

    def item_vectors(self, items: list[str]) -> dict[str, np.ndarray]:
        """item -> k factors (float32) in the live version, all from one version, as stored (NaN/inf if a
        row is damaged); unknown items left out."""
        if not items:
            return {}
        k, keys = self.model.k, self.keys
        held = shard_indices(items, len(self.shards))
        for attempt in range(self._max_attempts):
            _wait_before_retry(attempt)
            version = self.current_version()
            found: dict[str, np.ndarray] = {}
            for s, shard in enumerate(self.shards):
                asked = [items[i] for i in np.flatnonzero(held == s)]
                if not asked:
                    continue
                reply = self._call(
                    self._read_items_script,
                    scripts.READ_ITEMS.key_list(current=shard.current, items=shard.rows(version, "items")),
                    scripts.READ_ITEMS.arg_list(version=version, k=k, n=len(asked), items=join_ids(asked)),
                )
                if reply == b"moved":
                    break
                blob, mask = reply
                rows, present = rows_from_blob(blob, mask, len(asked), k)
                found.update((item, rows[i, :k].copy()) for i, item in enumerate(asked) if present[i])
            else:
                return {item: found[item] for item in items if item in found}
        raise VersionUnavailableError(f"{keys.current} moved on each of {self._max_attempts} reads")

    def recommend(self, user: str, k: int = 10, exclude_seen: bool = True) -> list[tuple[str, float]]:
        """Top-`k` items by predicted score for `user`, best first. A user the model has no row for (or with
        fewer than `fallback_below_events` interactions) gets the most popular items instead, scored by
        their decayed counts ([] while nothing was learnt yet).

        score = item bias + ⟨u, v_j⟩, plus user bias and global mean in explicit mode (the model's
        prediction; the additions are constant per user, so they change scores, not the order).
        Items whose stored rows are damaged are left out; a damaged row of the user raises
        `DamagedRowError`.
        """
        tried: list[int] = []
        for _ in range(self._max_attempts):
            read = self._read_user(user, with_seen=exclude_seen or self._fallback_below > 1)
            # The rule of streammf.model.popularity.serve_popularity (not imported: it would load numba).
            few = self._fallback_below > 1 and len(read.seen) < self._fallback_below
            if read.row is None or few:
                return read_popular_items(self._redis, self.shards, k, read.seen if exclude_seen else ())
            if not np.isfinite(read.row).all():
                raise DamagedRowError(self.keys.name, read.version, "user", user)
            matrix = self._matrix(read.version)
            if matrix is None:  # deleted after the user read: re-read the pointer
                tried.append(read.version)
                continue
            factors, bias = read.row[: self.model.k], float(read.row[self.model.k])
            scores = (matrix.factors @ factors).astype(np.float64) + matrix.bias
            if self.model.mode == "explicit":
                if not math.isfinite(read.global_mean):
                    raise StoreError(f"{self.keys.stats}: the global mean is not finite")
                scores += bias + read.global_mean
            excluded = [matrix.index[item] for item in read.seen if item in matrix.index]
            return _top(scores, matrix.ids, k, excluded + matrix.damaged)
        raise self._unavailable(tried)

    def similar_items(self, item: str, k: int = 10) -> list[tuple[str, float]]:
        """The `k` items with the highest cosine similarity of factors to `item`; [] for an unknown item.

        Items whose stored rows are damaged are left out; a damaged row of `item` raises `DamagedRowError`.
        """
        tried: list[int] = []
        for _ in range(self._max_attempts):
            version = self.current_version()
            matrix = self._matrix(version)
            if matrix is None:
                tried.append(version)
                continue
            row = matrix.index.get(item)
            if row is None:
                return []
            if row in matrix.damaged:
                raise DamagedRowError(self.keys.name, version, "item", item)
            unit = matrix.unit_factors
            return _top((unit @ unit[row]).astype(np.float64), matrix.ids, k, [row, *matrix.damaged])
        raise self._unavailable(tried)

    # ----------------------------------------------------------------------------------- internals

    def _call(self, script: Script, keys: list[str], args: list[scripts.Arg]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None

    def _read_user(self, user: str, with_seen: bool) -> _UserRead:
        """The user's row, from the version `current` names (read again if it moves in between)."""
        k = self.model.k
        keys = self.shards[shard_of(user, len(self.shards))]
        for attempt in range(self._max_attempts):
            _wait_before_retry(attempt)
            version = self.current_version()
            reply = self._call(
                self._read_user_script,
                scripts.READ_USER.key_list(
                    current=keys.current,
                    users=keys.rows(version, "users"),
                    inter=keys.inter(user),
                    stats=keys.stats,
                ),
                scripts.READ_USER.arg_list(version=version, user=user, k=k, with_seen=int(with_seen)),
            )
            if reply != b"moved":
                break
        else:
            raise VersionUnavailableError(f"{keys.current} moved on each of {self._max_attempts} reads")
        blob, mask, seen, n_seen, value_sum, value_count = reply
        rows, present = rows_from_blob(blob, mask, 1, k)
        count = parse_int(value_count, keys.stats, "field 'value_count'")
        total = parse_float(value_sum, keys.stats, "field 'value_sum'")
        return _UserRead(
            version=version,
            row=rows[0] if present[0] else None,
            seen=split_ids(seen, n_seen),
            global_mean=total / count if count else 0.0,
        )

    def _matrix(self, version: int) -> _ItemMatrix | None:
        """The item matrix of `version`, from the cache while fresh; None if the version is gone."""
        cached = self._cache
        if (
            cached is not None
            and cached.version == version
            and time.monotonic() - cached.loaded_at < self._ttl_s
        ):
            return cached
        loaded = self._load_matrix(version)
        if loaded is not None:
            self._cache = loaded
        return loaded

    def _load_matrix(self, version: int) -> _ItemMatrix | None:
        loaded_at = time.monotonic()
        ids: list[str] = []
        blocks = []
        for shard in self.shards:
            scanned = scan_version_rows(self._scan_rows_script, shard, version, "items", self.model.k)
            if scanned is None:
                return None
            ids += scanned[0]
            blocks.append(scanned[1])
        # In id order: ties in a top-k then fall the same way whatever the shards and HSCAN's order.
        order = sorted(range(len(ids)), key=ids.__getitem__)
        ids, rows = [ids[i] for i in order], np.concatenate(blocks)[order]
        k = self.model.k
        damaged = np.flatnonzero(~np.isfinite(rows).all(axis=1)).tolist()
        if damaged:
            log.warning(
                "model %r version %d: %d item rows are damaged (non-finite factors) and left out of "
                "results (first: %r)",
                self.keys.name,
                version,
                len(damaged),
                ids[damaged[0]],
            )
        return _ItemMatrix(
            version=version,
            loaded_at=loaded_at,
            ids=ids,
            index={item: i for i, item in enumerate(ids)},
            factors=np.ascontiguousarray(rows[:, :k]),
            bias=rows[:, k].copy(),
            damaged=damaged,
        )

    def _unavailable(self, tried: list[int]) -> VersionUnavailableError:
        return VersionUnavailableError(
            f"model {self.keys.name!r}: versions {tried} were deleted before they could be read "
            f"({self._max_attempts} attempts); is the garbage-collection grace period shorter than a read?"
        )


def _wait_before_retry(attempt: int) -> None:
    """Before reading again after `current` moved: a publish switches a sharded model's shards one after
    the other (about a millisecond), so waiting 1, 2, 4, … ms lets the reader find them all switched."""
    if attempt:
        time.sleep(0.001 * 2 ** (attempt - 1))


def _top(scores: np.ndarray, ids: list[str], k: int, excluded: list[int]) -> list[tuple[str, float]]:
    """The `k` best (id, score) pairs, best first, leaving out the `excluded` rows and non-finite scores
    (NaN would sort anywhere; ±inf is an overflow, not a ranking)."""
    candidates = np.isfinite(scores)
    if excluded:
        candidates[excluded] = False
    if candidates.all():  # the common case: skip the gather
        positions, negated = np.arange(len(scores)), -scores
    else:
        positions = np.flatnonzero(candidates)
        negated = -scores[positions]
    count = min(k, len(positions))
    if count <= 0:
        return []
    best = np.argpartition(negated, count - 1)[:count]
    best = best[np.argsort(negated[best], kind="stable")]
    return [(ids[i], float(scores[i])) for i in positions[best]]
