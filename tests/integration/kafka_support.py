"""Helpers for test_kafka_io.py / test_worker.py: produce with keys and headers, read topics back
without a consumer group, read a group's committed offsets, build worker settings."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from elbert_stream.config import KafkaSettings, Settings
from elbert_stream.stream.client import client_config
from elbert_stream.stream.records import OutputRecord

Position = tuple[str, int, int]




@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    @property
    def position(self) -> Position:
        return (self.topic, self.partition, self.offset)


def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None, dict[str, bytes]]],
            partition: int | None = None, **config: Any) -> list[Record]:
    """Send (key, value, headers) items (to ``partition``, default by key); returns each as a Record at
    the position the broker gave it."""
    producer = KafkaProducer(**{"bootstrap_servers": bootstrap, "acks": "all", "linger_ms": 5, **config})
    try:
        futs = [producer.send(topic, key=k, value=v, headers=list(h.items()), partition=partition)
                for k, v, h in items]
        producer.flush()
        out = []
        for (k, v, h), fut in zip(items, futs, strict=True):
            meta = fut.get(timeout=30)
            out.append(Record(meta.topic, meta.partition, meta.offset, k, v, h))
        return out
    finally:
        producer.close()


class Reader:
    """Reads every partition of ``topics`` from the beginning (no consumer group), accumulating."""

    def __init__(self, bootstrap: str, topics: list[str], isolation_level: str = "read_uncommitted",
                 **config: Any) -> None:
        self.consumer = KafkaConsumer(**{"bootstrap_servers": bootstrap, "group_id": None,
                                         "enable_auto_commit": False, "fetch_max_wait_ms": 100,
                                         "isolation_level": isolation_level, **config})
        parts = [TopicPartition(t, p) for t in topics for p in sorted(self._partitions(t))]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.records: dict[str, list[Record]] = {t: [] for t in topics}

    def _partitions(self, topic: str, timeout_s: float = 30.0) -> set[int]:
        """The topic's partitions; metadata may lag (e.g. just after a broker restart): wait for it."""
        deadline = time.monotonic() + timeout_s
        while not (found := self.consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no partitions known for {topic} after {timeout_s}s")
            time.sleep(0.2)
        return set(found)

    def poll(self, timeout_ms: int = 200) -> int:
        got = 0
        for tp, recs in self.consumer.poll(timeout_ms=timeout_ms, max_records=5000).items():
            self.records[tp.topic] += [Record(tp.topic, tp.partition, r.offset, r.key, r.value,
                                              dict(r.headers or [])) for r in recs]
            got += len(recs)
        return got

    def read(self, min_count: int, timeout_s: float = 60.0, settle_s: float = 0.5) -> dict[str, list[Record]]:
        """Poll until every partition is read past the end ListOffsets gave when the read began and at
        least ``min_count`` records arrived, then until no record arrived for ``settle_s`` (so the rest of
        the log, and late duplicates, get counted too). ``timeout_s`` bounds a wait *without progress*,
        and the settling: a long log is read whole however long it takes (Tansu on S3 serves ~60
        one-record batches a second), a stuck read still ends."""
        ends = self._ends()
        deadline = time.monotonic() + timeout_s
        while not self._done(min_count, ends) and time.monotonic() < deadline:
            if self.poll():
                deadline = time.monotonic() + timeout_s
        quiet = time.monotonic() + settle_s
        cap = time.monotonic() + timeout_s
        while time.monotonic() < min(quiet, cap):
            if self.poll(100):
                quiet = time.monotonic() + settle_s
        return self.records

    def _ends(self) -> dict[TopicPartition, int]:
        """Each assigned partition's end offset as ListOffsets gives it: only a lower bound on Tansu 0.6
        (the last batch's base offset + 1, or less on S3 storage), hence the settling in ``read``."""
        return {tp: end for tp, end in self.consumer.end_offsets(list(self.consumer.assignment())).items()
                if end is not None}

    def _done(self, min_count: int, ends: dict[TopicPartition, int]) -> bool:
        return (sum(map(len, self.records.values())) >= min_count
                and all(self.consumer.position(tp) >= end for tp, end in ends.items()))

    def close(self) -> None:
        self.consumer.close()


def read_all(bootstrap: str, topics: list[str], min_count: int, timeout_s: float = 60.0,
             settle_s: float = 0.5, isolation_level: str = "read_uncommitted",
             **config: Any) -> dict[str, list[Record]]:
    reader = Reader(bootstrap, topics, isolation_level, **config)
    try:
        return reader.read(min_count, timeout_s, settle_s)
    finally:
        reader.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """The group's committed offset per partition (None: nothing committed)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def worker_settings(bootstrap: str, topics: dict[str, str], model_dir: Path,
                    **sections: dict[str, Any]) -> Settings:
    """Settings of a worker on ``bootstrap`` (plus what the embedded broker there needs for its quirks:
    ``testing.broker.product_settings_for``)."""
    from elbert_stream.testing.broker import product_settings_for

    kafka = {"bootstrap_servers": bootstrap, "input_topics": [topics["input"]],
             "output_topic": topics["output"], "dead_letter_topic": topics["dead"],
             "group_id": topics["group"], "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
             "commit_interval_s": 0.2, **product_settings_for(bootstrap).get("kafka", {}),
             **sections.pop("kafka", {})}
    engine = {"max_slots": 16, **sections.pop("engine", {})}
    return Settings(model={"path": str(model_dir), "device": "cpu"}, kafka=kafka, engine=engine, **sections)


def logged_at(log_text: str, needle: str) -> float | None:
    """Epoch seconds of the first line of an ``elbert-stream`` log (``%(asctime)s`` local time) that
    contains ``needle``; None when no line does."""
    import datetime

    for line in log_text.splitlines():
        if needle in line and line[:4].isdigit():
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def run_cli(settings: Settings, replica_id: str | None, log_path: Path, **env: str) -> Any:
    """``elbert-stream run`` in a child process (a ``subprocess.Popen``), configured through ELBERT_*
    variables from ``settings`` (model, topics, group, membership timings) plus ``env``;
    ``replica_id`` None: the CLI's default identity (pass ELBERT_LOCK_DIR in ``env``)."""
    import json
    import subprocess
    import sys

    k = settings.kafka
    full = {**os.environ, "ELBERT_MODEL__PATH": str(settings.model.path), "ELBERT_MODEL__DEVICE": "cpu",
            "ELBERT_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
            "ELBERT_KAFKA__INPUT_TOPICS": json.dumps(k.input_topics),
            "ELBERT_KAFKA__OUTPUT_TOPIC": k.output_topic,
            "ELBERT_KAFKA__DEAD_LETTER_TOPIC": k.dead_letter_topic, "ELBERT_KAFKA__GROUP_ID": k.group_id,
            "ELBERT_KAFKA__SESSION_TIMEOUT_MS": "6000", "ELBERT_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "ELBERT_KAFKA__COMMIT_INTERVAL_S": "0.5", "ELBERT_ENGINE__MAX_QUEUE": "64",
            "ELBERT_KAFKA__LAG_FROM": k.lag_from,
            "ELBERT_KAFKA__RECEIVE_MESSAGE_MAX_BYTES": str(k.receive_message_max_bytes),
            "ELBERT_KAFKA__LEAVE_GROUP_ON_CLOSE": str(k.leave_group_on_close),
            **env}
    with open(log_path, "ab") as log:
        cmd = [sys.executable, "-m", "elbert_stream.cli", "run",
               *(["--replica-id", replica_id] if replica_id else [])]
        return subprocess.Popen(cmd, env=full, stdout=log, stderr=subprocess.STDOUT)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MB (``VmHWM``: its peak so far), from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def by_source(got: dict[str, list[Record]]) -> dict[tuple[str, int, int], list[tuple[str, Record]]]:
    """Input position -> the answers naming it (("out", record) or ("dead", record))."""
    index: dict[tuple[str, int, int], list[tuple[str, Record]]] = {}
    for rec in got["out"]:
        o = OutputRecord.from_bytes(rec.value or b"")
        index.setdefault((o.topic, o.partition, o.offset), []).append(("out", rec))
    for rec in got["dead"]:
        h = rec.headers
        pos = (h["elbert.source.topic"].decode(), int(h["elbert.source.partition"]),
               int(h["elbert.source.offset"]))
        index.setdefault(pos, []).append(("dead", rec))
    return index


@contextmanager
def other_member(k: KafkaSettings, topic: str) -> Iterator[KafkaConsumer]:
    """A second, dynamic member of ``k.group_id`` that polls ``topic`` on its own thread (and never
    commits) until the block ends; then it leaves the group (LeaveGroup)."""
    other = KafkaConsumer(**client_config(k), group_id=k.group_id, session_timeout_ms=6000,
                          heartbeat_interval_ms=1000, auto_offset_reset="earliest", enable_auto_commit=False)
    other.subscribe([topic])
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [other.poll(200) for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    try:
        yield other
    finally:
        stop.set()
        thread.join(10)
        other.close(autocommit=False)


def allow_values_of(bootstrap: str, topic: str, num_bytes: int) -> None:
    """Raise ``topic``'s max.message.bytes (Kafka's default is ~1 MB), as an operator would for 10 MB
    inputs; a broker that enforces no such limit (quirk ``no_max_message_bytes``) needs nothing."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    from elbert_stream.testing.broker import quirks_of

    if "no_max_message_bytes" in quirks_of(bootstrap):
        return
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                            configs={"max.message.bytes": str(num_bytes)})])
    finally:
        admin.close()
