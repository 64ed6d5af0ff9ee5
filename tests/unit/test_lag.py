"""``stream/lag.py`` EndOffsets: what it asks for and what it keeps, with a fake consumer (the real
ListOffsets path: tests/integration/test_kafka_io.py, lag tests)."""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition as KTopicPartition

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.lag import EndOffsets
from elbert_stream.stream.offsets import TopicPartition


class FakeConsumer:
    def __init__(self, ends: dict[KTopicPartition, int | None]) -> None:
        self.ends, self.asked = ends, []

    def end_offsets(self, tps: list[KTopicPartition], timeout_ms: int) -> dict[KTopicPartition, int | None]:
        self.asked.append(sorted(tps))
        return {tp: self.ends.get(tp) for tp in tps}


def idle_end_offsets() -> EndOffsets:
    e = EndOffsets.__new__(EndOffsets)  # no thread, no client: drive _refresh by hand
    e.settings, e.every_s, e._want, e._ends, e.num_failures = KafkaSettings(), 1.0, frozenset(), {}, 0
    return e


def test_asks_only_for_wanted_partitions_and_keeps_known_answers() -> None:
    e = idle_end_offsets()
    fake: Any = FakeConsumer({KTopicPartition("t", 0): 10, KTopicPartition("t", 1): None})
    e._refresh(fake)
    assert fake.asked == [] and e.get() == {}  # nothing wanted: no request
    e.want({TopicPartition("t", 0), TopicPartition("t", 1)})
    e._refresh(fake)
    assert fake.asked == [[KTopicPartition("t", 0), KTopicPartition("t", 1)]]
    assert e.get() == {TopicPartition("t", 0): 10}  # an unanswered partition is left out
    e.want({TopicPartition("t", 1)})  # partition 0 revoked: dropped from get() at once
    assert e.get() == {}
