"""The public Redis key layout v1 (`ModelKeys`), its codecs and the model meta: what the store writes and
every reader (`streammf.client`, or a service in another language) reads.

Other services read this layout without our code (README, "Reading embeddings from Redis"). Every key of a
model starts with ``streammf:{<tag>}:``; the hash tag puts the keys of one tag in one Redis Cluster slot, so
one Lua script may touch any of them (always through KEYS, see `streammf.store.scripts`). A model of one
shard has one tag, its name. A model of S > 1 shards (`streammf.store.shards`) has a control tag, its name
(keys meta, current, next_version, refresh_lease), and one tag per shard holding everything else: the
shard's copy of `current` (what its writers are fenced on), its rows, Gramian partial sums, interactions,
counts, popularity and offsets, and a full copy of `stats`.

    current                     string  the live version number N
    next_version                string  last version number handed out (INCR; numbers are never reused)
    meta                        hash    mode, k, hyper (JSON), layout_version, created_at,
                                        shards, shard_tags (JSON list; absent: one shard)
    retired                     zset    version -> server time it stopped being current (garbage collection)
    v<N>:meta                   hash    created_at, source, state (building|live|retired), published_at, …
    v<N>:users, v<N>:items      hash    id -> little-endian float32 blob: k factors, then the bias
    v<N>:gram:users, …:items    string  little-endian float64 k×k Gramian of the shard's rows (implicit
                                        mode; a model's Gramian is the sum over its shards)
    inter:<user>                hash    item -> value (text; implicit: summed strength, explicit: rating)
    item_counts                 hash    item -> observed entries m_j (n_i of a user is HLEN inter:<user>)
    stats                       hash    value_sum (decimal text), value_count, events_applied,
                                        popularity_origin, popularity_half_life (0: no decay),
                                        incarnation, writer (stamp of the last write of users)
    popularity                  zset    item -> forward-decay score S_j (cold start; see README)
    offsets                     hash    Kafka partition -> next offset to consume
    item_offsets                hash    the same, for the item part of batches (models of S > 1 shards)

One key sits outside a model's prefix, so that deleting the model keeps it: ``streammf:rebuild:{<name>}``,
the lease of the one replica that deletes and creates a lost model again (`streammf run --rebuild`).

Floats stored as text are written with 17 significant digits, so they read back as the exact float64.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from streammf.model.factors import DTYPE, Mode
from streammf.store import scripts
from streammf.store.contract import Side, StoreError, StoreLostStateError, StoreUnsafeError

KEY_ROOT = "streammf"
LAYOUT_VERSION = 1
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROW_DTYPE = np.dtype("<f4")
GRAMIAN_DTYPE = np.dtype("<f8")
SIDES: tuple[Side, ...] = ("users", "items")

# A Lua script's error reply starting with one of these words is bad (STOREERR) or missing (STORELOST)
# stored data; the rest of the message names the key.
_STORE_ERROR_CODE = "STOREERR"
_STORE_LOST_CODE = "STORELOST"


@dataclass(frozen=True)
class ModelKeys:
    """Key names of one model's control keys (`tag` None) or of one of its shards (layout v1)."""

    name: str
    tag: str | None = None

    def __post_init__(self) -> None:
        # The name sits inside the hash tag, so braces would break slot routing; keep it to config's charset.
        if not MODEL_NAME_PATTERN.match(self.name):
            raise ValueError(f"model name must match {MODEL_NAME_PATTERN.pattern}, got {self.name!r}")
        if self.tag is not None and re.search(r"[{}]", self.tag):
            raise ValueError(f"a shard tag may not contain braces, got {self.tag!r}")

    @property
    def prefix(self) -> str:
        return f"{KEY_ROOT}:{{{self.tag or self.name}}}:"

    def shard(self, tag: str) -> ModelKeys:
        return ModelKeys(self.name, tag)

    @property
    def current(self) -> str:
        return self.prefix + "current"

    @property
    def next_version(self) -> str:
        return self.prefix + "next_version"

    @property
    def meta(self) -> str:
        return self.prefix + "meta"

    @property
    def retired(self) -> str:
        return self.prefix + "retired"

    @property
    def refresh_lease(self) -> str:
        return self.prefix + "refresh_lease"

    @property
    def rebuild_lease(self) -> str:
        """Held by the one replica that deletes and creates a lost model again (`streammf run
        --rebuild`): outside the model's prefix, so deleting the model keeps it; in the control slot."""
        return f"{KEY_ROOT}:rebuild:{{{self.name}}}"

    @property
    def item_counts(self) -> str:
        return self.prefix + "item_counts"

    @property
    def stats(self) -> str:
        return self.prefix + "stats"

    @property
    def popularity(self) -> str:
        return self.prefix + "popularity"

    @property
    def offsets(self) -> str:
        return self.prefix + "offsets"

    @property
    def item_offsets(self) -> str:
        return self.prefix + "item_offsets"

    @property
    def inter_prefix(self) -> str:
        return self.prefix + "inter:"

    def inter(self, user: str) -> str:
        return self.inter_prefix + user

    def inter_keys(self, users: Sequence[str]) -> list[str]:
        """`inter(user)` of each user, the prefix built once (a batch names a few thousand users)."""
        prefix = self.inter_prefix
        return [prefix + user for user in users]

    def version_meta(self, version: int) -> str:
        return f"{self.prefix}v{version}:meta"

    def rows(self, version: int, side: Side) -> str:
        return f"{self.prefix}v{version}:{side}"

    def gramian(self, version: int, side: Side) -> str:
        return f"{self.prefix}v{version}:gram:{side}"

    def changed(self, version: int, side: Side) -> str:
        return f"{self.prefix}v{version}:changed:{side}"

    def version_keys(self, version: int) -> list[str]:
        return [
            self.version_meta(version),
            *(self.rows(version, side) for side in SIDES),
            *(self.gramian(version, side) for side in SIDES),
            *(self.changed(version, side) for side in SIDES),
        ]


