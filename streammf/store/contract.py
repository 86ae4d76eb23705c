"""The store contract: what a batch step reads (`BatchState`) and writes (`BatchUpdate`), the outcomes,
the errors, and the protocols every store implements (`streammf.store.memory`, `streammf.store.redis_store`).

One contract test suite runs against both stores. The in-memory store backs `streammf evaluate`, so
offline evaluation and the daemon run the very same update code.

Semantics every store must honour (the contract):
- `apply` is atomic: all of an update or nothing.
- Offset fencing: an update carries, per Kafka partition, the half-open offset range [first, next) it
  covers. If the stored next offset of any of its partitions is already >= the update's next offset, the
  update was applied before (a replay after a crash): nothing changes, `ApplyOutcome.DUPLICATE`. If a stored
  offset lies strictly inside a range (someone else applied part of it) or beyond its first offset without
  covering it, `ApplyOutcome.CONFLICT`: nothing changes; the caller re-reads offsets and re-polls.
  Partitions with no stored offset accept any range.
- Version fencing: an update computed against a version that is no longer current is refused
  (`ApplyOutcome.STALE_VERSION`); nothing changes; the caller re-reads state and recomputes.
- Users are written as values (a user is owned by the partition its events are keyed to). Items are shared
  across partitions, so item rows, item biases, counters and Gramians change by *deltas* added inside the
  store, and two writers touching one item both count. A missing item starts from the `item_base` row the
  update carries (deterministic init, identical in every replica) before its delta is added.
- Interactions (the WALS snapshot source): implicit strengths accumulate (add), explicit ratings keep the
  latest (set).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from streammf.model.factors import Mode

Side = Literal["users", "items"]


class StoreError(RuntimeError):
    """Stored data is missing or malformed; the message names the key."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or cannot take writes right now (connection refused or lost, timeout,
    loading its data, out of memory). Transient: nothing was half-applied; the caller backs off and retries.
    Stores raise this instead of their client library's exceptions, so callers never import those."""


class StoreLostStateError(StoreError):
    """The store no longer holds state it had: a key of the model is gone (Redis restarted empty,
    FLUSHALL, eviction), or Kafka's committed offsets show events the store has no record of. Going on
    would silently build a model over a fraction of the events, so the daemon stops instead; an operator
    chooses to rebuild (`streammf run --rebuild`: from the earliest offsets Kafka retains)."""


class StoreUnsafeError(StoreError):
    """The store is configured so that it may lose state (an eviction policy that can evict our keys)."""


class ApplyOutcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    STALE_VERSION = "stale_version"
    PAUSED = "paused"  # a refresh is handing the live version over; retry shortly


@dataclass(frozen=True)
class ModelMeta:
    name: str
    mode: Mode
    k: int
    version: int
    hyper: dict[str, float] = field(default_factory=dict)


@dataclass
class BatchState:
    """Everything one SGD batch reads, for the given (unique) users, items and (user, item) pairs."""

    version: int
    user_rows: np.ndarray  # (n_users, k) float32; rows of absent users are zero
    user_bias: np.ndarray  # (n_users,) float32
    user_present: np.ndarray  # (n_users,) bool
    user_counts: np.ndarray  # (n_users,) int64: observed entries n_i
    item_rows: np.ndarray  # (n_items, k) float32
    item_bias: np.ndarray  # (n_items,) float32
    item_present: np.ndarray  # (n_items,) bool
    item_counts: np.ndarray  # (n_items,) int64: observed entries m_j
    pair_values: np.ndarray  # (n_pairs,) float64: stored value, NaN if the pair was never observed
    value_sum: float  # sum of all event values applied (explicit: for the global mean)
    value_count: int  # number of events applied
    item_gramian: np.ndarray | None  # (k, k) float64, implicit mode only
    user_gramian: np.ndarray | None  # (k, k) float64, implicit mode only


