"""Kafka source (kafka-python) with commit-after-delivery.

``KafkaSource`` is a consumer-group member with auto-commit off: it tracks every polled offset in an
``OffsetTracker`` and commits (``commit``, on the loop thread only) the offsets it is given: the
contiguous run whose results the broker acknowledged. When to commit is the worker's ``CommitCadence``
(``offsets.py``); what is committed with the outputs under exactly_once is ``transactions.py``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaConsumer
from kafka import TopicPartition as KTopicPartition
from kafka import errors as kerrors
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.client import client_config, explain_bootstrap
from elbert_stream.stream.kafka_internals import (
    commit_offsets_on_io_thread,
    joining_group,
    leave_group_on_close,
    refetch_from_committed,
)
from elbert_stream.stream.lag import EndOffsets
from elbert_stream.stream.offsets import OffsetTracker, TopicPartition
from elbert_stream.stream.records import InputMessage

log = logging.getLogger(__name__)
JOIN_POLL_MS = 100  # poll slice while a group join is in flight (see ``poll``)


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



def join_bound_s(session_timeout_ms: int) -> float:
    """How long a member may go without an assignment before ``stuck_joining`` calls it stuck: three
    session timeouts + 30 s (a join waits at most a session timeout for the members, dead ones
    expired, plus the rebalance)."""
    return 3 * session_timeout_ms / 1000 + 30.0

class KafkaSource:
    """Consumer-group member over ``settings.input_topics``. Not thread-safe: every method runs on
    the worker's loop thread (kafka-python's consumer is single-threaded).

    ``on_revoke(tps)`` is called (on the consumer's IO thread, by the rebalance listener) after the
    revoked partitions' finished offsets were committed and before they are forgotten; the worker
    records them there and drops their buffered work on its own thread.

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
        self.paused = False  # every partition paused (the worker's backlog is full)
        self.held: set[TopicPartition] = set()  # partitions paused on their own (the sink parked a record)
        self.num_commits = 0
        self.num_commit_failures = 0
        self._commit_in_flight = False
        # since when this member has had no assignment to work on: from the start, and from each
        # revoke until the next assignment (even an empty one); None while it has one
        self.rebalancing_since: float | None = time.monotonic()
        self.num_revocations = 0  # rebalances that took partitions away (revoked or lost)
        self._reread: dict[TopicPartition, int | None] = {}  # revoked -> where to read again (None: commit)
        with explain_bootstrap(settings, "consumer"):
            self.consumer = KafkaConsumer(
                **client_config(settings), client_id=client_id, group_id=settings.group_id,
                group_instance_id=settings.group_instance_id, enable_auto_commit=False,
                auto_offset_reset=settings.auto_offset_reset, session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                max_poll_records=settings.max_poll_records, isolation_level=isolation_level,
                fetch_max_bytes=settings.fetch_max_bytes,
                max_partition_fetch_bytes=min(settings.fetch_max_bytes, 1024 * 1024),
                receive_message_max_bytes=settings.receive_message_max_bytes,
                metrics_enabled=False,  # kafka-python's own sensors, per record; unused
            )
        self.consumer.subscribe(settings.input_topics, listener=_Rebalance(self))
        self._end_offsets = (EndOffsets(settings, isolation_level=isolation_level,
                                        client_id=f"{client_id}-lag")
                             if settings.lag_from == "list_offsets" else None)

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InputMessage]:
        """Fetch records, track their offsets, return them in partition/offset order.

        While a group join is in flight the poll waits (slices of ``JOIN_POLL_MS``, back to back,
        until joined or ``max(timeout_ms, JOIN_POLL_MS)`` passed) whatever ``timeout_ms`` says:
        kafka-python 3.0 drops a join whose answer arrives between two polls and sends a new
        JoinGroup, so a member that does other work between ``poll(0)`` calls (the engine's steps)
        can rejoin forever without an assignment. Under eager rebalancing nothing is assigned while
        joining, so the wait costs no work of the group's partitions."""
        if self.joining:
            deadline = time.monotonic() + max(timeout_ms, JOIN_POLL_MS) / 1000
            batches = self.consumer.poll(timeout_ms=JOIN_POLL_MS, max_records=max_records,
                                         update_offsets=True)
            while not batches and joining_group(self.consumer) and time.monotonic() < deadline:
                batches = self.consumer.poll(timeout_ms=JOIN_POLL_MS, max_records=max_records,
                                             update_offsets=True)
        else:
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

    @property
    def joining(self) -> bool:
        """A group join is in flight (this member has no assignment to work on): poll back to back."""
        return self.rebalancing_since is not None and joining_group(self.consumer)

    def stuck_joining(self) -> str | None:
        """Why this member looks stuck, or None: no assignment since its start or its last revoke for
        longer than three session timeouts + 30 s (a join waits at most a session timeout for the
        members, dead ones expired, plus the rebalance). A restart is the remedy (health fails)."""
        limit_s = join_bound_s(self.settings.session_timeout_ms)
        since = self.rebalancing_since
        if since is None or time.monotonic() - since <= limit_s:
            return None
        return (f"no assignment for {time.monotonic() - since:.0f}s while joining group "
                f"{self.settings.group_id!r} (member {self.settings.group_instance_id or 'dynamic'}): "
                "the group never completed a join with this member (a dead member the broker does not "
                "expire, or a rebalance that never ends); restart it, and check the group with "
                "kafka-consumer-groups --describe")

    def total_partitions(self) -> int:
        """Partitions of the input topics, as the consumer's metadata knows them."""
        parts = [self.consumer.partitions_for_topic(t) or () for t in self.settings.input_topics]
        return sum(len(p) for p in parts)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t.topic, t.partition) for t in self.consumer.assignment()}

    def pause(self) -> None:
        """Stop fetching from every assigned partition (and from ones assigned later) until resume."""
        if not self.paused:
            self.consumer.pause(*self.consumer.assignment())
            self.paused = True

    def resume(self) -> None:
        """Fetch again from every partition but the ``held`` ones."""
        if self.paused:
            self.consumer.resume(*(t for t in self.consumer.paused()
                                   if TopicPartition(t.topic, t.partition) not in self.held))
            self.paused = False

    def hold(self, tps: set[TopicPartition]) -> None:
        """Pause exactly ``tps`` (on top of ``pause``): partitions whose next result cannot be
        delivered yet; the others keep flowing. Partitions no longer held are resumed."""
        if not tps and not self.held:  # every loop iteration: usually nothing held
            return
        assigned = self.assignment()
        tps = {tp for tp in tps if tp in assigned}
        if tps == self.held:
            return
        released, self.held = self.held - tps, tps
        if tps:
            self.consumer.pause(*(KTopicPartition(*tp) for tp in tps))
        if released and not self.paused:
            self.consumer.resume(*(KTopicPartition(*tp) for tp in released))
        log.info("partitions held back: %s", sorted(tps) or "none")

    def commit(self, offsets: dict[TopicPartition, int], *,
               blocking: bool = False) -> dict[TopicPartition, int]:
        """Commit ``offsets`` as the group's offsets. Non-blocking by default: the commit is sent and
        recorded (``mark_committed``) when the coordinator answers, on a later ``poll`` or commit;
        one is in flight at a time (offsets meanwhile go with the next). ``blocking`` (drain, close)
        waits up to ``commit_timeout_ms``. Returns the offsets sent, or {} (nothing to do, one in
        flight, or failed: logged, counted, the same offsets are committed again next time)."""
        if not offsets or (self._commit_in_flight and not blocking):
            return {}
        koffsets = {KTopicPartition(*tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
        if not blocking:
            self._commit_in_flight = True
            try:
                self.consumer.commit_async(koffsets, callback=lambda _o, r: self._committed(offsets, r))
            except kerrors.KafkaError as e:
                self._committed(offsets, e)
            return offsets
        try:
            self.consumer.commit(koffsets, timeout_ms=self.settings.commit_timeout_ms)
        except (kerrors.CommitFailedError, kerrors.KafkaError) as e:
            self._committed(offsets, e)
            return {}
        self._committed(offsets, None)
        return offsets

    def _committed(self, offsets: dict[TopicPartition, int], result: object) -> None:
        """A commit's outcome (an exception, or the response / None for success)."""
        self._commit_in_flight = False
        if isinstance(result, BaseException):
            self.num_commit_failures += 1
            log.warning("commit of %s failed (will retry next interval): %r", _fmt(offsets), result)
            return
        self.tracker.mark_committed(offsets)
        self.num_commits += 1
        log.debug("committed %s", _fmt(offsets))

    async def _on_revoked(self, revoked: set[KTopicPartition], *, commit: bool) -> None:
        """On the consumer's IO thread: commit the revoked partitions' finished offsets (unless the
        member was evicted), forget them, and tell the worker (``on_revoke``, which must only record
        the set: the loop thread applies it after ``poll`` returns)."""
        self.rebalancing_since = self.rebalancing_since or time.monotonic()
        tps = {TopicPartition(t.topic, t.partition) for t in revoked}
        self.num_revocations += bool(tps)
        ready = {tp: off for tp, off in self.tracker.committable().items() if tp in tps}
        if commit and ready and not self.transactional:
            offsets = {KTopicPartition(*tp): OffsetAndMetadata(off, "", -1) for tp, off in ready.items()}
            try:  # the public commit() blocks, and raises on this thread
                await commit_offsets_on_io_thread(self.consumer, offsets, self.settings.commit_timeout_ms)
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
        self.held = self.held - tps  # rebound, never mutated: stats() reads it from other threads
        log.info("partitions %s: %s", "revoked" if commit else "lost", sorted(tps))

    def _on_assigned(self, assigned: set[KTopicPartition]) -> None:
        self.rebalancing_since = None
        reread, self._reread = self._reread, {}
        for ktp in assigned:
            tp = TopicPartition(ktp.topic, ktp.partition)
            if tp not in reread:
                continue
            offset = reread[tp]  # back to the same member: read the dropped work again
            if offset is None:
                refetch_from_committed(self.consumer, ktp)
            else:
                self.consumer.seek(ktp, offset)
            log.info("%s[%d]: re-assigned with dropped work; reading again from %s", ktp.topic, ktp.partition,
                     "the committed offset" if offset is None else offset)
        if self.paused and assigned:
            self.consumer.pause(*assigned)
        log.info("partitions assigned: %s", sorted((t.topic, t.partition) for t in assigned))

    def lag(self) -> dict[TopicPartition, int | None]:
        """{tp: end offset - position} per assigned partition (no network call on this thread). The
        end offset comes from ``EndOffsets`` (ListOffsets every second on its own thread; fresh while
        paused) when ``settings.lag_from`` is ``list_offsets``, else, and until its first answer,
        from the high watermark the last fetch response carried (stale while paused; Tansu 0.6's
        ListOffsets answers the last batch's base offset + 1, wrong when that batch holds more than
        one record). None while neither is known."""
        assigned = self.consumer.assignment()
        ends: dict[TopicPartition, int] = {}
        if self._end_offsets is not None:
            self._end_offsets.want({TopicPartition(t.topic, t.partition) for t in assigned})
            ends = self._end_offsets.get()
        out: dict[TopicPartition, int | None] = {}
        for ktp in assigned:
            tp = TopicPartition(ktp.topic, ktp.partition)
            end = ends.get(tp, self.consumer.highwater(ktp))
            try:
                pos = self.consumer.position(ktp, timeout_ms=0)
            except kerrors.KafkaError:
                pos = None
            out[tp] = max(0, end - pos) if end is not None and pos is not None else None
        return out

    def close(self, timeout_ms: int = 5000, *, leave: bool | None = None) -> None:
        """Close the consumer. ``leave`` (default ``settings.leave_group_on_close``): send LeaveGroup,
        static members included, so the group rebalances now; otherwise a static member's partitions
        stay reserved until the session times out or the same instance id rejoins (a dynamic member
        always leaves: kafka-python's behaviour)."""
        leave = self.settings.leave_group_on_close if leave is None else leave
        if leave and self.settings.group_instance_id:
            leave_group_on_close(self.consumer)
        if self._end_offsets is not None:
            self._end_offsets.close()
        self.consumer.close(autocommit=False, timeout_ms=timeout_ms)


def _fmt(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items()))
