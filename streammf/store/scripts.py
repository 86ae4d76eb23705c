"""The Redis store's Lua scripts (`lua/*.lua`) and, once, the names of their KEYS and ARGV positions.

Each script starts with a generated header, `local K = {current = 1, ...}`, `local A = {...}`, and `NK`,
`NA` (the number of fixed KEYS and ARGV), so the Lua reads `KEYS[K.current]` and Python builds the lists
from the same names (`keys()`, `args()`): nothing has to agree on a magic index. Variable-length tails
(one `inter:<user>` key per batch user, offset triples) follow the fixed positions: `KEYS[NK + i]`,
`ARGV[NA + i]`.

Every key a script touches is passed in KEYS, none is built inside a script (Redis Cluster needs to see
them; tests/unit/test_lua_scripts.py checks the files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

Arg = bytes | str | int | float  # what redis-py sends as a script argument


@dataclass(frozen=True)
class LuaScript:
    name: str  # lua/<name>.lua
    keys: tuple[str, ...]
    args: tuple[str, ...]
    prelude: bool = True  # helpers shared by the scripts (lua/prelude.lua)

    def source(self) -> str:
        header = "\n".join(
            [
                "local K = {" + ", ".join(f"{k} = {i}" for i, k in enumerate(self.keys, 1)) + "}",
                "local A = {" + ", ".join(f"{a} = {i}" for i, a in enumerate(self.args, 1)) + "}",
                f"local NK, NA = {len(self.keys)}, {len(self.args)}",
            ]
        )
        parts = [header, _read("prelude") if self.prelude else "", _read(self.name)]
        return "\n".join(part for part in parts if part)

    def register(self, client: redis.Redis) -> Script:
        return client.register_script(self.source())

    def key_list(self, tail: Sequence[str] = (), **named: str) -> list[str]:
        """KEYS in the declared order (every fixed name required, no other), then `tail`."""
        if set(named) != set(self.keys):
            raise ValueError(f"{self.name}: keys {sorted(named)} != declared {sorted(self.keys)}")
        return [named[key] for key in self.keys] + list(tail)

    def arg_list(self, tail: Sequence[Arg] = (), **named: Arg) -> list[Arg]:
        """ARGV in the declared order, then `tail`."""
        if set(named) != set(self.args):
            raise ValueError(f"{self.name}: args {sorted(named)} != declared {sorted(self.args)}")
        return [named[arg] for arg in self.args] + list(tail)


@cache
def _read(name: str) -> str:
    return resources.files("streammf.store").joinpath("lua", f"{name}.lua").read_text()


def _script(name: str, keys: str, args: str, prelude: bool = True) -> LuaScript:
    return LuaScript(name, tuple(keys.split()), tuple(args.split()), prelude)


LEASE = _script("lease", "lease", "owner ttl_ms", prelude=False)
RELEASE_LEASE = _script("release_lease", "lease", "owner", prelude=False)
SCAN_ROWS = _script("scan_rows", "meta rows", "cursor count row_bytes")
OPEN_SHARD = _script(
    "open_shard",
    "current stats v1_meta v1_gram_items v1_gram_users",
    "zero_gramian incarnation",
    prelude=False,
)
OPEN = _script("open", "meta current next_version", "mode k hyper shards shard_tags", prelude=False)
# Tail: KEYS inter:<user> of each batch user, then of each other pair user.
READ_STATE = _script(
    "read_state",
    "current meta users items item_counts stats gram_items gram_users",
    """version implicit k n_users n_items n_pairs users items pair_items pair_inter_keys n_count_items
    count_items whole_limit""",
)
# Tails: KEYS inter:<user> of each distinct pair user; ARGV n_pair_args (item, value) texts of the pairs
# grouped per user (pair_group_keys/sizes: u32 KEYS index and count per group), then (partition, first,
# next) triples. finishing:
# '1' for the parts of a batch already begun on other shards (they pass a pause).
APPLY = _script(
    "apply",
    """current offsets meta users items item_counts stats gram_items gram_users changed_users changed_items
    popularity""",
    """incarnation finishing version k additive n_users n_items n_pairs value_sum_delta value_count_delta
    events_applied users user_rows items item_base item_deltas item_expected_mask item_expected_rows
    item_new_rows items_as_sent n_count_items count_items count_deltas pair_items pair_inter_keys pair_values
    item_gramian_delta user_gramian_delta item_gramian_expected item_gramian_sum user_gramian_expected
    user_gramian_sum max_abs_factor item_popularity popularity_half_life item_gram_before
    item_gram_after stamp_expected stamp_new stamp_strict count_texts n_pair_args pair_group_keys
    pair_group_sizes""",
)
# Tails: KEYS per version (v:meta, v:users, v:gram:users, v:changed:users); ARGV the version numbers, then
# (partition, first, next) triples.
FORGET_USER = _script(
    "forget_user", "current offsets inter item_counts stats", "incarnation user k implicit n_versions"
)
# Tail: ARGV (partition, first, next) triples.
FORGET_STATS = _script(
    "forget_stats", "current meta offsets stats", "incarnation version implicit value_sum value_count"
)
# ARGV: (partition, first, next) triples.
ADVANCE_OFFSETS = _script("advance_offsets", "offsets stats", "incarnation")
WRITE_ROWS = _script("write_rows", "meta rows", "n ids rows row_bytes")
DELETE_ROWS = _script("delete_rows", "meta rows", "n ids")
WRITE_STRING = _script("write_string", "meta target", "value")
# Tail: KEYS v:meta of every version from the old current one up to (not including) the new one.
PUBLISH = _script("publish", "current retired new_meta", "version expected mode", prelude=False)
SWITCH = _script("switch", "current", "version expected", prelude=False)
HANDOVER = _script("handover", "current meta", "version mark ttl_s", prelude=False)
DISCARD = _script("discard", "meta retired", "version", prelude=False)

# The reader's (streammf.client): one version's rows, 'moved' if it stopped being current.
READ_USER = _script("read_user", "current users inter stats", "version user k with_seen")
READ_ITEMS = _script("read_items", "current items", "version k n items")

ALL = (
    LEASE, RELEASE_LEASE, SCAN_ROWS, ADVANCE_OFFSETS, OPEN_SHARD, OPEN, READ_STATE, APPLY, FORGET_USER,
    FORGET_STATS, WRITE_ROWS, DELETE_ROWS, WRITE_STRING, PUBLISH, SWITCH, HANDOVER, DISCARD, READ_USER,
    READ_ITEMS,
)  # fmt: skip
