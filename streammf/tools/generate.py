"""A synthetic event stream with a known low-rank ground truth, for the demo and the tests.

Pure and seeded: no I/O, and the same arguments give the same events, call after call.

The world behind the events:
  * every user u and item i has a true factor vector (rank `k_true`) and a bias; the true score of a pair
    is ``global_mean + b_u + b_i + <p_u, q_i>`` (explicit) or the affinity ``<p_u, q_i>`` (implicit);
  * item popularity is Zipf-like (weight ``rank ** -popularity_exponent``, ranks shuffled over the ids so
    that items joining late can be hits too) and user activity is heavy-tailed (Pareto weights);
  * the user base and the catalogue grow linearly: at the first event only `initial_fraction` of each
    exists; the rest join one by one until all exist at the last event (or at `growth_events`);
  * each event picks a user by activity, draws `candidates` items by popularity and keeps the one the user
    prefers (Gumbel-max on ``preference_strength * affinity``), so which items a user touches carries the
    preference signal, as in real implicit data;
  * explicit mode rates it ``clip(round(true score + noise), 1, 5)``; implicit mode records a click
    (value 1) or, more often for liked items, a purchase (value 5, event_type "purchase").

`records(n)` gives the Kafka payloads (key = user id, value = `encode(event)`); with `poison_rate > 0` that
share of them is replaced by bad payloads of every kind `decode` (streammf.stream.events) rejects, for
fault tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple, get_args

import numpy as np

from streammf.stream.events import Event, encode

Mode = Literal["explicit", "implicit"]
PoisonKind = Literal["undecodable", "schema", "non_finite", "oversized"]
POISON_KINDS: tuple[PoisonKind, ...] = get_args(PoisonKind)

USER_PREFIX = "u"
ITEM_PREFIX = "i"
# Events are drawn in vectorised chunks; the size only trades memory for per-chunk overhead.
_CHUNK = 4096


def user_id(index: int) -> str:
    return f"{USER_PREFIX}{index}"


def item_id(index: int) -> str:
    return f"{ITEM_PREFIX}{index}"


class SyntheticRecord(NamedTuple):
    key: bytes
    value: bytes
    poison: PoisonKind | None  # None for a valid event


class SyntheticStream:
    def __init__(
        self,
        mode: Mode = "explicit",
        n_users: int = 1000,
        n_items: int = 500,
        k_true: int = 8,
        seed: int = 0,
        *,
        initial_fraction: float = 0.2,
        growth_events: int | None = None,
        popularity_exponent: float = 1.0,
        activity_shape: float = 1.5,
        candidates: int = 8,
        preference_strength: float = 2.0,
        global_mean: float = 3.0,
        user_bias_std: float = 0.4,
        item_bias_std: float = 0.5,
        interaction_std: float = 0.8,
        noise_std: float = 0.5,
        purchase_rate: float = 0.05,
        events_per_second: float = 50.0,
        start_time: float = 1_700_000_000.0,
        poison_rate: float = 0.0,
        oversized_bytes: int = 16_384,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`growth_events`: the event index by which every user and item exists (default: the n of each
        `events(n)` call). `interaction_std`: the spread of the true ``<p_u, q_i>``. Users pick items they
        like, so observed ratings average above `global_mean` (about 3.6 with the defaults, like MovieLens).
        `oversized_bytes`:
        size of the oversized poison records; it must exceed the consumer's `max_record_bytes`. `clock`:
        stamp each record with this clock as it is taken from `records` (e.g. `time.time`, so a replay's
        events carry the time they were sent); None keeps the reproducible synthetic clock that starts at
        `start_time` and ticks at `events_per_second`."""
        if mode not in get_args(Mode):
            raise ValueError(f"mode must be one of {get_args(Mode)}, got {mode!r}")
        if min(n_users, n_items, k_true, candidates) < 1:
            raise ValueError("n_users, n_items, k_true and candidates must be >= 1")
        if not 0.0 <= initial_fraction <= 1.0 or not 0.0 <= poison_rate <= 1.0:
            raise ValueError("initial_fraction and poison_rate must be within [0, 1]")
        if growth_events is not None and growth_events < 1:
            raise ValueError("growth_events must be >= 1")
        if events_per_second <= 0 or activity_shape <= 0 or popularity_exponent < 0:
            raise ValueError("events_per_second and activity_shape must be > 0, popularity_exponent >= 0")
        self.mode: Mode = mode
        self.n_users, self.n_items, self.k_true, self.seed = n_users, n_items, k_true, seed
        self.initial_fraction, self.growth_events = initial_fraction, growth_events
        self.candidates, self.preference_strength = candidates, preference_strength
        self.global_mean, self.noise_std, self.purchase_rate = global_mean, noise_std, purchase_rate
        self.events_per_second, self.start_time = events_per_second, start_time
        self.poison_rate, self.oversized_bytes = poison_rate, oversized_bytes
        self.clock = clock

        # Independent streams: the ground truth does not change when the event or poison draws do.
        truth_seed, self._event_seed, self._poison_seed = np.random.SeedSequence(seed).spawn(3)
        truth = np.random.default_rng(truth_seed)
        # Per-factor std s with k * s**4 = interaction_std**2, so <p_u, q_i> has about that spread.
        factor_std = (interaction_std**2 / k_true) ** 0.25
        self.user_factors = truth.normal(0.0, factor_std, (n_users, k_true))
        self.item_factors = truth.normal(0.0, factor_std, (n_items, k_true))
        self.user_bias = truth.normal(0.0, user_bias_std, n_users)
        self.item_bias = truth.normal(0.0, item_bias_std, n_items)
        popularity_rank = truth.permutation(n_items) + 1
        self.item_popularity = popularity_rank.astype(np.float64) ** -popularity_exponent
        self.user_activity = truth.pareto(activity_shape, n_users) + 1.0
        for array in (self.user_factors, self.item_factors, self.user_bias, self.item_bias):
            array.flags.writeable = False
        self._user_cumulative = np.cumsum(self.user_activity)
        self._item_cumulative = np.cumsum(self.item_popularity)

    # ----------------------------------------------------------------------------------- ground truth

    def true_score(self, user: int | str, item: int | str) -> float:
        """The noise-free score of a pair: the expected rating before rounding and clipping (explicit), or
        the affinity that steers which items a user picks (implicit). Takes indices or ids ('u3', 'i7')."""
        u, i = _index(user, USER_PREFIX, self.n_users), _index(item, ITEM_PREFIX, self.n_items)
        affinity = float(self.user_factors[u] @ self.item_factors[i])
        if self.mode == "implicit":
            return affinity
        return self.global_mean + float(self.user_bias[u] + self.item_bias[i]) + affinity

    def true_scores(self, user: int | str) -> np.ndarray:
        """`true_score` of one user against every item, indexed by item index."""
        u = _index(user, USER_PREFIX, self.n_users)
        affinity = self.item_factors @ self.user_factors[u]
        if self.mode == "implicit":
            return affinity
        return self.global_mean + self.user_bias[u] + self.item_bias + affinity

    # ----------------------------------------------------------------------------------------- events

    def events(self, n: int) -> Iterator[Event]:
        """n valid events with non-decreasing timestamps."""
        for columns in self._event_chunks(n):
            yield from _chunk_events(*columns)

    def records(self, n: int) -> Iterator[tuple[bytes, bytes]]:
        """n Kafka records (key, value); a `poison_rate` share of them are bad payloads. Without poison,
        the values are exactly ``encode(e)`` of ``events(n)``; poison replaces events one for one and
        keeps the replaced event's key, so the valid records still line up with ``events(n)``."""
        for record in self.labelled_records(n):
            yield record.key, record.value

    def labelled_records(self, n: int) -> Iterator[SyntheticRecord]:
        """`records(n)`, each tagged with its poison kind (None for a valid event). A valid event's payload
        is written here, not through the Event model (see `_event_json`): a replay at a fixed rate makes
        them as it sends them, and the model's ~20 µs per event held one core to ~15,000 events/s."""
        poison_rng = np.random.default_rng(self._poison_seed)
        for users, items, values, timestamps, purchases in self._event_chunks(n):
            poisoned = (poison_rng.random(len(users)) < self.poison_rate).tolist()
            kinds = _event_types(purchases, len(users))
            columns = (users.tolist(), items.tolist(), values.tolist(), timestamps.tolist(), kinds, poisoned)
            for user, item, value, timestamp, event_type, is_poison in zip(*columns, strict=True):
                if self.clock is not None:
                    timestamp = self.clock()
                uid, iid = user_id(user), item_id(item)
                if is_poison:
                    event = _event(uid, iid, value, timestamp, event_type)
                    kind = POISON_KINDS[poison_rng.integers(len(POISON_KINDS))]
                    yield SyntheticRecord(uid.encode(), self._poison_payload(kind, event, poison_rng), kind)
                else:
                    yield SyntheticRecord(
                        uid.encode(), _event_json(uid, iid, value, timestamp, event_type), None
                    )

    def _event_chunks(
        self, n: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """Columns (users, items, values, timestamps, purchase flags or None) of successive chunks."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(self._event_seed)
        growth = self.growth_events or n
        initial_users = max(1, math.ceil(self.initial_fraction * self.n_users))
        initial_items = max(1, math.ceil(self.initial_fraction * self.n_items))
        clock = self.start_time
        for start in range(0, n, _CHUNK):
            position = np.arange(start, min(n, start + _CHUNK))
            size = len(position)
            progress = np.minimum(position / max(growth - 1, 1), 1.0)
            active_users = initial_users + np.floor((self.n_users - initial_users) * progress).astype(
                np.int64
            )
            active_items = initial_items + np.floor((self.n_items - initial_items) * progress).astype(
                np.int64
            )

            users = _sample_prefix(self._user_cumulative, active_users, rng.random(size))
            candidate_draws = rng.random((size, self.candidates))
            candidates = _sample_prefix(self._item_cumulative, active_items[:, None], candidate_draws)
            affinity = np.einsum("nk,nck->nc", self.user_factors[users], self.item_factors[candidates])
            preference = self.preference_strength * affinity + rng.gumbel(size=affinity.shape)
            chosen = np.argmax(preference, axis=1)
            rows = np.arange(size)
            items, chosen_affinity = candidates[rows, chosen], affinity[rows, chosen]

            timestamps = clock + np.cumsum(rng.exponential(1.0 / self.events_per_second, size))
            clock = float(timestamps[-1])
            if self.mode == "explicit":
                score = self.global_mean + self.user_bias[users] + self.item_bias[items] + chosen_affinity
                noisy = score + rng.normal(0.0, self.noise_std, size)
                yield users, items, np.clip(np.rint(noisy), 1.0, 5.0), timestamps, None
            else:
                # Liked items are bought more often; the mean purchase probability stays near purchase_rate.
                purchase_probability = self.purchase_rate * 2.0 / (1.0 + np.exp(-2.0 * chosen_affinity))
                purchases = rng.random(size) < purchase_probability
                yield users, items, np.where(purchases, 5.0, 1.0), timestamps, purchases

    def _poison_payload(self, kind: PoisonKind, event: Event, rng: np.random.Generator) -> bytes:
        """A payload `decode` rejects with reason `kind`. None contains a newline, so JSON-lines output of
        `records` stays one record per line."""
        good = event.model_dump(mode="json", exclude_none=True)
        variant = int(rng.integers(3))
        if kind == "undecodable":
            return (b"\x80\x81\xfe not utf-8", encode(event)[:-7], b"user_id=u1 item_id=i1")[variant]
        if kind == "schema":
            broken: object = (
                {key: value for key, value in good.items() if key != "user_id"},  # required field missing
                [good["user_id"], good["item_id"], good["value"]],  # not an object
                {**good, "weight": -1.0},  # out of range
            )[variant]
            return json.dumps(broken).encode()
        if kind == "non_finite":
            # json.dumps writes NaN/Infinity (not JSON, but what buggy producers send and json.loads reads).
            return json.dumps({**good, "value": (math.nan, math.inf, -math.inf)[variant]}).encode()
        padding = "x" * self.oversized_bytes
        return json.dumps({**good, "padding": padding}).encode()


def _sample_prefix(cumulative: np.ndarray, active: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Indices drawn with probability proportional to the weights, among the first `active` entries only
    (`cumulative` is the cumulative sum of the weights; `active` broadcasts against `uniform`)."""
    targets = uniform * cumulative[active - 1]
    return np.minimum(np.searchsorted(cumulative, targets, side="right"), active - 1)


def _event_types(purchases: np.ndarray | None, n: int) -> list[str]:
    if purchases is None:
        return ["rating"] * n
    return ["purchase" if bought else "click" for bought in purchases.tolist()]


def _chunk_events(
    users: np.ndarray,
    items: np.ndarray,
    values: np.ndarray,
    timestamps: np.ndarray,
    purchases: np.ndarray | None,
) -> list[Event]:
    return [
        _event(user_id(u), item_id(i), v, t, kind)
        for u, i, v, t, kind in zip(
            users.tolist(),
            items.tolist(),
            values.tolist(),
            timestamps.tolist(),
            _event_types(purchases, len(users)),
            strict=True,
        )
    ]


def _event(user: str, item: str, value: float, timestamp: float, event_type: str) -> Event:
    return Event(
        user_id=user, item_id=item, value=value, weight=1.0, timestamp=timestamp, event_type=event_type
    )


def _event_json(user: str, item: str, value: float, timestamp: float, event_type: str) -> bytes:
    """`encode` of the event, byte for byte, without the model: ids, event types and the weight 1.0 here
    need no escaping, and a float Python writes without an exponent (1e-4 <= |x| < 1e16) is written the
    same, shortest round-trip digits, by pydantic; any other goes through the model."""
    value_text, time_text = repr(value), repr(timestamp)
    if "e" in value_text or "e" in time_text or "n" in value_text or "n" in time_text:
        return encode(_event(user, item, value, timestamp, event_type))
    return (
        f'{{"user_id":"{user}","item_id":"{item}","value":{value_text},"weight":1.0,'
        f'"timestamp":{time_text},"event_type":"{event_type}"}}'
    ).encode()


def _index(identifier: int | str, prefix: str, limit: int) -> int:
    if isinstance(identifier, str):
        if not identifier.startswith(prefix) or not identifier[len(prefix) :].isdigit():
            raise KeyError(f"{identifier!r} is not a synthetic id like '{prefix}42'")
        identifier = int(identifier[len(prefix) :])
    if not 0 <= identifier < limit:
        raise KeyError(f"index {identifier} outside 0..{limit - 1}")
    return identifier
