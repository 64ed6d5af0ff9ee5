"""Drive a running stream from outside and account for every input record.

Used by the demo, the streaming benchmark and the Serve integration tests:

* :func:`produce_values`: write values to the input topic, returning each record's
  ``(partition, offset)`` (and the send time, for end-to-end latency);
* :class:`TopicReader`: read topics from the beginning with no consumer group (manual
  assignment of every partition), so reading never disturbs the workers' group;
* :func:`account`: match outputs and dead letters back to input offsets: lost, duplicated,
  answered both ways.

Kafka only; no Ray, no torch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from elbert_stream.errors import ElbertError
from elbert_stream.stream.records import OutputRecord, parse_headers

log = logging.getLogger(__name__)

Position = tuple[str, int, int]  # (topic, partition, offset)


@dataclass(frozen=True, slots=True)
class Sent:
    """One produced record: where it landed and when (``time.time()`` seconds)."""

    topic: str
    partition: int
    offset: int
    sent_s: float

    @property
    def position(self) -> Position:
        return (self.topic, self.partition, self.offset)


def produce_values(bootstrap: str, topic: str, values: Sequence[bytes | None],
                   keys: Sequence[bytes | None] | None = None, *, rate_per_s: float | None = None,
                   linger_ms: int = 5) -> list[Sent]:
    """Produce ``values`` (optionally paced to ``rate_per_s``); waits for every ack."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, acks="all",
                             max_request_size=16 * 1024 * 1024, client_id="elbert-streamcheck")
    try:
        futures = []
        start = time.monotonic()
        for i, value in enumerate(values):
            if rate_per_s:
                delay = start + i / rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            key = keys[i] if keys is not None else None
            futures.append((time.time(), producer.send(topic, value=value, key=key)))
        producer.flush()
        out = []
        for sent_s, fut in futures:
            meta = fut.get(timeout=30)
            out.append(Sent(meta.topic, meta.partition, meta.offset, sent_s))
        return out
    finally:
        producer.close()


@dataclass
class Received:
    """One record read back: its value, headers and position, plus the reader's arrival time."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: dict[str, str]
    timestamp_ms: int
    read_s: float


class TopicReader:
    """Reads every partition of ``topics`` from the beginning, without a consumer group
    (``isolation_level="read_committed"`` for an exactly_once output)."""

    def __init__(self, bootstrap: str, topics: Iterable[str], *, timeout_s: float = 20.0,
                 isolation_level: str = "read_uncommitted") -> None:
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                       auto_offset_reset="earliest", client_id="elbert-streamcheck-reader",
                                       fetch_max_wait_ms=100, isolation_level=isolation_level)
        deadline = time.monotonic() + timeout_s
        parts: list[TopicPartition] = []
        for topic in topics:
            ids = self._consumer.partitions_for_topic(topic)
            while not ids and time.monotonic() < deadline:
                time.sleep(0.2)
                ids = self._consumer.partitions_for_topic(topic)
            if not ids:
                raise ElbertError(f"topic {topic!r} has no partitions on {bootstrap}")
            parts += [TopicPartition(topic, p) for p in sorted(ids)]
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)
        self.records: dict[str, list[Received]] = {t: [] for t in topics}

    def poll(self, timeout_ms: int = 200) -> int:
        """Fetch what is there now; returns how many records arrived."""
        got = 0
        for tp, batch in self._consumer.poll(timeout_ms=timeout_ms, max_records=5000).items():
            now = time.time()
            for r in batch:
                headers = parse_headers([(k, v) for k, v in (r.headers or [])])
                self.records[tp.topic].append(
                    Received(tp.topic, tp.partition, r.offset, r.value, headers, r.timestamp, now))
                got += 1
        return got

    def poll_until(self, done: Callable[[TopicReader], bool], timeout_s: float,
                   on_progress: Callable[[TopicReader], None] | None = None) -> bool:
        """Poll until ``done(self)`` or ``timeout_s``; returns whether ``done`` became true."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if on_progress is not None:
                on_progress(self)
            if done(self):
                return True
            if time.monotonic() > deadline:
                return False

    def count(self, topic: str) -> int:
        return len(self.records[topic])

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Accounting:
    """Every input position against what came back for it."""

    num_inputs: int
    outputs: dict[Position, list[OutputRecord]] = field(default_factory=dict)
    dead_letters: dict[Position, list[Received]] = field(default_factory=dict)
    lost: list[Position] = field(default_factory=list)
    both: list[Position] = field(default_factory=list)  # answered AND dead-lettered
    strays: int = 0  # outputs/dead letters naming a position we did not produce

    @property
    def num_duplicates(self) -> int:
        """Extra answers beyond one per input (at-least-once redelivery after a failure)."""
        extra = sum(len(v) - 1 for v in self.outputs.values())
        extra += sum(len(v) - 1 for v in self.dead_letters.values())
        return extra + len(self.both)

    @property
    def num_answered(self) -> int:
        return self.num_inputs - len(self.lost)

    def dead_letter_reasons(self) -> Counter[str]:
        return Counter(recs[0].headers.get("elbert.reason", "?") for recs in self.dead_letters.values())

    def summary(self) -> dict[str, Any]:
        return {"inputs": self.num_inputs, "outputs": len(self.outputs),
                "dead_letters": len(self.dead_letters), "lost": len(self.lost),
                "duplicates": self.num_duplicates, "strays": self.strays}


def dead_letter_position(rec: Received) -> Position | None:
    h = rec.headers
    try:
        return (h["elbert.source.topic"], int(h["elbert.source.partition"]), int(h["elbert.source.offset"]))
    except (KeyError, ValueError):
        return None


def account(sent: Sequence[Sent], outputs: Iterable[Received],
            dead_letters: Iterable[Received]) -> Accounting:
    """Match every output record and dead letter to the input position it names."""
    wanted = {s.position for s in sent}
    acc = Accounting(num_inputs=len(wanted))
    for rec in outputs:
        out = OutputRecord.from_bytes(rec.value or b"")
        pos = (out.topic, out.partition, out.offset)
        if pos in wanted:
            acc.outputs.setdefault(pos, []).append(out)
        else:
            acc.strays += 1
    for rec in dead_letters:
        where = dead_letter_position(rec)
        if where is not None and where in wanted:
            acc.dead_letters.setdefault(where, []).append(rec)
        else:
            acc.strays += 1
    acc.lost = sorted(p for p in wanted if p not in acc.outputs and p not in acc.dead_letters)
    acc.both = sorted(p for p in wanted if p in acc.outputs and p in acc.dead_letters)
    return acc


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[index])
