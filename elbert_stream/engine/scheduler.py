"""The slot table: a bounded FIFO waiting queue, ``max_slots`` slots and a token budget.

Pure Python (no torch) so tests drive it with no model. The engine asks it, once per step, which
waiting requests to admit (``schedule``) and tells it which slots finished (``free``).

Contract
--------
* ``add`` appends to the waiting queue and returns False when the queue holds ``max_queue``
  requests: the caller applies backpressure (stop polling) and retries later. Nothing is dropped.
* ``schedule`` admits waiting requests in FIFO order into free slots while the sum of the token
  lengths of busy slots stays ``<= max_batch_tokens``. It stops at the first request that does not
  fit, so a long text is never overtaken forever by short ones (no starvation). A text longer than
  the whole budget is admitted when the table is empty, and then runs alone.
* ``admit_when_empty=True`` admits only into an empty table (static batches: the "compaction" and
  "naive" engine modes). Continuous batching (the default) refills any free slot every step.
* Slots are the integers ``0..max_slots-1``; the lowest free slot is taken first.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass

from elbert_stream.errors import ConfigError, EngineFailure
from elbert_stream.types import Request


@dataclass(frozen=True, slots=True)
class Admission:
    """A request placed into a slot by ``schedule``."""

    slot: int
    request: Request


class SlotScheduler:
    """Waiting queue + slot table + token budget. Not thread-safe: one thread drives it."""

    def __init__(self, max_slots: int, max_batch_tokens: int, max_queue: int, *,
                 admit_when_empty: bool = False) -> None:
        for name, value in (("max_slots", max_slots), ("max_batch_tokens", max_batch_tokens),
                            ("max_queue", max_queue)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        self.max_slots = max_slots
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.admit_when_empty = admit_when_empty
        self._waiting: deque[Request] = deque()
        self._free: list[int] = list(range(max_slots))  # a heap: lowest slot first
        self._slots: list[Request | None] = [None] * max_slots
        self._busy_tokens = 0

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_busy(self) -> int:
        return self.max_slots - len(self._free)

    @property
    def busy_tokens(self) -> int:
        """Sum of the token lengths of the requests in busy slots."""
        return self._busy_tokens

    @property
    def queue_full(self) -> bool:
        return len(self._waiting) >= self.max_queue

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_busy > 0

    def request_in(self, slot: int) -> Request | None:
        return self._slots[slot]

    def peek(self, n: int) -> list[Request]:
        """The first ``n`` waiting requests (the next to be admitted, in order); nothing changes."""
        return list(itertools.islice(self._waiting, n))

    def busy_slots(self) -> list[int]:
        """Busy slot numbers, ascending."""
        return [i for i, r in enumerate(self._slots) if r is not None]

    # ---- transitions -----------------------------------------------------------------------------
    def add(self, request: Request) -> bool:
        """Queue a request; False (and nothing queued) when the waiting queue is full."""
        if len(self._waiting) >= self.max_queue:
            return False
        self._waiting.append(request)
        return True

    def schedule(self, now_s: float | None = None) -> list[Admission]:
        """Admit waiting requests into free slots (FIFO, budgeted); sets ``admitted_s``."""
        if self.admit_when_empty and self.num_busy > 0:
            return []
        now = time.monotonic() if now_s is None else now_s
        admitted: list[Admission] = []
        while self._waiting and self._free:
            head = self._waiting[0]
            fits = self._busy_tokens + head.num_tokens <= self.max_batch_tokens
            if not fits and self.num_busy > 0:
                break  # FIFO: nobody overtakes the head
            self._waiting.popleft()
            slot = heapq.heappop(self._free)
            self._slots[slot] = head
            self._busy_tokens += head.num_tokens
            head.admitted_s = now
            admitted.append(Admission(slot, head))
        return admitted

    def free(self, slots: list[int], now_s: float | None = None) -> list[Request]:
        """Release finished slots; sets ``finished_s`` and returns their requests (same order)."""
        now = time.monotonic() if now_s is None else now_s
        done: list[Request] = []
        for slot in slots:
            request = self._slots[slot]
            if request is None:
                raise EngineFailure(f"slot {slot} is not busy")  # an engine bug, not bad input
            self._slots[slot] = None
            self._busy_tokens -= request.num_tokens
            heapq.heappush(self._free, slot)
            request.finished_s = now
            done.append(request)
        return done
