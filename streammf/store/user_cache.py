"""A writer's copy of the users it wrote: their rows and every interaction they have, so that a batch
reads from Redis only the users it has not seen (and the items, which every writer changes).

Events are keyed by user, so a partition's owner is normally the only writer of its users. The copy is
trusted only while nobody else wrote: every write of users to the live version (a batch, a forgotten user)
sets the model's writer stamp, and this writer's batches set stamps only it uses. The copy is valid while
the stamp is still the one its own last batch set (`streammf.store.redis_store` compares it, atomically,
in the read and the apply scripts), and for one model version. Anything else empties it: another writer's
batch, a forgotten user, a published refresh, an apply that did not answer 'applied'. An empty copy
costs one full read, as if there were none.

A user is kept only once every interaction they have is known (new users are, from their first batch;
a user with history is when the batch read them all), so a pair not in the copy is new. The copy holds at
most `max_pairs` interactions; past that it is emptied and fills again (a bound on memory, 32–64 bytes per
interaction in a `PairTable`, not an eviction policy).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_, itemgetter

import numpy as np

from streammf.store.pair_table import PairTable

# At most 128 MB of interactions (8M slots of 16 bytes; STREAMMF_REDIS__USER_CACHE_PAIRS).
DEFAULT_USER_CACHE_PAIRS = 3_000_000
# A user read from the store with at most this many interactions is read whole (one HGETALL), so the copy
# can keep them; one with more is read pair by pair each batch, as without a copy.
WHOLE_READ_LIMIT = 500
# After finding the copy stale (another writer on the same model, e.g. a second replica), batches do
# without it (no copy, no whole reads) for 2, 4, ... up to this many batches before trying again: two
# writers taking turns would otherwise pay the copy's reads for nothing.
MAX_DISTRUST_BATCHES = 64


@dataclass(frozen=True)
class WholeUsers:
    """Users a read saw whole: how many interactions each has, and all of them."""

    counts: dict[str, int]
    pairs: dict[tuple[str, str], float]  # (user, item) -> stored value


NO_WHOLE_USERS = WholeUsers({}, {})


@dataclass(frozen=True)
class BatchIds:
    """A batch's users and pairs as the copy's integer ids."""

    users: Sequence[str]
    user_ids: np.ndarray  # (n_users,) int64
    pair_keys: np.ndarray  # (n_pairs,) int64: user id << 32 | item id


class UserCache:
    """Users and items get small integer ids here, rows and counts live in numpy arrays indexed by user id,
    and interactions in one `PairTable` keyed by user id << 32 | item id: a batch is a few vectorised and
    compiled steps, not Python loops over its pairs (this copy must cost the daemon's
    interpreter less than the reads it saves it)."""

    def __init__(self, max_pairs: int, row_width: int, whole_limit: int = WHOLE_READ_LIMIT) -> None:
        """`row_width`: floats per stored row (k factors and the bias)."""
        self.max_pairs = max_pairs
        self.whole_limit = whole_limit
        self.version = 0
        self.stamp = ""  # the writer stamp this writer's last apply set ('' before it applied)
        self._writer = uuid.uuid4().hex
        self._applies = 0
        self._stale_runs = 0  # copies found stale in a row
        self._distrust = 0  # batches left that read every user
        self._user_ids: dict[str, int] = {}
        self._item_ids: dict[str, int] = {}
        self._held = np.zeros(0, dtype=bool)  # per user id: every interaction known, row as stored
        self._rows = np.zeros((0, row_width), dtype=np.float32)  # per user id: factors then bias
        self._counts = np.zeros(0, dtype=np.int64)  # per user id: interactions
        self._pairs = PairTable()  # user id << 32 | item id -> stored value (held users only)

    def __len__(self) -> int:
        """Users held."""
        return int(self._held.sum())

    def clear(self, version: int) -> None:
        self.version = version
        self._user_ids.clear()
        self._item_ids.clear()
        self._held[:] = False
        self._pairs.clear()

    def found_stale(self, version: int) -> None:
        """The store bore another writer's stamp: drop the copy, and do without one for a while (2, 4, ...
        batches): two writers of one model would otherwise pay the copy's reads for nothing."""
        self.clear(version)
        self._stale_runs += 1
        self._distrust = min(2**self._stale_runs, MAX_DISTRUST_BATCHES)

    def found_valid(self) -> None:
        self._stale_runs = 0

    def trusting(self) -> bool:
        """Whether this batch uses the copy (not while distrusted); counts the batch."""
        if self._distrust > 0:
            self._distrust -= 1
            return False
        return True

    def applied_without(self, version: int, stamp: str) -> None:
        """A batch applied without the copy under `stamp` (the copy is empty then)."""
        self.clear(version)
        self.stamp = stamp

    def next_stamp(self) -> str:
        """A stamp no other writer ever sets (this writer's id and its apply count)."""
        self._applies += 1
        return f"{self._writer}:{self._applies}"

    def ids_of(self, users: Sequence[str], pairs: Sequence[tuple[str, str]]) -> BatchIds:
        """Ids for a batch's users and pairs (new names get new ids), looked up once per batch."""
        user_ids = self._assigned_ids(self._user_ids, users)
        self._fit(len(self._user_ids))
        local = dict(zip(users, range(len(users)), strict=True))
        names = list(map(itemgetter(0), pairs))
        positions = list(map(local.get, names, repeat(-1)))
        if -1 in positions:  # a pair of a user not listed (the contract allows it)
            pair_users = self._assigned_ids(self._user_ids, names)
            self._fit(len(self._user_ids))
        else:
            pair_users = user_ids[np.array(positions, dtype=np.int64)]
        item_ids = self._assigned_ids(self._item_ids, list(map(itemgetter(1), pairs)))
        return BatchIds(users, user_ids, (pair_users << 32) | item_ids)

    def held(self, ids: BatchIds) -> np.ndarray:
        """Per user: held in the copy. Call `follow` first."""
        return self._held[ids.user_ids]

    def follow(self, version: int) -> None:
        """Drop a copy of another version."""
        if version != self.version:
            self.clear(version)

    def pairs_held(self, ids: BatchIds) -> np.ndarray:
        """Per pair: its user is held."""
        return self._held[ids.pair_keys >> 32]

    def rows_of(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Held users' (rows (n, k + 1) float32, interaction counts)."""
        return self._rows[user_ids], self._counts[user_ids]

    def values_of(self, pair_keys: np.ndarray) -> np.ndarray:
        """Stored values of pairs of held users, NaN for a pair not stored (meaningless for other users)."""
        return self._pairs.get(pair_keys, np.nan)

    def record(
        self,
        version: int,
        stamp: str,
        read: BatchIds | None,
        users: Sequence[str],
        rows: np.ndarray,
        whole: WholeUsers,
        pair_users: Sequence[str],
        pair_items: Sequence[str],
        pair_values: np.ndarray,
        additive: bool,
    ) -> None:
        """A batch this writer applied under `stamp`: its users' rows as written ((n, k + 1) float32) and
        its pairs, added (implicit strengths) or set (explicit ratings) as the apply script does; `whole`
        has the users read whole for it (they join the copy); `read` the ids of the batch as read (reused
        when the update is of that very batch, the usual case)."""
        self.version, self.stamp = version, stamp
        if read is not None and read.users is users and len(read.pair_keys) == len(pair_users):
            ids = read
        else:  # a part of the batch read (some events were left out): its own ids
            ids = self.ids_of(users, list(zip(pair_users, pair_items, strict=True)))
        self._join(whole)
        mine = self._held[ids.user_ids]
        self._rows[ids.user_ids[mine]] = rows[mine]
        keys = ids.pair_keys
        mine = self._held[keys >> 32]
        self._record_pairs(keys[mine], np.asarray(pair_values, dtype=np.float64)[mine], additive)
        if len(self._pairs) > self.max_pairs or len(self._user_ids) > self.max_pairs:
            self.clear(version)

    def _join(self, whole: WholeUsers) -> None:
        """Users read whole and not held join the copy, with every interaction they have."""
        if not whole.counts:
            return
        candidates = list(whole.counts)
        ids = self._assigned_ids(self._user_ids, candidates)
        self._fit(len(self._user_ids))
        joining = ~self._held[ids]
        if not joining.any():
            return
        names = list(compress(candidates, joining))
        self._counts[ids[joining]] = list(map(whole.counts.__getitem__, names))
        self._held[ids[joining]] = True
        joined = set(names)
        known = [(key, value) for key, value in whole.pairs.items() if key[0] in joined]
        if known:
            users = self._assigned_ids(self._user_ids, [user for (user, _), _ in known])
            items = self._assigned_ids(self._item_ids, [item for (_, item), _ in known])
            self._pairs.set((users << 32) | items, np.array([value for _, value in known], dtype=np.float64))

    def _record_pairs(self, keys: np.ndarray, values: np.ndarray, additive: bool) -> None:
        """Pairs of held users: stored values, and one more interaction per new pair. A pair twice in one
        update builds on its own earlier value, as in the script: strengths are added one after the other
        in stream order, a rating's last value stays."""
        self._pairs.record(keys, values, additive, new_per_owner=self._counts)

    @staticmethod
    def _assigned_ids(mapping: dict[str, int], names: Sequence[str]) -> np.ndarray:
        ids = list(map(mapping.get, names))
        if None in ids:  # only the missing ones in Python
            for j in compress(range(len(ids)), map(is_, ids, repeat(None))):
                ids[j] = mapping.setdefault(names[j], len(mapping))
        return np.array(ids, dtype=np.int64)

    def _fit(self, n_users: int) -> None:
        """Room for `n_users` user ids (arrays grow by doubling)."""
        if n_users <= len(self._held):
            return
        size = max(n_users, 2 * len(self._held), 1024)
        held, rows, counts = self._held, self._rows, self._counts
        self._held = np.zeros(size, dtype=bool)
        self._rows = np.zeros((size, rows.shape[1]), dtype=np.float32)
        self._counts = np.zeros(size, dtype=np.int64)
        self._held[: len(held)], self._rows[: len(rows)], self._counts[: len(counts)] = held, rows, counts
