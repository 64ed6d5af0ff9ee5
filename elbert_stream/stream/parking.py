"""Records that cannot be written now, held in order per input partition and retried with backoff.

A dead letter the broker refuses (topic missing, not authorised, ``max.message.bytes`` too small) or
any record whose ``send`` blocked past ``max_block_ms`` is parked instead of failing the worker
(``sink.py``). Later records of the same input partition queue behind it, so the partition's order
holds; the worker pauses exactly the partitions with parked records (``blocked``) and, since their
offsets are not done, nothing of them is committed past the parked record. No Kafka client here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from elbert_stream.stream.offsets import TopicPartition
from elbert_stream.stream.records import InputMessage

log = logging.getLogger(__name__)
FIRST_RETRY_S = 0.5


@dataclass
class Parked:
    msg: InputMessage
    topic: str  # where it was going
    resend: Callable[[], None]  # sends it again (a dead letter: the whole chain, value first)
    error: str = ""  # the broker's or client's refusal; "" for one only queued behind its partition's head
    due_s: float = 0.0

    @property
    def partition(self) -> TopicPartition:
        return TopicPartition(self.msg.topic, self.msg.partition)


class ParkingLot:
    """Parked records in arrival order; the loop thread's only (reads from other threads see a
    consistent list: it is rebound, never mutated in place, except by appends)."""

    def __init__(self, backoff_max_s: float) -> None:
        self.backoff_max_s = backoff_max_s
        self.items: list[Parked] = []
        self._refused: dict[tuple[str, int, int], tuple[int, float]] = {}  # position -> (refusals, since)
        # partitions whose parked head was sent again and not yet answered: still held (the answer
        # comes on the producer's IO thread: ``delivered`` or, refused again, ``park``)
        self._retrying: dict[TopicPartition, tuple[str, int, int]] = {}
        self._refusals: dict[TopicPartition, tuple[str, str, float]] = {}  # (topic, error, since)
        self._lock = threading.Lock()

    def holds(self, msg: InputMessage) -> bool:
        """Whether a record for ``msg`` must queue: one of its partition is parked, or is being tried
        again (unless it is that very try: a dead letter's chain, its value omitted, is one try)."""
        if not self.items and not self._retrying:  # the usual case, per record: nothing parked
            return False
        tp = TopicPartition(msg.topic, msg.partition)
        with self._lock:
            trying = self._retrying.get(tp)
        if trying is not None:
            return trying != (msg.topic, msg.partition, msg.offset)
        return any(p.partition == tp for p in self.items)

    def queue(self, msg: InputMessage, topic: str, resend: Callable[[], None]) -> None:
        """Behind its partition's parked head, in order."""
        self.items = [*self.items, Parked(msg, topic, resend)]

    def park(self, msg: InputMessage, topic: str, resend: Callable[[], None], error: str) -> None:
        now = time.monotonic()
        key = (msg.topic, msg.partition, msg.offset)
        tp = TopicPartition(msg.topic, msg.partition)
        attempts, since = self._refused.get(key, (0, now))
        attempts += 1
        self._refused[key] = (attempts, since)
        with self._lock:
            self._retrying.pop(tp, None)
            self._refusals[tp] = (topic, error, since)
        due = now + min(self.backoff_max_s, FIRST_RETRY_S * 2 ** (attempts - 1))
        first = not any(p.topic == topic and p.error for p in self.items)
        self.items = [*self.items, Parked(msg, topic, resend, error, due)]
        if first or attempts in (2, 4, 8) or attempts % 16 == 0:
            log.error("cannot write to topic %r (%s) for %s: parked, its input partition held, retrying in "
                      "%.1fs (attempt %d)", topic, error, msg.where, due - now, attempts)

    def take_due(self, is_current: Callable[[InputMessage], bool]) -> list[Parked]:
        """Remove and return, in order, what to send again now (the caller sends; what is still
        refused comes back through ``park``, what lands behind it through ``queue``): per partition,
        its refused head once its backoff passed and no earlier try of it is in flight (the rest
        waits for that try's answer), or, once the head got through, everything queued behind it.
        Records of partitions no longer assigned are dropped: their new owner redoes them."""
        if not self.items:
            return []
        now = time.monotonic()
        items = [p for p in self.items if is_current(p.msg) or self._forget(p.msg)]
        with self._lock:
            in_flight = set(self._retrying)
        heads: dict[TopicPartition, Parked] = {}  # each partition's refused record (a refusal comes back
        for p in items:  # at the end, behind what queued meanwhile: it still goes first)
            if p.error:
                heads.setdefault(p.partition, p)
        keep: list[Parked] = []
        out: list[Parked] = []
        for p in items:
            tp = p.partition
            head = heads.get(tp)
            if tp in in_flight or (head is not None and (p is not head or head.due_s > now)):
                keep.append(p)  # waits: for the try in flight, or behind its refused head
                continue
            if head is not None:  # the head, due: one try; the rest waits for its answer
                with self._lock:
                    self._retrying[tp] = (p.msg.topic, p.msg.partition, p.msg.offset)
                in_flight.add(tp)
            out.append(p)
        if heads or out:
            keep.sort(key=lambda p: (p is not heads.get(p.partition), p.msg.offset))
        self.items = keep
        return out

    def delivered(self, msg: InputMessage) -> None:
        """A record got through (any thread): forget its refusals; its partition is free again if it
        was the parked head sent again."""
        if not self._retrying and not self._refused:  # the usual case, per acknowledgement
            return
        key = (msg.topic, msg.partition, msg.offset)
        tp = TopicPartition(msg.topic, msg.partition)
        with self._lock:
            if self._retrying.get(tp) == key:
                del self._retrying[tp]
                self._refusals.pop(tp, None)
        self._forget(msg)

    def _forget(self, msg: InputMessage) -> bool:
        """Drop what is known of ``msg``'s refusals; False (so it filters in a comprehension)."""
        self._refused.pop((msg.topic, msg.partition, msg.offset), None)
        return False

    def blocked(self) -> set[TopicPartition]:
        if not self.items and not self._retrying:  # every loop iteration: usually nothing
            return set()
        with self._lock:
            retrying = set(self._retrying)
        return {p.partition for p in self.items} | retrying

    def release(self, tps: set[TopicPartition]) -> None:
        """Partitions revoked: nothing of them is held any more."""
        with self._lock:
            for tp in tps:
                self._retrying.pop(tp, None)
                self._refusals.pop(tp, None)

    def problem(self) -> str | None:
        """What is refused, where and why; None when nothing is."""
        with self._lock:
            refusals = dict(self._refusals)
        if not refusals:
            return None
        return refusal_warning({v[0] for v in refusals.values()}, next(iter(refusals.values()))[1],
                               min(v[2] for v in refusals.values()), set(refusals), len(self.items),
                               self.backoff_max_s)


def refusal_warning(topics: set[str], error: str, since_s: float, partitions: set[TopicPartition],
                    waiting: int, backoff_max_s: float) -> str:
    """The health warning for records a topic refuses (this module's and ``transactions.py``'s)."""
    parts = sorted(f"{t}[{p}]" for t, p in partitions)
    return (f"topic(s) {sorted(topics)} refused records for {time.monotonic() - since_s:.0f}s ({error}); "
            f"input partitions {parts} held ({waiting} record(s) waiting, nothing committed past them), "
            f"retrying with backoff up to {backoff_max_s:g}s: make the topic writable (exists, this "
            "principal may write, max.message.bytes) and the stream resumes by itself")
