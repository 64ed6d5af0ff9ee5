"""OffsetTracker: which input offsets may be committed.

Early exit finishes messages out of order, so a partition's committed offset may only advance over
the contiguous run of polled messages whose result (output or dead letter) the broker has
acknowledged. Contiguity is over the offsets actually polled, in poll order: offsets the broker
never returned (compaction, transaction markers) are gaps, not holes.

Pure and thread-safe: ``track`` and ``committable`` run on the consumer thread, ``done`` on the
producer's callback thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple


class TopicPartition(NamedTuple):
    """Same shape as ``kafka.TopicPartition`` (also a namedtuple (topic, partition)): they compare equal."""

    topic: str
    partition: int


@dataclass
class _Partition:
    epoch: int
    pending: deque[int] = field(default_factory=deque)  # polled, not yet past the commit point
    done: set[int] = field(default_factory=set)  # acked members of pending
    last_tracked: int = -1
    next_commit: int | None = None  # first offset not known to be done (None: nothing finished yet)
    committed: int | None = None  # what mark_committed last recorded


class OffsetTracker:
    """Tracks polled offsets per partition and the next committable offset.

    Protocol: ``epoch = track(tp, offset)`` when polled (returns None for an offset at or below one
    already tracked in this assignment: a re-delivery to skip); ``done(tp, offset, epoch)`` when its
    output or dead letter is acknowledged; ``committable()`` -> {tp: next offset to consume};
    ``mark_committed(offsets)`` after a successful commit; ``forget(tps)`` on revoke.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._epochs: dict[TopicPartition, int] = {}
        # bumped by every forget, after the epochs moved: a stage holding work compares it with the
        # value it last saw and, when it changed, drops what ``is_current`` now refuses
        self.num_forgets = 0

    def track(self, tp: tuple[str, int], offset: int) -> int | None:
        """Record a polled offset; return the partition's epoch to hand back to ``done``."""
        tp = TopicPartition(*tp)
        with self._lock:
            part = self._parts.get(tp)
            if part is None:
                part = self._parts[tp] = _Partition(epoch=self._epochs.get(tp, 0))
            if offset <= part.last_tracked:
                return None
            part.last_tracked = offset
            if not part.pending and part.next_commit is not None:
                part.next_commit = offset  # everything polled before is done: skip the gap
            part.pending.append(offset)
            return part.epoch

    def done(self, tp: tuple[str, int], offset: int, epoch: int) -> bool:
        """Mark an offset finished (acknowledged). False when it is stale (forgotten partition,
        older epoch) or unknown."""
        tp = TopicPartition(*tp)
        with self._lock:
            part = self._parts.get(tp)
            if part is None or part.epoch != epoch or offset in part.done:
                return False
            if not part.pending or offset < part.pending[0] or offset > part.last_tracked:
                return False
            part.done.add(offset)
            while part.pending and part.pending[0] in part.done:
                head = part.pending.popleft()
                part.done.discard(head)
                part.next_commit = head + 1
            if part.pending and part.next_commit is not None:
                part.next_commit = part.pending[0]  # jump over offsets never polled (gaps)
            return True

    def committable(self, only_new: bool = True) -> dict[TopicPartition, int]:
        """{tp: next offset to consume} for every partition with finished work (with ``only_new``,
        only those that moved since ``mark_committed``). Never beyond an unfinished offset."""
        with self._lock:
            return {
                tp: p.next_commit for tp, p in self._parts.items()
                if p.next_commit is not None and not (only_new and p.committed == p.next_commit)
            }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, off in offsets.items():
                part = self._parts.get(TopicPartition(*tp))
                if part is not None:
                    part.committed = off

    def forget(self, tps: list[tuple[str, int]] | set[TopicPartition] | None = None) -> None:
        """Drop partitions (all when None), e.g. on revoke; later acks for them are ignored."""
        with self._lock:
            for tp in list(self._parts) if tps is None else [TopicPartition(*t) for t in tps]:
                if self._parts.pop(tp, None) is not None:
                    self._epochs[tp] = self._epochs.get(tp, 0) + 1
            self.num_forgets += 1

    def first_pending(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        """{tp: oldest polled offset not yet acknowledged} for those of ``tps`` with unfinished work:
        where a consumer must read again from if it gets the partition back after a revoke."""
        with self._lock:
            parts = ((tp, self._parts.get(TopicPartition(*tp))) for tp in tps)
            return {tp: p.pending[0] for tp, p in parts if p is not None and p.pending}

    def is_current(self, topic: str, partition: int, epoch: int) -> bool:
        """Whether ``epoch`` is the partition's live assignment (False once forgotten)."""
        with self._lock:
            part = self._parts.get(TopicPartition(topic, partition))
            return part is not None and part.epoch == epoch

    def num_pending(self) -> dict[TopicPartition, int]:
        """Polled but not yet committable, per partition."""
        with self._lock:
            return {tp: len(p.pending) for tp, p in self._parts.items()}

    def total_pending(self) -> int:
        with self._lock:
            return sum(len(p.pending) for p in self._parts.values())

    def positions(self) -> dict[TopicPartition, int]:
        """{tp: last tracked offset + 1}: where the consumer stands, as far as tracking knows."""
        with self._lock:
            return {tp: p.last_tracked + 1 for tp, p in self._parts.items()}


class CommitCadence:
    """When to commit: every ``interval_s`` (or when forced). The worker owns the one instance; what is
    committed, and how (group offsets, or a transaction with the outputs), is the sink's ``commit``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last_s = time.monotonic()

    def due(self, force: bool = False) -> bool:
        """True (and the interval restarts) when ``interval_s`` has passed since the last, or ``force``."""
        now = time.monotonic()
        if not force and now - self._last_s < self.interval_s:
            return False
        self._last_s = now
        return True
