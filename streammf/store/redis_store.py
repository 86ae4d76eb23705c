"""The Redis factor store: `RefreshableStore` on a real Redis server, in the public key layout v1
(`streammf.store.layout`), every change made by one Lua script (`streammf.store.scripts`).

The arithmetic inside the scripts is the in-memory twin's (`streammf.store.memory`): float32 rows are
widened to float64, the float64 delta is added, the sum is rounded back to float32 once. The store remembers
the item rows and Gramians of its last batch read and sends `apply` the sums it computed from them; the
script takes a sum only where the stored bytes are still the ones read, and adds the delta itself elsewhere.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import hiredis
import numpy as np
import redis
from redis.cluster import RedisCluster

from streammf.model.factors import Mode
from streammf.store import scripts
from streammf.store.batch_split import BatchSplit, Counts, shard_parts
from streammf.store.contract import (
    ApplyOutcome,
    BatchState,
    BatchUpdate,
    ModelMeta,
    Side,
    StoreError,
    StoreLostStateError,
    StoreUnavailableError,
    item_rows_after,
)
from streammf.store.layout import (
    GRAMIAN_DTYPE,
    ROW_DTYPE,
    SIDES,
    ModelKeys,
    StoredModel,
    decode_gramian,
    hold_lease,
    join_ids,
    parse_float,
    parse_int,
    read_current_version,
    read_model_meta,
    read_popular_items,
    release_lease,
    require_binary_client,
    require_no_eviction,
    rows_from_blob,
    scan_keys,
    scan_version_rows,
    shard_keys,
    split_numbers,
    store_error_from,
    text,
    value_texts,
)
from streammf.store.shards import shard_indices, shard_of, shard_tags
from streammf.store.user_cache import (
    DEFAULT_USER_CACHE_PAIRS,
    NO_WHOLE_USERS,
    BatchIds,
    UserCache,
    WholeUsers,
)

log = logging.getLogger(__name__)

# Rows per script call when a refresh writes a version: ~130 kB of arguments at k=32.
_WRITE_CHUNK_ROWS = 1000
# A batch read names the version it expects; it is repeated when a publish lands in between.
_SNAPSHOT_ATTEMPTS = 10


@dataclass(frozen=True)
class _LastRead:
    """What the last batch read returned, for `apply`'s precomputed sums (a hint: the script checks it)."""

    version: int
    item_index: dict[str, int]
    item_rows: np.ndarray  # (n, k+1) float32, bit-exact copies of the stored bytes
    item_present: np.ndarray
    item_gramian: bytes
    user_gramian: bytes
    writer: str  # the writer stamp the read found (streammf.store.user_cache)
    whole: WholeUsers  # users read whole (every interaction, up to the script's whole_limit)


@dataclass(frozen=True)
class _CachedRead:
    """How the last batch read used the writer's copy of its users, for the apply that follows it."""

    version: int
    stamp: str  # the writer stamp the read found
    strict: bool  # users were taken from the copy: apply only if the stamp is unchanged
    whole: WholeUsers  # users read from the store whose every interaction the read saw
    ids: BatchIds | None  # the batch's ids in the copy (None: read without the copy)
    users: list[str]  # the very list of users read (an update of a part of the batch has another)
    count_items: list[str]  # the items whose counts were read, in the order of `state.item_counts`
    state: BatchState  # what the read returned (stored counts and pair values)


@dataclass(frozen=True)
class _ApplyCommand:
    """The apply script's KEYS and ARGV, and, for a lone writer's apply of sums as sent, what it writes."""

    keys: list[str]
    args: list[Any]
    as_sent: bool  # the item rows are written as sent (nothing written since the read: the stamp held)
    item_rows: bytes  # (n_items, k + 1) float32 rows as written, when `as_sent`
    item_counts: np.ndarray | None  # the counts of the update's count items as written, if known
    item_gramian: bytes  # the Gramians as written when the stored ones are those read ('' otherwise)
    user_gramian: bytes


@dataclass(frozen=True)
class _AheadRead:
    """The next batch as `begin_apply` reads it: all of it, and the part Redis is asked for."""

    all_users: list[str]
    all_items: list[str]
    ids: BatchIds
    hits: np.ndarray  # per user: held in the copy
    pair_hits: np.ndarray  # per pair: its user is held
    users: list[str]  # read: users not held
    items: list[str]  # read: items the apply does not write
    pairs: list[tuple[str, str]]  # read: pairs of users not held
    item_at: np.ndarray  # per item: its row in the update (-1: not written by the apply)
    command: tuple[list[str], list[Any]]  # the read script's KEYS and ARGV


class PendingApply:
    """An apply `RedisStore.begin_apply` sent: the next batch's state as it leaves it (`next_state`, or
    None), and its answer when asked (`outcome`)."""

    def __init__(
        self,
        store: RedisStore,
        connection: Any,
        command: _ApplyCommand,
        version: int,
        stamp_before: str,
        next_state: BatchState | None,
    ) -> None:
        self.store, self.connection, self.command = store, connection, command
        self.version, self.stamp_before, self.next_state = version, stamp_before, next_state

    def outcome(self) -> ApplyOutcome:
        return self.store.finish_apply(self)


class ModelMismatchError(ValueError):
    """The model exists with a different mode or number of factors than the caller asked for."""


def _tail_positions(script: scripts.LuaScript, ids: Sequence[str]) -> dict[str, int]:
    """id -> its KEYS position (1-based, as Lua indexes) in the tail after the script's fixed keys; the
    first position wins for an id listed twice."""
    positions: dict[str, int] = {}
    for offset, ident in enumerate(ids, start=len(script.keys) + 1):
        positions.setdefault(ident, offset)
    return positions


def _pair_values(keys: ModelKeys, pairs: list[tuple[str, str]], joined: bytes) -> np.ndarray:
    """The read script's ','-joined pair values ('' for a pair not stored) as floats, NaN for absent.
    The script has checked each with Lua's tonumber; one that Python reads otherwise (hex, spaces) is
    reported with its key by the per-value path."""
    raw = split_numbers(joined, len(pairs))
    try:
        return np.array([value or b"nan" for value in raw], dtype=np.bytes_).astype(np.float64)
    except ValueError:
        return np.array(
            [
                parse_float(value or None, keys.inter(user), f"field {item!r}", default=np.nan)
                for (user, item), value in zip(pairs, raw, strict=True)
            ],
            dtype=np.float64,
        )


def _whole_users(
    users: list[str], counts: np.ndarray, mask: bytes, items: bytes, values: bytes
) -> WholeUsers:
    """The read script's users read whole: each user's count and interactions, users in order. Data that
    Python reads otherwise than the script (a value in hex, an item name holding NUL) keeps no user
    whole: they are then read pair by pair, as without a copy."""
    if b"1" not in mask:
        return NO_WHOLE_USERS
    read = zip(users, mask, counts.tolist(), strict=True)
    whole = [(user, count) for user, flag, count in read if flag == ord("1")]
    owners = itertools.chain.from_iterable(itertools.repeat(user, count) for user, count in whole)
    try:
        all_items = items.decode().split("\0") if items else []
        texts = values.split(b",") if values else []
        all_values = np.array(texts, dtype=np.bytes_).astype(np.float64).tolist()
        pairs = zip(owners, all_items, strict=True)
        return WholeUsers(dict(whole), dict(zip(pairs, all_values, strict=True)))
    except ValueError:
        return NO_WHOLE_USERS


def _with_cached_users(
    part: BatchState, cache: UserCache, ids: BatchIds, hits: np.ndarray, pair_hits: np.ndarray
) -> BatchState:
    """The batch state of the users and pairs of `ids` from `part` (read for the users not in the copy and
    their pairs) and the copy (the others)."""
    n, k = len(hits), part.item_rows.shape[1]
    rows, counts = cache.rows_of(ids.user_ids[hits])
    user_rows = np.zeros((n, k), dtype=part.user_rows.dtype)
    user_bias = np.zeros(n, dtype=part.user_bias.dtype)
    user_rows[~hits], user_bias[~hits] = part.user_rows, part.user_bias
    user_rows[hits], user_bias[hits] = rows[:, :k], rows[:, k]
    user_present = hits.copy()
    user_present[~hits] = part.user_present
    user_counts = np.zeros(n, dtype=np.int64)
    user_counts[~hits], user_counts[hits] = part.user_counts, counts
    pair_values = cache.values_of(ids.pair_keys)
    pair_values[~pair_hits] = part.pair_values
    return replace(
        part,
        user_rows=user_rows,
        user_bias=user_bias,
        user_present=user_present,
        user_counts=user_counts,
        pair_values=pair_values,
    )


def _user_rows(update: BatchUpdate, k: int) -> np.ndarray:
    """The update's user rows as stored: (n, k + 1) float32, factors then bias."""
    n = len(update.users)
    rows = [np.asarray(update.user_rows).reshape(n, k), np.asarray(update.user_bias).reshape(n)]
    return np.column_stack(rows).astype(ROW_DTYPE)


