"""Factor stores: what a batch step reads (`BatchState`) and writes (`BatchUpdate`), and the in-memory twin.

The Redis store (`streammf.redis_store`) implements the same `FactorStore` protocol; one contract test
suite runs against both. The in-memory store backs `streammf evaluate`, so offline evaluation and the
daemon run the very same update code.

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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

from streammf.factors import DTYPE, Mode

Side = Literal["users", "items"]


class StoreError(RuntimeError):
    """Stored data is missing or malformed; the message names the key."""


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


class FactorStore(Protocol):
    def meta(self) -> ModelMeta: ...

    def read_batch_state(
        self, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState: ...

    def apply(self, update: BatchUpdate) -> ApplyOutcome: ...

    def applied_offsets(self) -> dict[int, int]:
        """Partition -> next offset to consume (what has been applied)."""
        ...

    def events_applied(self) -> int: ...

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

    def write_gramian(self, version: int, side: Side, gramian: np.ndarray) -> None: ...

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
        for row, item in enumerate(update.items):
            stored = self.item_rows.get(item)
            if stored is None or not (np.abs(stored) <= update.max_abs_factor).all():
                stored = np.append(update.item_base[row], 0.0).astype(DTYPE)
            delta = np.append(update.item_delta[row], update.item_bias_delta[row])
            self.item_rows[item] = (stored.astype(np.float64) + delta).astype(DTYPE)
            self.item_counts[item] = self.item_counts.get(item, 0) + int(update.item_count_delta[row])
        additive = self._meta.mode == "implicit"
        for user, item, value in zip(update.pair_users, update.pair_items, update.pair_values, strict=True):
            row = self.interactions.setdefault(user, {})
            row[item] = row.get(item, 0.0) + float(value) if additive else float(value)
        self.value_sum += update.value_sum_delta
        self.value_count += update.value_count_delta
        self._events_applied += update.events_applied
        if self.item_gramian is not None and update.item_gramian_delta is not None:
            self.item_gramian += update.item_gramian_delta
        if self.user_gramian is not None and update.user_gramian_delta is not None:
            self.user_gramian += update.user_gramian_delta
        for partition, (_, nxt) in update.offsets.items():
            self.offsets[partition] = nxt
        return ApplyOutcome.APPLIED

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

    def write_gramian(self, version: int, side: Side, gramian: np.ndarray) -> None:
        if self._meta.mode != "implicit":
            raise ValueError("explicit models keep no Gramians")
        draft = self._draft(version)
        value = np.array(gramian, dtype=np.float64).reshape(self._meta.k, self._meta.k)
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
