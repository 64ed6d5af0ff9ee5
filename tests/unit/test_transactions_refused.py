"""TransactionalSink when the broker refuses a dead letter inside a transaction (logic only: the
producer is a fake that refuses records for the dead-letter topic while told to). Neither embedded
broker can run this path end to end (docs/streaming.md, "Dead letters"): Tansu does not enforce
max.message.bytes, noida-db refuses the EndTxn after an abort and a new producer epoch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kafka import errors as kerrors

from elbert_stream.config import KafkaSettings
from elbert_stream.stream import sink, transactions
from elbert_stream.stream.offsets import OffsetTracker, TopicPartition
from elbert_stream.stream.records import InputMessage
from elbert_stream.stream.sink import DeliveryError
from elbert_stream.stream.transactions import TransactionalSink


class Future:
    def __init__(self, error: BaseException | None) -> None:
        self.is_done, self.exception = True, error

    def failed(self) -> bool:
        return self.exception is not None


class Producer:
    """Records what each transaction sent and how it ended; refuses dead letters while ``refuse``."""

    refuse = False
    made: list[Producer] = []

    def __init__(self, **config: Any) -> None:
        self.config = {"max_request_size": 1_048_576, **config}
        self.txns: list[tuple[list[str], str]] = []
        self._open: list[str] = []
        Producer.made.append(self)

    def init_transactions(self) -> None: ...
    def begin_transaction(self) -> None:
        self._open = []

    def send(self, topic: str, value: bytes | None = None, **_: Any) -> Future:
        self._open.append(f"{topic}:{(value or b'').decode()}")
        bad = Producer.refuse and topic == "dlq"
        return Future(kerrors.MessageSizeTooLargeError() if bad else None)

    def flush(self, timeout: float | None = None) -> None: ...
    def abort_transaction(self) -> None:
        self.txns.append((self._open, "aborted"))

    def close(self, timeout: float | None = None) -> None: ...


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> list[Producer]:
    Producer.made, Producer.refuse = [], True
    monkeypatch.setattr(sink, "KafkaProducer", Producer)
    monkeypatch.setattr(sink, "no_busy_send_loop", lambda producer: None)  # a fake has no sender
    done = SimpleNamespace(wait=lambda timeout_ms=None: True)

    def commit(producer: Producer) -> Any:
        producer.txns.append((producer._open, "committed"))
        return done

    monkeypatch.setattr(transactions, "send_offsets_to_transaction", lambda *a: done)
    monkeypatch.setattr(transactions, "commit_transaction", commit)
    monkeypatch.setattr(transactions, "wake_sender", lambda p: None)
    return Producer.made


def test_a_refused_dead_letter_aborts_and_its_partition_waits_while_others_commit(
        fake_kafka: list[Producer], monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(transactions.time, "monotonic", lambda: now[0])
    settings = KafkaSettings(output_topic="out", dead_letter_topic="dlq", retry_backoff_max_s=4.0)
    tracker = OffsetTracker()
    s = TransactionalSink(settings, tracker, replica_id="r", transactional_id="t-g-r0")
    source = SimpleNamespace(consumer=SimpleNamespace(group_metadata=lambda: "gm"))
    msgs = {p: [InputMessage("in", p, o, None, b"x", [], epoch=tracker.track(("in", p), o) or 0)
                for o in range(2)] for p in (0, 1)}
    s._send("out", msgs[0][0], b"a0", None, [], "ok")
    s.send_dead_letter(msgs[0][1], "not_utf8", "bad bytes")
    s._send("out", msgs[1][0], b"b0", None, [], "ok")
    s._send("out", msgs[1][1], b"b1", None, [], "ok")

    assert s.commit(source) == {}  # the dead letter refused: the whole transaction aborted
    first = fake_kafka[0]
    assert first.txns[-1][1] == "aborted" and len(fake_kafka) == 2  # and a fresh producer took over
    assert s.blocked() == {TopicPartition("in", 0)} and s.num_parked == 2
    warning = s.problem()
    assert warning is not None and "dlq" in warning and "MessageSizeTooLarge" in warning

    assert s.commit(source) == {TopicPartition("in", 1): 2}  # partition 1 alone, while 0 waits
    assert fake_kafka[1].txns[-1] == (["out:b0", "out:b1"], "committed")
    now[0] += 0.6  # partition 0's backoff (0.5 s) passed: tried again, refused again
    assert s.commit(source) == {}
    assert s.blocked() == {TopicPartition("in", 0)}

    Producer.refuse = False  # the topic became writable
    now[0] += 1.1  # second backoff: 1 s
    assert s.commit(source) == {TopicPartition("in", 0): 2}
    last = fake_kafka[-1].txns[-1]
    assert last[1] == "committed" and last[0][0] == "out:a0" and last[0][1].startswith("dlq:")
    assert s.blocked() == set() and s.problem() is None and s.num_parked == 0


def test_any_other_refused_record_is_still_fatal(fake_kafka: list[Producer],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Producer, "send", lambda self, topic, value=None, **_: Future(
        kerrors.TopicAuthorizationFailedError() if topic == "out" else None))
    tracker = OffsetTracker()
    s = TransactionalSink(KafkaSettings(output_topic="out", dead_letter_topic="dlq"), tracker,
                          replica_id="r", transactional_id="t-g-r0")
    m = InputMessage("in", 0, 0, None, b"x", [], epoch=tracker.track(("in", 0), 0) or 0)
    s._send("out", m, b"a", None, [], "ok")
    with pytest.raises(DeliveryError):
        s.commit(SimpleNamespace(consumer=SimpleNamespace(group_metadata=lambda: "gm")))  # type: ignore[arg-type]
