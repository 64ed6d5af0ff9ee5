"""A rebalance that hands a member back partitions it held must not lose their unfinished work.

The worker drops the unfinished work of revoked partitions (their next owner reads it again). When
that next owner is the same member, kafka-python keeps the partition's fetch position past the
dropped records, so KafkaSource seeks back to the oldest unacknowledged offset on re-assignment.
"""

from __future__ import annotations

import threading

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka_support import wait_for

from elbert_stream.config import KafkaSettings
from elbert_stream.kafka_io import KafkaSource, client_config
from elbert_stream.offsets import OffsetTracker

pytestmark = pytest.mark.integration

PER_PARTITION = 10


def _settings(bootstrap: str, topics: dict[str, str]) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, input_topics=[topics["input"]],
                         group_id=topics["group"], group_instance_id=None, session_timeout_ms=6000,
                         heartbeat_interval_ms=1000)


def _produce_evenly(bootstrap: str, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for p in range(4):
            for i in range(PER_PARTITION):
                producer.send(topic, value=f"text {p}-{i}".encode(), partition=p)
        producer.flush()
    finally:
        producer.close()


def test_partitions_given_back_to_the_same_member_are_read_again(kafka_bootstrap: str,
                                                                 topics: dict[str, str]) -> None:
    _produce_evenly(kafka_bootstrap, topics["input"])
    k = _settings(kafka_bootstrap, topics)
    source = KafkaSource(k, OffsetTracker(), client_id="member-a")
    seen: list[tuple[int, int]] = []
    try:
        # member A polls every record and finishes none of them (all still in its engine)
        assert wait_for(lambda: bool(seen.extend((m.partition, m.offset) for m in source.poll(200)))
                        or len(seen) >= 4 * PER_PARTITION, timeout_s=60)
        assert len(set(seen)) == 4 * PER_PARTITION
        # member B joins: a rebalance revokes everything from A and gives part of it back
        stop = threading.Event()
        other = KafkaConsumer(**client_config(k), group_id=k.group_id, session_timeout_ms=6000,
                              heartbeat_interval_ms=1000, auto_offset_reset="earliest",
                              enable_auto_commit=False)
        other.subscribe([topics["input"]])
        thread = threading.Thread(target=lambda: [other.poll(200) for _ in iter(stop.is_set, True)],
                                  daemon=True)
        thread.start()
        again: list[tuple[int, int]] = []
        try:
            def rebalanced_and_reread() -> bool:
                again.extend((m.partition, m.offset) for m in source.poll(200))
                mine = {tp.partition for tp in source.assignment()}
                return source.num_revocations > 0 and 0 < len(mine) < 4 and all(
                    {(p, o) for o in range(PER_PARTITION)} <= set(again) for p in mine)
            assert wait_for(rebalanced_and_reread, timeout_s=90), (
                f"after the rebalance A holds {sorted(source.assignment())}; read again {sorted(again)}")
        finally:
            stop.set()
            thread.join(10)
            other.close(autocommit=False)
    finally:
        source.close()