def _read_pair_values(read: _CachedRead | None, update: BatchUpdate) -> np.ndarray | None:
    """The stored values of the update's pairs as its read saw them (NaN: none), if the update is of the
    batch read (the usual case: no event was left out)."""
    if read is None or read.users is not update.users:
        return None
    values = read.state.pair_values
    return values if len(values) == len(update.pair_users) else None


def _read_counts(read: _CachedRead | None, counts: Counts) -> np.ndarray | None:
    """The stored counts of the items of `counts` as the update's read saw them; None if one was not read.
    Looked up by name unless they are the very list read: an update recomputed without some events may
    list the same items in another order, and a shard's user part counts only some of them."""
    if read is None:
        return None
    if counts[0] is read.count_items:
        return read.state.item_counts
    index = dict(zip(read.count_items, range(len(read.count_items)), strict=True))
    at = list(map(index.get, counts[0], itertools.repeat(-1)))
    return None if -1 in at else read.state.item_counts[np.array(at, dtype=np.int64)]


def _pair_writes(
    update: BatchUpdate, key_index: np.ndarray, stored: np.ndarray | None, additive: bool
) -> tuple[list[str], bytes, bytes]:
    """The values to store per pair as apply.lua's ARGV tail: (item, value text) pairs grouped by the
    user's inter hash (KEYS index and count per group). Ratings replace: always (a pair twice in one
    update is sent twice, in order, and HSET keeps the last, as the script would); strengths add to the
    stored value: only from the values read (`stored`), and only for pairs once in the update. Empty
    when the script makes them itself."""
    n = len(update.pair_users)
    if n == 0 or (additive and stored is None):
        return [], b"", b""
    if additive and len(set(zip(update.pair_users, update.pair_items, strict=True))) != n:
        return [], b"", b""
    values = np.asarray(update.pair_values, dtype=np.float64)
    if additive and stored is not None:  # as the script: the stored strength (or 0) plus the batch's
        values = np.where(np.isnan(stored), 0.0, stored) + values
    order = np.argsort(key_index, kind="stable")
    groups, sizes = np.unique(key_index[order], return_counts=True)
    items = [update.pair_items[j] for j in order.tolist()]
    texts = value_texts(values[order].tolist())
    tail = list(itertools.chain.from_iterable(zip(items, texts, strict=True)))
    return tail, groups.astype("<u4").tobytes(), sizes.astype("<u4").tobytes()


def _packed(calls: list[tuple[Any, ...]]) -> list[bytes]:
    """Commands in the Redis protocol, each packed by one hiredis call: redis-py's `pack_commands` adds
    ~0.3 µs of Python per argument (a type check, then its chunking), and an apply has ~2.5 arguments
    per event. Arguments are str, bytes, int or float, as hiredis takes them."""
    return list(map(hiredis.pack_command, calls))


def _offset_triples(offsets: dict[int, tuple[int, int]]) -> list[int]:
    """The ARGV tail of a fenced script: partition, first offset, next offset, per partition."""
    return [int(value) for partition, (first, nxt) in offsets.items() for value in (partition, first, nxt)]


def _item_sums(
    last: _LastRead | None, items: Sequence[str], base: np.ndarray, deltas: np.ndarray, max_abs: float
) -> tuple[bytes, bytes, bytes]:
    """apply.lua's item arithmetic done here, from the rows the last read returned: a '1'/'0'/'?' mask
    (read present / read absent / not read), the rows read, and the float32 sums. The script uses a sum
    only where the stored row is still the one read; repeated items are left to the script."""
    n = len(items)
    if last is None or n == 0 or len(set(items)) != n:
        return b"?" * n, b"", b""
    index = np.array([last.item_index.get(item, -1) for item in items], dtype=np.int64)
    known = index >= 0
    safe = np.maximum(index, 0)
    rows, present = last.item_rows[safe], known & last.item_present[safe]
    # The script's test for a damaged row: every coordinate within ±max_abs (NaN fails), as a float64.
    sound = np.all(np.abs(rows.astype(np.float64)) <= min(max_abs, 1e308), axis=1)
    start = np.where((present & sound)[:, None], rows, np.column_stack([base, np.zeros(n, dtype=base.dtype)]))
    sums = (start.astype(np.float64) + deltas).astype(ROW_DTYPE)
    mask = np.where(known, np.where(present, ord("1"), ord("0")), ord("?")).astype(np.uint8)
    return mask.tobytes(), rows.astype(ROW_DTYPE).tobytes(), sums.tobytes()


# A server away, restarting, full, or (Redis Cluster) a slot whose primary is down or moving.
_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)