def decode_gramian(blob: bytes | None, k: int, key: str) -> np.ndarray:
    if blob is None:
        raise StoreLostStateError(f"{key} is missing (every version of an implicit model has both Gramians)")
    if len(blob) != 8 * k * k:
        raise StoreError(f"{key}: {len(blob)} bytes, expected {8 * k * k} (float64 {k}×{k})")
    return np.frombuffer(blob, dtype=GRAMIAN_DTYPE).reshape(k, k).astype(np.float64)


def text(raw: bytes | str) -> str:
    """A reply as text (our clients reply in bytes; redis-py's types allow str as well)."""
    return raw.decode() if isinstance(raw, bytes) else raw


def parse_int(raw: bytes | str | None, key: str, what: str, default: int = 0) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StoreError(f"{key} {what}: not an integer: {raw!r}") from None


def parse_float(raw: bytes | str | None, key: str, what: str, default: float = 0.0) -> float:
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise StoreError(f"{key} {what}: not a number: {raw!r}") from None


@dataclass(frozen=True)
class StoredModel:
    """The immutable part of a model's meta hash, checked on the way in."""

    mode: Mode
    k: int
    hyper: dict[str, float]
    shard_tags: tuple[str, ...] = ()  # one per shard; () for a model of one shard (its tag is its name)

    @property
    def shards(self) -> int:
        return max(1, len(self.shard_tags))


def shard_keys(keys: ModelKeys, model: StoredModel) -> list[ModelKeys]:
    """The keys of each shard of the model (for one shard: the control keys themselves)."""
    return [keys.shard(tag) for tag in model.shard_tags] if model.shard_tags else [keys]


