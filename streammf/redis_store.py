"""The Redis factor store: `RefreshableStore` on a real Redis server, in the public key layout v1.

Other services read this layout without our code (README, "Reading embeddings from Redis"). Every key of a
model starts with ``streammf:{<name>}:``; the hash tag puts them all in one Redis Cluster slot, so one Lua
script may touch any of them.

    current                     string  the live version number N
    next_version                string  last version number handed out (INCR; numbers are never reused)
    meta                        hash    mode, k, hyper (JSON), layout_version, created_at
    retired                     zset    version -> server time it stopped being current (garbage collection)
    v<N>:meta                   hash    created_at, source, state (building|live|retired), published_at, …
    v<N>:users, v<N>:items      hash    id -> little-endian float32 blob: k factors, then the bias
    v<N>:gram:users, …:items    string  little-endian float64 k×k Gramian (implicit mode)
    inter:<user>                hash    item -> value (text; implicit: summed strength, explicit: rating)
    item_counts                 hash    item -> observed entries m_j (n_i of a user is HLEN inter:<user>)
    stats                       hash    value_sum (decimal text), value_count, events_applied
    offsets                     hash    Kafka partition -> next offset to consume

Floats stored as text are written with 17 significant digits, so they read back as the exact float64.
The arithmetic inside the scripts is the in-memory twin's (`streammf.store.MemoryStore`): float32 rows are
widened to float64, the float64 delta is added, the sum is rounded back to float32 once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import redis
from redis.commands.core import Script

from streammf.factors import DTYPE, Mode
from streammf.store import (
    ApplyOutcome,
    BatchState,
    BatchUpdate,
    ModelMeta,
    Side,
    StoreError,
    StoreLostStateError,
    StoreUnsafeError,
)

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
# Rows per script call when a refresh writes a version: ~130 kB of arguments at k=32.
_WRITE_CHUNK_ROWS = 1000
# A batch read names the version it expects; it is repeated when a publish lands in between.
_SNAPSHOT_ATTEMPTS = 10
# Take the lease if free, extend it if ours (PX milliseconds).
_LEASE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ModelMismatchError(ValueError):
    """The model exists with a different mode or number of factors than the caller asked for."""


@dataclass(frozen=True)
class ModelKeys:
    """Key names of one model (layout v1)."""

    name: str

    def __post_init__(self) -> None:
        # The name sits inside the hash tag, so braces would break slot routing; keep it to config's charset.
        if not MODEL_NAME_PATTERN.match(self.name):
            raise ValueError(f"model name must match {MODEL_NAME_PATTERN.pattern}, got {self.name!r}")

    @property
    def prefix(self) -> str:
        return f"{KEY_ROOT}:{{{self.name}}}:"

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
    def item_counts(self) -> str:
        return self.prefix + "item_counts"

    @property
    def stats(self) -> str:
        return self.prefix + "stats"

    @property
    def offsets(self) -> str:
        return self.prefix + "offsets"

    @property
    def inter_prefix(self) -> str:
        return self.prefix + "inter:"

    def inter(self, user: str) -> str:
        return self.inter_prefix + user

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


def parse_int(raw: bytes | None, key: str, what: str, default: int = 0) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StoreError(f"{key} {what}: not an integer: {raw!r}") from None


def parse_float(raw: bytes | None, key: str, what: str, default: float = 0.0) -> float:
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


def read_model_meta(client: redis.Redis, keys: ModelKeys) -> StoredModel:
    """Parse `…:meta`, raising `StoreError` naming the key when it is missing or malformed."""
    raw = client.hgetall(keys.meta)
    if not raw:
        raise StoreLostStateError(f"{keys.meta} is missing: no model {keys.name!r} in this Redis database")
    layout = parse_int(raw.get(b"layout_version"), keys.meta, "field 'layout_version'", default=-1)
    if layout != LAYOUT_VERSION:
        raise StoreError(f"{keys.meta} field 'layout_version': {layout}, this code reads {LAYOUT_VERSION}")
    mode = raw.get(b"mode", b"").decode()
    if mode not in ("explicit", "implicit"):
        raise StoreError(f"{keys.meta} field 'mode': {mode!r} is neither 'explicit' nor 'implicit'")
    k = parse_int(raw.get(b"k"), keys.meta, "field 'k'", default=0)
    if k < 1:
        raise StoreError(f"{keys.meta} field 'k': {k} is not a positive number of factors")
    try:
        hyper = json.loads(raw.get(b"hyper", b"{}"))
    except ValueError:
        raise StoreError(f"{keys.meta} field 'hyper': not JSON: {raw.get(b'hyper')!r}") from None
    return StoredModel(mode=mode, k=k, hyper=hyper)  # type: ignore[arg-type]  # checked above


def read_current_version(client: redis.Redis, keys: ModelKeys) -> int:
    version = parse_int(client.get(keys.current), keys.current, "value", default=-1)
    if version < 1:
        raise StoreLostStateError(f"{keys.current} is missing or not a version number")
    return version


def model_exists(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(ModelKeys(name).meta))


def delete_model(client: redis.Redis, name: str) -> int:
    """UNLINK every key of the model (SCAN over its prefix); returns how many there were."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=_glob_escape(ModelKeys(name).prefix) + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", text)


