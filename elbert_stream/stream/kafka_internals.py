"""Every use of kafka-python's private internals, in one place, each with a unit test that pins the
shape it was written for (tests/unit/test_kafka_internals.py). Written for kafka-python 3.0.x
(``TESTED``; pyproject pins the same range): a new minor version must pass those tests before the
pin moves.

Why each exists (kafka-python 3 has no public way to do it):

* ``commit_offsets_on_io_thread``: rebalance listeners run on the consumer's IO thread, where the
  public, blocking ``consumer.commit()`` raises; the coordinator's coroutine can be awaited there.
* ``refetch_from_committed``: "read this assigned partition again from the group's committed
  offset" (a fresh fetch state, as for a newly assigned partition); there is no public seek-to-committed.
* ``joining_group``: whether a group (re)join is pending (the worker must then poll back to back:
  kafka-python 3.0 drops a join answered between two polls).
* ``leave_group_on_close``: make ``close()`` send LeaveGroup for a static member too (by its member id
  and ``group.instance.id``: LeaveGroup v3+, KIP-345's member removal); kafka-python sends it only for
  dynamic members and has no option to leave as a static one.
* ``no_busy_send_loop``: kafka-python's producer sender polls with timeout 0, in a loop, while a
  connected broker has ``max_in_flight_requests_per_connection`` requests unanswered (its
  ``connection_delay`` is 0 for any node not backing off; Java's is "until a response"): a broker that
  stops answering (frozen, overloaded, a long GC) makes the sender thread spin and hold the GIL, and
  every other thread of the replica (the engine's steps) crawls. Measured with the broker SIGSTOPped:
  the sender thread at 100 % of a core, one classify call through the engine 16-27 s instead of < 1 s.
* ``send_offsets_to_transaction`` / ``commit_transaction``: the transaction manager's requests as
  futures, so the caller can wait with a deadline (the public calls wait forever); ``wake_sender``
  makes the sender thread pick them up at once.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KTopicPartition
from kafka.consumer.subscription_state import TopicPartitionState
from kafka.structs import OffsetAndMetadata

TESTED = ((3, 0), (3, 1))  # kafka-python versions these were written and tested for: [3.0, 3.1)


Offsets = dict[KTopicPartition, OffsetAndMetadata]


async def commit_offsets_on_io_thread(consumer: KafkaConsumer, offsets: Offsets, timeout_ms: int) -> None:
    """Commit group offsets from a rebalance listener (the consumer's IO thread)."""
    await consumer._coordinator._commit_offsets_sync_async(offsets, timeout_ms=timeout_ms)


def refetch_from_committed(consumer: KafkaConsumer, ktp: KTopicPartition) -> None:
    """Give an assigned partition a fresh fetch state (paused flag kept), as kafka-python does for a
    newly assigned one: its next poll fetches the group's committed offset first (stable offsets
    under ``read_committed``). Call from the assignment listener, before any fetch of the new
    generation; buffered fetches for the old position are discarded (no valid position)."""
    subs = consumer._subscription
    with subs._lock:
        old = subs.assignment.get(ktp)
        if old is not None:
            fresh = TopicPartitionState()
            fresh.paused = old.paused
            subs.assignment[ktp] = fresh


def joining_group(consumer: KafkaConsumer) -> bool:
    """True while the member must (re)join its group or a rejoin is under way (at start; during a
    rebalance, after the revoke: kafka-python keeps the revoked partitions in ``assignment()``,
    marked pending revocation, until the new assignment). kafka-python 3.0.x's
    ``join_group_async`` caches the join as a task and re-awaits it on the next poll, but a task
    that FINISHED between two polls is taken for a stale one and replaced by a new JoinGroup: its
    assignment is lost. Reproduced with a bare consumer: ``poll(0)`` with 50 ms of other work
    between polls never gets an assignment (hundreds of generations), ``poll(20)`` with the same
    work does at once (tests/integration/test_kafka_io.py)."""
    coordinator = consumer._coordinator
    return bool(coordinator.need_rejoin() or coordinator.rejoining)


def leave_group_on_close(consumer: KafkaConsumer) -> None:
    """Make this consumer's ``close()`` send LeaveGroup even when it is a static member (kafka-python
    skips it for members with a ``group_instance_id``): the request names the member id and the
    instance id, so the broker removes the static member and rebalances at once instead of holding
    its partitions until ``session.timeout.ms`` (or for ever, on a broker that never expires static
    members). Call right before ``close()``."""
    coordinator = consumer._coordinator
    coordinator.is_dynamic_member = lambda: True  # an instance attribute shadows the method


SENDER_WAIT_MS = 100  # the sender's poll while its connection is full of unanswered requests


def no_busy_send_loop(producer: KafkaProducer) -> None:
    """Make ``producer``'s sender wait (up to ``SENDER_WAIT_MS``; a response or a new record wakes it
    sooner) instead of spinning while a connected node cannot take another request (see the module
    doc). A node that is not connected keeps kafka-python's reconnect backoff."""
    client = producer._sender._client
    conns = client._manager._conns
    backoff = client.connection_delay

    def connection_delay(node_id: Any) -> float:
        conn = conns.get(node_id)
        if conn is not None and conn.connected:
            return SENDER_WAIT_MS
        return float(backoff(node_id))

    client.connection_delay = connection_delay  # an instance attribute shadows the method


def send_offsets_to_transaction(producer: KafkaProducer, offsets: Offsets, group_metadata: Any) -> Any:
    """Add the offsets to the open transaction; returns the request's result (``.wait(timeout_ms)``)."""
    return producer._transaction_manager.send_offsets_to_transaction(offsets, group_metadata)


def commit_transaction(producer: KafkaProducer) -> Any:
    """Start committing the open transaction; returns the request's result (``.wait(timeout_ms)``)."""
    return producer._transaction_manager.begin_commit()


def wake_sender(producer: KafkaProducer) -> None:
    """Make the producer's sender thread send queued transaction requests now."""
    producer._sender.wakeup()
