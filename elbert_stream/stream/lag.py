"""Consumer lag from the broker's end offsets (ListOffsets), off the loop thread.

``EndOffsets`` asks the broker for the end offsets of the partitions the worker owns (``want``), every
``every_s``, on a thread and a client of its own, with the source's isolation level (read_committed:
the last stable offset), so the loop never waits on the broker for them and the figure stays fresh
while the worker's partitions are paused (a full backlog: exactly when the autoscaler needs it). The
fetch high watermark, the other way to know a partition's end, is stale while paused and unknown
until a fetch answered; ``KafkaSource.lag`` falls back to it only until the first answer, or always
with ``kafka.lag_from = fetch_high_watermark`` (for a broker whose ListOffsets is wrong: Tansu 0.6,
docs/streaming.md's quirk table).
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaConsumer
from kafka import TopicPartition as KTopicPartition

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.client import client_config
from elbert_stream.stream.offsets import TopicPartition

log = logging.getLogger(__name__)


class EndOffsets:
    """End offsets of ``want()``-ed partitions, refreshed in the background (see module doc).
    ``get()`` is cheap and thread-safe; ``close()`` stops the thread and the client."""

    def __init__(self, settings: KafkaSettings, *, isolation_level: str = "read_committed",
                 every_s: float = 1.0, client_id: str = "elbert-lag") -> None:
        self.settings = settings
        self.isolation_level = isolation_level
        self.every_s = every_s
        self.client_id = client_id
        self.num_failures = 0
        self._want: frozenset[TopicPartition] = frozenset()
        self._ends: dict[TopicPartition, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{client_id}-end-offsets", daemon=True)
        self._thread.start()

    def want(self, tps: set[TopicPartition]) -> None:
        """The partitions to follow (the member's assignment); others are dropped from ``get``."""
        self._want = frozenset(tps)

    def get(self) -> dict[TopicPartition, int]:
        """{tp: end offset} as last answered, for wanted partitions only."""
        ends, want = self._ends, self._want
        return {tp: off for tp, off in ends.items() if tp in want}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        consumer: KafkaConsumer | None = None
        try:
            while not self._stop.is_set():
                try:
                    consumer = consumer or self._client()
                    self._refresh(consumer)
                except Exception as e:  # noqa: BLE001 - lag is advisory: log, keep the last answer
                    self.num_failures += 1
                    log.log(logging.WARNING if self.num_failures == 1 else logging.DEBUG,
                            "end offsets (ListOffsets) failed, lag falls back to the fetch high "
                            "watermark: %r", e)
                self._stop.wait(self.every_s)
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)

    def _client(self) -> KafkaConsumer:
        return KafkaConsumer(**client_config(self.settings), client_id=self.client_id, group_id=None,
                             enable_auto_commit=False, isolation_level=self.isolation_level)

    def _refresh(self, consumer: KafkaConsumer) -> None:
        want = self._want
        if not want:
            self._ends = {}
            return
        answer = consumer.end_offsets([KTopicPartition(*tp) for tp in want],
                                      timeout_ms=max(1000, int(self.every_s * 1000)))
        self._ends = {TopicPartition(k.topic, k.partition): int(v)
                      for k, v in answer.items() if v is not None}