# Policies under which Redis may delete keys that have no TTL, i.e. any of ours.
EVICTING_POLICIES = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


def eviction_policy(client: redis.Redis) -> str:
    """The server's maxmemory-policy, from INFO (allowed where CONFIG GET is not, e.g. managed Redis)."""
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


def require_binary_client(client: redis.Redis) -> None:
    """Row blobs are bytes; a client that decodes replies to str would corrupt them."""
    if client.get_connection_kwargs().get("decode_responses"):
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
    """Ids as one script argument, NUL-separated (see LUA_PRELUDE)."""
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


def split_numbers(joined: bytes, n: int) -> list[bytes]:
    """A script's ','-joined numbers ('' for absent) as n raw values."""
    return joined.split(b",") if n else []  # the scripts return only validated numbers: no ',' inside


# Helpers every script below starts with (concatenated in front of it).
# Id lists travel as one argument, ids joined by NUL (no id contains NUL: `join_ids` checks): with the
# pure-Python RESP parser each argument or reply element costs redis-py microseconds, and a batch has
# thousands of ids. Rows travel as one concatenated blob, absent rows as zeros plus a '1'/'0' mask.
LUA_PRELUDE = """
local NUL = string.char(0)
local function bad(key, what) return redis.error_reply('STOREERR ' .. key .. ' ' .. what) end
local function lost(key, what) return redis.error_reply('STORELOST ' .. key .. ' ' .. what) end
local function is_int(s) return string.match(s, '^%-?%d+$') ~= nil end
local function split(joined, n)
  local out, pos = {}, 1
  for i = 1, n - 1 do
    local stop = string.find(joined, NUL, pos, true)
    out[i] = string.sub(joined, pos, stop - 1)
    pos = stop + 1
  end
  if n > 0 then out[n] = string.sub(joined, pos) end
  return out
end
-- Offset fencing, exactly streammf.store.fence: ARGV[from..] holds (partition, first, next) triples.
-- Returns nil when the update may be applied, else 'conflict', 'duplicate' or an error reply.
local function fence(offsets_key, from)
  local ahead, behind, overlap = false, false, false
  for o = from, #ARGV, 3 do
    local stored = redis.call('HGET', offsets_key, ARGV[o])
    if stored then
      local have = tonumber(stored)
      if not have then return bad(offsets_key, 'field ' .. ARGV[o] .. ': not a number: ' .. stored) end
      if have <= tonumber(ARGV[o + 1]) then ahead = true
      elseif have >= tonumber(ARGV[o + 2]) then behind = true
      else overlap = true end
    else
      ahead = true
    end
  end
  if overlap or (behind and ahead) then return 'conflict' end
  if behind then return 'duplicate' end
  return nil
end
local function paused(meta_key)  -- a refresh is handing this version over (writers wait)
  local paused_until = redis.call('HGET', meta_key, 'paused_until')
  if not paused_until then return false end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6 < tonumber(paused_until)
end
local function gather_rows(key, ids, row_bytes)
  local rows, mask, zero = {}, {}, string.rep(NUL, row_bytes)
  for i, id in ipairs(ids) do
    local row = redis.call('HGET', key, id)
    if row then
      if #row ~= row_bytes then
        return nil, nil, bad(key, 'field ' .. id .. ': ' .. #row .. ' bytes, expected ' .. row_bytes ..
                             ' (k float32 factors + bias)')
      end
      rows[i], mask[i] = row, '1'
    else
      rows[i], mask[i] = zero, '0'
    end
  end
  return table.concat(rows), table.concat(mask), nil
end
"""

