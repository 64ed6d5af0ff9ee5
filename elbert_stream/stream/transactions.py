"""``kafka.delivery=exactly_once``: outputs and input offsets committed in one Kafka transaction.

``TransactionalSink`` is a ``KafkaSink`` that holds every output and dead letter instead of sending
it, and marks its input offset done at once ("result ready"). On each commit (``commit_interval_s``,
drain) it takes the contiguous ready prefix per partition from the ``OffsetTracker``, and in ONE
transaction sends the held records of that prefix, adds the prefix ends as the group's offsets
(``send_offsets_to_transaction``) and commits. A consumer of the output topic reading with
``isolation_level=read_committed`` sees each input's result exactly once: a crash before the commit
aborts the transaction (the next ``init_transactions`` with the same ``transactional_id`` aborts it
and fences the old producer) and the inputs are re-read from the last committed offsets.

Records beyond the prefix stay held (memory is bounded by the worker's in-flight messages). The
revoke listener must not commit offsets on its own in this mode (``KafkaSource(transactional=True)``);
held records of revoked partitions are dropped (``drop``), their new owner redoes them from the group's
committed offset (also when the new owner is this replica: the source then reads again from there).
A dead letter the broker refuses inside a transaction (topic missing, not authorised,
``max.message.bytes``) aborts that transaction and is not fatal: its records are held again, the
partitions of the refused dead letters are held back (``blocked``; the worker pauses them) and left out
of the next transactions until their backoff passes, then retried, until the topic takes them (the
same contract as ``sink.py``'s parked records). Any other failure in a transaction is fatal
(``DeliveryError``): the worker stops, nothing of it becomes visible.

Not verifiable on Tansu 0.6: it shows aborted records to ``read_committed`` readers and does not
fence a zombie producer (docs/streaming.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition as KTopicPartition
from kafka import errors as kerrors
from kafka.structs import OffsetAndMetadata

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.kafka_internals import commit_transaction, send_offsets_to_transaction, wake_sender
from elbert_stream.stream.offsets import OffsetTracker, TopicPartition
from elbert_stream.stream.parking import FIRST_RETRY_S, refusal_warning
from elbert_stream.stream.records import Headers, InputMessage
from elbert_stream.stream.sink import DeliveryError, KafkaSink
from elbert_stream.stream.source import KafkaSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Held:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers
    outcome: str
    source: tuple[str, int, int]  # the input's topic, partition, offset
    epoch: int  # the input partition's assignment epoch (OffsetTracker)


class TransactionalSink(KafkaSink):
    """See the module doc. ``commit(source)`` runs on the worker's loop thread."""

    def __init__(self, settings: KafkaSettings, tracker: OffsetTracker, *, replica_id: str,
                 transactional_id: str, client_id: str = "elbert-stream", **producer_overrides: Any) -> None:
        """``transactional_id``: stable across restarts, never shared by two live workers
        (``identity.py``)."""
        producer_overrides.setdefault("transaction_timeout_ms", settings.transaction_timeout_ms)
        super().__init__(settings, tracker, replica_id=replica_id, client_id=client_id,
                         transactional_id=transactional_id, **producer_overrides)
        self._held: dict[TopicPartition, dict[int, list[_Held]]] = {}
        self._held_lock = threading.Lock()
        self.num_transactions = 0
        # inputs of transactions that failed before they completed: the broker finishes or aborts each
        # one, records and offsets together, when this transactional id starts again
        self.in_doubt: set[tuple[str, int, int]] = set()
        # partitions whose dead letter the broker refused: (retry from, attempts, error, since)
        self._refused: dict[TopicPartition, tuple[float, int, str, float]] = {}
        self.producer.init_transactions()

    @property
    def in_flight(self) -> int:
        with self._held_lock:
            return sum(len(v) for part in self._held.values() for v in part.values())

    def _send(self, topic: str, msg: InputMessage, value: bytes | None, key: bytes | None,
              headers: Headers, outcome: str, retry: tuple[str, str, Headers | None] | None = None, *,
              omitted: bool = False) -> None:
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v) for k, v in headers) + 512
        if size > int(self.producer.config["max_request_size"]):  # would fail the whole transaction
            raise kerrors.MessageSizeTooLargeError(f"record of about {size} bytes for {msg.where}")
        tp = TopicPartition(msg.topic, msg.partition)
        with self._held_lock:  # a result of a revoked (forgotten) assignment is not held: never sent
            if self.tracker.done(tp, msg.offset, msg.epoch):
                self._held.setdefault(tp, {}).setdefault(msg.offset, []).append(
                    _Held(topic, value, key, headers, outcome, (msg.topic, msg.partition, msg.offset),
                          msg.epoch))

    def drop(self, tps: set[TopicPartition]) -> None:
        """Forget held records of revoked partitions and, under the same lock, their tracked offsets
        (any thread): ``commit`` then never sees offsets whose records are gone."""
        with self._held_lock:
            for tp in tps:
                self._held.pop(tp, None)
                self._refused.pop(tp, None)
            self.tracker.forget(tps)

    def commit(self, source: KafkaSource, *, blocking: bool = True) -> dict[TopicPartition, int]:
        """One transaction: held records of the ready prefix + the prefix ends as group offsets
        (always waited for, each step within ``delivery_timeout_ms``; ``blocking`` is ignored)."""
        now = time.monotonic()
        with self._held_lock:  # offsets and their records taken together (a revoke drops both or neither)
            offsets = {tp: off for tp, off in self.tracker.committable().items()
                       if self._refused.get(tp, (0.0,))[0] <= now}  # a refused partition waits its backoff
            batch = self._take(offsets)
        if not offsets:
            return {}
        try:
            self.producer.begin_transaction()
            sent = [(rec, self.producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers))
                    for rec in batch]
            # records on the broker before the offsets: a broker that applies TxnOffsetCommit at once
            # (Tansu) would otherwise commit offsets whose records a crash never let out
            self.producer.flush(timeout=self.settings.delivery_timeout_ms / 1000)
            if self._refused_dead_letters(sent, batch):
                return {}
            self._wait("send_offsets_to_transaction", send_offsets_to_transaction(
                self.producer,
                {KTopicPartition(*tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                source.consumer.group_metadata()))
            self._wait("commit_transaction", commit_transaction(self.producer))
        except Exception as e:
            self._abort()
            self.in_doubt.update(rec.source for rec in batch)
            log.error("transaction of %d records for %s did not complete (%r): the broker commits or aborts "
                      "it, with its offsets, when transactional id %s starts again", len(batch), offsets, e,
                      self.producer.config.get("transactional_id"))
            raise DeliveryError(f"transaction of {len(batch)} records for {offsets} failed: {e!r}") from e
        self.tracker.mark_committed(offsets)
        self.num_transactions += 1
        for tp in offsets:
            if self._refused.pop(tp, None) is not None:
                log.warning("dead letters of %s[%d] written: the partition flows again", *tp)
        with self._lock:
            for rec in batch:
                self.counts[rec.outcome.split(".")[0]] += 1
                if rec.outcome != "ok":
                    self.counts[rec.outcome] += 1
        return offsets

    def _refused_dead_letters(self, sent: list[tuple[_Held, Any]], batch: list[_Held]) -> bool:
        """After the flush: when the only records that failed are dead letters the broker refused,
        abort (nothing was committed), hold the batch again, hold back those partitions with a backoff,
        and return True. Any other failed record raises its error (the caller's fatal path)."""
        failed = [(rec, fut.exception) for rec, fut in sent if fut.is_done and fut.failed()]
        if not failed:
            return False
        other = next((e for rec, e in failed if rec.topic != self.settings.dead_letter_topic), None)
        if other is not None:
            raise other
        self._abort()
        # a fresh producer (same transactional id: init_transactions fences nothing live, the abort is
        # done): kafka-python would bump the epoch to recover the failed batch's sequence, and
        # noida-db then refuses the next EndTxn (InvalidTxnState); a new producer id avoids both
        self.producer.close(timeout=5)
        self.producer = self._new_producer()
        self.producer.init_transactions()
        now = time.monotonic()
        with self._held_lock:
            for rec in batch:  # a revoked partition's records are not held again (the tracker forgot it)
                tp = TopicPartition(*rec.source[:2])
                if self.tracker.is_current(tp.topic, tp.partition, rec.epoch):
                    self._held.setdefault(tp, {}).setdefault(rec.source[2], []).append(rec)
            for rec, error in failed:
                tp = TopicPartition(*rec.source[:2])
                _, attempts, _, since = self._refused.get(tp, (0.0, 0, "", now))
                backoff = min(self.settings.retry_backoff_max_s, FIRST_RETRY_S * 2 ** attempts)
                self._refused[tp] = (now + backoff, attempts + 1, repr(error), since)
        log.error("dead-letter topic %r refused %d record(s) (%r): transaction aborted, partitions %s held "
                  "back and retried with backoff", self.settings.dead_letter_topic, len(failed), failed[0][1],
                  sorted(self._refused))
        return True

    def blocked(self) -> set[TopicPartition]:
        """Partitions held back behind a refused dead letter (the worker pauses them)."""
        if not self._refused:  # every loop iteration: usually nothing
            return set()
        with self._held_lock:
            return set(self._refused)

    def problem(self) -> str | None:
        with self._held_lock:
            refused = dict(self._refused)
            waiting = sum(len(v) for tp in refused for v in self._held.get(tp, {}).values())
        if not refused:
            return None
        return refusal_warning({self.settings.dead_letter_topic}, next(iter(refused.values()))[2],
                               min(v[3] for v in refused.values()), set(refused), waiting,
                               self.settings.retry_backoff_max_s)

    @property
    def num_parked(self) -> int:
        with self._held_lock:
            return sum(len(v) for tp in self._refused for v in self._held.get(tp, {}).values())

    def _wait(self, what: str, result: Any) -> None:
        """kafka-python's ``send_offsets_to_transaction`` / ``commit_transaction`` bodies, with a
        deadline: theirs wait forever, and a broker that stopped answering mid-commit (a 5 s freeze
        past the request timeout) hung the worker for good. Past ``delivery_timeout_ms`` this
        raises, the transaction is aborted and the worker stops with DeliveryError."""
        wake_sender(self.producer)
        timeout_ms = self.settings.delivery_timeout_ms
        if not result.wait(timeout_ms=timeout_ms):
            raise kerrors.KafkaTimeoutError(f"{what} not answered within {timeout_ms} ms")

    def _take(self, offsets: dict[TopicPartition, int]) -> list[_Held]:
        """Remove and return the held records below each partition's new commit point, in order."""
        out: list[_Held] = []  # the caller holds _held_lock
        for tp, end in offsets.items():
            part = self._held.get(tp, {})
            for off in sorted(o for o in part if o < end):
                out += part.pop(off)
        return out

    def _abort(self) -> None:
        try:
            self.producer.abort_transaction()
        except Exception as e:  # noqa: BLE001 - fenced or broker gone: the transaction times out
            log.warning("abort_transaction failed: %r", e)

    def raise_failures(self) -> None:
        """Nothing is sent outside ``commit``; kept for the KafkaSink contract."""
        super().raise_failures()
