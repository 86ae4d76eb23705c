"""The daemon's learner in a process of its own, behind the loop-facing methods of a `Learner`.

One interpreter runs one thread of Python at a time. In one process the loop's thread (the Kafka client,
decoding) and the learner's (the batch plan, the copy of users, packing the store's scripts) took turns
on one lock, so a daemon could not use more than one core for its Python. Here the learner, its store and
its copy of users live in a child process: the loop hands it a batch's columns and offsets over a pipe
and gets the `StepResult` back. The calls are the same, made in the same order, one at a time, so the
store sees what an in-process learner would have done: exactly once still rests on the offsets each
apply writes with its effect.

A child that dies (killed, out of memory) is started again at the next call; the call it was serving
raises `StoreUnavailableError`, which the loop treats as a write to a store that may have lost what it
acknowledged: it abandons the batch and learns again from Redis where each partition stands. A child
that cannot be started again (Redis unreachable) is the same transient error, retried with backoff; one
that dies `MAX_DEATHS_IN_A_ROW` times without answering a call in between (a batch that kills it every
time) stops the daemon with `LearnerProcessError`, loudly, rather than restarting it forever. The child
attaches to the model the daemon opened and never creates one: a model gone meanwhile is lost state.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from streammf.store.contract import (
    ApplyOutcome,
    StoreLostStateError,
    StoreUnavailableError,
    StoreUnsafeError,
)
from streammf.stream.events import EventColumns
from streammf.stream.learner import (
    Ahead,
    BatchSkipped,
    Computed,
    LearnerParams,
    PendingBatch,
    StepResult,
)

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from streammf.config import Settings

log = logging.getLogger(__name__)

# A child must answer its first message within this (imports, numba's cached kernels, opening the store).
START_TIMEOUT_S = 120.0

# Deaths without a call answered in between, after which the daemon stops instead of starting another.
MAX_DEATHS_IN_A_ROW = 3

Timings = list[tuple[str, float]]  # (store call, seconds) observed in the child since its last message


class LearnerProcessError(RuntimeError):
    """The learner process could not be started, or keeps dying."""


class LearnerProcess:
    """A `Learner` in a child process: `submit`, `learn`, `applied_offsets`, `offsets_ahead` and
    `forget_user`, as the loop calls them. The child's store-call latencies are observed into `latency`.

    Calls are messages down one pipe, answered in order. `submit` only sends, so the loop can hand over the
    next batch while the child is busy with one: the child then starts it the moment the previous one is
    answered, instead of waiting for the loop to account for that one first. Answers are read in the
    order submitted (an answer nobody waited for is read and dropped before a later one)."""

    def __init__(self, settings: Settings, params: LearnerParams, latency: Histogram | None = None) -> None:
        self.settings = settings
        self.params = params
        self.latency = latency
        self._context = multiprocessing.get_context("spawn")  # not fork: this process runs threads
        self._send_lock = threading.Lock()  # one message at a time down the pipe, whichever thread sends
        self._receive_lock = threading.Lock()  # one reader of answers at a time
        self._process: Any = None
        self._pipe: Connection | None = None
        self._outstanding: deque[_Ticket] = deque()  # sent, answer not read yet; oldest first
        self._calls = 0
        self._deaths_in_a_row = 0
        self._start()

    def submit(
        self, events: EventColumns, offsets: dict[int, tuple[int, int]], after: PendingBatch | None = None
    ) -> PendingBatch:
        """Hand a batch to the child and return at once (`Learner.learn` there, when its turn comes).
        `after`: a batch submitted before, which the child must have applied, or this one is skipped."""
        return self._submit("learn", (events, offsets), after)

    def learn(
        self,
        events: EventColumns,
        offsets: dict[int, tuple[int, int]],
        on_diverged: Callable[[list[int]], None] | None = None,
    ) -> StepResult:
        """`Learner.learn` in the child; `on_diverged` runs here, before the child applies anything."""
        return self.submit(events, offsets).wait(on_diverged)

    def applied_offsets(self) -> dict[int, int]:
        offsets: dict[int, int] = self._submit("applied_offsets", ()).wait()
        return offsets

    def offsets_ahead(self) -> dict[int, int]:
        offsets: dict[int, int] = self._submit("offsets_ahead", ()).wait()
        return offsets

    def forget_user(self, user: str, offsets: dict[int, tuple[int, int]] | None = None) -> ApplyOutcome:
        outcome: ApplyOutcome = self._submit("forget_user", (user, offsets)).wait()
        return outcome

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to exit after the calls sent before, and wait for it (then kill it)."""
        with self._send_lock:
            process, pipe = self._process, self._pipe
            self._process = self._pipe = None
            if process is None or pipe is None:
                return
            with contextlib.suppress(OSError):  # already gone
                pipe.send(None)
            process.join(timeout_s)
            if process.is_alive():
                log.warning("learner process did not exit within %.0fs: killing it", timeout_s)
                process.kill()
                process.join()
            pipe.close()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=serve, args=(child_end, self.settings, self.params), name="streammf-learner", daemon=True
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the child dies
        self._process, self._pipe = process, parent_end
        started = time.monotonic()
        if not parent_end.poll(START_TIMEOUT_S):
            self._discard()
            raise LearnerProcessError(f"the learner process did not start within {START_TIMEOUT_S:.0f}s")
        try:
            kind, payload, _ = parent_end.recv()
        except (EOFError, OSError) as exc:
            code = self._discard()
            raise LearnerProcessError(f"the learner process exited while starting (code {code})") from exc
        if kind == "error":
            self._discard()
            raise payload
        log.info("learner process %d ready in %.1fs", process.pid, time.monotonic() - started)

    def _submit(self, method: str, args: tuple[Any, ...], after: PendingBatch | None = None) -> _Ticket:
        """Send a call; what goes wrong sending it is raised by the ticket's `wait`."""
        with self._send_lock:
            self._calls += 1
            ticket = _Ticket(self, self._calls, method)
            try:
                if after is not None and not self._in_this_child(after):
                    # The child that had the batch before is gone (or never had it): nothing says it applied.
                    raise BatchSkipped("the learner process that had the batch before this one is gone")
                if self._process is None:
                    self._restart()
                ticket.pipe = self._pipe
                self._send(
                    (method, args, ticket.call, after.call if isinstance(after, _Ticket) else None), method
                )
            except Exception as exc:
                ticket.error = exc
                return ticket
            self._outstanding.append(ticket)
        return ticket

    def _in_this_child(self, ticket: PendingBatch) -> bool:
        return (
            isinstance(ticket, _Ticket)
            and ticket.owner is self
            and ticket.pipe is not None
            and (ticket.pipe is self._pipe)
        )

    def _wait(self, ticket: _Ticket, on_diverged: Callable[[list[int]], None] | None) -> Any:
        """The answer to `ticket`. Answers to calls sent before it whose waits have not come yet are read
        first and kept for them (the pipe answers in order)."""
        with self._receive_lock:
            if ticket.answer is None:
                while True:
                    if ticket not in self._outstanding:  # discarded with the child that had it
                        raise StoreUnavailableError(
                            f"the learner process that had this {ticket.method} call is gone; its store "
                            "writes, if any, are fenced by their offsets"
                        )
                    head = self._outstanding.popleft()
                    if head is ticket:
                        return self._answer(ticket, on_diverged)
                    head.answer = self._answer_early(head)
        kind, payload = ticket.answer
        if kind == "error":
            raise payload
        return payload

    def _answer_early(self, ticket: _Ticket) -> tuple[str, Any]:
        """A call's answer, read before its wait: diverged events it reports cannot be dead-lettered
        then, so such a batch is not applied."""

        def refuse(positions: list[int]) -> None:
            raise BatchSkipped("diverged events reported before anyone waited for the batch: not applied")

        try:
            return "result", self._answer(ticket, refuse)
        except Exception as exc:
            return "error", exc

    def _answer(self, ticket: _Ticket, on_diverged: Callable[[list[int]], None] | None) -> Any:
        if ticket.pipe is not self._pipe:
            raise StoreUnavailableError(
                f"the learner process that had this {ticket.method} call is gone; its store writes, if any, "
                "are fenced by their offsets"
            )
        while True:
            kind, payload = self._receive(ticket.method)
            if kind == "result":
                self._deaths_in_a_row = 0
                return payload
            if kind == "error":
                raise payload
            assert kind == "diverged"
            # The child waits to hear whether it may apply: not if the parent cannot take them.
            try:
                if on_diverged is not None:
                    on_diverged(payload)
            except BaseException:
                with self._send_lock:
                    self._send(False, ticket.method)
                self._receive(ticket.method)  # the child's answer: it gave the batch up
                raise
            with self._send_lock:
                self._send(True, ticket.method)

    def _restart(self) -> None:
        """Start a child after a death (or after `close`). Lost state and an unsafe store are raised as
        they are; anything else that keeps the child from starting is transient for the loop."""
        if self._deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            raise LearnerProcessError(
                f"the learner process died {self._deaths_in_a_row} times in a row without finishing a "
                "call: not starting it again (its errors and exit codes are logged above)"
            )
        try:
            self._start()
        except (StoreLostStateError, StoreUnsafeError):
            raise
        except Exception as exc:
            self._deaths_in_a_row += 1
            raise StoreUnavailableError(f"the learner process could not be started again: {exc}") from exc

    def _send(self, message: Any, method: str) -> None:
        pipe = self._pipe
        if pipe is None:
            raise StoreUnavailableError(f"the learner process is gone (during {method})")
        try:
            pipe.send(message)
        except OSError as exc:
            raise self._died(method, pipe) from exc

    def _receive(self, method: str) -> tuple[str, Any]:
        """The child's next message; the store-call timings it carries are observed here."""
        pipe = self._pipe
        if pipe is None:
            raise StoreUnavailableError(f"the learner process is gone (during {method})")
        try:
            kind, payload, timings = pipe.recv()
        except (EOFError, OSError) as exc:
            raise self._died(method, pipe) from exc
        self._observe(timings)
        return kind, payload

    def _died(self, method: str, pipe: Connection) -> StoreUnavailableError:
        if pipe is self._pipe:  # the first to notice counts the death (the other thread may notice too)
            code = self._discard()
            self._deaths_in_a_row += 1
            log.error("the learner process died (exit code %s): starting another at the next call", code)
        else:
            code = None
        return StoreUnavailableError(
            f"the learner process died during {method} (exit code {code}); its store writes, if any, "
            "are fenced by their offsets"
        )

    def _observe(self, timings: Timings) -> None:
        if self.latency is not None:
            for op, seconds in timings:
                self.latency.labels(op).observe(seconds)

    def _discard(self) -> int | None:
        """Forget a child that is gone or useless; its exit code."""
        process, pipe = self._process, self._pipe
        self._process = self._pipe = None
        self._outstanding.clear()
        if pipe is not None:
            pipe.close()
        if process is None:
            return None
        process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join()
        return int(process.exitcode) if process.exitcode is not None else None


