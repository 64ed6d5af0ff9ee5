"""The parking lot's logic (stream/parking.py), without Kafka: backoff, order per partition, one try
of a refused head at a time, what is held, and what the health warning says."""

from __future__ import annotations

import time

import pytest

from elbert_stream.stream import parking
from elbert_stream.stream.offsets import TopicPartition
from elbert_stream.stream.parking import ParkingLot
from elbert_stream.stream.records import InputMessage


def msg(partition: int, offset: int) -> InputMessage:
    return InputMessage("in", partition, offset, None, b"v", [], epoch=0)


def current(_: InputMessage) -> bool:
    return True


def test_a_refused_head_holds_its_partition_and_is_tried_alone_after_its_backoff(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(parking.time, "monotonic", lambda: now[0])
    lot = ParkingLot(backoff_max_s=4.0)
    sent: list[str] = []
    head = msg(0, 5)
    lot.park(head, "dlq", lambda: sent.append("head"), "MessageSizeTooLargeError(None)")
    assert lot.holds(msg(0, 6)) and not lot.holds(msg(1, 0))
    lot.queue(msg(0, 6), "out", lambda: sent.append("6"))
    assert lot.blocked() == {TopicPartition("in", 0)}
    assert lot.take_due(current) == []  # backoff 0.5 s not over
    now[0] += 0.6
    (first,) = lot.take_due(current)  # only the head; what queued behind it waits for its answer
    first.resend()
    assert sent == ["head"] and lot.blocked() == {TopicPartition("in", 0)}
    assert not lot.holds(head) and lot.holds(msg(0, 7))  # the try itself goes out, others queue
    assert lot.take_due(current) == []  # its answer has not come
    lot.park(head, "dlq", lambda: sent.append("head"), "MessageSizeTooLargeError(None)")  # refused again
    now[0] += 0.6
    assert lot.take_due(current) == []  # second backoff: 1 s
    now[0] += 0.5
    assert [p.msg.offset for p in lot.take_due(current)] == [5]  # the head first, though it came back last
    lot.delivered(head)  # it got through: what queued behind it flows
    assert [p.msg.offset for p in lot.take_due(current)] == [6]
    assert lot.blocked() == set() and lot.problem() is None


def test_backoff_doubles_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(parking.time, "monotonic", lambda: now[0])
    lot = ParkingLot(backoff_max_s=2.0)
    m = msg(3, 1)
    waits = []
    for _ in range(5):
        lot.park(m, "dlq", lambda: None, "refused")
        waits.append(lot.items[-1].due_s - now[0])
        now[0] += 10
        lot.take_due(current)
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_revoked_partitions_records_are_dropped() -> None:
    lot = ParkingLot(backoff_max_s=1.0)
    lot.park(msg(0, 1), "dlq", lambda: None, "refused")
    lot.queue(msg(0, 2), "out", lambda: None)
    lot.park(msg(1, 1), "dlq", lambda: None, "refused")
    lot.release({TopicPartition("in", 0)})
    lot.take_due(lambda m: m.partition != 0)
    assert {p.msg.partition for p in lot.items} == {1}


def test_the_warning_names_the_topic_the_error_and_the_partitions() -> None:
    lot = ParkingLot(backoff_max_s=30.0)
    lot.park(msg(2, 9), "my-dlq", lambda: None, "TopicAuthorizationFailedError(...)")
    time.sleep(0.01)
    text = lot.problem()
    assert text is not None
    for part in ("my-dlq", "TopicAuthorizationFailedError", "in[2]", "30s", "resumes by itself"):
        assert part in text, (part, text)
