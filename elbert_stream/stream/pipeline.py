"""The pieces the worker's stages are joined with: bounded channels, the in-flight budget, the
per-stage clocks, and the epoch filter that drops a revoked partition's work. No Kafka client and no
torch here, so the logic is unit-tested with plain objects.

* ``Channel``: a FIFO of items between two stage threads, handed over in batches (one lock round per
  batch, not per item). ``put`` blocks while the channel holds ``capacity`` items or more (None: no
  bound of its own, the ``Budget`` bounds it); ``urgent`` items (``Worker.classify``'s) skip the bound
  and go first, and ``get_urgent`` takes them alone (the engine stage, whose backlog is not empty).
  ``close`` (the producer is done: the consumer drains it, then ``get`` returns None) and ``abort``
  (a stage failed: every waiter wakes, ``put`` returns False) end it.
* ``Budget``: how many polled messages may be on their way to the engine (polled, not yet queued in
  the engine, dead-lettered or dropped). The intake polls at most what is left and pauses every
  partition while nothing is: backpressure from the engine's queue back to the broker.
* ``StageClock``: busy seconds and items of one stage (written by its thread, read by ``stats``).
* ``keep_current``: the items of a batch whose partition assignment (``OffsetTracker`` epoch) is still
  live; a revoked partition's work is dropped wherever it is, its new owner reads it again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from elbert_stream.errors import BadMessage
from elbert_stream.stream.records import InputMessage

T = TypeVar("T")


@dataclass(slots=True)
class DeadLetter:
    """An input that cannot be processed, on its way to the output stage (dead-letter topic)."""

    msg: InputMessage
    error: BadMessage


class Channel(Generic[T]):
    """Bounded FIFO between two stages (see the module doc). Thread-safe."""

    def __init__(self, name: str, capacity: int | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._urgent: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._aborted = False

    def __len__(self) -> int:
        return len(self._items) + len(self._urgent)

    def put(self, items: Iterable[T], *, urgent: bool = False, timeout_s: float | None = None) -> bool:
        """Append ``items`` (``urgent``: in front, ignoring the bound); waits while the channel is full.
        False when it was closed or aborted (the items were not taken), or ``timeout_s`` passed."""
        items = list(items)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while (not urgent and self.capacity is not None and len(self._items) >= self.capacity
                   and not (self._closed or self._aborted)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if self._closed or self._aborted:
                return False
            (self._urgent if urgent else self._items).extend(items)
            self._cond.notify_all()
        return True

    def get(self, timeout_s: float = 0.0) -> list[T] | None:
        """Everything waiting, oldest first (waits up to ``timeout_s`` for something); [] when nothing
        came; None once the channel is closed and empty, or aborted."""
        with self._cond:
            if not len(self) and timeout_s > 0 and not (self._closed or self._aborted):
                self._cond.wait_for(lambda: len(self) or self._closed or self._aborted, timeout_s)
            if self._aborted or (self._closed and not len(self)):
                return None
            out = [*self._urgent, *self._items]
            self._urgent.clear()
            self._items.clear()
            self._cond.notify_all()
            return out

    def get_urgent(self) -> list[T]:
        """Only the urgent items waiting (never waits)."""
        if not self._urgent:  # every engine iteration: usually none
            return []
        with self._cond:
            out = list(self._urgent)
            self._urgent.clear()
            return out

    def take_all(self) -> list[T]:
        """Whatever is left (after close or abort), for failing waiting callers."""
        with self._cond:
            out = [*self._urgent, *self._items]
            self._urgent.clear()
            self._items.clear()
            return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class Budget:
    """Messages on their way to the engine, at most ``limit`` (see the module doc). Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    def available(self) -> int:
        return max(0, self.limit - self._used)

    def take(self, n: int) -> None:
        if n:
            with self._cond:
                self._used += n

    def give(self, n: int) -> None:
        if n:
            with self._cond:
                self._used = max(0, self._used - n)
                self._cond.notify_all()

    def wait_for_room(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until some budget is free; whether there is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._used < self.limit, timeout_s)


class StageClock:
    """Busy time and items of one stage: ``with clock.busy(n): ...`` around its work."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.items = 0
        self.dropped_revoked = 0
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, items: int = 0) -> None:
        self.busy_s += time.perf_counter() - self._t0
        self.items += items

    def snapshot(self) -> dict[str, float | int]:
        return {"busy_s": round(self.busy_s, 4), "items": self.items, "dropped_revoked": self.dropped_revoked}


def keep_current(items: list[T], msg_of: Callable[[T], InputMessage | None],
                 is_current: Callable[[str, int, int], bool]) -> tuple[list[T], int]:
    """(the items whose message's partition epoch is live, how many were dropped). Items without a
    Kafka message (``msg_of`` returns None: a synchronous job's) are always kept. One ``is_current``
    call per (partition, epoch) in the batch, not per item."""
    live: dict[tuple[str, int, int], bool] = {}
    kept: list[T] = []
    for item in items:
        m = msg_of(item)
        if m is not None:
            key = (m.topic, m.partition, m.epoch)
            ok = live.get(key)
            if ok is None:
                ok = live[key] = is_current(*key)
            if not ok:
                continue
        kept.append(item)
    return kept, len(items) - len(kept)
