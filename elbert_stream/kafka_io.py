"""Kafka source and sink (kafka-python) with commit-after-delivery.

``KafkaSource`` is a consumer-group member with auto-commit off: it tracks every polled offset in an
``OffsetTracker`` and commits, on its own thread only, the contiguous run whose results the broker
acknowledged. ``KafkaSink`` is an idempotent ``acks=all`` producer: outputs and dead letters mark
their input offset done from the delivery callback. Codec and schema live in ``records.py``.

Delivery failure policy (at-least-once): the producer retries retriable errors itself until
``delivery_timeout_ms``. An output the broker rejects as a record (too large, invalid) is sent to the
dead-letter topic with reason ``output_rejected``; any other failed delivery (broker unreachable past
the timeout, authorisation, a failed dead letter) is fatal: ``KafkaSink.raise_failures`` raises
``DeliveryError``, the worker stops with that error and fails its health check, and the offset is never
committed, so the replacement replica processes the message again. Nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KTopicPartition
from kafka import errors as kerrors
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener, TopicPartitionState
from kafka.structs import OffsetAndMetadata

from elbert_stream.config import KafkaSettings
from elbert_stream.errors import ElbertError
from elbert_stream.offsets import OffsetTracker, TopicPartition
from elbert_stream.records import (
    TRACE_HEADERS,
    Headers,
    InputMessage,
    OutputRecord,
    dead_letter_headers,
    trace_headers,
)
from elbert_stream.redact import register_secrets

log = logging.getLogger(__name__)
COMMIT_TIMEOUT_MS = 5000  # a commit blocks the loop thread at most this long; it is retried next interval
RECORD_REJECTED = (kerrors.MessageSizeTooLargeError, kerrors.RecordListTooLargeError,
                   kerrors.InvalidRecordError, kerrors.CorruptRecordError)


class DeliveryError(ElbertError):
    """A result could not be delivered to Kafka; the worker must stop (its offset stays uncommitted)."""


def client_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by consumer, producer and admin clients. The secrets in
    it are registered with ``redact`` (kafka-python logs them at DEBUG)."""
    register_secrets(*(s.get_secret_value() for s in (k.sasl_password, k.ssl_password) if s is not None))
    cfg: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers.split(","),
                           "bootstrap_timeout_ms": k.bootstrap_timeout_ms,
                           "security_protocol": k.security_protocol}
    if k.sasl_mechanism:
        cfg.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                   sasl_plain_password=k.sasl_password.get_secret_value() if k.sasl_password else None)
    if k.security_protocol in ("SSL", "SASL_SSL"):
        cfg.update(ssl_cafile=k.ssl_cafile, ssl_certfile=k.ssl_certfile, ssl_keyfile=k.ssl_keyfile,
                   ssl_password=k.ssl_password.get_secret_value() if k.ssl_password else None,
                   ssl_check_hostname=k.ssl_check_hostname)
    return cfg


# what KafkaUnreachable reports of the client's settings (the secrets are never among them)
SHOWN_SECURITY_SETTINGS = {"security_protocol", "sasl_mechanism", "sasl_username", "ssl_cafile",
                           "ssl_certfile"}


class KafkaUnreachable(ElbertError):
    """No Kafka client could bootstrap: wrong address, credentials, CA or protocol (the message says
    which settings were used and the last refusal kafka-python logged)."""


class _Refusals(logging.Handler):
    """Collects the distinct causes of the "Bootstrap connection to X failed: <cause> (backoff ...)"
    warnings kafka-python logs while a client bootstraps."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.causes: dict[str, None] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Bootstrap connection") and "failed: " in message:
            self.causes[message.split("failed: ", 1)[1].rsplit(" (backoff", 1)[0]] = None


@contextlib.contextmanager
def explain_bootstrap(k: KafkaSettings, what: str) -> Iterator[None]:
    """Turn kafka-python's bare "Unable to bootstrap" into an error that names the bootstrap servers,
    the security settings (never a secret) and the cause of the last refused connection (e.g.
    ``SaslAuthenticationFailedError``), so a misconfigured replica fails with a readable reason."""
    refusals = _Refusals()
    logger = logging.getLogger("kafka.net.manager")
    logger.addHandler(refusals)
    try:
        yield
    except kerrors.KafkaTimeoutError as e:
        shown = k.model_dump(include=SHOWN_SECURITY_SETTINGS, exclude_none=True)
        used = ", ".join(f"{name}={shown[name]}" for name in sorted(shown))
        raise KafkaUnreachable(f"the {what} could not connect to Kafka at {k.bootstrap_servers} ({used}): "
                               f"{e}; refused with: {'; '.join(refusals.causes) or 'nothing logged'}") from e
    finally:
        logger.removeHandler(refusals)


class _Rebalance(AsyncConsumerRebalanceListener):
    """kafka-python 3 runs rebalance listeners on its IO thread (a blocking ``consumer.commit()``
    there raises), so this one is async and awaits the coordinator's commit coroutine."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[KTopicPartition]) -> None:
        await self.source._on_revoked(revoked, commit=True)

    async def on_partitions_lost(self, lost: set[KTopicPartition]) -> None:
        await self.source._on_revoked(lost, commit=False)  # evicted: a commit cannot succeed

    async def on_partitions_assigned(self, assigned: set[KTopicPartition]) -> None:
        self.source._on_assigned(assigned)


