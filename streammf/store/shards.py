"""How a model is split over S shards: which shard holds an id, and each shard's hash tag.

A shard is a set of keys with one hash tag, so it sits in one Redis Cluster slot and one Lua script may
touch any of its keys; different shards' tags fall in different slots, so Redis Cluster spreads them over
its primaries. The ids are placed by a hash every language has in its standard library:

    shard(id) = CRC-32 (IEEE 802.3, as zlib.crc32, java.util.zip.CRC32, Go's hash/crc32.ChecksumIEEE)
                of the id's UTF-8 bytes, modulo S

A user's row and interactions live in the user's shard, an item's row, count and popularity in the item's
shard. With S = 1 every key carries the model's own tag: the layout is the one of a model before shards.

Shard s's tag is ``<name>/<s>.<n>``, with n the smallest number >= 0 that puts the tag's slot (CRC-16 of
the tag, modulo 16384, the Redis Cluster rule) in the s-th of S equal slot ranges. `redis-cli --cluster
create` hands each of P primaries an equal run of slots, so with S = P every primary gets one shard. The
tags are stored in the model's meta hash (field ``shard_tags``): readers take them from there and never
need CRC-16. ``/`` is not allowed in model names, so no tag can be another model's name.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

MAX_SHARDS = 1024


def shard_of(ident: str, shards: int) -> int:
    """The shard holding the row of `ident` (a user or an item id)."""
    return 0 if shards == 1 else zlib.crc32(ident.encode()) % shards


def shard_indices(ids: Sequence[str], shards: int) -> np.ndarray:
    """`shard_of` of every id, as an int array."""
    if shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return np.fromiter((zlib.crc32(ident.encode()) % shards for ident in ids), dtype=np.int64, count=len(ids))


def shard_tags(name: str, shards: int) -> list[str]:
    """The hash tag of each shard (see the module doc); [name] for one shard."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be in 1..{MAX_SHARDS}, got {shards}")
    if shards == 1:
        return [name]
    tags = []
    for s in range(shards):
        low, high = s * REDIS_CLUSTER_HASH_SLOTS // shards, (s + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
        n = 0
        while not low <= key_slot(f"{name}/{s}.{n}".encode()) < high:
            n += 1
        tags.append(f"{name}/{s}.{n}")
    return tags