def read_model_meta(client: redis.Redis, keys: ModelKeys) -> StoredModel:
    """Parse `…:meta`, raising `StoreError` naming the key when it is missing or malformed."""
    raw = client.hgetall(keys.meta)
    if not raw:
        raise StoreLostStateError(f"{keys.meta} is missing: no model {keys.name!r} in this Redis database")
    layout = parse_int(raw.get(b"layout_version"), keys.meta, "field 'layout_version'", default=-1)
    if layout != LAYOUT_VERSION:
        raise StoreError(f"{keys.meta} field 'layout_version': {layout}, this code reads {LAYOUT_VERSION}")
    mode = text(raw.get(b"mode", b""))
    if mode not in ("explicit", "implicit"):
        raise StoreError(f"{keys.meta} field 'mode': {mode!r} is neither 'explicit' nor 'implicit'")
    k = parse_int(raw.get(b"k"), keys.meta, "field 'k'", default=0)
    if k < 1:
        raise StoreError(f"{keys.meta} field 'k': {k} is not a positive number of factors")
    try:
        hyper = json.loads(raw.get(b"hyper", b"{}"))
    except ValueError:
        raise StoreError(f"{keys.meta} field 'hyper': not JSON: {raw.get(b'hyper')!r}") from None
    shards = parse_int(raw.get(b"shards"), keys.meta, "field 'shards'", default=1)
    tags: tuple[str, ...] = ()
    if shards > 1:
        try:
            tags = tuple(json.loads(raw.get(b"shard_tags", b"")))
        except ValueError:
            tags = ()
        if len(tags) != shards or not all(isinstance(tag, str) and tag for tag in tags):
            raise StoreError(f"{keys.meta} field 'shard_tags': not a JSON list of {shards} tags")
    return StoredModel(mode=mode, k=k, hyper=hyper, shard_tags=tags)  # type: ignore[arg-type]  # checked


def read_current_version(client: redis.Redis, keys: ModelKeys) -> int:
    version = parse_int(client.get(keys.current), keys.current, "value", default=-1)
    if version < 1:
        raise StoreLostStateError(f"{keys.current} is missing or not a version number")
    return version


def model_exists(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(ModelKeys(name).meta))


def hold_lease(client: redis.Redis, key: str, owner: str, ttl_s: float) -> bool:
    """Take or extend the lease at `key` (a refresh's, a rebuild's) for `ttl_s`; True if `owner` holds it."""
    take = scripts.LEASE.register(client)
    args = scripts.LEASE.arg_list(owner=owner, ttl_ms=max(1, int(ttl_s * 1000)))
    return bool(take(keys=scripts.LEASE.key_list(lease=key), args=args))


def release_lease(client: redis.Redis, key: str, owner: str) -> bool:
    """Give the lease at `key` up if `owner` holds it (True if it did)."""
    args = scripts.RELEASE_LEASE.arg_list(owner=owner)
    return bool(
        scripts.RELEASE_LEASE.register(client)(keys=scripts.RELEASE_LEASE.key_list(lease=key), args=args)
    )


def read_popular_items(
    client: redis.Redis, shards: Sequence[ModelKeys], n: int, exclude: Sequence[str] = ()
) -> list[tuple[str, float]]:
    """The `n` most popular items (decayed counts at the model's clock, best first; ties in ZREVRANGE's
    order, higher id first), without `exclude`: what a reader serves a user the model has no row for.
    Each shard ranks its own items against its own clock; the best of each are merged."""
    if n <= 0:
        return []
    excluded = set(exclude)
    merged: list[tuple[str, float]] = []
    for keys in shards:
        with client.pipeline(transaction=True) as pipe:  # one slot: a MULTI works in Redis Cluster too
            pipe.zrevrange(keys.popularity, 0, n + len(excluded) - 1, withscores=True)
            pipe.hmget(keys.stats, "events_applied", "popularity_origin", "popularity_half_life")
            ranked, (clock, origin, half_life) = pipe.execute()
        clock_value = parse_int(clock, keys.stats, "field 'events_applied'")
        origin_value = parse_float(origin, keys.stats, "field 'popularity_origin'")
        half_life_value = parse_float(half_life, keys.stats, "field 'popularity_half_life'")
        now = 1.0 if not half_life_value else 2.0 ** ((clock_value - origin_value) / half_life_value)
        merged += [(text(item), float(score) / now) for item, score in ranked if text(item) not in excluded]
    if len(shards) > 1:
        merged.sort(
            key=lambda pair: pair[0].encode(), reverse=True
        )  # ZREVRANGE's tie order: bytes, descending
        merged.sort(key=lambda pair: pair[1], reverse=True)  # stable: ties keep the order above
    return merged[:n]


