"""Kafka sink (kafka-python): outputs and dead letters, each marking its input offset done when the
broker acknowledged it. Codec and schema live in ``records.py``.

Delivery failure policy (at-least-once): the producer retries retriable errors itself until
``delivery_timeout_ms``. An output the broker rejects as a record (too large, invalid) is sent to the
dead-letter topic with reason ``output_rejected``; any other failed delivery (broker unreachable past
the timeout, authorisation, a failed dead letter) is fatal: ``KafkaSink.raise_failures`` raises
``DeliveryError``, the worker stops with that error and fails its health check, and the offset is never
committed, so the replacement replica processes the message again. Nothing is lost.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kafka import KafkaProducer
from kafka import errors as kerrors

from elbert_stream.config import KafkaSettings
from elbert_stream.errors import ElbertError
from elbert_stream.stream.client import client_config, explain_bootstrap
from elbert_stream.stream.offsets import OffsetTracker, TopicPartition
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
        self._in_flight = 0
        cfg: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 2,
                               "delivery_timeout_ms": settings.delivery_timeout_ms,
                               "request_timeout_ms": min(30_000, settings.delivery_timeout_ms // 2),
                               "compression_type": None if settings.compression_type == "none"
                               else settings.compression_type}
        cfg.update(producer_overrides)
        with explain_bootstrap(settings, "producer"):
            self.producer = KafkaProducer(**client_config(settings), client_id=client_id, **cfg)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def send_output(self, msg: InputMessage, record: OutputRecord, headers: Headers | None = None) -> None:
        """Produce ``record`` with key = input key and ``headers`` (default: the input's W3C trace
        context); an output the client rejects outright (too large) becomes an ``output_rejected``
        dead letter."""
        headers = trace_headers(msg) if headers is None else headers
        try:
            self._send(self.settings.output_topic, msg, record.to_bytes(), msg.key, headers, "ok")
        except RECORD_REJECTED as e:
            self.send_dead_letter(msg, "output_rejected", f"output record rejected: {e!r}")

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
        if not omit_value:  # an estimate of the record size with 512 bytes of framing
            size = len(msg.value or b"") + len(msg.key or b"") + sum(len(k) + len(v) for k, v in headers)
            omit_value = size + 512 > int(self.producer.config["max_request_size"])
        if omit_value:
            headers.append(("elbert.value_omitted", f"{len(msg.value or b'')} bytes".encode()))
        retry = None if omit_value else (reason, detail, trace)
        value = None if omit_value else msg.value
        if value is None and msg.key is None:  # Kafka clients refuse a record with neither
            value = b""
        try:
            self._send(self.settings.dead_letter_topic, msg, value, msg.key, headers, f"dead_letter.{reason}",
                       retry)
        except RECORD_REJECTED:
            if omit_value:
                raise
            self.send_dead_letter(msg, reason, detail, trace, omit_value=True)

    def _send(self, topic: str, msg: InputMessage, value: bytes | None, key: bytes | None,
              headers: list[tuple[str, bytes]], outcome: str,
              retry: tuple[str, str, Headers | None] | None = None) -> None:
        with self._lock:
            self._in_flight += 1
        try:
            fut = self.producer.send(topic, value=value, key=key, headers=headers)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        fut.add_callback(self._on_ack, msg, outcome)
        fut.add_errback(self._on_error, msg, "output" if outcome == "ok" else "dead_letter", retry)

    def _on_ack(self, msg: InputMessage, outcome: str, _metadata: Any) -> None:
        self.tracker.done((msg.topic, msg.partition), msg.offset, msg.epoch)
        with self._lock:
            self._in_flight -= 1
            self.counts[outcome.split(".")[0]] += 1
            if outcome != "ok":
                self.counts[outcome] += 1

    def _on_error(self, msg: InputMessage, kind: str, retry: tuple[str, str, Headers | None] | None,
                  error: BaseException) -> None:
        with self._lock:
            self._in_flight -= 1
            self._failures.append(_Failure(msg, kind, error, retry))

    def raise_failures(self) -> None:
        """Handle failed deliveries (call on the worker thread): dead-letter rejected outputs, raise
        ``DeliveryError`` for the rest."""
        with self._lock:
            failures, self._failures = self._failures, []
        for f in failures:
            if f.kind == "output" and isinstance(f.error, RECORD_REJECTED):
                self.send_dead_letter(f.msg, "output_rejected", f"output record rejected: {f.error!r}")
                continue
            if f.kind == "dead_letter" and f.retry is not None and isinstance(f.error, RECORD_REJECTED):
                self.send_dead_letter(f.msg, *f.retry, omit_value=True)  # the broker refused the size
                continue
            with self._lock:
                self.counts["error"] += 1
            raise DeliveryError(f"cannot deliver the {f.kind} for {f.msg.where}: {f.error!r}") from f.error

    def counts_snapshot(self) -> Counter[str]:
        """A copy of ``counts`` (outcomes are counted on the producer's IO thread)."""
        with self._lock:
            return Counter(self.counts)

    def commit(self, source: KafkaSource) -> dict[TopicPartition, int]:
        """Commit the contiguous acknowledged offsets as the group's offsets (at-least-once)."""
        return source.commit(self.tracker.committable())

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)