@dataclass
class BatchUpdate:
    """The result of one SGD batch, applied atomically."""

    version: int
    offsets: dict[int, tuple[int, int]]  # partition -> [first, next)
    users: list[str]
    user_rows: np.ndarray  # (n_users, k) float32, written as values
    user_bias: np.ndarray  # (n_users,) float32
    items: list[str]
    item_base: np.ndarray  # (n_items, k) float32: the init row used when the item is absent
    item_delta: np.ndarray  # (n_items, k) float64: added to the stored row
    item_bias_delta: np.ndarray  # (n_items,) float64
    item_count_delta: np.ndarray  # (n_items,) int64
    pair_users: list[str]
    pair_items: list[str]
    pair_values: np.ndarray  # (n_pairs,) float64: implicit: strength to add; explicit: rating to set
    value_sum_delta: float
    value_count_delta: int
    events_applied: int
    item_gramian_delta: np.ndarray | None = None  # (k, k) float64
    user_gramian_delta: np.ndarray | None = None
    # A stored item row with a coordinate not finite or beyond this is damaged: the delta applies to the
    # base row instead (the learner computed it from there), which repairs the row.
    max_abs_factor: float = float("inf")
    # Decayed item popularity (cold start, streammf.model.popularity): per item, the batch's weights
    # relative to its last event (`batch_item_weights`); the store scales them by its clock, which is
    # events_applied (the batch's last event has clock events_applied + events_applied_delta - 1).
    item_popularity: np.ndarray | None = None  # (n_items,) float64
    popularity_half_life: float = float("inf")
    # Implicit mode: the rows as they entered the Gramians before the batch, (n, k) float32, zero for a
    # row that was absent (or damaged). A store split in shards keeps one Gramian partial sum per shard
    # and changes each by the rows it holds: Σ after·afterᵀ − before·beforeᵀ.
    user_rows_before: np.ndarray | None = None
    item_rows_before: np.ndarray | None = None
    # (n_pairs,) bool: the pair was not stored before the batch (it adds 1 to its item's count). A store
    # split in shards counts a pair on its user's shard, where its newness is known.
    pair_new: np.ndarray | None = None