def delete_model(client: redis.Redis, name: str) -> int:
    """UNLINK every key of the model, on every shard (SCAN over each prefix); returns how many there were."""
    keys = ModelKeys(name)
    try:
        tags = read_model_meta(client, keys).shard_tags
    except StoreError:  # no meta (or a damaged one): whatever of the model is left is under its name
        tags = ()
    deleted = 0
    for prefix in [keys.shard(tag).prefix for tag in tags] + [keys.prefix]:
        batch: list[bytes] = []
        for key in scan_keys(client, prefix):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += unlink_all(client, batch)
                batch.clear()
        if batch:
            deleted += unlink_all(client, batch)
    return deleted


def scan_keys(client: redis.Redis, prefix: str, count: int = 1000) -> Iterator[bytes]:
    """Every key starting with `prefix` (which holds a hash tag): in a Redis Cluster, only the node that
    owns the tag's slot is asked."""
    match = _glob_escape(prefix) + "*"
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(prefix)
        return cast(Iterator[bytes], client.scan_iter(match=match, count=count, target_nodes=node))
    return client.scan_iter(match=match, count=count)


def unlink_all(client: redis.Redis, keys: Sequence[bytes]) -> int:
    """UNLINK keys that share one hash tag (one slot: a single command in a cluster too)."""
    return int(client.unlink(*keys))


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", text)


# Policies under which Redis may delete keys that have no TTL, i.e. any of ours.
EVICTING_POLICIES = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


def eviction_policy(client: redis.Redis) -> str:
    """The server's maxmemory-policy, from INFO (allowed where CONFIG GET is not, e.g. managed Redis); in
    a Redis Cluster the most dangerous one among the primaries."""
    if isinstance(client, RedisCluster):
        policies = {
            str(client.info("memory", target_nodes=node).get("maxmemory_policy", "unknown"))
            for node in client.get_primaries()
        }
        return min(policies, key=lambda policy: (policy not in EVICTING_POLICIES, policy))
    return str(client.info("memory").get("maxmemory_policy", "unknown"))


def require_no_eviction(client: redis.Redis, allow_eviction: bool) -> str:
    """Refuse a server that may evict our keys (it would silently delete parts of the model); returns the
    policy. Our keys carry no TTL, so the volatile-* policies and noeviction are safe."""
    policy = eviction_policy(client)
    if policy in EVICTING_POLICIES and not allow_eviction:
        raise StoreUnsafeError(
            f"Redis maxmemory-policy is {policy}: it may evict the model's keys and silently lose state. "
            "Set it to noeviction (CONFIG SET maxmemory-policy noeviction, or in redis.conf), or accept "
            "the risk with STREAMMF_REDIS__ALLOW_EVICTION=true"
        )
    return policy


# An append-only file rewritten from less than this is rewritten every few seconds under a steady stream:
# the daemon's scripts add ~450 bytes per event (~9 MB/s at 20,000 events/s), and each rewrite forks and
# copies the dataset, which shows in the update latency's tail (README, "Throughput").
AOF_REWRITE_MIN_SIZE_ADVISED = 512 * 2**20


def aof_rewrite_warning(client: redis.Redis) -> str | None:
    """What to tell the operator when a server (in a Redis Cluster, any primary) keeps an append-only file
    and rewrites it automatically from less than AOF_REWRITE_MIN_SIZE_ADVISED; None when not, or when the
    server does not say (CONFIG GET refused, as on some managed Redis)."""
    nodes = client.get_primaries() if isinstance(client, RedisCluster) else [None]
    for node in nodes:
        on: dict[str, Any] = {} if node is None else {"target_nodes": node}
        try:
            if not int(client.info("persistence", **on).get("aof_enabled", 0)):
                continue
            config: dict[Any, Any] = client.config_get("auto-aof-rewrite-*", **on)
        except redis.ResponseError:
            return None
        min_size = int(config.get("auto-aof-rewrite-min-size", 0))
        percentage = int(config.get("auto-aof-rewrite-percentage", 0))  # 0: no automatic rewrite
        if percentage > 0 and min_size < AOF_REWRITE_MIN_SIZE_ADVISED:
            where = "" if node is None else f" on {node.name}"
            return (
                f"Redis{where} rewrites its append-only file from auto-aof-rewrite-min-size {min_size} "
                "bytes: under a steady stream that is a rewrite (a fork and a copy of the dataset) every few "
                f"seconds, which shows in update latency; set it to at least {AOF_REWRITE_MIN_SIZE_ADVISED} "
                "(e.g. CONFIG SET auto-aof-rewrite-min-size 1gb, and in redis.conf)"
            )
    return None


