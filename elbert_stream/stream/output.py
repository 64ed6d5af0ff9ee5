"""The output stage: finished predictions and dead letters -> the sink, on one thread.

It owns every call that sends (``KafkaSink.send_output`` / ``send_dead_letter``, the parked records'
retries, ``raise_failures``) and the per-record telemetry. Per hand-off: Kafka predictions of a live
assignment are encoded (``records.encode_output``) and produced, synchronous ones go back to their
caller, dead letters go to the dead-letter topic; work of a revoked partition is dropped (its new
owner redoes it). The delivery callbacks (producer I/O thread) mark offsets done as before. The stage
ends when its channel is closed and empty: it flushes the producer (within the drain deadline) and
handles the last delivery failures; a ``DeliveryError`` fails the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.offsets import OffsetTracker
from elbert_stream.stream.pipeline import Channel, DeadLetter, StageClock
from elbert_stream.stream.records import InputMessage, encode_output, trace_headers
from elbert_stream.stream.sink import KafkaSink
from elbert_stream.stream.sync_jobs import SyncRef
from elbert_stream.types import Prediction

WAIT_S = 0.05


class OutputStage:
    """See the module doc. ``run`` is the thread's body."""

    def __init__(self, sink: KafkaSink, tracker: OffsetTracker, inbox: Channel[Prediction | DeadLetter],
                 loop: LoopStats, *, telemetry: Any, model_name: str, model_version: str, replica_id: str,
                 aborted: threading.Event, deadline: Callable[[], float]) -> None:
        self.sink = sink
        self.tracker = tracker
        self.inbox = inbox
        self.loop = loop
        self.telemetry = telemetry
        self.names = (model_name, model_version, replica_id)
        self.aborted = aborted
        self.deadline = deadline
        self.clock = StageClock()
        self.done = threading.Event()

    def run(self) -> None:
        """Until the channel is closed and empty, then flush; ``done`` is set once all was handed to
        the broker and acknowledged (or failed)."""
        sink = self.sink
        try:
            while not self.aborted.is_set():
                sink.raise_failures()
                sink.retry_parked()
                items = self.inbox.get(WAIT_S)
                if items is None:
                    break
                if items:
                    self.clock.start()
                    self.emit(items)
                    self.clock.stop(len(items))
            if not self.aborted.is_set():
                deadline = self.deadline()
                sink.flush(max(1.0, deadline - time.monotonic()) if deadline < float("inf") else None)
                sink.raise_failures()
        finally:
            self.done.set()

    def emit(self, items: list[Prediction | DeadLetter]) -> None:
        preds = [i for i in items if isinstance(i, Prediction)]
        if preds:  # only default-gear exits feed the autoscaler's exit histogram (LoopStats.finished)
            looser = [p for p in preds if p.gear]
            self.loop.finished([p for p in preds if not p.gear] if looser else preds)
            if looser:
                self.loop.finished(looser, default_gear=False)
        for item in items:
            if isinstance(item, DeadLetter):
                self.dead_letter(item)
            elif isinstance(item.meta, SyncRef):
                item.meta.job.set(item.meta.index, item)
            elif self._current(item.meta):
                self.output(item, item.meta)

    def output(self, p: Prediction, meta: InputMessage) -> None:
        headers = trace_headers(meta)
        if self.telemetry is not None:
            headers = self.telemetry.record_prediction(p, meta.headers, source_timestamp_ms=meta.timestamp_ms)
        name, version, replica = self.names
        value = encode_output(meta, p, model_name=name, model_version=version, replica_id=replica,
                             gear=p.gear)
        self.sink.send_output(meta, value, headers)

    def dead_letter(self, d: DeadLetter) -> None:
        if not self._current(d.msg):
            return
        headers = trace_headers(d.msg)
        if self.telemetry is not None:
            headers = self.telemetry.record_dead_letter(d.error.reason, d.msg.headers)
        self.sink.send_dead_letter(d.msg, d.error.reason, d.error.detail, trace=headers)

    def _current(self, msg: InputMessage) -> bool:
        """False for a message of a partition revoked since it was polled: its new owner re-reads it
        from the last commit (which never covers it), so answering it would only add a duplicate."""
        if self.tracker.is_current(msg.topic, msg.partition, msg.epoch):
            return True
        self.clock.dropped_revoked += 1
        return False