class FactorStore(Protocol):
    def meta(self) -> ModelMeta: ...

    def read_batch_state(
        self, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState: ...

    def apply(self, update: BatchUpdate) -> ApplyOutcome: ...

    def applied_offsets(self) -> dict[int, int]:
        """Partition -> next offset to consume (what has been applied)."""
        ...

    def offsets_ahead(self) -> dict[int, int]:
        """Partition -> where the store holds it further than `applied_offsets` says: a store made of
        shards that took a batch on some of them only. The batch consumed from `applied_offsets` must end
        there. Empty for a store that applies a batch in one step."""
        ...

    def events_applied(self) -> int: ...

    def popular_items(self, n: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        """The `n` items with the highest decayed popularity, best first, with their decayed counts at the
        model's clock (ties: higher id first, as Redis' ZREVRANGE); `exclude` left out."""
        ...

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        """Delete the user from the model, atomically: their row in every version (and their share of the
        implicit user Gramians), their interactions, their share of item counts (and, explicit, of the
        global mean). `offsets` (the forget event's [offset, offset + 1)) are fenced and stored like a
        batch's. Idempotent. PAUSED while a refresh hands the live version over."""
        ...


class RefreshableStore(FactorStore, Protocol):
    """What a WALS refresh needs on top of `FactorStore`: the interactions, and a way to build a new version
    aside and make it current in one step.

    Build: `begin_version()` (a number never reused), `write_rows` / `write_gramian` for it, then
    `publish(version, expected_current)`: a compare-and-set of the current version, refused (False) when
    another version was published meanwhile, `version` is not newer, or it is not being built (never begun,
    or superseded by a newer publish). After a publish, updates computed against the old version get
    `ApplyOutcome.STALE_VERSION`. A new version holds only what was written to it; interactions, item
    counts, stats and offsets are shared by all versions.

    Catch-up: updates applied to the live version while a refresh computes would be missing from the
    version it publishes. So the refresh first calls `track_changes(live)`; from then on every applied
    update records its users and items, which `take_changes(live)` returns and forgets. To hand over
    without a gap, `pause_writes(live, ttl_s)` makes `apply` answer `ApplyOutcome.PAUSED` (the writer
    retries) until `resume_writes`, a publish, or `ttl_s` passes; `publish` refuses once a pause it
    depends on has expired, because writes may have slipped in since.
    """

    def iter_interactions(self, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(users, items, values) chunks covering about `batch` users each; values float64."""
        ...

    def current_version(self) -> int: ...

    def read_all_rows(self, side: Side) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, (n, k) float32 factors, (n,) float32 biases) of every row of the live version."""
        ...

    def global_mean(self) -> float:
        """value_sum / value_count of all applied events; 0.0 before any."""
        ...

    def begin_version(self, source: str = "wals") -> int:
        """`source` says what builds the version (stores that keep version metadata record it)."""
        ...

    def write_rows(
        self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray, biases: np.ndarray | None = None
    ) -> None: ...

    def write_gramian(self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray) -> None:
        """The Gramian of `rows` ((n, k): every row of the side in `version`) for implicit mode's gravity."""
        ...

    def delete_rows(self, version: int, side: Side, ids: Sequence[str]) -> None:
        """Remove rows from a version being built."""
        ...

    def publish(self, version: int, expected_current: int) -> bool: ...

    def discard_version(self, version: int) -> bool: ...

    def track_changes(self, version: int) -> bool:
        """Start recording the users and items of updates applied to `version`; False if not current."""
        ...

    def stop_tracking(self, version: int) -> None:
        """Undo `track_changes`: updates to `version` no longer record what they change."""
        ...

    def take_changes(self, version: int) -> tuple[list[str], list[str]]:
        """(users, items) of updates applied to `version` since tracking began or the last take."""
        ...

    def read_interactions(self, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, values) of the given users' interactions as they are now."""
        ...

    def pause_writes(self, version: int, ttl_s: float) -> bool:
        """Refuse updates to `version` (PAUSED) for at most `ttl_s`; False if it is not current."""
        ...

    def resume_writes(self, version: int) -> None: ...

    def collect_garbage(self, grace_s: float) -> list[int]: ...


def item_rows_after(update: BatchUpdate) -> np.ndarray:
    """The item rows the writer computed, (n, k) float32: base + delta, the rows its Gramian change
    counts after the batch (a store that finds an item moved by another writer writes another row)."""
    base = np.asarray(update.item_base, dtype=np.float64)
    return (base + np.asarray(update.item_delta, dtype=np.float64).reshape(base.shape)).astype(np.float32)


def gramian_correction(
    stored: np.ndarray, written: np.ndarray, before: np.ndarray, after: np.ndarray
) -> np.ndarray | None:
    """What an item Gramian needs beyond the writer's own change, shared by the stores (apply.lua adds the
    same terms in the same order, so both give the same bits).

    The writer's change counts each item from `before` (the row it read, as the Gramian held it: zero if
    absent or damaged) to `after` (the row it computed). When another writer changed the item in between,
    the store starts from `stored` (what it holds, counted the same way) and writes `written`, its own
    sum: then the item's terms w·wᵀ − s·sᵀ − (n·nᵀ − o·oᵀ) are added, item by item, so the Gramian stays
    the sum of the rows it covers. Rows are (n_items, k) float32; None when no item needs it (a single
    writer: the terms would cancel only up to rounding, so they are never formed)."""
    moved = np.flatnonzero(
        np.any(stored.view(np.uint32) != before.view(np.uint32), axis=1)
        | np.any(written.view(np.uint32) != after.view(np.uint32), axis=1)
    )
    if len(moved) == 0:
        return None
    k = stored.shape[1]
    correction = np.zeros((k, k))
    for r in moved:
        for rows, sign in ((written, 1.0), (stored, -1.0), (after, -1.0), (before, 1.0)):
            row = rows[r].astype(np.float64)
            if sign > 0:
                correction += np.outer(row, row)
            else:
                correction -= np.outer(row, row)
    return correction


def fence(stored: dict[int, int], offsets: dict[int, tuple[int, int]]) -> ApplyOutcome | None:
    """Offset fencing shared by the stores (the Redis Lua script implements the same rule).

    Per partition: stored <= first: ahead, may apply (a gap is fine: transaction markers, compaction);
    stored >= next: already applied; in between: partly applied by someone else. Returns None when the
    update may be applied.
    """
    states = set()
    for partition, (first, nxt) in offsets.items():
        have = stored.get(partition)
        if have is None or have <= first:
            states.add("ahead")
        elif have >= nxt:
            states.add("behind")
        else:
            states.add("overlap")
    if not states or states == {"ahead"}:
        return None
    if states == {"behind"}:
        return ApplyOutcome.DUPLICATE
    return ApplyOutcome.CONFLICT