# One HSCAN step over a version's rows; 'gone' once the version's meta is deleted. In steps, so a large
# version never blocks Redis for long.
# KEYS: v:meta, v:users or v:items.  ARGV: cursor, count, row bytes.
# Returns the next cursor, the number of rows, NUL-joined ids, concatenated rows.
SCAN_ROWS_LUA = (
    LUA_PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
local reply = redis.call('HSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
local fields, row_bytes, ids, rows = reply[2], tonumber(ARGV[3]), {}, {}
for f = 1, #fields, 2 do
  if #fields[f + 1] ~= row_bytes then
    return bad(KEYS[2], 'field ' .. fields[f] .. ': ' .. #fields[f + 1] .. ' bytes, expected ' .. row_bytes ..
               ' (k float32 factors + bias)')
  end
  ids[#ids + 1] = fields[f]
  rows[#rows + 1] = fields[f + 1]
end
return {reply[1], #ids, table.concat(ids, NUL), table.concat(rows)}
"""
)
_SCAN_STEP_ROWS = 2000


def scan_version_rows(
    script: Script, keys: ModelKeys, version: int, side: Side, k: int
) -> tuple[list[str], np.ndarray] | None:
    """All rows of one side of a version: (ids, (n, k+1) float32 rows), or None if the version was deleted.

    Every step checks that the version's meta still exists, and garbage collection deletes a version's
    meta and rows in one UNLINK: so all rows returned belong to `version`, and none is from a half-deleted
    one. Rows written meanwhile may or may not be included (HSCAN's guarantee).
    """
    script_keys = [keys.version_meta(version), keys.rows(version, side)]
    ids: list[str] = []
    blobs: list[bytes] = []
    cursor: bytes | int = 0
    while True:
        try:
            reply = script(keys=script_keys, args=[cursor, _SCAN_STEP_ROWS, 4 * (k + 1)])
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


# Creates the model if its meta is absent (returns 1), else leaves everything alone (returns 0).
# KEYS: meta, current, next_version, stats, v1:meta, v1:gram:items, v1:gram:users
# ARGV: mode, k, hyper JSON, zero Gramian blob ('' in explicit mode)
_OPEN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'mode', ARGV[1], 'k', ARGV[2], 'hyper', ARGV[3], 'layout_version', '1',
           'created_at', now)
redis.call('SET', KEYS[2], '1')
redis.call('SET', KEYS[3], '1')
redis.call('HSET', KEYS[4], 'value_sum', '0', 'value_count', '0', 'events_applied', '0')
redis.call('HSET', KEYS[5], 'created_at', now, 'source', 'sgd', 'state', 'live', 'published_at', now)
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[6], ARGV[4])
  redis.call('SET', KEYS[7], ARGV[4])
end
return 1
"""

# What one batch reads, from the version the caller found in `current` just before: 'moved' when that is
# no longer current (the caller reads again). A script rather than MULTI/EXEC: the same isolation, with
# one reply of 11 elements instead of one per command.
# KEYS: 1 current, 2 v:meta, 3 v:users, 4 v:items, 5 item_counts, 6 stats, 7 v:gram:items, 8 v:gram:users,
#       9.. inter:<user> of each batch user, then of each other pair user
# ARGV: 1 version, 2 implicit (1|0), 3 k, 4 n_users, 5 n_items, 6 n_pairs, 7 users, 8 items, 9 pair items,
#       10 per pair the KEYS index of its user's inter hash ('<I4' each)
# Returns user rows, user mask, user entry counts (','-joined), item rows, item mask, item counts,
# pair values (','-joined, '' where never observed), value_sum, value_count, item Gramian, user Gramian.
_READ_STATE_LUA = (
    LUA_PRELUDE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'moved' end
if redis.call('EXISTS', KEYS[2]) == 0 then return 'no_meta' end
local row_bytes = 4 * (tonumber(ARGV[3]) + 1)
local n_users, n_items, n_pairs = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local users, items, pair_items = split(ARGV[7], n_users), split(ARGV[8], n_items), split(ARGV[9], n_pairs)

local user_rows, user_mask, err = gather_rows(KEYS[3], users, row_bytes)
if err then return err end
local item_rows, item_mask, err2 = gather_rows(KEYS[4], items, row_bytes)
if err2 then return err2 end
local user_counts, item_counts, pair_values = {}, {}, {}
for u = 1, n_users do user_counts[u] = redis.call('HLEN', KEYS[8 + u]) end
for i, item in ipairs(items) do
  local count = redis.call('HGET', KEYS[5], item)
  if count and not is_int(count) then
    return bad(KEYS[5], 'field ' .. item .. ': not an integer: ' .. count)
  end
  item_counts[i] = count or '0'
end
for p = 1, n_pairs do
  local key = KEYS[struct.unpack('<I4', ARGV[10], 4 * p - 3)]
  local value = redis.call('HGET', key, pair_items[p])
  if value and not tonumber(value) then
    return bad(key, 'field ' .. pair_items[p] .. ': not a number: ' .. value)
  end
  pair_values[p] = value or ''
end
local stats = redis.call('HMGET', KEYS[6], 'value_sum', 'value_count')
local item_gramian, user_gramian = false, false
if ARGV[2] == '1' then
  item_gramian = redis.call('GET', KEYS[7]) or false
  user_gramian = redis.call('GET', KEYS[8]) or false
end
return {user_rows, user_mask, table.concat(user_counts, ','), item_rows, item_mask,
        table.concat(item_counts, ','), table.concat(pair_values, ','), stats[1], stats[2],
        item_gramian, user_gramian}
"""
)

# One batch update, all or nothing. A Redis script is not rolled back when it fails half-way, so phase 1
# reads and validates everything and computes the new values; only phase 2 writes.
# KEYS: 1 current, 2 offsets, 3 v:meta, 4 v:users, 5 v:items, 6 item_counts, 7 stats, 8 v:gram:items,
#       9 v:gram:users, 10 v:changed:users, 11 v:changed:items, 12.. inter:<user> of each distinct pair user
# ARGV: 1 version, 2 k, 3 additive (1: implicit strengths add, 0: explicit ratings are set), 4 n_users,
#       5 n_items, 6 n_pairs, 7 value_sum delta, 8 value_count delta, 9 events applied,
#       10 users, 11 user rows '<f4' (n_users × (k+1)), 12 items, 13 item base rows '<f4' (n_items × k),
#       14 item deltas '<f8' (n_items × (k+1): factors then bias), 15 item count deltas '<i8',
#       16 pair items, 17 per pair the KEYS index of its user's inter hash ('<I4' each), 18 pair values '<f8',
#       19 item Gramian delta '<f8' k×k or '', 20 user Gramian delta or '',
#       21 max |coordinate| of a sound stored item row (a damaged one is replaced by its base row),
#       22.. per partition: partition, first offset, next offset
_APPLY_LUA = (
    LUA_PRELUDE
    + """
local current = redis.call('GET', KEYS[1])
if not current then return lost(KEYS[1], 'is missing: the model has no current version') end
if current ~= ARGV[1] then return 'stale_version' end
if redis.call('EXISTS', KEYS[3]) == 0 then
  return lost(KEYS[3], 'is missing: ' .. KEYS[1] .. ' names a version without meta')
end
local tracking = redis.call('HGET', KEYS[3], 'tracking')
if paused(KEYS[3]) then return 'paused' end

local refused = fence(KEYS[2], 22)
if refused then return refused end

local k = tonumber(ARGV[2])
local additive = ARGV[3] == '1'
local n_users, n_items, n_pairs = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local users, items, pair_items = split(ARGV[10], n_users), split(ARGV[12], n_items), split(ARGV[16], n_pairs)

-- Items: stored (or base) float32 row + float64 delta, rounded to float32 after each add, like the twin.
local row_f = '<' .. string.rep('f', k + 1)
local row_d = '<' .. string.rep('d', k + 1)
local row_bytes = 4 * (k + 1)
local base_bytes = 4 * k
local zero_bias = struct.pack('<f', 0)
local max_abs = tonumber(ARGV[21])
local function sound(row)  -- every coordinate finite and within ±max_abs (NaN fails the comparison)
  for c = 1, k + 1 do
    if not (math.abs(row[c]) <= max_abs) then return false end
  end
  return true
end
local item_rows, item_order, count_deltas = {}, {}, {}
for r = 1, n_items do
  local item = items[r]
  local stored = item_rows[item]
  if not stored then
    stored = redis.call('HGET', KEYS[5], item)
    if stored then
      if #stored ~= row_bytes then
        return bad(KEYS[5], 'field ' .. item .. ': ' .. #stored .. ' bytes, expected ' .. row_bytes ..
                   ' (k float32 factors + bias)')
      end
    else
      stored = string.sub(ARGV[13], (r - 1) * base_bytes + 1, r * base_bytes) .. zero_bias
    end
    local count = redis.call('HGET', KEYS[6], item)
    if count and not is_int(count) then
      return bad(KEYS[6], 'field ' .. item .. ': not an integer: ' .. count)
    end
    item_order[#item_order + 1] = item
    count_deltas[item] = 0
  end
  local row = {struct.unpack(row_f, stored)}
  if not sound(row) then  -- damaged: the learner started this item again from its base row
    row = {struct.unpack(row_f, string.sub(ARGV[13], (r - 1) * base_bytes + 1, r * base_bytes) .. zero_bias)}
  end
  local delta = {struct.unpack(row_d, ARGV[14], (r - 1) * 8 * (k + 1) + 1)}
  for c = 1, k + 1 do row[c] = row[c] + delta[c] end
  item_rows[item] = struct.pack(row_f, unpack(row, 1, k + 1))
  count_deltas[item] = count_deltas[item] + struct.unpack('<i8', ARGV[15], (r - 1) * 8 + 1)
end

-- Interactions: implicit strengths add, explicit ratings replace; a pair repeated in one update
-- builds on its own earlier value.
local pair_values, pair_order = {}, {}
for p = 1, n_pairs do
  local key, item = KEYS[struct.unpack('<I4', ARGV[17], 4 * p - 3)], pair_items[p]
  local value = struct.unpack('<d', ARGV[18], 8 * p - 7)
  local values = pair_values[key]
  if not values then
    values = {}
    pair_values[key] = values
  end
  if values[item] == nil then
    pair_order[#pair_order + 1] = {key, item}
    if additive then
      local stored = redis.call('HGET', key, item)
      values[item] = 0
      if stored then
        values[item] = tonumber(stored)
        if not values[item] then return bad(key, 'field ' .. item .. ': not a number: ' .. stored) end
      end
    end
  end
  if additive then values[item] = values[item] + value else values[item] = value end
end

local stats = redis.call('HMGET', KEYS[7], 'value_sum', 'value_count', 'events_applied')
local value_sum = 0
if stats[1] then
  value_sum = tonumber(stats[1])
  if not value_sum then return bad(KEYS[7], 'field value_sum: not a number: ' .. stats[1]) end
end
if stats[2] and not is_int(stats[2]) then
  return bad(KEYS[7], 'field value_count: not an integer: ' .. stats[2])
end
if stats[3] and not is_int(stats[3]) then
  return bad(KEYS[7], 'field events_applied: not an integer: ' .. stats[3])
end

local function add_gramian(key, delta)
  local stored = redis.call('GET', key)
  if not stored then return nil, lost(key, 'is missing (implicit models keep a Gramian per version)') end
  if #stored ~= 8 * k * k then
    return nil, bad(key, 'holds ' .. #stored .. ' bytes, expected ' .. 8 * k * k)
  end
  local fmt, out = '<' .. string.rep('d', k), {}
  for r = 0, k - 1 do
    local g = {struct.unpack(fmt, stored, r * 8 * k + 1)}
    local d = {struct.unpack(fmt, delta, r * 8 * k + 1)}
    for c = 1, k do g[c] = g[c] + d[c] end
    out[r + 1] = struct.pack(fmt, unpack(g, 1, k))
  end
  return table.concat(out), nil
end
local gramians = {}
for _, slot in ipairs({{8, 19}, {9, 20}}) do
  if ARGV[slot[2]] ~= '' then
    local blob, err = add_gramian(KEYS[slot[1]], ARGV[slot[2]])
    if err then return err end
    gramians[#gramians + 1] = {KEYS[slot[1]], blob}
  end
end

-- Phase 2: everything checked; write.
for u = 1, n_users do
  redis.call('HSET', KEYS[4], users[u], string.sub(ARGV[11], (u - 1) * row_bytes + 1, u * row_bytes))
end
for _, item in ipairs(item_order) do
  redis.call('HSET', KEYS[5], item, item_rows[item])
  redis.call('HINCRBY', KEYS[6], item, string.format('%d', count_deltas[item]))
end
for _, pair in ipairs(pair_order) do
  redis.call('HSET', pair[1], pair[2], string.format('%.17g', pair_values[pair[1]][pair[2]]))
end
redis.call('HSET', KEYS[7], 'value_sum', string.format('%.17g', value_sum + tonumber(ARGV[7])))
redis.call('HINCRBY', KEYS[7], 'value_count', ARGV[8])
redis.call('HINCRBY', KEYS[7], 'events_applied', ARGV[9])
for _, g in ipairs(gramians) do redis.call('SET', g[1], g[2]) end
for o = 22, #ARGV, 3 do redis.call('HSET', KEYS[2], ARGV[o], ARGV[o + 2]) end
if tracking then  -- a refresh is catching up with this version: tell it what changed
  for u = 1, n_users do redis.call('SADD', KEYS[10], users[u]) end
  for _, item in ipairs(item_order) do redis.call('SADD', KEYS[11], item) end
end
return 'applied'
"""
)

# Deletes a user from the model (see FactorStore.forget_user). Phase 1 reads and checks, phase 2 writes.
# KEYS: 1 current, 2 offsets, 3 inter:<user>, 4 item_counts, 5 stats, then per version (4 each):
#       v:meta, v:users, v:gram:users, v:changed:users
# ARGV: 1 user, 2 k, 3 implicit (1|0), 4 number of versions n, 5 .. 4+n version numbers (the same order
#       as their KEYS), then (partition, first, next) triples.
_FORGET_USER_LUA = (
    LUA_PRELUDE
    + """
local current = redis.call('GET', KEYS[1])
if not current then return lost(KEYS[1], 'is missing: the model has no current version') end
local user, k, implicit, n = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[4])
local live = nil
for v = 1, n do if ARGV[4 + v] == current then live = v end end
if not live then return 'stale_version' end  -- a version was published since the caller listed them
if paused(KEYS[5 + 4 * (live - 1) + 1]) then return 'paused' end
local refused = fence(KEYS[2], 5 + n)
if refused then return refused end

local interactions = redis.call('HGETALL', KEYS[3])
local value_sum_delta = 0
for f = 2, #interactions, 2 do
  local value = tonumber(interactions[f])
  if not value then return bad(KEYS[3], 'field ' .. interactions[f - 1] .. ': not a number') end
  value_sum_delta = value_sum_delta + value
end
local stats_sum = redis.call('HGET', KEYS[5], 'value_sum')
if stats_sum and not tonumber(stats_sum) then return bad(KEYS[5], 'field value_sum: not a number') end
local row_bytes, row_f, grams = 4 * (k + 1), '<' .. string.rep('f', k + 1), {}
for v = 1, n do
  local meta, rows, gram_key = KEYS[5 + 4 * (v - 1) + 1], KEYS[5 + 4 * (v - 1) + 2], KEYS[5 + 4 * (v - 1) + 3]
  local row = redis.call('EXISTS', meta) == 1 and redis.call('HGET', rows, user)
  if row and implicit then
    if #row ~= row_bytes then return bad(rows, 'field ' .. user .. ': ' .. #row .. ' bytes') end
    local gram = redis.call('GET', gram_key)
    if not gram then return lost(gram_key, 'is missing (implicit models keep a Gramian per version)') end
    if #gram ~= 8 * k * k then return bad(gram_key, 'holds ' .. #gram .. ' bytes') end
    local x, fmt, out = {struct.unpack(row_f, row)}, '<' .. string.rep('d', k), {}
    for r = 0, k - 1 do
      local g = {struct.unpack(fmt, gram, r * 8 * k + 1)}
      for c = 1, k do g[c] = g[c] - x[r + 1] * x[c] end
      out[r + 1] = struct.pack(fmt, unpack(g, 1, k))
    end
    grams[v] = table.concat(out)
  end
end

for v = 1, n do
  local base = 5 + 4 * (v - 1)
  if redis.call('HDEL', KEYS[base + 2], user) == 1 and grams[v] then
    redis.call('SET', KEYS[base + 3], grams[v])
  end
  if redis.call('HGET', KEYS[base + 1], 'tracking') then redis.call('SADD', KEYS[base + 4], user) end
end
for f = 1, #interactions, 2 do
  if redis.call('HINCRBY', KEYS[4], interactions[f], -1) <= 0 then
    redis.call('HDEL', KEYS[4], interactions[f])
  end
end
redis.call('DEL', KEYS[3])
if not implicit and #interactions > 0 then
  local value_sum = (tonumber(stats_sum) or 0) - value_sum_delta
  redis.call('HSET', KEYS[5], 'value_sum', string.format('%.17g', value_sum))
  redis.call('HINCRBY', KEYS[5], 'value_count', -(#interactions / 2))
end
for o = 5 + n, #ARGV, 3 do redis.call('HSET', KEYS[2], ARGV[o], ARGV[o + 2]) end
return 'applied'
"""
)

# Writes into a version only while it is being built, so a refresh that lost the race (its version was
# retired, maybe already deleted) cannot resurrect keys nobody will collect. Returns 0 when refused.
# KEYS: v:meta, target key.
# ARGV: 'rows', n, ids, concatenated rows, row bytes | 'delete', n, ids | 'string', value.
_WRITE_VERSION_LUA = (
    LUA_PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'building' then return 0 end
if ARGV[1] == 'rows' then
  local n, row_bytes = tonumber(ARGV[2]), tonumber(ARGV[5])
  for i, id in ipairs(split(ARGV[3], n)) do
    redis.call('HSET', KEYS[2], id, string.sub(ARGV[4], (i - 1) * row_bytes + 1, i * row_bytes))
  end
elseif ARGV[1] == 'delete' then
  for _, id in ipairs(split(ARGV[3], tonumber(ARGV[2]))) do redis.call('HDEL', KEYS[2], id) end
else
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"""
)

# Compare-and-set of the current version. Retires the old version and every number between it and the new
# one (abandoned builds), stamping them with the server's clock for `collect_garbage`.
# KEYS: current, retired, new v:meta.  ARGV: version, expected current, key prefix.
_PUBLISH_LUA = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[2] then return 0 end
local version, old = tonumber(ARGV[1]), tonumber(current)
if version <= old or redis.call('HGET', KEYS[3], 'state') ~= 'building' then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
-- A refresh that paused writers to the old version must publish before the pause runs out.
local paused_until = redis.call('HGET', ARGV[3] .. 'v' .. current .. ':meta', 'paused_until')
if paused_until and tonumber(now) >= tonumber(paused_until) then return 0 end
redis.call('HSET', KEYS[3], 'state', 'live', 'published_at', now)
redis.call('SET', KEYS[1], ARGV[1])
for v = old, version - 1 do
  redis.call('ZADD', KEYS[2], now, v)
  local meta = ARGV[3] .. 'v' .. v .. ':meta'
  if redis.call('EXISTS', meta) == 1 then redis.call('HSET', meta, 'state', 'retired', 'retired_at', now) end
end
return 1
"""

# Marks the live version for a refresh's catch-up: 'tracking' (applies record what they change) or
# 'paused_until' (applies are refused until the server's clock passes it). Refused (0) unless current.
# KEYS: current, v:meta.  ARGV: version, 'tracking' | 'paused_until', seconds to pause.
_HANDOVER_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if ARGV[2] == 'tracking' then
  redis.call('HSET', KEYS[2], 'tracking', '1')
else
  local t = redis.call('TIME')
  local until_s = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3])
  redis.call('HSET', KEYS[2], 'paused_until', string.format('%.6f', until_s))
end
return 1
"""

# Hands a version that will not be published (a refresh gave up) to garbage collection.
# KEYS: v:meta, retired.  ARGV: version.
_DISCARD_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'building' then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'state', 'retired', 'retired_at', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""


class RedisStore:
    """`RefreshableStore` on Redis. Thread-safe as far as the redis client is (redis.Redis is)."""

    def __init__(self, client: redis.Redis, keys: ModelKeys, model: StoredModel) -> None:
        require_binary_client(client)
        self._client = client
        self.keys = keys
        self._model = model
        self._read_script = client.register_script(_READ_STATE_LUA)
        self._apply_script = client.register_script(_APPLY_LUA)
        self._forget_script = client.register_script(_FORGET_USER_LUA)
        self._write_script = client.register_script(_WRITE_VERSION_LUA)
        self._publish_script = client.register_script(_PUBLISH_LUA)
        self._discard_script = client.register_script(_DISCARD_LUA)
        self._handover_script = client.register_script(_HANDOVER_LUA)
        self._lease_script = client.register_script(_LEASE_LUA)
        self._release_lease_script = client.register_script(_RELEASE_LEASE_LUA)
        self._scan_rows_script = client.register_script(SCAN_ROWS_LUA)

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
        client.register_script(_OPEN_LUA)(
            keys=[
                keys.meta,
                keys.current,
                keys.next_version,
                keys.stats,
                keys.version_meta(1),
                keys.gramian(1, "items"),
                keys.gramian(1, "users"),
            ],
            args=[mode, k, json.dumps(hyper or {}, sort_keys=True), zero_gramian],
        )
        store = cls.attach(client, name)
        if (store._model.mode, store._model.k) != (mode, k):
            raise ModelMismatchError(
                f"model {name!r} exists with mode={store._model.mode} k={store._model.k}, "
                f"asked for mode={mode} k={k}; pick another model name or delete it"
            )
        return store

    @classmethod
    def attach(cls, client: redis.Redis, name: str) -> RedisStore:
        """An existing model (readers, the refresh); `StoreError` if there is none."""
        keys = ModelKeys(name)
        return cls(client, keys, read_model_meta(client, keys))

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
        # KEYS[8 + u] is the u-th batch user's inter hash (for HLEN), so batch users are listed as given.
        batch_users = set(users)
        inter_users = [*users, *dict.fromkeys(user for user, _ in pairs if user not in batch_users)]
        inter_index: dict[str, int] = {}
        for position, user in enumerate(inter_users):
            inter_index.setdefault(user, 9 + position)  # KEYS index, 1-based in Lua
        try:
            reply = self._read_script(
                keys=[
                    keys.current,
                    keys.version_meta(version),
                    keys.rows(version, "users"),
                    keys.rows(version, "items"),
                    keys.item_counts,
                    keys.stats,
                    keys.gramian(version, "items"),
                    keys.gramian(version, "users"),
                    *(keys.inter(user) for user in inter_users),
                ],
                args=[
                    version,
                    1 if implicit else 0,
                    k,
                    len(users),
                    len(items),
                    len(pairs),
                    join_ids(users),
                    join_ids(items),
                    join_ids([item for _, item in pairs]),
                    np.array([inter_index[user] for user, _ in pairs], dtype="<u4").tobytes(),
                ],
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
        inter_index = {user: 12 + i for i, user in enumerate(pair_users)}  # KEYS index, 1-based in Lua

        def gramian_delta(delta: np.ndarray | None) -> bytes:
            # Explicit models keep no Gramians: a delta is ignored, as in the in-memory twin.
            if not implicit or delta is None:
                return b""
            return np.asarray(delta, dtype=GRAMIAN_DTYPE).reshape(k, k).tobytes()

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
        args: list[bytes | str | int] = [
            update.version,
            k,
            1 if implicit else 0,
            n_users,
            n_items,
            len(update.pair_users),
            repr(float(update.value_sum_delta)),
            int(update.value_count_delta),
            int(update.events_applied),
            join_ids(update.users),
            user_rows.astype(ROW_DTYPE).tobytes(),
            join_ids(update.items),
            np.asarray(update.item_base).reshape(n_items, k).astype(ROW_DTYPE).tobytes(),
            item_deltas.astype(GRAMIAN_DTYPE).tobytes(),
            np.asarray(update.item_count_delta).astype("<i8").tobytes(),
            join_ids(update.pair_items),
            np.array([inter_index[user] for user in update.pair_users], dtype="<u4").tobytes(),
            np.asarray(update.pair_values, dtype="<f8").tobytes(),
            gramian_delta(update.item_gramian_delta),
            gramian_delta(update.user_gramian_delta),
            repr(min(float(update.max_abs_factor), 1e308)),  # Lua's tonumber does not read 'inf'
        ]
        for partition, (first, nxt) in update.offsets.items():
            args += [int(partition), int(first), int(nxt)]
        script_keys = [
            keys.current,
            keys.offsets,
            keys.version_meta(update.version),
            keys.rows(update.version, "users"),
            keys.rows(update.version, "items"),
            keys.item_counts,
            keys.stats,
            keys.gramian(update.version, "items"),
            keys.gramian(update.version, "users"),
            keys.changed(update.version, "users"),
            keys.changed(update.version, "items"),
            *(keys.inter(user) for user in pair_users),
        ]
        try:
            outcome = self._apply_script(keys=script_keys, args=args)
        except redis.ResponseError as exc:
            raise store_error_from(exc) or exc from None
        return ApplyOutcome(outcome.decode())

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        keys = self.keys
        for _ in range(_SNAPSHOT_ATTEMPTS):
            versions = self._versions_with_rows()
            script_keys = [keys.current, keys.offsets, keys.inter(user), keys.item_counts, keys.stats]
            for version in versions:
                script_keys += [
                    keys.version_meta(version),
                    keys.rows(version, "users"),
                    keys.gramian(version, "users"),
                    keys.changed(version, "users"),
                ]
            args: list[str | int] = [user, self._model.k, int(self._model.mode == "implicit"), len(versions)]
            args += versions
            for partition, (first, nxt) in (offsets or {}).items():
                args += [int(partition), int(first), int(nxt)]
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
        retired = {int(v) for v in self._client.zrange(self.keys.retired, 0, -1)}
        return sorted(retired | set(range(current, max(current, last) + 1)))

    def applied_offsets(self) -> dict[int, int]:
        raw = self._client.hgetall(self.keys.offsets)
        return {
            parse_int(p, self.keys.offsets, "field"): parse_int(o, self.keys.offsets, f"field {p!r}")
            for p, o in raw.items()
        }

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
        meta_key, target = self.keys.version_meta(version), self.keys.rows(version, side)
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, n, _WRITE_CHUNK_ROWS):
            stop = min(start + _WRITE_CHUNK_ROWS, n)
            args = [
                "rows",
                stop - start,
                join_ids(ids[start:stop]),
                blobs[start:stop].tobytes(),
                blobs.shape[1] * 4,
            ]
            self._write_script(keys=[meta_key, target], args=args, client=pipe)
        self._check_written(version, pipe.execute())

    def delete_rows(self, version: int, side: Side, ids: Sequence[str]) -> None:
        """Remove rows from a version being built (users forgotten while a refresh ran)."""
        if not ids:
            return
        meta_key, target = self.keys.version_meta(version), self.keys.rows(version, side)
        written = self._write_script(keys=[meta_key, target], args=["delete", len(ids), join_ids(ids)])
        self._check_written(version, [written])

    def write_gramian(self, version: int, side: Side, gramian: np.ndarray) -> None:
        if self._model.mode != "implicit":
            raise ValueError("explicit models keep no Gramians")
        k = self._model.k
        blob = np.asarray(gramian, dtype=GRAMIAN_DTYPE).reshape(k, k).tobytes()
        written = self._write_script(
            keys=[self.keys.version_meta(version), self.keys.gramian(version, side)], args=["string", blob]
        )
        self._check_written(version, [written])

    def _check_written(self, version: int, results: list[int]) -> None:
        if not all(results):
            raise StoreError(f"{self.keys.version_meta(version)}: version {version} is not being built")

    def publish(self, version: int, expected_current: int) -> bool:
        """Make `version` current iff `current` is still `expected_current` and `version` is newer and being
        built. The old version (and abandoned builds below `version`) are retired, not yet deleted."""
        published = self._publish_script(
            keys=[self.keys.current, self.keys.retired, self.keys.version_meta(version)],
            args=[version, expected_current, self.keys.prefix],
        )
        return bool(published)

    def hold_refresh_lease(self, owner: str, ttl_s: float) -> bool:
        """Take or extend the lease that lets one replica run the periodic refresh (True if held)."""
        return bool(
            self._lease_script(keys=[self.keys.refresh_lease], args=[owner, max(1, int(ttl_s * 1000))])
        )

    def release_refresh_lease(self, owner: str) -> bool:
        """Give the lease up if `owner` holds it (True if it did)."""
        return bool(self._release_lease_script(keys=[self.keys.refresh_lease], args=[owner]))

    def refresh_lease_holder(self) -> str | None:
        holder = self._client.get(self.keys.refresh_lease)
        return None if holder is None else holder.decode()

    def discard_version(self, version: int) -> bool:
        """Give up a version being built (e.g. its publish was refused); `collect_garbage` deletes it."""
        return bool(
            self._discard_script(keys=[self.keys.version_meta(version), self.keys.retired], args=[version])
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
                keys=[self.keys.current, self.keys.version_meta(version)], args=[version, mark, repr(ttl_s)]
            )
        )

    def collect_garbage(self, grace_s: float) -> list[int]:
        """UNLINK (memory freed off the main thread) every version retired more than `grace_s` seconds ago
        by the server's clock, so readers still holding its number get to finish. Returns those versions."""
        seconds, micros = self._client.time()
        cutoff = seconds + micros / 1e6 - grace_s
        due = [int(v) for v in self._client.zrangebyscore(self.keys.retired, "-inf", cutoff)]
        for version in due:
            # One UNLINK per version removes its meta together with its rows: a reader that sees the meta
            # after reading rows knows the rows were whole.
            pipe = self._client.pipeline(transaction=False)
            pipe.unlink(*self.keys.version_keys(version))
            pipe.zrem(self.keys.retired, version)
            pipe.execute()
        return due
