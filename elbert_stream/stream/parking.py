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
        self._attempts: dict[tuple[str, int, int], int] = {}  # refusals so far, per input position
        self._since: dict[tuple[str, int, int], float] = {}
        self.num_parked = 0  # refusals parked, ever
        # partitions whose parked head was sent again and not yet answered: still held (the answer
        # comes on the producer's IO thread: ``delivered`` or, refused again, ``park``)
        self._retrying: dict[TopicPartition, tuple[str, int, int]] = {}
        self._lock = threading.Lock()

    def holds(self, tp: TopicPartition) -> bool:
        return any(p.partition == tp for p in self.items)

    def queue(self, msg: InputMessage, topic: str, resend: Callable[[], None]) -> None:
        """Behind its partition's parked head, in order."""
        self.items = [*self.items, Parked(msg, topic, resend)]

    def park(self, msg: InputMessage, topic: str, resend: Callable[[], None], error: str) -> None:
        now = time.monotonic()
        key = (msg.topic, msg.partition, msg.offset)
        with self._lock:
            self._retrying.pop(TopicPartition(msg.topic, msg.partition), None)
        attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
        self._since.setdefault(key, now)
        due = now + min(self.backoff_max_s, FIRST_RETRY_S * 2 ** (attempts - 1))
        first = not any(p.topic == topic and p.error for p in self.items)
        self.items = [*self.items, Parked(msg, topic, resend, error, due)]
        self.num_parked += 1
        if first or attempts in (2, 4, 8) or attempts % 16 == 0:
            log.error("cannot write to topic %r (%s) for %s: parked, its input partition held, retrying in "
                      "%.1fs (attempt %d)", topic, error, msg.where, due - now, attempts)

    def take_due(self, is_current: Callable[[InputMessage], bool]) -> list[Parked]:
        """Remove and return, in order, every record of the partitions whose parked head is due (the
        caller sends them again; what is still refused comes back through ``park``/``queue``).
        Records of partitions no longer assigned are dropped: their new owner redoes them."""
        now = time.monotonic()
        keep: list[Parked] = []
        out: list[Parked] = []
        decided: dict[TopicPartition, bool] = {}
        for p in self.items:
            if not is_current(p.msg):
                self._forget(p.msg)
                continue
            if p.partition not in decided:
                decided[p.partition] = go = p.due_s <= now
                if go:
                    with self._lock:
                        self._retrying[p.partition] = (p.msg.topic, p.msg.partition, p.msg.offset)
            (out if decided[p.partition] else keep).append(p)
        self.items = keep
        return out

    def delivered(self, msg: InputMessage) -> None:
        """A record got through (any thread): forget its refusals; its partition is free again if it
        was the parked head sent again."""
        key = (msg.topic, msg.partition, msg.offset)
        tp = TopicPartition(msg.topic, msg.partition)
        with self._lock:
            if self._retrying.get(tp) == key:
                del self._retrying[tp]
        self._forget(msg)

    def _forget(self, msg: InputMessage) -> None:
        key = (msg.topic, msg.partition, msg.offset)
        self._attempts.pop(key, None)
        self._since.pop(key, None)

    def blocked(self) -> set[TopicPartition]:
        with self._lock:
            retrying = set(self._retrying)
        return {p.partition for p in self.items} | retrying

    def release(self, tps: set[TopicPartition]) -> None:
        """Partitions revoked: nothing of them is held any more."""
        with self._lock:
            for tp in tps:
                self._retrying.pop(tp, None)

    def problem(self) -> str | None:
        """What is parked, where and why; None when nothing is."""
        items = self.items
        refused = [p for p in items if p.error]
        if not items:
            return None
        head = refused[0] if refused else items[0]
        key = (head.msg.topic, head.msg.partition, head.msg.offset)
        waited = time.monotonic() - self._since.get(key, time.monotonic())
        topics = sorted({p.topic for p in refused})
        parts = sorted({f"{p.msg.topic}[{p.msg.partition}]" for p in items})
        return (f"{len(items)} record(s) for topic(s) {topics} not written for {waited:.0f}s "
                f"({head.error or 'queued'}); input partitions {parts} held (nothing committed past them), "
                f"retrying with backoff up to {self.backoff_max_s:g}s: make the topic writable (exists, "
                "this principal may write, max.message.bytes) and the stream resumes by itself")
