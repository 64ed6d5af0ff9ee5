"""Kafka sink (kafka-python): outputs and dead letters, each marking its input offset done when the
broker acknowledged it. Codec and schema live in ``records.py``.

Delivery failure policy (at-least-once): the producer retries retriable errors itself until
``delivery_timeout_ms``. An output the broker rejects as a record (too large, invalid) is sent to the
dead-letter topic with reason ``output_rejected``.

A record that cannot be written NOW is parked, not fatal: a dead letter the broker refuses (topic
missing, not authorised, too small a ``max.message.bytes`` even without the value, or any failed
delivery of a dead letter), or any record whose ``send`` blocked past ``max_block_ms`` (topic metadata
unknown, buffer full). A parked record is retried with exponential backoff (up to
``retry_backoff_max_s``) until it goes through; its input partition is held (``blocked``: the worker
pauses exactly those partitions, the others keep flowing) and, since its offset is not done, nothing of
that partition is committed past it. ``problem()`` says what is parked, where and why (the worker's
health detail and stats; a log line names the topic and the broker's error; the
``elbert_parked_records`` / ``elbert_held_partitions`` gauges). The stream recovers by itself when the
topic becomes writable: a fleet of replicas never crash-loops on one unwritable dead letter.

Any other failed delivery of an OUTPUT (broker unreachable past the timeout, authorisation) is fatal:
``KafkaSink.raise_failures`` raises ``DeliveryError``, the worker stops with that error and fails its
health check, and the offset is never committed, so the replacement replica processes the message
again. Nothing is lost.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kafka import KafkaProducer
from kafka import errors as kerrors

from elbert_stream.config import KafkaSettings
from elbert_stream.errors import ElbertError
from elbert_stream.stream.client import client_config, explain_bootstrap
from elbert_stream.stream.kafka_internals import no_busy_send_loop
from elbert_stream.stream.offsets import OffsetTracker, TopicPartition
from elbert_stream.stream.parking import ParkingLot
from elbert_stream.stream.records import (
    InputMessage,
    OutputRecord,
    dead_letter_headers,
    trace_headers,
)
from elbert_stream.types import TRACE_HEADERS, Headers

if TYPE_CHECKING:
    from elbert_stream.stream.source import KafkaSource

log = logging.getLogger(__name__)
RECORD_REJECTED = (kerrors.MessageSizeTooLargeError, kerrors.RecordListTooLargeError,
                   kerrors.InvalidRecordError, kerrors.CorruptRecordError)


class DeliveryError(ElbertError):
    """A result could not be delivered to Kafka; the worker must stop (its offset stays uncommitted)."""


@dataclass
class _Failure:
    msg: InputMessage
    kind: str  # "output" | "dead_letter"
    error: BaseException
    retry: tuple[str, str, Headers | None] | None = None  # a dead letter's (reason, detail, trace)
    omitted: bool = False  # a dead letter sent without its value already


class KafkaSink:
    """Idempotent ``acks=all`` producer for outputs and dead letters.

    ``send_output`` / ``send_dead_letter`` may run on any one thread; their delivery callbacks (on
    the producer's I/O thread) mark the input offset done in the tracker and count the outcome.
    Failures are queued and handled by ``raise_failures`` on the caller's thread (see module doc).
    """

    def __init__(self, settings: KafkaSettings, tracker: OffsetTracker, *, replica_id: str,
                 client_id: str = "elbert-stream", **producer_overrides: Any) -> None:
        self.settings = settings
        self.tracker = tracker
        self.replica_id = replica_id
        self.counts: Counter[str] = Counter()  # ok | dead_letter | dead_letter.<reason> | error
        self._lock = threading.Lock()
        self._failures: list[_Failure] = []
        self.parking = ParkingLot(settings.retry_backoff_max_s)  # loop thread (see parking.py)
        self._in_flight = 0
        # Idempotence only with transactions: kafka-python 3.0.x classifies ANY non-retriable batch
        # error of an idempotent, non-transactional producer as fatal (transaction_manager
        # .classify_batch_error): one record the broker refuses (a dead letter over the topic's
        # max.message.bytes, a topic not authorised) aborts every batch of the producer, for good.
        # Measured on noida-db. Java fails only that batch. at_least_once tolerates the duplicate a
        # retry after a lost acknowledgement can cause; exactly_once is transactional (idempotent).
        cfg: dict[str, Any] = {"acks": "all", "enable_idempotence": "transactional_id" in producer_overrides,
                               "linger_ms": settings.linger_ms,
                               "metrics_enabled": False,  # kafka-python's own sensors, per record; unused
                               "delivery_timeout_ms": settings.delivery_timeout_ms,
                               "max_block_ms": settings.max_block_ms,
                               # a typo in a topic name is refused, never a new topic: on a real cluster
                               # auto-creation is usually off anyway, and the record parks loudly
                               "allow_auto_create_topics": False,
                               "request_timeout_ms": min(30_000, settings.delivery_timeout_ms // 2),
                               "compression_type": None if settings.compression_type == "none"
                               else settings.compression_type}
        cfg.update(producer_overrides)
        self._producer_config = {**client_config(settings), "client_id": client_id, **cfg}
        self.producer = self._new_producer()

    def _new_producer(self) -> KafkaProducer:
        with explain_bootstrap(self.settings, "producer"):
            producer = KafkaProducer(**self._producer_config)
        no_busy_send_loop(producer)  # kafka-python spins while a broker does not answer
        return producer

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def send_output(self, msg: InputMessage, record: OutputRecord | bytes,
                    headers: Headers | None = None) -> None:
        """Produce ``record`` (or its encoding, ``records.encode_output``) with key = input key and
        ``headers`` (default: the input's W3C trace context); an output the client rejects outright
        (too large) becomes an ``output_rejected`` dead letter."""
        headers = trace_headers(msg) if headers is None else headers
        value = record if isinstance(record, bytes) else record.to_bytes()
        try:
            self._send(self.settings.output_topic, msg, value, msg.key, headers, "ok")
        except RECORD_REJECTED as e:
            self.send_dead_letter(msg, "output_rejected", f"output record rejected: {e!r}")

    def shed_value(self, msg: InputMessage) -> None:
        """Release the value of a bad record now if its dead letter will omit it anyway (too large to
        produce again): a 10 MB value then never waits in a stage's queue (any thread)."""
        if msg.value is not None and self._too_large_to_resend(msg, 4096):  # headers not built yet
            msg.shed_value_bytes, msg.value = len(msg.value), None

    def _too_large_to_resend(self, msg: InputMessage, framing_bytes: int) -> bool:
        """Whether key + value + ``framing_bytes`` exceed the producer's ``max_request_size``."""
        size = len(msg.value or b"") + len(msg.key or b"") + framing_bytes
        return size > int(self.producer.config["max_request_size"])

    def send_dead_letter(self, msg: InputMessage, reason: str, detail: str,
                         trace: Headers | None = None, *, omit_value: bool = False) -> None:
        """Produce the original key and value to the dead-letter topic, with the reason in headers
        (``trace``: trace-context headers to add; default the input's). A value too large to produce
        again (record over the producer's ``max_request_size``, or refused by the broker) is omitted:
        the dead letter then has a null value and ``elbert.value_omitted: <size> bytes``. A dead letter
        that would have neither key nor value (a keyless tombstone, an omitted keyless value) gets an
        empty value instead."""
        log.warning("dead letter %s: %s: %s", msg.where, reason, detail[:200])
        headers = dead_letter_headers(msg, reason, detail, self.replica_id)
        if trace is not None:
            headers = [h for h in headers if h[0] not in TRACE_HEADERS] + list(trace)
        omit_value = omit_value or msg.shed_value_bytes is not None
        if not omit_value:  # an estimate of the record size: headers + 512 bytes of framing
            omit_value = self._too_large_to_resend(msg, 512 + sum(len(k) + len(v) for k, v in headers))
        if omit_value:
            size_bytes = msg.shed_value_bytes if msg.shed_value_bytes is not None else len(msg.value or b"")
            headers.append(("elbert.value_omitted", f"{size_bytes} bytes".encode()))
        value = None if omit_value else msg.value
        if value is None and msg.key is None:  # Kafka clients refuse a record with neither
            value = b""
        try:
            self._send(self.settings.dead_letter_topic, msg, value, msg.key, headers, f"dead_letter.{reason}",
                       (reason, detail, trace), omitted=omit_value)
        except RECORD_REJECTED:
            if omit_value:
                raise
            self.send_dead_letter(msg, reason, detail, trace, omit_value=True)

    def _send(self, topic: str, msg: InputMessage, value: bytes | None, key: bytes | None,
              headers: list[tuple[str, bytes]], outcome: str,
              retry: tuple[str, str, Headers | None] | None = None, *, omitted: bool = False) -> None:
        """Send one record, or park it (``parking.py``): behind a parked record of its partition, or
        when ``send`` blocked past ``max_block_ms`` (metadata unknown, buffer full)."""
        if self.parking.holds(msg):
            self.parking.queue(msg, topic, self._resend(topic, msg, value, key, headers, outcome, retry))
            return
        with self._lock:
            self._in_flight += 1
        try:
            fut = self.producer.send(topic, value=value, key=key, headers=headers)
        except kerrors.KafkaTimeoutError as e:
            with self._lock:
                self._in_flight -= 1
            resend = self._resend(topic, msg, value, key, headers, outcome, retry)
            self.parking.park(msg, topic, resend, repr(e))
            return
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        fut.add_callback(self._on_ack, msg, outcome)
        fut.add_errback(self._on_error, msg, "output" if outcome == "ok" else "dead_letter", retry, omitted)

    def _resend(self, topic: str, msg: InputMessage, value: bytes | None, key: bytes | None,
                headers: list[tuple[str, bytes]], outcome: str,
                retry: tuple[str, str, Headers | None] | None) -> Callable[[], None]:
        """How to send a parked record again: a dead letter from the start (its value first), any
        other record as it was."""
        if retry is not None:
            return functools.partial(self.send_dead_letter, msg, *retry)
        return functools.partial(self._send, topic, msg, value, key, headers, outcome)

    def retry_parked(self) -> int:
        """Send again the parked records whose backoff passed (loop thread); returns how many."""
        due = self.parking.take_due(lambda m: self.tracker.is_current(m.topic, m.partition, m.epoch))
        for p in due:
            p.resend()
        if due and not self.parking.items:
            log.warning("parked records sent again: no partition held any more")
        return len(due)

    def blocked(self) -> set[TopicPartition]:
        """Input partitions with a parked record: the worker holds (pauses) exactly these."""
        return self.parking.blocked()

    def problem(self) -> str | None:
        """What is parked, where and why (the worker's health warning); None when nothing is."""
        return self.parking.problem()

    @property
    def num_parked(self) -> int:
        return len(self.parking.items)

    def _on_ack(self, msg: InputMessage, outcome: str, _metadata: Any) -> None:
        self.tracker.done((msg.topic, msg.partition), msg.offset, msg.epoch)
        self.parking.delivered(msg)
        with self._lock:
            self._in_flight -= 1
            self.counts[outcome.split(".")[0]] += 1
            if outcome != "ok":
                self.counts[outcome] += 1

    def _on_error(self, msg: InputMessage, kind: str, retry: tuple[str, str, Headers | None] | None,
                  omitted: bool, error: BaseException) -> None:
        with self._lock:
            self._in_flight -= 1
            self._failures.append(_Failure(msg, kind, error, retry, omitted))

    def raise_failures(self) -> None:
        """Handle failed deliveries (call on the worker thread): dead-letter rejected outputs, park
        refused dead letters, raise ``DeliveryError`` for the rest."""
        with self._lock:
            failures, self._failures = self._failures, []
        for f in failures:
            if f.kind == "output" and isinstance(f.error, RECORD_REJECTED):
                self.send_dead_letter(f.msg, "output_rejected", f"output record rejected: {f.error!r}")
                continue
            if f.kind == "dead_letter" and f.retry is not None:
                if isinstance(f.error, RECORD_REJECTED) and not f.omitted:
                    self.send_dead_letter(f.msg, *f.retry, omit_value=True)  # the broker refused the size
                else:  # the topic refused it (even without the value): park, never fatal
                    resend = functools.partial(self.send_dead_letter, f.msg, *f.retry)
                    self.parking.park(f.msg, self.settings.dead_letter_topic, resend, repr(f.error))
                continue
            with self._lock:
                self.counts["error"] += 1
            raise DeliveryError(f"cannot deliver the {f.kind} for {f.msg.where}: {f.error!r}") from f.error

    def counts_snapshot(self) -> Counter[str]:
        """A copy of ``counts`` (outcomes are counted on the producer's IO thread)."""
        with self._lock:
            return Counter(self.counts)

    def commit(self, source: KafkaSource, *, blocking: bool = False) -> dict[TopicPartition, int]:
        """Commit the contiguous acknowledged offsets as the group's offsets (at-least-once);
        asynchronous unless ``blocking`` (``KafkaSource.commit``)."""
        return source.commit(self.tracker.committable(), blocking=blocking)

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)
