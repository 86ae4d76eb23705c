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
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis

from streammf.model.factors import Mode
from streammf.store import scripts
from streammf.store.contract import (
    ApplyOutcome,
    BatchState,
    BatchUpdate,
    ModelMeta,
    Side,
    StoreError,
    StoreLostStateError,
    StoreUnavailableError,
)
from streammf.store.layout import (
    GRAMIAN_DTYPE,
    ROW_DTYPE,
    SIDES,
    ModelKeys,
    StoredModel,
    decode_gramian,
    join_ids,
    parse_float,
    parse_int,
    read_current_version,
    read_model_meta,
    read_popular_items,
    require_binary_client,
    require_no_eviction,
    rows_from_blob,
    scan_version_rows,
    split_numbers,
    store_error_from,
    text,
)

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


class ModelMismatchError(ValueError):
    """The model exists with a different mode or number of factors than the caller asked for."""


def _tail_positions(script: scripts.LuaScript, ids: Sequence[str]) -> dict[str, int]:
    """id -> its KEYS position (1-based, as Lua indexes) in the tail after the script's fixed keys; the
    first position wins for an id listed twice."""
    positions: dict[str, int] = {}
    for offset, ident in enumerate(ids, start=len(script.keys) + 1):
        positions.setdefault(ident, offset)
    return positions


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
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError) as exc:
            raise StoreUnavailableError(f"Redis: {type(exc).__name__}: {exc}") from exc

    return call