class _Ticket:
    """A call sent to the child (`LearnerProcess._submit`): its number, and the pipe it went down."""

    def __init__(self, owner: LearnerProcess, call: int, method: str) -> None:
        self.owner, self.call, self.method = owner, call, method
        self.pipe: Connection | None = None
        self.error: Exception | None = None  # raised by `wait`: the call could not be sent
        self.answer: tuple[str, Any] | None = None  # read before its wait (`LearnerProcess._wait`)

    def wait(self, on_diverged: Callable[[list[int]], None] | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.owner._wait(self, on_diverged)


class _NotApplied(Exception):
    """The parent could not dead-letter a batch's diverged events: the batch is not applied."""


class _TimingLog:
    """What `TimedStore` records to in the child: (op, seconds) pairs, sent with the next message."""

    def __init__(self) -> None:
        self.entries: Timings = []

    def labels(self, op: str) -> _Observer:
        return _Observer(op, self.entries)

    def drain(self) -> Timings:
        entries, self.entries[:] = list(self.entries), []
        return entries


class _Observer:
    def __init__(self, op: str, entries: Timings) -> None:
        self.op, self.entries = op, entries

    def observe(self, seconds: float) -> None:
        self.entries.append((self.op, seconds))


def serve(pipe: Connection, settings: Settings, params: LearnerParams) -> None:
    """The child's main: open the store, then answer calls until told to stop or the parent is gone."""
    # The parent decides when the child stops: a Ctrl-C reaches the whole process group. (SIGTERM is
    # left as it is: only the parent gets one from a container runtime, and multiprocessing's exit
    # handler may need it to end a child the parent could not close.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from streammf.logs import configure_logging
    from streammf.store.connect import redis_client
    from streammf.store.timed import TimedStore
    from streammf.stream.daemon import attach_store, tune_interpreter
    from streammf.stream.learner import Learner

    configure_logging(settings.log_level, settings.log_format)
    timings = _TimingLog()
    try:
        store = attach_store(settings, redis_client(settings))  # the daemon created it if absent
        store.cache_users(settings.redis.user_cache_pairs)
        learner = Learner(TimedStore(store, timings), params)
    except Exception as exc:
        pipe.send(("error", _portable(exc), []))
        return
    tune_interpreter()
    pipe.send(("ready", os.getpid(), []))
    inbox: deque[Any] = deque()  # calls read but not served yet (in order)
    took_effect: dict[int, bool] = {}  # call number -> its batch was applied (or found applied before)
    computed: dict[int, Computed] = {}  # call number -> its batch, computed while the one before applied
    while True:
        try:
            request = inbox.popleft() if inbox else pipe.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if request is None:
            return
        if type(request) is bool:  # the word on a batch given up already
            continue
        method, args, call, after = request
        took_effect[call] = False
        try:
            if after is not None and not took_effect.get(after, False):
                raise BatchSkipped("the batch before this one was not applied: this one is not learnt")
            if method == "learn":
                events, offsets = args
                # The next batch, if it has been sent by the time this one's apply goes out and follows
                # this one: computed while the apply runs (it holds only if this one applies, and it is
                # the next call served).
                following: list[int] = []

                def ahead(call: int = call, following: list[int] = following) -> Ahead | None:
                    message = _next_call(pipe, inbox)
                    if message is None or message[0] != "learn" or message[3] != call:
                        return None
                    following.append(message[2])
                    events_and_offsets: Ahead = message[1]
                    return events_and_offsets

                hear = partial(_ask_parent, pipe, inbox, timings)
                result, done = learner.learn_ahead(events, offsets, hear, ahead, computed.pop(call, None))
                computed.clear()
                if done is not None:
                    computed[following[-1]] = done
                took_effect[call] = result.outcome in (ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE)
                answer: tuple[str, Any] = ("result", result)
            else:
                answer = ("result", getattr(learner, method)(*args))
        except Exception as exc:
            answer = ("error", _portable(exc))
        for old in [c for c in took_effect if c < call - 16]:  # only the last few are ever asked about
            del took_effect[old]
        try:
            pipe.send((*answer, timings.drain()))
        except (EOFError, OSError):
            return


def _next_call(pipe: Connection, inbox: deque[Any]) -> Any:
    """The next call to serve if it has been sent (read into `inbox`, not taken), else None."""
    while not inbox and pipe.poll(0):
        message = pipe.recv()
        if type(message) is not bool:  # a word on a batch given up already
            inbox.append(message)
    return inbox[0] if inbox and inbox[0] is not None else None


def _ask_parent(pipe: Connection, inbox: deque[Any], timings: _TimingLog, positions: list[int]) -> None:
    """Tell the parent of diverged events and wait for its word (calls sent meanwhile wait in `inbox`)."""
    pipe.send(("diverged", positions, timings.drain()))
    while True:
        message = pipe.recv()
        if type(message) is bool:
            if not message:
                raise _NotApplied
            return
        inbox.append(message)
        if message is None:  # told to stop
            raise _NotApplied


def _portable(exc: Exception) -> Exception:
    """`exc` with the child's traceback as a note, or, if it cannot cross the pipe, a RuntimeError
    that says what it was."""
    exc.add_note("in the learner process:\n" + "".join(traceback.format_exception(exc)).rstrip())
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
