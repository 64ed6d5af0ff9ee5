"""A rebalance that hands a member back partitions it held must not lose their dropped work.

The worker drops the unfinished work of revoked partitions (their next owner reads it again). When
that next owner is the same member, kafka-python keeps the partition's fetch position past the
dropped records, so KafkaSource reads again on re-assignment: in at_least_once from the oldest
unacknowledged offset; in exactly_once (``transactional``) from the group's committed offset, because
results finished since the last transaction were only held and were dropped too (this was the loss
of 3-34 inputs per fault run in exactly_once).
"""

from __future__ import annotations

import pytest
from kafka import KafkaProducer
from kafka_support import other_member, wait_for

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.offsets import OffsetTracker
from elbert_stream.stream.source import KafkaSource

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


@pytest.mark.both_brokers
@pytest.mark.parametrize("transactional", [False, True], ids=["at_least_once", "exactly_once"])
def test_partitions_given_back_to_the_same_member_are_read_again(kafka_bootstrap: str, topics: dict[str, str],
                                                                 transactional: bool) -> None:
    _produce_evenly(kafka_bootstrap, topics["input"])
    k = _settings(kafka_bootstrap, topics)
    tracker = OffsetTracker()
    source = KafkaSource(k, tracker, client_id="member-a", transactional=transactional)
    seen: list[tuple[int, int]] = []
    try:
        # member A polls every record; it finishes (acknowledged, or in exactly_once held for a
        # transaction) the first half of each partition and none of the rest; nothing is committed
        polled = []
        assert wait_for(lambda: bool(polled.extend(source.poll(200))) or len(polled) >= 4 * PER_PARTITION,
                        timeout_s=60)
        seen = [(m.partition, m.offset) for m in polled]
        assert len(set(seen)) == 4 * PER_PARTITION
        for m in polled:
            if m.offset < PER_PARTITION // 2:
                assert tracker.done((m.topic, m.partition), m.offset, m.epoch)
        # member B joins: a rebalance revokes everything from A and gives part of it back
        again: list[tuple[int, int]] = []
        # at_least_once: the finished half was delivered, only the rest comes again;
        # exactly_once: the held half was dropped with the rest, everything comes again
        first = 0 if transactional else PER_PARTITION // 2
        with other_member(k, topics["input"]):
            def rebalanced_and_reread() -> bool:
                again.extend((m.partition, m.offset) for m in source.poll(200))
                mine = {tp.partition for tp in source.assignment()}
                return source.num_revocations > 0 and 0 < len(mine) < 4 and all(
                    {(p, o) for o in range(first, PER_PARTITION)} <= set(again) for p in mine)
            assert wait_for(rebalanced_and_reread, timeout_s=90), (
                f"after the rebalance A holds {sorted(source.assignment())}; read again {sorted(again)}")
    finally:
        source.close()