@_translating_errors
class RedisStore:
    """`RefreshableStore` on Redis. Thread-safe as far as the redis client is (redis.Redis is)."""

    def __init__(self, client: redis.Redis, keys: ModelKeys, model: StoredModel) -> None:
        require_binary_client(client)
        self._client = client
        self.keys = keys
        self._model = model
        self._read_script = scripts.READ_STATE.register(client)
        self._apply_script = scripts.APPLY.register(client)
        self._forget_script = scripts.FORGET_USER.register(client)
        self._write_rows_script = scripts.WRITE_ROWS.register(client)
        self._delete_rows_script = scripts.DELETE_ROWS.register(client)
        self._write_string_script = scripts.WRITE_STRING.register(client)
        self._publish_script = scripts.PUBLISH.register(client)
        self._discard_script = scripts.DISCARD.register(client)
        self._handover_script = scripts.HANDOVER.register(client)
        self._lease_script = scripts.LEASE.register(client)
        self._release_lease_script = scripts.RELEASE_LEASE.register(client)
        self._scan_rows_script = scripts.SCAN_ROWS.register(client)
        self._last_read: _LastRead | None = None

    @classmethod
    def open(
        cls, client: redis.Redis, name: str, mode: Mode, k: int, hyper: dict[str, float] | None = None
    ) -> RedisStore:
        """Create the model (meta, version 1, current pointer) unless it exists; then check mode and k.

        The stored hyperparameters stay those of the creator: they document version 1, not the caller.
        """
        require_binary_client(client)
        keys = ModelKeys(name)
        zero_gramian = np.zeros((k, k), dtype=GRAMIAN_DTYPE).tobytes() if mode == "implicit" else b""
        scripts.OPEN.register(client)(
            keys=scripts.OPEN.key_list(
                meta=keys.meta,
                current=keys.current,
                next_version=keys.next_version,
                stats=keys.stats,
                v1_meta=keys.version_meta(1),
                v1_gram_items=keys.gramian(1, "items"),
                v1_gram_users=keys.gramian(1, "users"),
            ),
            args=scripts.OPEN.arg_list(
                mode=mode, k=k, hyper=json.dumps(hyper or {}, sort_keys=True), zero_gramian=zero_gramian
            ),
        )
        return cls.attach(client, name, (mode, k))

    @classmethod
    def attach(cls, client: redis.Redis, name: str, expect: tuple[Mode, int] | None = None) -> RedisStore:
        """An existing model (readers, the refresh); `StoreError` if there is none, `ModelMismatchError`
        if it is not of the `expect`ed (mode, k)."""
        keys = ModelKeys(name)
        store = cls(client, keys, read_model_meta(client, keys))
        if expect is not None and (store._model.mode, store._model.k) != expect:
            raise ModelMismatchError(
                f"model {name!r} exists with mode={store._model.mode} k={store._model.k}, "
                f"asked for mode={expect[0]} k={expect[1]}; pick another model name or delete it"
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
        """One atomic read (a Lua script) of the version `current` named just before; read again if it
        moved in between."""
        for _ in range(_SNAPSHOT_ATTEMPTS):
            version = self.current_version()
            state = self._read_snapshot(version, users, items, pairs)
            if state is not None:
                return state
        raise StoreError(f"{self.keys.current} moved on each of {_SNAPSHOT_ATTEMPTS} snapshot attempts")

    def _read_snapshot(
        self, version: int, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState | None:
        keys, k = self.keys, self._model.k
        implicit = self._model.mode == "implicit"
        # KEYS[NK + u] is the u-th batch user's inter hash (for HLEN), so batch users are listed as given.
        batch_users = set(users)
        inter_users = [*users, *dict.fromkeys(user for user, _ in pairs if user not in batch_users)]
        inter_index = _tail_positions(scripts.READ_STATE, inter_users)
        try:
            reply = self._read_script(
                keys=scripts.READ_STATE.key_list(
                    [keys.inter(user) for user in inter_users],
                    current=keys.current,
                    meta=keys.version_meta(version),
                    users=keys.rows(version, "users"),
                    items=keys.rows(version, "items"),
                    item_counts=keys.item_counts,
                    stats=keys.stats,
                    gram_items=keys.gramian(version, "items"),
                    gram_users=keys.gramian(version, "users"),
                ),
                args=scripts.READ_STATE.arg_list(
                    version=version,
                    implicit=int(implicit),
                    k=k,
                    n_users=len(users),
                    n_items=len(items),
                    n_pairs=len(pairs),
                    users=join_ids(users),
                    items=join_ids(items),
                    pair_items=join_ids([item for _, item in pairs]),
                    pair_inter_keys=np.array([inter_index[user] for user, _ in pairs], dtype="<u4").tobytes(),
                ),
            )
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None
        if reply == b"moved":
            return None
        if reply == b"no_meta":
            raise StoreLostStateError(
                f"{keys.version_meta(version)} is missing: {keys.current} names a version without meta"
            )
        (user_blob, user_mask, user_counts, item_blob, item_mask, item_counts, pair_values, value_sum,
         value_count, item_gramian, user_gramian) = reply  # fmt: skip
        user_rows, user_present = rows_from_blob(user_blob, user_mask, len(users), k)
        item_rows, item_present = rows_from_blob(item_blob, item_mask, len(items), k)
        self._last_read = _LastRead(
            version=version,
            item_index={item: r for r, item in enumerate(items)},
            item_rows=item_rows,
            item_present=item_present,
            item_gramian=item_gramian or b"",
            user_gramian=user_gramian or b"",
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
            user_counts=np.array(split_numbers(user_counts, len(users)), dtype=np.int64),
            item_rows=item_rows[:, :k].copy(),
            item_bias=item_rows[:, k].copy(),
            item_present=item_present,
            item_counts=np.array(split_numbers(item_counts, len(items)), dtype=np.int64),
            pair_values=np.array(
                [
                    parse_float(raw or None, keys.inter(user), f"field {item!r}", default=np.nan)
                    for (user, item), raw in zip(pairs, split_numbers(pair_values, len(pairs)), strict=True)
                ],
                dtype=np.float64,
            ),
            value_sum=parse_float(value_sum, keys.stats, "field 'value_sum'"),
            value_count=parse_int(value_count, keys.stats, "field 'value_count'"),
            item_gramian=gramians[0],
            user_gramian=gramians[1],
        )

    def apply(self, update: BatchUpdate) -> ApplyOutcome:
        keys, k = self.keys, self._model.k
        implicit = self._model.mode == "implicit"
        pair_users = list(dict.fromkeys(update.pair_users))
        inter_index = _tail_positions(scripts.APPLY, pair_users)

        last = self._last_read if self._last_read and self._last_read.version == update.version else None

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
        user_rows = np.column_stack(
            [np.asarray(update.user_rows).reshape(n_users, k), np.asarray(update.user_bias).reshape(n_users)]
        )
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
        args = scripts.APPLY.arg_list(
            _offset_triples(update.offsets),
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
            user_rows=user_rows.astype(ROW_DTYPE).tobytes(),
            items=join_ids(update.items),
            item_base=item_base.tobytes(),
            item_deltas=item_deltas.astype(GRAMIAN_DTYPE).tobytes(),
            item_expected_mask=expected_mask,
            item_expected_rows=expected_rows,
            item_new_rows=new_rows,
            item_count_deltas=np.asarray(update.item_count_delta).astype("<i8").tobytes(),
            pair_items=join_ids(update.pair_items),
            pair_inter_keys=np.array([inter_index[u] for u in update.pair_users], dtype="<u4").tobytes(),
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
        )
        script_keys = scripts.APPLY.key_list(
            [keys.inter(user) for user in pair_users],
            current=keys.current,
            offsets=keys.offsets,
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
        try:
            outcome = self._apply_script(keys=script_keys, args=args)
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None
        return ApplyOutcome(outcome.decode())

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        keys = self.keys
        for _ in range(_SNAPSHOT_ATTEMPTS):
            versions = self._versions_with_rows()
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
                [*versions, *_offset_triples(offsets or {})],
                user=user,
                k=self._model.k,
                implicit=int(self._model.mode == "implicit"),
                n_versions=len(versions),
            )
            try:
                outcome = ApplyOutcome(self._forget_script(keys=script_keys, args=args).decode())
            except redis.ResponseError as exc:
                raise store_error_from(exc) or exc from None
            if outcome is not ApplyOutcome.STALE_VERSION:
                return outcome
        raise StoreError(f"{keys.current} moved on each of {_SNAPSHOT_ATTEMPTS} attempts to forget a user")

    def _versions_with_rows(self) -> list[int]:
        """Every version that may still hold rows: the live one, those being built after it, and those
        retired but not yet collected (readers may still use them)."""
        current = self.current_version()
        last = parse_int(self._client.get(self.keys.next_version), self.keys.next_version, "value", current)
        retired = set(self._version_numbers(self._client.zrange(self.keys.retired, 0, -1)))
        return sorted(retired | set(range(current, max(current, last) + 1)))

    def check_eviction_policy(self, allow_eviction: bool) -> str:
        """`StoreUnsafeError` if the server may evict our keys (see `require_no_eviction`)."""
        return require_no_eviction(self._client, allow_eviction)

    def _version_numbers(self, members: object) -> list[int]:
        """Members of the `retired` sorted set (a plain ZRANGE reply: bytes) as version numbers."""
        return [parse_int(m, self.keys.retired, "member") for m in cast(list[bytes], members)]

    def applied_offsets(self) -> dict[int, int]:
        raw = self._client.hgetall(self.keys.offsets)
        return {
            parse_int(p, self.keys.offsets, "field"): parse_int(o, self.keys.offsets, f"field {p!r}")
            for p, o in raw.items()
        }

    def popular_items(self, n: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        return read_popular_items(self._client, self.keys, n, exclude)

    def events_applied(self) -> int:
        raw = self._client.hget(self.keys.stats, "events_applied")
        return parse_int(raw, self.keys.stats, "field 'events_applied'")

    # ------------------------------------------------------------------------ refresh support

    def read_all_rows(self, side: Side) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, (n, k) factors, (n,) biases) of every row of one side of the live version."""
        k = self._model.k
        for _ in range(_SNAPSHOT_ATTEMPTS):
            scanned = scan_version_rows(self._scan_rows_script, self.keys, self.current_version(), side, k)
            if scanned is not None:
                ids, rows = scanned
                return ids, rows[:, :k].copy(), rows[:, k].copy()
        raise StoreError(f"{self.keys.current}: each version it named was deleted while being read")

    def global_mean(self) -> float:
        """Mean of all event values applied (explicit mode's μ); 0 before any event."""
        value_sum, value_count = self._client.hmget(self.keys.stats, ["value_sum", "value_count"])
        count = parse_int(value_count, self.keys.stats, "field 'value_count'")
        return parse_float(value_sum, self.keys.stats, "field 'value_sum'") / count if count else 0.0

    def iter_interactions(self, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """SCAN the interaction hashes: chunks of about `batch` users. Not a snapshot (events keep coming);
        a user is never split across chunks."""
        prefix = self.keys.inter_prefix.encode()
        pending: list[bytes] = []
        for key in self._client.scan_iter(match=self.keys.inter_prefix + "*", count=batch):
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
        """A new version number (never reused), in state 'building', with zero Gramians if implicit."""
        version = int(self._client.incr(self.keys.next_version))
        server_time = self._client.time()
        now = f"{server_time[0]}.{server_time[1]:06d}"
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(
            self.keys.version_meta(version),
            mapping={"created_at": now, "source": source, "state": "building"},
        )
        if self._model.mode == "implicit":
            zero = np.zeros((self._model.k, self._model.k), dtype=GRAMIAN_DTYPE).tobytes()
            for side in SIDES:
                pipe.set(self.keys.gramian(version, side), zero)
        pipe.execute()
        return version

    def write_rows(
        self, version: int, side: Side, ids: Sequence[str], rows: np.ndarray, biases: np.ndarray | None = None
    ) -> None:
        """Rows (n, k) and biases (n,) (zeros when None) into a version being built, in chunked pipelines."""
        k = self._model.k
        n = len(ids)
        bias = np.zeros(n) if biases is None else np.asarray(biases).reshape(n)
        blobs = np.column_stack([np.asarray(rows).reshape(n, k), bias]).astype(ROW_DTYPE)
        script_keys = scripts.WRITE_ROWS.key_list(
            meta=self.keys.version_meta(version), rows=self.keys.rows(version, side)
        )
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, n, _WRITE_CHUNK_ROWS):
            stop = min(start + _WRITE_CHUNK_ROWS, n)
            args = scripts.WRITE_ROWS.arg_list(
                n=stop - start,
                ids=join_ids(ids[start:stop]),
                rows=blobs[start:stop].tobytes(),
                row_bytes=blobs.shape[1] * 4,
            )
            self._write_rows_script(keys=script_keys, args=args, client=pipe)
        self._check_written(version, pipe.execute())

    def delete_rows(self, version: int, side: Side, ids: Sequence[str]) -> None:
        """Remove rows from a version being built (users forgotten while a refresh ran)."""
        if not ids:
            return
        written = self._delete_rows_script(
            keys=scripts.DELETE_ROWS.key_list(
                meta=self.keys.version_meta(version), rows=self.keys.rows(version, side)
            ),
            args=scripts.DELETE_ROWS.arg_list(n=len(ids), ids=join_ids(ids)),
        )
        self._check_written(version, [written])

    def write_gramian(self, version: int, side: Side, gramian: np.ndarray) -> None:
        if self._model.mode != "implicit":
            raise ValueError("explicit models keep no Gramians")
        k = self._model.k
        blob = np.asarray(gramian, dtype=GRAMIAN_DTYPE).reshape(k, k).tobytes()
        written = self._write_string_script(
            keys=scripts.WRITE_STRING.key_list(
                meta=self.keys.version_meta(version), target=self.keys.gramian(version, side)
            ),
            args=scripts.WRITE_STRING.arg_list(value=blob),
        )
        self._check_written(version, [written])

    def _check_written(self, version: int, results: list[int]) -> None:
        if not all(results):
            raise StoreError(f"{self.keys.version_meta(version)}: version {version} is not being built")

    def publish(self, version: int, expected_current: int) -> bool:
        """Make `version` current iff `current` is still `expected_current` and `version` is newer and being
        built. The old version (and abandoned builds below `version`) are retired, not yet deleted."""
        retiring = [self.keys.version_meta(v) for v in range(expected_current, version)]
        published = self._publish_script(
            keys=scripts.PUBLISH.key_list(
                retiring,
                current=self.keys.current,
                retired=self.keys.retired,
                new_meta=self.keys.version_meta(version),
            ),
            args=scripts.PUBLISH.arg_list(version=version, expected=expected_current),
        )
        return bool(published)

    def hold_refresh_lease(self, owner: str, ttl_s: float) -> bool:
        """Take or extend the lease that lets one replica run the periodic refresh (True if held)."""
        return bool(
            self._lease_script(
                keys=scripts.LEASE.key_list(lease=self.keys.refresh_lease),
                args=scripts.LEASE.arg_list(owner=owner, ttl_ms=max(1, int(ttl_s * 1000))),
            )
        )

    def release_refresh_lease(self, owner: str) -> bool:
        """Give the lease up if `owner` holds it (True if it did)."""
        return bool(
            self._release_lease_script(
                keys=scripts.RELEASE_LEASE.key_list(lease=self.keys.refresh_lease),
                args=scripts.RELEASE_LEASE.arg_list(owner=owner),
            )
        )

    def refresh_lease_holder(self) -> str | None:
        holder = self._client.get(self.keys.refresh_lease)
        return None if holder is None else text(holder)

    def discard_version(self, version: int) -> bool:
        """Give up a version being built (e.g. its publish was refused); `collect_garbage` deletes it."""
        return bool(
            self._discard_script(
                keys=scripts.DISCARD.key_list(
                    meta=self.keys.version_meta(version), retired=self.keys.retired
                ),
                args=scripts.DISCARD.arg_list(version=version),
            )
        )

    def track_changes(self, version: int) -> bool:
        """From now on, updates applied to `version` record their users and items (see `take_changes`)."""
        return bool(self._handover(version, "tracking", 0.0))

    def stop_tracking(self, version: int) -> None:
        """Undo `track_changes`: the mark and what was recorded under it go."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self.keys.version_meta(version), "tracking")
        pipe.delete(*(self.keys.changed(version, side) for side in SIDES))
        pipe.execute()

    def take_changes(self, version: int) -> tuple[list[str], list[str]]:
        """The users and items updated in `version` since tracking began or the last take; forgets them."""
        keys = [self.keys.changed(version, side) for side in SIDES]
        pipe = self._client.pipeline(transaction=True)
        for key in keys:
            pipe.smembers(key)
        pipe.delete(*keys)
        *members, _ = pipe.execute()
        users, items = (sorted(raw.decode() for raw in side) for side in members)
        return users, items

    def read_interactions(self, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The given users' interactions as they are now (one pipelined HGETALL per user)."""
        prefix = self.keys.inter_prefix.encode()
        return self._read_interactions([self.keys.inter(user).encode() for user in users], prefix)

    def pause_writes(self, version: int, ttl_s: float) -> bool:
        """Updates to `version` get PAUSED until `resume_writes`, a publish, or `ttl_s` (server clock)."""
        return bool(self._handover(version, "paused_until", ttl_s))

    def resume_writes(self, version: int) -> None:
        self._client.hdel(self.keys.version_meta(version), "paused_until")

    def _handover(self, version: int, mark: str, ttl_s: float) -> int:
        return int(
            self._handover_script(
                keys=scripts.HANDOVER.key_list(
                    current=self.keys.current, meta=self.keys.version_meta(version)
                ),
                args=scripts.HANDOVER.arg_list(version=version, mark=mark, ttl_s=repr(ttl_s)),
            )
        )

    def collect_garbage(self, grace_s: float) -> list[int]:
        """UNLINK (memory freed off the main thread) every version retired more than `grace_s` seconds ago
        by the server's clock, so readers still holding its number get to finish. Returns those versions."""
        seconds, micros = self._client.time()
        cutoff = seconds + micros / 1e6 - grace_s
        due = self._version_numbers(self._client.zrangebyscore(self.keys.retired, "-inf", cutoff))
        for version in due:
            # One UNLINK per version removes its meta together with its rows: a reader that sees the meta
            # after reading rows knows the rows were whole.
            pipe = self._client.pipeline(transaction=False)
            pipe.unlink(*self.keys.version_keys(version))
            pipe.zrem(self.keys.retired, version)
            pipe.execute()
        return due