def _translating_errors(cls: type[RedisStore]) -> type[RedisStore]:
    """Every public method raises `StoreUnavailableError` where redis-py raised a connection, timeout,
    loading or out-of-memory error (the store's callers catch the store's errors, not redis-py's)."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        setattr(cls, name, _translated(member))
    return cls


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(f"Redis: {type(exc).__name__}: {exc}") from exc

    return call


def open_shard(client: redis.Redis, shard: ModelKeys, zero_gramian: bytes, incarnation: str) -> str:
    """A shard's own keys of a new model, marked with `incarnation` unless it has them already; returns
    the incarnation the shard holds (lua/open_shard.lua)."""
    keys = scripts.OPEN_SHARD.key_list(
        current=shard.current,
        stats=shard.stats,
        v1_meta=shard.version_meta(1),
        v1_gram_items=shard.gramian(1, "items"),
        v1_gram_users=shard.gramian(1, "users"),
    )
    args = scripts.OPEN_SHARD.arg_list(zero_gramian=zero_gramian, incarnation=incarnation)
    return text(scripts.OPEN_SHARD.register(client)(keys=keys, args=args))


@_translating_errors
class RedisStore:
    """`RefreshableStore` on Redis, or on a Redis Cluster (a model of S shards spreads over its primaries).
    Thread-safe as far as the redis client is (redis.Redis and RedisCluster are).

    With S > 1 every batch is applied as one script per shard, each fencing the batch's offsets on its own
    shard: a crash between two shards' scripts leaves the batch applied on some of them, and the partition
    resumes from the smallest offset the shards hold (`applied_offsets`), its first batch ending where the
    furthest shard stands (`offsets_ahead`), so each shard takes each event once. Readers switch versions
    on the control `current`; each shard's own `current` fences its writers and follows the control one.
    """

    def __init__(self, client: redis.Redis, keys: ModelKeys, model: StoredModel) -> None:
        require_binary_client(client)
        self._client = client
        self.keys = keys
        self._model = model
        self.shards = shard_keys(keys, model)
        self._read_script = scripts.READ_STATE.register(client)
        self._apply_script = scripts.APPLY.register(client)
        self._forget_script = scripts.FORGET_USER.register(client)
        self._forget_stats_script = scripts.FORGET_STATS.register(client)
        self._advance_offsets_script = scripts.ADVANCE_OFFSETS.register(client)
        # Which creation of the model this store writes to; every write script checks it (`foreign` in
        # lua/prelude.lua), so a writer never writes into a model deleted and created again after it
        # attached. Models made before incarnations were kept have none ('').
        self.incarnation = text(client.hget(self.shards[0].stats, "incarnation") or b"")
        self._write_rows_script = scripts.WRITE_ROWS.register(client)
        self._delete_rows_script = scripts.DELETE_ROWS.register(client)
        self._write_string_script = scripts.WRITE_STRING.register(client)
        self._publish_script = scripts.PUBLISH.register(client)
        self._switch_script = scripts.SWITCH.register(client)
        self._discard_script = scripts.DISCARD.register(client)
        self._handover_script = scripts.HANDOVER.register(client)
        self._scan_rows_script = scripts.SCAN_ROWS.register(client)
        self._last_read: dict[int, _LastRead] = {}  # shard -> its part of the last batch read
        # Per shard, a copy of the users it holds that this store wrote, with its own stamp (a batch's user
        # part on each shard is a write of its own); [] for none.
        self.user_caches: list[UserCache] = []
        self._cached_reads: dict[int, _CachedRead] = {}  # shard -> how its part of the last read used it
        self._batch_read: tuple[list[str], list[str], int] | None = None  # last sharded read's batch
        self._version_read: int | None = None  # the version of the last batch read
        self.cache_users(DEFAULT_USER_CACHE_PAIRS)

    def cache_users(self, max_pairs: int) -> None:
        """Keep a copy of the users this store writes, of at most `max_pairs` interactions over all
        shards (0: none)."""
        n = len(self.shards)
        per_shard = -(-max_pairs // n)
        self.user_caches = [UserCache(per_shard, self._model.k + 1) for _ in range(n if max_pairs > 0 else 0)]
        self._cached_reads.clear()

    def users_held(self) -> int:
        """Users in this store's copies (streammf.store.user_cache)."""
        return sum(len(cache) for cache in self.user_caches)

    @classmethod
    def open(
        cls,
        client: redis.Redis,
        name: str,
        mode: Mode,
        k: int,
        hyper: dict[str, float] | None = None,
        shards: int = 1,
    ) -> RedisStore:
        """Create the model (every shard's keys, then the meta, version 1, current pointer) unless it
        exists; then check mode, k and the number of shards.

        The stored hyperparameters stay those of the creator: they document version 1, not the caller.
        """
        require_binary_client(client)
        keys = ModelKeys(name)
        if not client.exists(keys.meta):
            tags = shard_tags(name, shards)
            zero_gramian = np.zeros((k, k), dtype=GRAMIAN_DTYPE).tobytes() if mode == "implicit" else b""
            # Creators racing on one model all adopt the incarnation the first shard holds, so its shards
            # never end up marked by different creators (which would refuse one creator's writes).
            incarnation = ""
            for s, shard in enumerate([keys.shard(tag) for tag in tags] if shards > 1 else [keys]):
                held = open_shard(client, shard, zero_gramian, incarnation or uuid.uuid4().hex)
                if s == 0:
                    incarnation = held
                elif held != incarnation:
                    raise StoreError(
                        f"model {name!r}: shard {s} holds keys of another creation than shard 0 "
                        f"(incarnation {held!r}, not {incarnation!r}); delete the model and start again"
                    )
            scripts.OPEN.register(client)(
                keys=scripts.OPEN.key_list(
                    meta=keys.meta, current=keys.current, next_version=keys.next_version
                ),
                args=scripts.OPEN.arg_list(
                    mode=mode,
                    k=k,
                    hyper=json.dumps(hyper or {}, sort_keys=True),
                    shards=shards,
                    shard_tags=json.dumps(tags),
                ),
            )
        return cls.attach(client, name, (mode, k), shards=shards)

    @classmethod
    def attach(
        cls, client: redis.Redis, name: str, expect: tuple[Mode, int] | None = None, shards: int | None = None
    ) -> RedisStore:
        """An existing model (readers, the refresh); `StoreError` if there is none, `ModelMismatchError`
        if it is not of the `expect`ed (mode, k), or (when given) of `shards` shards."""
        keys = ModelKeys(name)
        store = cls(client, keys, read_model_meta(client, keys))
        model = store._model
        if expect is not None and (model.mode, model.k) != expect:
            raise ModelMismatchError(
                f"model {name!r} exists with mode={model.mode} k={model.k}, "
                f"asked for mode={expect[0]} k={expect[1]}; pick another model name or delete it"
            )
        if shards is not None and model.shards != shards:
            raise ModelMismatchError(
                f"model {name!r} exists with {model.shards} shard(s), asked for {shards} "
                "(STREAMMF_REDIS__SHARDS); a model keeps the number it was created with"
            )
        return store

    # ------------------------------------------------------------------------------ FactorStore

    def meta(self) -> ModelMeta:
        return ModelMeta(
            name=self.keys.name,
            mode=self._model.mode,
            k=self._model.k,
            version=self.current_version(),
            hyper=dict(self._model.hyper),
        )

    def current_version(self) -> int:
        return read_current_version(self._client, self.keys)

    def read_batch_state(
        self, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState:
        """One atomic read (a Lua script per shard) of the version `current` named just before; read
        again if it moved in between."""
        # One shard: its script checks the one `current` itself, so the version the last read found is
        # tried first (a stale guess costs one attempt) and a batch makes one round trip less. Several:
        # the control `current` is read each time, since the shards' own may lag behind it (a torn
        # publish is rolled forward from it).
        version = self._version_read if len(self.shards) == 1 else None
        for _ in range(_SNAPSHOT_ATTEMPTS + 1):
            if version is None:
                version = self.current_version()
            if len(self.shards) == 1:
                state = self._read_part(0, version, users, items, pairs)
            else:
                state = self._read_sharded(version, users, items, pairs)
            if state is not None:
                self._version_read = version
                return state
            version = None
        raise StoreError(f"{self.keys.current} moved on each of {_SNAPSHOT_ATTEMPTS} snapshot attempts")

    def _read_part(
        self,
        s: int,
        version: int,
        users: list[str],
        items: list[str],
        pairs: list[tuple[str, str]],
        count_items: list[str] | None = None,
    ) -> BatchState | None:
        """Shard `s`'s part of the batch state (`_read_snapshot`), users this store holds a valid copy of
        taken from it (`UserCache`): the read script reads the others (whole, for the copy, when they have
        few interactions) and the items, and tells whose stamp the shard bears. If it is not this store's
        own, the copy is dropped and the part read again in full."""
        self._cached_reads.pop(s, None)
        if not self.user_caches:
            return self._read_snapshot(s, version, users, items, pairs, count_items)
        cache = self.user_caches[s]
        count_items = items if count_items is None else count_items
        cache.follow(version)

        def remember(state: BatchState, strict: bool, whole: WholeUsers, ids: BatchIds | None) -> None:
            stamp = self._last_read[s].writer
            self._cached_reads[s] = _CachedRead(version, stamp, strict, whole, ids, users, count_items, state)

        if not cache.trusting():  # another writer wrote lately: read as without a copy
            state = self._read_snapshot(s, version, users, items, pairs, count_items)
            if state is not None:  # the stamp still serves the settled sums
                remember(state, False, NO_WHOLE_USERS, None)
            return state
        ids = cache.ids_of(users, pairs)
        hits = cache.held(ids)
        if not hits.any():
            state = self._read_snapshot(
                s, version, users, items, pairs, count_items, whole_limit=cache.whole_limit
            )
            if state is not None:
                whole = self._last_read[s].whole
                if self._last_read[s].writer != cache.stamp:  # another writer wrote (other users too)
                    cache.found_stale(version)
                    ids, whole = cache.ids_of(users, pairs), NO_WHOLE_USERS
                remember(state, False, whole, ids)
            return state
        pair_hits = cache.pairs_held(ids)
        part = self._read_snapshot(
            s,
            version,
            list(itertools.compress(users, ~hits)),
            items,
            list(itertools.compress(pairs, ~pair_hits)),
            count_items,
            whole_limit=cache.whole_limit,
        )
        if part is None:
            return None
        if self._last_read[s].writer != cache.stamp:
            log.debug("another writer wrote since this one's last batch: its copy of users is dropped")
            cache.found_stale(version)
            return self._read_part(s, version, users, items, pairs, count_items)
        cache.found_valid()
        state = _with_cached_users(part, cache, ids, hits, pair_hits)
        remember(state, True, self._last_read[s].whole, ids)
        return state

    def _read_sharded(
        self, version: int, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState | None:
        """Each shard's part, merged in the order asked; None when a shard is not at `version` (rolled
        forward first if it lags behind a publish)."""
        self._batch_read = None
        split = BatchSplit.of(len(self.shards), users, items, [user for user, _ in pairs])
        parts: list[BatchState] = []
        for s in range(len(self.shards)):
            part = self._read_part(
                s,
                version,
                [users[i] for i in split.users[s]],
                [items[i] for i in split.items[s]],
                [pairs[i] for i in split.pairs[s]],
                count_items=items,  # every shard holds a partial count of every item
            )
            if part is None:
                self._roll_forward(s, version)
                return None
            parts.append(part)
        self._batch_read = (users, items, len(pairs))
        return split.merge(version, parts, self._model.k)

    def _roll_forward(self, s: int, version: int) -> None:
        """Publish `version` on shard `s` if the shard lags behind it: the control `current` moved there,
        so the version is complete on every shard (a refresh died between the control switch and this
        shard's)."""
        shard = self.shards[s]
        behind = parse_int(self._client.get(shard.current), shard.current, "value", default=-1)
        if behind < 1:
            raise StoreLostStateError(f"{shard.current} is missing or not a version number")
        if behind >= version or shard.current == self.keys.current:
            return
        if self._publish_shard(s, version, behind, "force"):
            log.warning(
                "shard %s was behind the published version: rolled forward",
                shard.prefix,
                extra={"from_version": behind, "to_version": version},
            )

    def _read_snapshot(
        self,
        s: int,
        version: int,
        users: list[str],
        items: list[str],
        pairs: list[tuple[str, str]],
        count_items: list[str] | None = None,
        whole_limit: int = -1,
    ) -> BatchState | None:
        """Shard `s`'s part of a batch state; item counts are of `count_items` (default `items`); users
        with at most `whole_limit` interactions are read whole (`_LastRead.whole`)."""
        count_items = items if count_items is None else count_items
        script_keys, args = self._read_command(s, version, users, items, pairs, count_items, whole_limit)
        try:
            reply = self._read_script(keys=script_keys, args=args)
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None
        return self._read_reply(s, version, reply, users, items, pairs, count_items)

    def _read_command(
        self,
        s: int,
        version: int,
        users: list[str],
        items: list[str],
        pairs: list[tuple[str, str]],
        count_items: list[str],
        whole_limit: int,
    ) -> tuple[list[str], list[Any]]:
        """The read script's KEYS and ARGV for `_read_snapshot`."""
        keys, k = self.shards[s], self._model.k
        implicit = self._model.mode == "implicit"
        # KEYS[NK + u] is the u-th batch user's inter hash (for HLEN), so batch users are listed as given.
        batch_users = set(users)
        inter_users = [*users, *dict.fromkeys(user for user, _ in pairs if user not in batch_users)]
        inter_index = _tail_positions(scripts.READ_STATE, inter_users)
        joined_items = join_ids(items)
        script_keys = scripts.READ_STATE.key_list(
            keys.inter_keys(inter_users),
            current=keys.current,
            meta=keys.version_meta(version),
            users=keys.rows(version, "users"),
            items=keys.rows(version, "items"),
            item_counts=keys.item_counts,
            stats=keys.stats,
            gram_items=keys.gramian(version, "items"),
            gram_users=keys.gramian(version, "users"),
        )
        args = scripts.READ_STATE.arg_list(
            version=version,
            implicit=int(implicit),
            k=k,
            n_users=len(users),
            n_items=len(items),
            n_pairs=len(pairs),
            users=join_ids(users),
            items=joined_items,
            pair_items=join_ids([item for _, item in pairs]),
            pair_inter_keys=np.array([inter_index[user] for user, _ in pairs], dtype="<u4").tobytes(),
            n_count_items=len(count_items),
            # One shard: the batch's own items (the same bytes, split once in the script).
            count_items=joined_items if count_items is items else join_ids(count_items),
            whole_limit=whole_limit,
        )
        return script_keys, args

    def _read_reply(
        self,
        s: int,
        version: int,
        reply: Any,
        users: list[str],
        items: list[str],
        pairs: list[tuple[str, str]],
        count_items: list[str],
    ) -> BatchState | None:
        """`_read_snapshot`'s state from the read script's reply (None: `current` moved)."""
        keys, k = self.shards[s], self._model.k
        implicit = self._model.mode == "implicit"
        if reply == b"moved":
            return None
        if reply == b"no_meta":
            raise StoreLostStateError(
                f"{keys.version_meta(version)} is missing: {keys.current} names a version without meta"
            )
        (user_blob, user_mask, user_counts, item_blob, item_mask, item_counts, pair_values, value_sum,
         value_count, item_gramian, user_gramian, writer, whole_mask, whole_items,
         whole_values) = reply  # fmt: skip
        user_rows, user_present = rows_from_blob(user_blob, user_mask, len(users), k)
        item_rows, item_present = rows_from_blob(item_blob, item_mask, len(items), k)
        counts = np.array(split_numbers(user_counts, len(users)), dtype=np.int64)
        self._last_read[s] = _LastRead(
            version=version,
            item_index={item: r for r, item in enumerate(items)},
            item_rows=item_rows,
            item_present=item_present,
            item_gramian=item_gramian or b"",
            user_gramian=user_gramian or b"",
            writer=text(writer),
            whole=_whole_users(users, counts, whole_mask, whole_items, whole_values),
        )
        gramians = (
            (
                decode_gramian(item_gramian, k, keys.gramian(version, "items")),
                decode_gramian(user_gramian, k, keys.gramian(version, "users")),
            )
            if implicit
            else (None, None)
        )
        return BatchState(
            version=version,
            user_rows=user_rows[:, :k].copy(),
            user_bias=user_rows[:, k].copy(),
            user_present=user_present,
            user_counts=counts,
            item_rows=item_rows[:, :k].copy(),
            item_bias=item_rows[:, k].copy(),
            item_present=item_present,
            item_counts=np.array(split_numbers(item_counts, len(count_items)), dtype=np.int64),
            pair_values=_pair_values(keys, pairs, pair_values),
            value_sum=parse_float(value_sum, keys.stats, "field 'value_sum'"),
            value_count=parse_int(value_count, keys.stats, "field 'value_count'"),
            item_gramian=gramians[0],
            user_gramian=gramians[1],
        )

    def apply(self, update: BatchUpdate) -> ApplyOutcome:
        """One shard: one script. Several: the item part of the batch on every shard (item rows, counts,
        popularity, the stats copies), then the user part on every shard (user rows, interactions), each
        a script fenced on its own offsets hash. A crash in between is completed by the replay (shards and
        parts that took the batch answer duplicate); because no interaction is written before every item
        count is, the replay finds the same pairs new and counts stay exact. The first outcome other than
        applied or duplicate is returned at once (the caller retries, or re-reads and recomputes)."""
        if len(self.shards) == 1:
            counts = (update.items, np.asarray(update.item_count_delta))
            read = self._cached_reads.get(0)
            return self._apply_users(0, update, "all", counts, finishing=False, read=read)
        applied = begun = False
        item_parts, user_parts, counts_by_shard = shard_parts(update, len(self.shards), self._model.k)
        reads = self._part_reads(update, user_parts)
        no_counts: Counts = ([], np.zeros(0, dtype=np.int64))
        steps = [(s, part, "items", no_counts) for s, part in enumerate(item_parts)]
        steps += [(s, part, "users", counts_by_shard[s]) for s, part in enumerate(user_parts)]
        for s, part, which, shard_counts in steps:
            # Once one part is in (applied now or before), the batch is begun: its other parts pass a
            # refresh's pause, which waits for them (pause_writes), so no batch stays half applied.
            if which == "items":
                outcome = self._apply_shard(s, part, which, shard_counts, finishing=begun)
            else:
                outcome = self._apply_users(s, part, which, shard_counts, finishing=begun, read=reads[s])
            if outcome is ApplyOutcome.APPLIED:
                applied = True
            elif outcome is not ApplyOutcome.DUPLICATE:
                return outcome
            begun = True
        return ApplyOutcome.APPLIED if applied else ApplyOutcome.DUPLICATE

    def _part_reads(self, update: BatchUpdate, user_parts: list[BatchUpdate]) -> list[_CachedRead | None]:
        """Per shard, how the last read's part of this batch used the copy, if the update is of the very
        batch read; the user parts then list the users as read (the same names, split the same way)."""
        batch = self._batch_read
        reads: list[_CachedRead | None] = [None] * len(self.shards)
        if batch is None or batch[0] is not update.users or batch[1] is not update.items:
            return reads
        if batch[2] != len(update.pair_users):
            return reads
        for s, read in self._cached_reads.items():
            reads[s] = read
            user_parts[s] = replace(user_parts[s], users=read.users)
        return reads

    def _apply_users(
        self,
        s: int,
        update: BatchUpdate,
        part: str,
        counts: Counts,
        finishing: bool,
        read: _CachedRead | None,
    ) -> ApplyOutcome:
        """A write of users on shard `s` (`part` 'all': the whole batch on one shard; 'users': the batch's
        user part), under a stamp of this writer's: its copy of the shard's users follows what it wrote,
        or is dropped on any other outcome (nothing written, or not known whether it was). On a model of
        several shards, a batch refused here (another writer wrote the shard's users since the read) has
        its item parts in already; its recomputation finds them applied, as after a crash between parts."""
        if not self.user_caches:
            return self._apply_shard(s, update, part, counts, finishing=finishing)
        cache = self.user_caches[s]
        if read is not None and read.version != update.version:
            read = None  # not computed from the last read
        stamp = cache.next_stamp()
        expected, strict = (read.stamp, read.strict) if read is not None else ("", False)
        outcome = None
        try:
            outcome = self._apply_shard(
                s, update, part, counts, finishing=finishing, stamp=(expected, stamp, strict), read=read
            )
        finally:
            if outcome is ApplyOutcome.APPLIED and (read is None or read.ids is None):
                cache.applied_without(update.version, stamp)
            elif outcome is ApplyOutcome.APPLIED and read is not None:
                self._record(cache, update, read, stamp)
            elif outcome is not ApplyOutcome.PAUSED:  # paused: nothing written, the same update comes again
                cache.clear(update.version)
                self._cached_reads.pop(s, None)
        return outcome

    def _record(self, cache: UserCache, update: BatchUpdate, read: _CachedRead, stamp: str) -> None:
        """`update`, computed from `read`, as applied under `stamp` into the copy of its shard's users."""
        cache.record(
            update.version,
            stamp,
            read.ids,
            update.users,
            _user_rows(update, self._model.k),
            read.whole,
            update.pair_users,
            update.pair_items,
            np.asarray(update.pair_values, dtype=np.float64),
            additive=self._model.mode == "implicit",
        )

    def begin_apply(
        self, update: BatchUpdate, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> PendingApply | None:
        """Send `update`'s apply, and ahead of it down the same connection the read of the next batch's
        (`users`, `items`, `pairs`) state, and return with that state as the apply will leave it, without
        waiting for the apply: the caller computes the next batch while Redis runs it. None when this
        store cannot (only a lone writer's apply of its sums as sent, on one shard, can): apply as usual.

        Redis runs the read before the apply, so it sees the state before it; what the apply writes (the
        batch's users and interactions, through the copy of users; its item rows and counts, the Gramians
        and the global sums, from the update) is taken from the update, exactly as the apply script
        stores it. The state holds only if the apply answers 'applied' (`finish_apply`); on anything else
        the copy is dropped and the next batch is read again from Redis."""
        if len(self.shards) != 1 or not self.user_caches or isinstance(self._client, RedisCluster):
            return None
        read = self._cached_reads.get(0)
        if read is None or not read.strict or read.ids is None or read.version != update.version:
            return None
        if read.users is not update.users or len(read.state.pair_values) != len(update.pair_users):
            return None  # not the very batch read (some events were left out)
        cache, implicit = self.user_caches[0], self._model.mode == "implicit"
        counts = (update.items, np.asarray(update.item_count_delta))
        stamp = cache.next_stamp()
        command = self._apply_command(0, update, "all", counts, False, (read.stamp, stamp, True), read)
        if not command.as_sent or command.item_counts is None:
            return None
        if implicit and not (command.item_gramian and command.user_gramian):
            return None
        # From here the copy holds the batch as applied; anything but 'applied' drops it.
        self._record(cache, update, read, stamp)
        connection = None
        try:
            ahead = self._ahead_read(update, users, items, pairs)
            connection = self._client.connection_pool.get_connection()
            calls = [("EVALSHA", self._apply_script.sha, len(command.keys), *command.keys, *command.args)]
            if ahead is not None:
                read_keys, read_args = ahead.command
                calls.insert(0, ("EVALSHA", self._read_script.sha, len(read_keys), *read_keys, *read_args))
            connection.send_packed_command(_packed(calls))
            reply = None
            if ahead is not None:
                try:
                    reply = connection.read_response()
                except redis.ResponseError:  # e.g. the scripts are not loaded (a restarted Redis): read later
                    reply = None
        except BaseException:
            if connection is not None:
                connection.disconnect()  # a reply may be left unread on it
                self._client.connection_pool.release(connection)
            self._drop_copy(update.version, read.stamp)
            raise
        next_state = None
        if ahead is not None and reply is not None:
            try:
                next_state = self._ahead_state(update, read, command, stamp, ahead, reply)
            except (StoreError, ValueError) as exc:  # the apply is out: the next batch's own read says so
                log.debug("the next batch's state could not be taken ahead: %s", exc)
                self._cached_reads.pop(0, None)
        return PendingApply(self, connection, command, update.version, read.stamp, next_state)

    def finish_apply(self, pending: PendingApply) -> ApplyOutcome:
        """The answer of an apply `begin_apply` sent. Anything but 'applied' drops the copy of users (and
        the next batch's state given with it)."""
        outcome = None
        connection = pending.connection
        try:
            try:
                try:
                    reply = connection.read_response()
                except redis.exceptions.NoScriptError:  # nothing ran: send it the usual way (loads it)
                    reply = self._apply_script(keys=pending.command.keys, args=pending.command.args)
            except redis.ResponseError as exc:
                raise store_error_from(exc) or exc from None
            outcome = ApplyOutcome(reply.decode())
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self._client.connection_pool.release(connection)
            if outcome is not ApplyOutcome.APPLIED:
                self._drop_copy(pending.version, pending.stamp_before)
        return outcome

    def _drop_copy(self, version: int, stamp: str) -> None:
        """Forget the copy recorded ahead of an apply that did not answer 'applied' (nothing of it was
        written: the stamp the model bears is still `stamp`, the one before it)."""
        self.user_caches[0].clear(version)
        self.user_caches[0].stamp = stamp
        self._cached_reads.pop(0, None)

    def _ahead_read(
        self,
        update: BatchUpdate,
        users: list[str],
        items: list[str],
        pairs: list[tuple[str, str]],
    ) -> _AheadRead | None:
        """What of the next batch Redis must be asked for (users the copy does not hold, their pairs, items
        the apply does not write); None if a user the apply writes is not in the copy (a user with more
        interactions than are read whole): the read before the apply would miss what it writes."""
        cache = self.user_caches[0]
        ids = cache.ids_of(users, pairs)
        hits, pair_hits = cache.held(ids), cache.pairs_held(ids)
        unheld = list(itertools.compress(users, ~hits))
        if not set(unheld).isdisjoint(update.users):
            return None
        written = dict(zip(update.items, range(len(update.items)), strict=True))
        at = np.array([written.get(item, -1) for item in items], dtype=np.int64)
        read_items = list(itertools.compress(items, at < 0))
        read_pairs = list(itertools.compress(pairs, ~pair_hits))
        read_command = self._read_command(
            0, update.version, unheld, read_items, read_pairs, read_items, cache.whole_limit
        )
        return _AheadRead(
            users, items, ids, hits, pair_hits, unheld, read_items, read_pairs, at, read_command
        )

    def _ahead_state(
        self,
        update: BatchUpdate,
        read: _CachedRead,
        command: _ApplyCommand,
        stamp: str,
        ahead: _AheadRead,
        reply: Any,
    ) -> BatchState | None:
        """The next batch's state once the apply is in: the read's part, the copy's users, and the rows,
        counts, Gramians and sums the apply writes. None if the read found another writer's stamp (the
        apply is then refused too) or a moved version."""
        version, k = update.version, self._model.k
        part = self._read_reply(0, version, reply, ahead.users, ahead.items, ahead.pairs, ahead.items)
        if part is None or self._last_read[0].writer != read.stamp:
            return None
        whole = self._last_read[0].whole
        written, at = ahead.item_at >= 0, ahead.item_at
        n_items = len(at)
        rows = np.zeros((n_items, k + 1), dtype=ROW_DTYPE)
        rows[written] = np.frombuffer(command.item_rows, dtype=ROW_DTYPE).reshape(-1, k + 1)[at[written]]
        rows[~written, :k], rows[~written, k] = part.item_rows, part.item_bias
        present = np.ones(n_items, dtype=bool)
        present[~written] = part.item_present
        item_counts = np.zeros(n_items, dtype=np.int64)
        assert command.item_counts is not None
        item_counts[written], item_counts[~written] = command.item_counts[at[written]], part.item_counts
        implicit = self._model.mode == "implicit"
        state = replace(
            part,
            item_rows=rows[:, :k].astype(part.item_rows.dtype),
            item_bias=rows[:, k].astype(part.item_bias.dtype),
            item_present=present,
            item_counts=item_counts,
            value_sum=read.state.value_sum + float(update.value_sum_delta),
            value_count=read.state.value_count + int(update.value_count_delta),
            item_gramian=decode_gramian(command.item_gramian, k, "item Gramian") if implicit else None,
            user_gramian=decode_gramian(command.user_gramian, k, "user Gramian") if implicit else None,
        )
        cache = self.user_caches[0]
        state = _with_cached_users(state, cache, ahead.ids, ahead.hits, ahead.pair_hits)
        self._last_read[0] = _LastRead(
            version=version,
            item_index={item: r for r, item in enumerate(ahead.all_items)},
            item_rows=rows,
            item_present=present,
            item_gramian=command.item_gramian if implicit else b"",
            user_gramian=command.user_gramian if implicit else b"",
            writer=stamp,
            whole=whole,
        )
        self._cached_reads[0] = _CachedRead(
            version, stamp, True, whole, ahead.ids, ahead.all_users, ahead.all_items, state
        )
        cache.found_valid()
        return state

    def _apply_shard(
        self,
        s: int,
        update: BatchUpdate,
        part: str,
        counts: Counts,
        finishing: bool,
        stamp: tuple[str, str, bool] = ("", "", False),
        read: _CachedRead | None = None,
    ) -> ApplyOutcome:
        """One script: `part` 'all' (the whole batch, one shard), or the batch's 'items' or 'users' part
        on shard `s`, fenced on `item_offsets` or `offsets`; `counts`: (items, increments) of the shard's
        item counts; `finishing`: the batch is begun on other shards (the part passes a pause)."""
        command = self._apply_command(s, update, part, counts, finishing, stamp, read)
        try:
            outcome = self._apply_script(keys=command.keys, args=command.args)
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None
        return ApplyOutcome(outcome.decode())

    def _apply_command(
        self,
        s: int,
        update: BatchUpdate,
        part: str,
        counts: Counts,
        finishing: bool,
        stamp: tuple[str, str, bool],
        read: _CachedRead | None,
    ) -> _ApplyCommand:
        """`_apply_shard`'s script KEYS and ARGV, and what it writes when it takes the writer's sums."""
        keys, k = self.shards[s], self._model.k
        implicit = self._model.mode == "implicit"
        pair_users = list(dict.fromkeys(update.pair_users))
        inter_index = _tail_positions(scripts.APPLY, pair_users)

        last = self._last_read.get(s)
        last = last if last is not None and last.version == update.version else None

        def gramian_delta(delta: np.ndarray | None) -> bytes:
            # Explicit models keep no Gramians: a delta is ignored, as in the in-memory twin.
            if not implicit or delta is None:
                return b""
            return np.asarray(delta, dtype=GRAMIAN_DTYPE).reshape(k, k).tobytes()

        def gramian_sum(delta: bytes, read: bytes) -> bytes:
            if not delta or len(read) != len(delta):
                return b""
            total = np.frombuffer(read, dtype=GRAMIAN_DTYPE) + np.frombuffer(delta, dtype=GRAMIAN_DTYPE)
            return total.tobytes()

        n_users, n_items = len(update.users), len(update.items)
        user_rows = _user_rows(update, k)
        item_deltas = np.column_stack(
            [
                np.asarray(update.item_delta, dtype=np.float64).reshape(n_items, k),
                np.asarray(update.item_bias_delta, dtype=np.float64).reshape(n_items),
            ]
        )
        item_gramian_delta = gramian_delta(update.item_gramian_delta)
        user_gramian_delta = gramian_delta(update.user_gramian_delta)
        item_base = np.asarray(update.item_base).reshape(n_items, k).astype(ROW_DTYPE)
        expected_mask, expected_rows, new_rows = _item_sums(
            last, update.items, item_base, item_deltas, float(update.max_abs_factor)
        )
        joined_items = join_ids(update.items)
        # One shard, users from this writer's copy under its own stamp (strict): nothing was written since
        # the read, so the stored item rows are the rows read and the sums are final. The script takes them
        # without the rows read, the deltas and the base rows (and refuses if the stamp moved).
        as_sent = part == "all" and stamp[2] and stamp[0] != "" and n_items > 0 and b"?" not in expected_mask
        gram_before = gram_after = b""
        if as_sent:
            item_base_bytes = item_delta_bytes = expected_mask = expected_rows = b""
        else:
            item_base_bytes = item_base.tobytes()
            item_delta_bytes = item_deltas.astype(GRAMIAN_DTYPE).tobytes()
            # The rows the writer's item Gramian change counts, before and after: the script corrects the
            # Gramian for items another writer moved (see `gramian_correction`).
            if implicit and update.item_gramian_delta is not None and update.item_rows_before is not None:
                gram_before = (
                    np.asarray(update.item_rows_before, dtype=ROW_DTYPE).reshape(n_items, k).tobytes()
                )
                gram_after = item_rows_after(update).astype(ROW_DTYPE).tobytes()
        key_index = np.array([inter_index[u] for u in update.pair_users], dtype=np.int64)
        stored = _read_pair_values(read, update)
        pair_tail, group_keys, group_sizes = _pair_writes(update, key_index, stored, implicit)
        read_counts = _read_counts(read, counts)
        args = scripts.APPLY.arg_list(
            [*pair_tail, *_offset_triples(update.offsets)],
            incarnation=self.incarnation,
            finishing=int(finishing),
            version=update.version,
            k=k,
            additive=int(implicit),
            n_users=n_users,
            n_items=n_items,
            n_pairs=len(update.pair_users),
            value_sum_delta=repr(float(update.value_sum_delta)),
            value_count_delta=int(update.value_count_delta),
            events_applied=int(update.events_applied),
            users=join_ids(update.users),
            user_rows=user_rows.tobytes(),
            items=joined_items,
            item_base=item_base_bytes,
            item_deltas=item_delta_bytes,
            item_expected_mask=expected_mask,
            item_expected_rows=expected_rows,
            item_new_rows=new_rows,
            items_as_sent=int(as_sent),
            n_count_items=len(counts[0]),
            count_items=joined_items if counts[0] is update.items else join_ids(counts[0]),
            count_deltas=np.asarray(counts[1]).astype("<i8").tobytes(),
            pair_items=join_ids(update.pair_items),
            pair_inter_keys=key_index.astype("<u4").tobytes(),
            pair_values=np.asarray(update.pair_values, dtype="<f8").tobytes(),
            item_gramian_delta=item_gramian_delta,
            user_gramian_delta=user_gramian_delta,
            item_gramian_expected=last.item_gramian if last else b"",
            item_gramian_sum=gramian_sum(item_gramian_delta, last.item_gramian) if last else b"",
            user_gramian_expected=last.user_gramian if last else b"",
            user_gramian_sum=gramian_sum(user_gramian_delta, last.user_gramian) if last else b"",
            max_abs_factor=repr(min(float(update.max_abs_factor), 1e308)),  # Lua's tonumber reads no 'inf'
            item_popularity=b""
            if update.item_popularity is None
            else np.asarray(update.item_popularity, dtype="<f8").reshape(n_items).tobytes(),
            popularity_half_life=repr(
                0.0 if math.isinf(update.popularity_half_life) else update.popularity_half_life
            ),
            item_gram_before=gram_before,
            item_gram_after=gram_after,
            # (stamp the read found, this apply's stamp, refuse if the stamp changed): see `UserCache`.
            stamp_expected=stamp[0],
            stamp_new=stamp[1],
            stamp_strict=int(stamp[2]),
            # The counts and the interactions to store, for when nothing was written since the read.
            count_texts=b""
            if read_counts is None
            else join_ids([str(c) for c in (read_counts + np.asarray(counts[1], dtype=np.int64)).tolist()]),
            n_pair_args=len(pair_tail),
            pair_group_keys=group_keys,
            pair_group_sizes=group_sizes,
        )
        script_keys = scripts.APPLY.key_list(
            keys.inter_keys(pair_users),
            current=keys.current,
            offsets=keys.item_offsets if part == "items" else keys.offsets,
            meta=keys.version_meta(update.version),
            users=keys.rows(update.version, "users"),
            items=keys.rows(update.version, "items"),
            item_counts=keys.item_counts,
            stats=keys.stats,
            gram_items=keys.gramian(update.version, "items"),
            gram_users=keys.gramian(update.version, "users"),
            changed_users=keys.changed(update.version, "users"),
            changed_items=keys.changed(update.version, "items"),
            popularity=keys.popularity,
        )
        return _ApplyCommand(
            script_keys,
            args,
            as_sent,
            new_rows,
            None if read_counts is None else read_counts + np.asarray(counts[1], dtype=np.int64),
            gramian_sum(item_gramian_delta, last.item_gramian) if last else b"",
            gramian_sum(user_gramian_delta, last.user_gramian) if last else b"",
        )

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        """One shard: one script. Several: the stats copies of the other shards first, each fenced on its
        own offsets, then the user's shard (rows, interactions, the item counts of the user's pairs, which
        that shard holds), which deletes the interactions last: a crash in between leaves them there for
        the replay, which the shards already done answer as a duplicate."""
        home = shard_of(user, len(self.shards))
        for _ in range(_SNAPSHOT_ATTEMPTS):
            version = self.current_version()
            if len(self.shards) > 1:
                for s in range(len(self.shards)):
                    self._roll_forward(s, version)
                outcome = self._forget_elsewhere(user, home, version, offsets or {})
                if outcome is not ApplyOutcome.APPLIED:
                    if outcome is ApplyOutcome.STALE_VERSION:
                        continue
                    return outcome
            outcome = self._forget_home(home, user, offsets or {})
            if outcome in (ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE) and len(self.shards) > 1:
                # A forget has no item part: the item part's offsets move past it, so a resume does not
                # start before it again.
                for shard in self.shards:
                    self._advance_offsets_script(
                        keys=scripts.ADVANCE_OFFSETS.key_list(offsets=shard.item_offsets, stats=shard.stats),
                        args=scripts.ADVANCE_OFFSETS.arg_list(
                            _offset_triples(offsets or {}), incarnation=self.incarnation
                        ),
                    )
            if outcome is not ApplyOutcome.STALE_VERSION:
                return outcome
        raise StoreError(
            f"{self.keys.current} moved on each of {_SNAPSHOT_ATTEMPTS} attempts to forget a user"
        )

    def _forget_elsewhere(
        self, user: str, home: int, version: int, offsets: dict[int, tuple[int, int]]
    ) -> ApplyOutcome:
        """The forget's part on every shard but the user's: their copy of the stats."""
        inter_key = self.shards[home].inter(user)
        interactions = self._client.hgetall(inter_key)  # in the order the home shard's script sums them
        value_sum = 0.0
        for item, raw in interactions.items():
            value_sum += parse_float(raw, inter_key, f"field {item!r}")
        for s, shard in enumerate(self.shards):
            if s == home:
                continue
            try:
                reply = self._forget_stats_script(
                    keys=scripts.FORGET_STATS.key_list(
                        current=shard.current,
                        meta=shard.version_meta(version),
                        offsets=shard.offsets,
                        stats=shard.stats,
                    ),
                    args=scripts.FORGET_STATS.arg_list(
                        _offset_triples(offsets),
                        incarnation=self.incarnation,
                        version=version,
                        implicit=int(self._model.mode == "implicit"),
                        value_sum=repr(value_sum),
                        value_count=len(interactions),
                    ),
                )
            except redis.ResponseError as exc:
                raise store_error_from(exc) or exc from None
            outcome = ApplyOutcome(reply.decode())
            if outcome not in (ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE):
                return outcome
        return ApplyOutcome.APPLIED

    def _forget_home(self, s: int, user: str, offsets: dict[int, tuple[int, int]]) -> ApplyOutcome:
        keys = self.shards[s]
        versions = self._versions_with_rows(s)
        per_version = [
            key
            for version in versions
            for key in (
                keys.version_meta(version),
                keys.rows(version, "users"),
                keys.gramian(version, "users"),
                keys.changed(version, "users"),
            )
        ]
        script_keys = scripts.FORGET_USER.key_list(
            per_version,
            current=keys.current,
            offsets=keys.offsets,
            inter=keys.inter(user),
            item_counts=keys.item_counts,
            stats=keys.stats,
        )
        args = scripts.FORGET_USER.arg_list(
            [*versions, *_offset_triples(offsets)],
            incarnation=self.incarnation,
            user=user,
            k=self._model.k,
            implicit=int(self._model.mode == "implicit"),
            n_versions=len(versions),
        )
        try:
            return ApplyOutcome(self._forget_script(keys=script_keys, args=args).decode())
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None

    def _versions_with_rows(self, s: int) -> list[int]:
        """Every version that may still hold rows on shard `s`: the live one, those being built after it,
        and those retired but not yet collected (readers may still use them)."""
        shard = self.shards[s]
        current = parse_int(self._client.get(shard.current), shard.current, "value", default=-1)
        if current < 1:
            raise StoreLostStateError(f"{shard.current} is missing or not a version number")
        last = parse_int(self._client.get(self.keys.next_version), self.keys.next_version, "value", current)
        retired = set(self._version_numbers(shard, self._client.zrange(shard.retired, 0, -1)))
        return sorted(retired | set(range(current, max(current, last) + 1)))

    def check_eviction_policy(self, allow_eviction: bool) -> str:
        """`StoreUnsafeError` if the server may evict our keys (see `require_no_eviction`)."""
        return require_no_eviction(self._client, allow_eviction)

    def _version_numbers(self, shard: ModelKeys, members: object) -> list[int]:
        """Members of a `retired` sorted set (a plain ZRANGE reply: bytes) as version numbers."""
        return [parse_int(m, shard.retired, "member") for m in cast(list[bytes], members)]

    def _shard_offsets(self) -> list[dict[int, int]]:
        """The offsets each fenced part holds: per shard, its user part's and (several shards) item part's."""
        hashes = [shard.offsets for shard in self.shards]
        if len(self.shards) > 1:
            hashes += [shard.item_offsets for shard in self.shards]
        return [
            {
                parse_int(p, key, "field"): parse_int(o, key, f"field {p!r}")
                for p, o in self._client.hgetall(key).items()
            }
            for key in hashes
        ]

    def applied_offsets(self) -> dict[int, int]:
        """Partition -> next offset to consume: the smallest any shard holds. A partition that some part
        of some shard has no offset for, though others have, resumes from 0 (Kafka moves a position
        below the log start to the earliest offset): that part has taken none of its events yet (a
        first batch torn by a crash, or still being applied by the partition's previous owner)."""
        per_shard = self._shard_offsets()
        partitions = set().union(*(set(offsets) for offsets in per_shard))
        return {
            p: min(offsets[p] for offsets in per_shard) if all(p in offsets for offsets in per_shard) else 0
            for p in sorted(partitions)
        }

    def offsets_ahead(self) -> dict[int, int]:
        """Partition -> the largest next offset a shard holds, where the shards disagree (a crash fell
        between the shard writes of a batch): the first batch consumed from `applied_offsets` must end
        there, so each shard either takes the whole of it or has it already."""
        per_shard = self._shard_offsets()
        partitions = set().union(*(set(offsets) for offsets in per_shard))
        ahead = {}
        for p in sorted(partitions):
            held = [offsets.get(p) for offsets in per_shard]
            furthest = max(h for h in held if h is not None)
            if any(h != furthest for h in held):
                ahead[p] = furthest
        return ahead

    def popular_items(self, n: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        return read_popular_items(self._client, self.shards, n, exclude)

    def events_applied(self) -> int:
        """Events applied (every shard counts every batch; the first shard's count is the model's)."""
        stats = self.shards[0].stats
        return parse_int(self._client.hget(stats, "events_applied"), stats, "field 'events_applied'")

    # ------------------------------------------------------------------------ refresh support

    def read_all_rows(self, side: Side) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, (n, k) factors, (n,) biases) of every row of one side of the live version."""
        k = self._model.k
        for _ in range(_SNAPSHOT_ATTEMPTS):
            version = self.current_version()
            ids: list[str] = []
            blocks: list[np.ndarray] = []
            for shard in self.shards:
                scanned = scan_version_rows(self._scan_rows_script, shard, version, side, k)
                if scanned is None:
                    break
                ids += scanned[0]
                blocks.append(scanned[1])
            else:
                rows = np.concatenate(blocks) if blocks else np.zeros((0, k + 1), dtype=np.float32)
                return ids, rows[:, :k].copy(), rows[:, k].copy()
        raise StoreError(f"{self.keys.current}: each version it named was deleted while being read")

    def global_mean(self) -> float:
        """Mean of all event values applied (explicit mode's μ); 0 before any event."""
        stats = self.shards[0].stats
        value_sum, value_count = self._client.hmget(stats, ["value_sum", "value_count"])
        count = parse_int(value_count, stats, "field 'value_count'")
        return parse_float(value_sum, stats, "field 'value_sum'") / count if count else 0.0

    def iter_interactions(self, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """SCAN the interaction hashes, shard by shard: chunks of about `batch` users. Not a snapshot
        (events keep coming); a user is never split across chunks."""
        for shard in self.shards:
            prefix = shard.inter_prefix.encode()
            pending: list[bytes] = []
            for key in scan_keys(self._client, shard.inter_prefix, count=batch):
                pending.append(key)
                if len(pending) >= batch:
                    yield self._read_interactions(pending, prefix)
                    pending = []
            if pending:
                yield self._read_interactions(pending, prefix)

    def _read_interactions(
        self, inter_keys: list[bytes], prefix: bytes
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pipe = self._client.pipeline(transaction=False)
        for key in inter_keys:
            pipe.hgetall(key)
        users: list[str] = []
        items: list[str] = []
        values: list[float] = []
        for key, fields in zip(inter_keys, pipe.execute(), strict=True):
            user = key[len(prefix) :].decode()
            for item, raw in fields.items():
                users.append(user)
                items.append(item.decode())
                values.append(parse_float(raw, key.decode(), f"field {item!r}"))
        return (
            np.array(users, dtype=object),
            np.array(items, dtype=object),
            np.array(values, dtype=np.float64),
        )

    def begin_version(self, source: str = "wals") -> int:
        """A new version number (never reused), in state 'building' on every shard, with zero Gramians if
        implicit."""
        version = self._new_version_number()
        server_time = self._client.time()
        now = f"{server_time[0]}.{server_time[1]:06d}"
        for shard in self.shards:
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(
                shard.version_meta(version),
                mapping={"created_at": now, "source": source, "state": "building"},
            )
            if self._model.mode == "implicit":
                zero = np.zeros((self._model.k, self._model.k), dtype=GRAMIAN_DTYPE).tobytes()
                for side in SIDES:
                    pipe.set(shard.gramian(version, side), zero)
            pipe.execute()
        return version

    def _new_version_number(self) -> int:
        """`INCR next_version`. A counter at or below a version the model holds (the key was lost: deleted,
        evicted) would mark that version 'building' and let a refresh overwrite it: it is raised past the
        live and retired versions first, and past any other whose meta exists."""
        counter = self.keys.next_version
        version = int(self._client.incr(counter))
        shard = self.shards[0]
        retired = self._version_numbers(shard, self._client.zrange(shard.retired, 0, -1))
        known = max([self.current_version(), *retired])
        if version > known and not self._client.exists(shard.version_meta(version)):
            return version
        log.warning(
            "%s handed out version %d, but the model holds version %d: the counter was lost; raising it",
            counter,
            version,
            known,
        )
        self._client.set(counter, known)
        while self._client.exists(shard.version_meta(version := int(self._client.incr(counter)))):
            pass
        return version

    def _by_shard(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Positions of `ids` held by each shard."""
        if len(self.shards) == 1:
            return [np.arange(len(ids))]
        held = shard_indices(ids, len(self.shards))
        return [np.flatnonzero(held == s) for s in range(len(self.shards))]

    def write_rows(
        self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray, biases: np.ndarray | None = None
    ) -> None:
        """Rows (n, k) and biases (n,) (zeros when None) into a version being built, in chunked pipelines."""
        k = self._model.k
        n = len(ids)
        bias = np.zeros(n) if biases is None else np.asarray(biases).reshape(n)
        blobs = np.column_stack([np.asarray(rows).reshape(n, k), bias]).astype(ROW_DTYPE)
        for shard, at in zip(self.shards, self._by_shard(ids), strict=True):
            script_keys = scripts.WRITE_ROWS.key_list(
                meta=shard.version_meta(version), rows=shard.rows(version, side)
            )
            # Pipelined on one Redis; redis-py's cluster pipeline refuses scripts, so one call at a time.
            pipe = (
                None if isinstance(self._client, RedisCluster) else self._client.pipeline(transaction=False)
            )
            written = []
            for start in range(0, len(at), _WRITE_CHUNK_ROWS):
                chunk = at[start : start + _WRITE_CHUNK_ROWS]
                args = scripts.WRITE_ROWS.arg_list(
                    n=len(chunk),
                    ids=join_ids([ids[i] for i in chunk]),
                    rows=blobs[chunk].tobytes(),
                    row_bytes=blobs.shape[1] * 4,
                )
                written.append(self._write_rows_script(keys=script_keys, args=args, client=pipe))
            self._check_written(version, written if pipe is None else pipe.execute())

    def delete_rows(self, version: int, side: Side, ids: Sequence[str]) -> None:
        """Remove rows from a version being built (users forgotten while a refresh ran)."""
        for shard, at in zip(self.shards, self._by_shard(ids), strict=True):
            if not len(at):
                continue
            written = self._delete_rows_script(
                keys=scripts.DELETE_ROWS.key_list(
                    meta=shard.version_meta(version), rows=shard.rows(version, side)
                ),
                args=scripts.DELETE_ROWS.arg_list(n=len(at), ids=join_ids([ids[i] for i in at])),
            )
            self._check_written(version, [written])

    def write_gramian(self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray) -> None:
        """The Gramian of `rows` (every row of the side, (n, k)), as each shard's partial sum over its own."""
        if self._model.mode != "implicit":
            raise ValueError("explicit models keep no Gramians")
        k = self._model.k
        wide = np.asarray(rows, dtype=np.float64).reshape(len(ids), k)
        for shard, at in zip(self.shards, self._by_shard(ids), strict=True):
            part = wide if len(self.shards) == 1 else wide[at]
            written = self._write_string_script(
                keys=scripts.WRITE_STRING.key_list(
                    meta=shard.version_meta(version), target=shard.gramian(version, side)
                ),
                args=scripts.WRITE_STRING.arg_list(value=(part.T @ part).astype(GRAMIAN_DTYPE).tobytes()),
            )
            self._check_written(version, [written])

    def _check_written(self, version: int, results: list[int]) -> None:
        if not all(results):
            raise StoreError(f"{self.keys.version_meta(version)}: version {version} is not being built")

    def publish(self, version: int, expected_current: int) -> bool:
        """Make `version` current iff `current` is still `expected_current` and `version` is newer and being
        built. The old version (and abandoned builds below `version`) are retired, not yet deleted.

        Several shards: every shard is checked (being built, its pause not run out), then the control
        `current` switches, which is the moment readers see the new version, then each shard's."""
        if len(self.shards) == 1:
            return self._publish_shard(0, version, expected_current, "flip")
        if not all(
            self._publish_shard(s, version, expected_current, "check") for s in range(len(self.shards))
        ):
            return False
        switched = self._switch_script(
            keys=scripts.SWITCH.key_list(current=self.keys.current),
            args=scripts.SWITCH.arg_list(version=version, expected=expected_current),
        )
        if not switched:
            return False
        for s in range(len(self.shards)):
            self._publish_shard(s, version, expected_current, "force")
        return True

    def _publish_shard(self, s: int, version: int, expected: int, mode: str) -> bool:
        shard = self.shards[s]
        return bool(
            self._publish_script(
                keys=scripts.PUBLISH.key_list(
                    [shard.version_meta(v) for v in range(expected, version)],
                    current=shard.current,
                    retired=shard.retired,
                    new_meta=shard.version_meta(version),
                ),
                args=scripts.PUBLISH.arg_list(version=version, expected=expected, mode=mode),
            )
        )

    def hold_refresh_lease(self, owner: str, ttl_s: float) -> bool:
        """Take or extend the lease that lets one replica run the periodic refresh (True if held)."""
        return hold_lease(self._client, self.keys.refresh_lease, owner, ttl_s)

    def release_refresh_lease(self, owner: str) -> bool:
        """Give the lease up if `owner` holds it (True if it did)."""
        return release_lease(self._client, self.keys.refresh_lease, owner)

    def refresh_lease_holder(self) -> str | None:
        holder = self._client.get(self.keys.refresh_lease)
        return None if holder is None else text(holder)

    def discard_version(self, version: int) -> bool:
        """Give up a version being built (e.g. its publish was refused); `collect_garbage` deletes it.
        Not once the control `current` names it (several shards: a publish that switched readers and then
        failed on a shard is finished by rolling that shard forward, never undone)."""
        if len(self.shards) > 1 and self.current_version() >= version:
            return False
        discarded = [
            bool(
                self._discard_script(
                    keys=scripts.DISCARD.key_list(meta=shard.version_meta(version), retired=shard.retired),
                    args=scripts.DISCARD.arg_list(version=version),
                )
            )
            for shard in self.shards
        ]
        return any(discarded)

    def track_changes(self, version: int) -> bool:
        """From now on, updates applied to `version` record their users and items (see `take_changes`)."""
        return self._handover(version, "tracking", 0.0)

    def stop_tracking(self, version: int) -> None:
        """Undo `track_changes`: the mark and what was recorded under it go."""
        for shard in self.shards:
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(shard.version_meta(version), "tracking")
            pipe.delete(*(shard.changed(version, side) for side in SIDES))
            pipe.execute()

    def take_changes(self, version: int) -> tuple[list[str], list[str]]:
        """The users and items updated in `version` since tracking began or the last take; forgets them."""
        users: set[str] = set()
        items: set[str] = set()
        for shard in self.shards:
            keys = [shard.changed(version, side) for side in SIDES]
            pipe = self._client.pipeline(transaction=True)
            for key in keys:
                pipe.smembers(key)
            pipe.delete(*keys)
            changed_users, changed_items, _ = pipe.execute()
            users.update(raw.decode() for raw in changed_users)
            items.update(raw.decode() for raw in changed_items)
        return sorted(users), sorted(items)

    def read_interactions(self, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The given users' interactions as they are now (one pipelined HGETALL per user and shard)."""
        parts = [
            self._read_interactions([shard.inter(users[i]).encode() for i in at], shard.inter_prefix.encode())
            for shard, at in zip(self.shards, self._by_shard(users), strict=True)
        ]
        return (
            np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]),
        )

    def pause_writes(self, version: int, ttl_s: float) -> bool:
        """Updates to `version` get PAUSED until `resume_writes`, a publish, or `ttl_s` (server clock).

        Several shards: a batch begun on some shard finishes its other parts through the pause, and this
        waits for every such batch (at most a tenth of `ttl_s`), so the changes taken next are whole.
        False, with writers resumed, if some shard is at another version or a batch stays half applied
        (its writer died: the partition's next owner completes it; the refresh publishes another time)."""
        if not self._handover(version, "paused_until", ttl_s):
            if len(self.shards) > 1:
                self.resume_writes(version)  # the shards that were marked
            return False
        if len(self.shards) == 1:
            return True
        deadline = time.monotonic() + ttl_s / 10
        while self._half_applied():
            if time.monotonic() > deadline:
                log.warning("a batch stays half applied across the shards: not handing over now")
                self.resume_writes(version)
                return False
            time.sleep(0.005)
        return True

    def _half_applied(self) -> bool:
        """Some batch has its item part further on some shard than its user part on some shard."""
        per_shard = self._shard_offsets()
        users, items = per_shard[: len(self.shards)], per_shard[len(self.shards) :]
        partitions = set().union(*(set(offsets) for offsets in items))
        return any(
            max(offsets.get(p, -1) for offsets in items) > min(offsets.get(p, -1) for offsets in users)
            for p in partitions
        )

    def resume_writes(self, version: int) -> None:
        for shard in self.shards:
            self._client.hdel(shard.version_meta(version), "paused_until")

    def _handover(self, version: int, mark: str, ttl_s: float) -> bool:
        """`mark` on every shard's meta of `version`; False if some shard's `current` is another one."""
        marked = [
            int(
                self._handover_script(
                    keys=scripts.HANDOVER.key_list(current=shard.current, meta=shard.version_meta(version)),
                    args=scripts.HANDOVER.arg_list(version=version, mark=mark, ttl_s=repr(ttl_s)),
                )
            )
            for shard in self.shards
        ]
        return all(marked)

    def collect_garbage(self, grace_s: float) -> list[int]:
        """UNLINK (memory freed off the main thread) every version retired more than `grace_s` seconds ago
        by the server's clock, so readers still holding its number get to finish. Returns those versions."""
        seconds, micros = self._client.time()
        cutoff = seconds + micros / 1e6 - grace_s
        collected: set[int] = set()
        for shard in self.shards:
            due = self._version_numbers(shard, self._client.zrangebyscore(shard.retired, "-inf", cutoff))
            for version in due:
                # One UNLINK per version removes its meta together with its rows: a reader that sees the
                # meta after reading rows knows the rows were whole.
                self._client.unlink(*shard.version_keys(version))
                self._client.zrem(shard.retired, version)
            collected.update(due)
        return sorted(collected)