def require_binary_client(client: redis.Redis | RedisCluster) -> None:
    """Row blobs are bytes; a client that decodes replies to str would corrupt them."""
    if client.get_encoder().decode_responses:
        raise ValueError("the Redis client must be created with decode_responses=False (rows are binary)")


def store_error_from(exc: redis.ResponseError) -> StoreError | None:
    """The StoreError a Lua script reported, or None when the reply is some other Redis error."""
    message = str(exc)
    if message.startswith(_STORE_ERROR_CODE + " "):
        return StoreError(message.removeprefix(_STORE_ERROR_CODE + " "))
    if message.startswith(_STORE_LOST_CODE + " "):
        return StoreLostStateError(message.removeprefix(_STORE_LOST_CODE + " "))
    return None


def join_ids(ids: Sequence[str]) -> bytes:
    """Ids as one script argument, NUL-separated (split by lua/prelude.lua): with the pure-Python RESP
    parser each argument costs redis-py microseconds, and a batch has thousands of ids."""
    joined = "\0".join(ids)
    if joined.count("\0") != max(len(ids) - 1, 0):
        raise ValueError("ids must not contain NUL characters")
    return joined.encode()


def split_ids(joined: bytes, n: int) -> list[str]:
    return joined.decode().split("\0") if n else []


def rows_from_blob(blob: bytes, mask: bytes, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A script's concatenated rows and '1'/'0' mask -> ((n, k+1) float32 rows, (n,) bool present)."""
    rows = np.frombuffer(blob, dtype=ROW_DTYPE).reshape(n, k + 1).astype(DTYPE)
    return rows, np.frombuffer(mask, dtype=np.uint8) == ord("1")


def value_texts(values: Sequence[float]) -> list[str]:
    """Numbers as the scripts write them (Lua's string.format('%.17g'): exact, and the same text)."""
    return list(map("%.17g".__mod__, values))


def split_numbers(joined: bytes, n: int) -> list[bytes]:
    """A script's ','-joined numbers ('' for absent) as n raw values."""
    return joined.split(b",") if n else []  # the scripts return only validated numbers: no ',' inside


_SCAN_STEP_ROWS = 2000


def scan_version_rows(
    script: Script, keys: ModelKeys, version: int, side: Side, k: int
) -> tuple[list[str], np.ndarray] | None:
    """All rows of one side of a version: (ids, (n, k+1) float32 rows), or None if the version was deleted.

    Every step checks that the version's meta still exists, and garbage collection deletes a version's
    meta and rows in one UNLINK: so all rows returned belong to `version`, and none is from a half-deleted
    one. Rows written meanwhile may or may not be included (HSCAN's guarantee).
    """
    script_keys = scripts.SCAN_ROWS.key_list(meta=keys.version_meta(version), rows=keys.rows(version, side))
    ids: list[str] = []
    blobs: list[bytes] = []
    cursor: bytes | int = 0
    while True:
        try:
            args = scripts.SCAN_ROWS.arg_list(cursor=cursor, count=_SCAN_STEP_ROWS, row_bytes=4 * (k + 1))
            reply = script(keys=script_keys, args=args)
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None
        if reply == b"gone":
            return None
        cursor, n, joined, blob = reply
        ids += split_ids(joined, n)
        blobs.append(blob)
        if cursor == b"0":
            break
    rows = np.frombuffer(b"".join(blobs), dtype=ROW_DTYPE).reshape(len(ids), k + 1).astype(DTYPE)
    first_seen = {ident: i for i, ident in reversed(list(enumerate(ids)))}
    if len(first_seen) < len(ids):  # HSCAN may return an id twice; keep one row each
        keep = sorted(first_seen.values())
        ids, rows = [ids[i] for i in keep], rows[keep]
    return ids, rows
