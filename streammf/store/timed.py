"""A FactorStore wrapper that times every store call into a labelled histogram (op = method name)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from streammf.store.contract import ApplyOutcome, BatchState, BatchUpdate, FactorStore, ModelMeta


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LatencyHistogram(Protocol):
    """A prometheus_client Histogram labelled by op, or anything that records like one."""

    def labels(self, op: str) -> Observer: ...


class TimedStore:
    def __init__(self, store: FactorStore, latency: LatencyHistogram) -> None:
        self.inner = store
        self._read = latency.labels("read_batch_state")
        self._apply = latency.labels("apply")
        self._offsets = latency.labels("applied_offsets")
        self._forget = latency.labels("forget_user")

    def meta(self) -> ModelMeta:
        return self.inner.meta()

    def read_batch_state(
        self, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> BatchState:
        started = time.perf_counter()
        try:
            return self.inner.read_batch_state(users, items, pairs)
        finally:
            self._read.observe(time.perf_counter() - started)

    def apply(self, update: BatchUpdate) -> ApplyOutcome:
        started = time.perf_counter()
        try:
            return self.inner.apply(update)
        finally:
            self._apply.observe(time.perf_counter() - started)

    def begin_apply(
        self, update: BatchUpdate, users: list[str], items: list[str], pairs: list[tuple[str, str]]
    ) -> _TimedPendingApply | None:
        """The inner store's `begin_apply`, if it has one; the apply's time is what the caller waits in
        it and in `outcome` (not the work it does in between)."""
        begin = getattr(self.inner, "begin_apply", None)
        if begin is None:
            return None
        started = time.perf_counter()
        pending = begin(update, users, items, pairs)
        if pending is None:
            return None
        return _TimedPendingApply(pending, self._apply, time.perf_counter() - started)

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        started = time.perf_counter()
        try:
            return self.inner.forget_user(user, offsets)
        finally:
            self._forget.observe(time.perf_counter() - started)

    def applied_offsets(self) -> dict[int, int]:
        started = time.perf_counter()
        try:
            return self.inner.applied_offsets()
        finally:
            self._offsets.observe(time.perf_counter() - started)

    def offsets_ahead(self) -> dict[int, int]:
        return self.inner.offsets_ahead()

    def events_applied(self) -> int:
        return self.inner.events_applied()

    def popular_items(self, n: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        return self.inner.popular_items(n, exclude)


class _TimedPendingApply:
    def __init__(self, pending: Any, observer: Observer, waited_s: float) -> None:
        self.pending, self.observer, self.waited_s = pending, observer, waited_s
        self.next_state: BatchState | None = pending.next_state

    def outcome(self) -> ApplyOutcome:
        started = time.perf_counter()
        try:
            outcome: ApplyOutcome = self.pending.outcome()
            return outcome
        finally:
            self.observer.observe(self.waited_s + time.perf_counter() - started)