class KafkaSource:
    """Consumer-group member over ``settings.input_topics``. Not thread-safe: every method runs on
    the worker's loop thread (kafka-python's consumer is single-threaded).

    ``on_revoke(tps)`` is called (on that thread, inside ``poll``) after the revoked partitions'
    finished offsets were committed and before they are forgotten; the worker drops its local
    buffer for them there.

    ``transactional=True`` (``exactly_once``): offsets are committed with the outputs, in the sink's
    transactions, so the revoke listener commits nothing, and a partition given back to this member is
    read again from the group's committed offset (the results finished since then were only held,
    and were dropped on revoke). Otherwise from its oldest unacknowledged offset.
    """

    def __init__(self, settings: KafkaSettings, tracker: OffsetTracker, *, client_id: str = "elbert-stream",
                 on_revoke: Callable[[set[TopicPartition]], None] | None = None,
                 isolation_level: str = "read_committed", transactional: bool = False) -> None:
        self.settings = settings
        self.tracker = tracker
        self.on_revoke = on_revoke
        self.transactional = transactional
        self.paused = False
        self.num_commits = 0
        self.num_commit_failures = 0
        self.num_revocations = 0  # rebalances that took partitions away (revoked or lost)
        self._reread: dict[TopicPartition, int | None] = {}  # revoked -> where to read again (None: commit)
        self._last_commit_s = time.monotonic()
        with explain_bootstrap(settings, "consumer"):
            self.consumer = KafkaConsumer(
                **client_config(settings), client_id=client_id, group_id=settings.group_id,
                group_instance_id=settings.group_instance_id, enable_auto_commit=False,
                auto_offset_reset=settings.auto_offset_reset, session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                max_poll_records=settings.max_poll_records, isolation_level=isolation_level,
                fetch_max_bytes=settings.fetch_max_bytes,
                max_partition_fetch_bytes=min(settings.fetch_max_bytes, 1024 * 1024),
            )
        self.consumer.subscribe(settings.input_topics, listener=_Rebalance(self))

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InputMessage]:
        """Fetch records, track their offsets, return them in partition/offset order."""
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=True)
        now = time.monotonic()
        out: list[InputMessage] = []
        for ktp, records in batches.items():
            tp = TopicPartition(ktp.topic, ktp.partition)
            for r in records:
                epoch = self.tracker.track(tp, r.offset)
                if epoch is None:
                    log.warning("skipping re-delivered %s[%d]@%d", tp.topic, tp.partition, r.offset)
                    continue
                out.append(InputMessage(
                    topic=tp.topic, partition=tp.partition, offset=r.offset, key=r.key, value=r.value,
                    headers=[(k, v) for k, v in (r.headers or [])],
                    timestamp_ms=-1 if r.timestamp is None else r.timestamp, epoch=epoch, polled_s=now,
                ))
        return out

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t.topic, t.partition) for t in self.consumer.assignment()}

    def pause(self) -> None:
        """Stop fetching from every assigned partition (and from ones assigned later) until resume."""
        if not self.paused:
            self.consumer.pause(*self.consumer.assignment())
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume(*self.consumer.paused())
            self.paused = False

    def commit_due(self, force: bool = False) -> bool:
        """True (and the interval restarts) when ``commit_interval_s`` has passed, or ``force``."""
        now = time.monotonic()
        if not force and now - self._last_commit_s < self.settings.commit_interval_s:
            return False
        self._last_commit_s = now
        return True

    def maybe_commit(self, force: bool = False) -> dict[TopicPartition, int]:
        """Commit finished offsets when ``commit_interval_s`` has passed (or ``force``); returns them."""
        return self._commit(self.tracker.committable()) if self.commit_due(force) else {}

    def _commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        if not offsets:
            return {}
        try:
            self.consumer.commit({KTopicPartition(*tp): OffsetAndMetadata(off, "", -1)
                                  for tp, off in offsets.items()}, timeout_ms=COMMIT_TIMEOUT_MS)
        except (kerrors.CommitFailedError, kerrors.KafkaError) as e:
            self.num_commit_failures += 1
            log.warning("commit of %s failed (will retry next interval): %r", _fmt(offsets), e)
            return {}
        self.tracker.mark_committed(offsets)
        self.num_commits += 1
        log.debug("committed %s", _fmt(offsets))
        return offsets

    async def _on_revoked(self, revoked: set[KTopicPartition], *, commit: bool) -> None:
        """On the consumer's IO thread: commit the revoked partitions' finished offsets (unless the
        member was evicted), forget them, and tell the worker (``on_revoke``, which must only record
        the set: the loop thread applies it after ``poll`` returns)."""
        tps = {TopicPartition(t.topic, t.partition) for t in revoked}
        self.num_revocations += bool(tps)
        ready = {tp: off for tp, off in self.tracker.committable().items() if tp in tps}
        if commit and ready and not self.transactional:
            offsets = {KTopicPartition(*tp): OffsetAndMetadata(off, "", -1) for tp, off in ready.items()}
            try:  # kafka-python 3.0's coroutine behind commit(); the public one blocks on this thread
                coordinator = self.consumer._coordinator
                await coordinator._commit_offsets_sync_async(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
                self.tracker.mark_committed(ready)
                self.num_commits += 1
            except Exception as e:  # noqa: BLE001 - the new owner re-reads from the last commit
                self.num_commit_failures += 1
                log.warning("commit of %s on revoke failed: %r", _fmt(ready), e)
        if self.on_revoke is not None:
            self.on_revoke(tps)
        # the worker drops unfinished work of revoked partitions; if this member gets one back,
        # kafka-python keeps its fetch position past that work: remember where to read again
        if self.transactional:  # held results were dropped too: everything since the last commit
            self._reread.update(dict.fromkeys(tps))
        else:
            self._reread.update(self.tracker.first_pending(tps))
        self.tracker.forget(tps)
        log.info("partitions %s: %s", "revoked" if commit else "lost", sorted(tps))

    def _on_assigned(self, assigned: set[KTopicPartition]) -> None:
        reread, self._reread = self._reread, {}
        for ktp in assigned:
            tp = TopicPartition(ktp.topic, ktp.partition)
            if tp not in reread:
                continue
            offset = reread[tp]  # back to the same member: read the dropped work again
            if offset is None:
                _read_from_committed(self.consumer, ktp)
            else:
                self.consumer.seek(ktp, offset)
            log.info("%s[%d]: re-assigned with dropped work; reading again from %s", ktp.topic, ktp.partition,
                     "the committed offset" if offset is None else offset)
        if self.paused and assigned:
            self.consumer.pause(*assigned)
        log.info("partitions assigned: %s", sorted((t.topic, t.partition) for t in assigned))

    def lag(self) -> dict[TopicPartition, int | None]:
        """{tp: high watermark - position} per assigned partition, from the high watermark the last
        fetch response carried (no network call); None until a fetch answered. ListOffsets
        (``end_offsets``) is not used: Tansu 0.6 answers it with the last batch's base offset + 1,
        which is wrong whenever that batch holds more than one record. Stale while paused."""
        out: dict[TopicPartition, int | None] = {}
        for ktp in self.consumer.assignment():
            high = self.consumer.highwater(ktp)
            try:
                pos = self.consumer.position(ktp, timeout_ms=0)
            except kerrors.KafkaError:
                pos = None
            ok = high is not None and pos is not None and high >= pos
            out[TopicPartition(ktp.topic, ktp.partition)] = high - pos if ok else None
        return out

    def close(self, timeout_ms: int = 5000) -> None:
        """Close without LeaveGroup when static membership is on (``group_instance_id`` set): the
        partitions stay ours until the session times out, or until the same instance id rejoins."""
        self.consumer.close(autocommit=False, timeout_ms=timeout_ms)


def _read_from_committed(consumer: KafkaConsumer, ktp: KTopicPartition) -> None:
    """Give an assigned partition a fresh fetch state (paused flag kept), as kafka-python does for a
    newly assigned one: its next poll fetches the group's committed offset first (stable offsets
    under ``read_committed``). Runs in the assignment listener, before any fetch of the new
    generation; buffered fetches for the old position are discarded (no valid position)."""
    subs = consumer._subscription  # kafka-python 3.0 internals: no public "seek to committed"
    with subs._lock:
        old = subs.assignment.get(ktp)
        if old is not None:
            fresh = TopicPartitionState()
            fresh.paused = old.paused
            subs.assignment[ktp] = fresh


def _fmt(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items()))


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

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)
