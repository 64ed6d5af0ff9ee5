"""The intake stage: the one thread that owns the consumer (``KafkaSource``).

Every consumer call runs here (kafka-python's consumer is not thread-safe): poll, pause / resume / hold,
commit, assignment, lag, close. Per iteration it holds the partitions the sink parked a record of,
pauses every partition while the ``Budget`` is spent (it then waits for room between ``poll(0)`` calls,
but polls back to back while a group join is in flight: kafka-python drops a join answered between two
polls), else polls at most what is left with a real ``poll_timeout_ms`` wait, drops polled records of a
revoked assignment, decodes the rest (bad ones become ``DeadLetter`` items) and hands the batch to the
tokenizer stage. It commits on the ``CommitCadence`` (the sink decides how: group offsets, or one
transaction with the outputs) and refreshes the lag. On stop it closes its channel, waits for the output
stage to finish (committing on the cadence meanwhile), commits once more, and closes the sink and the
source.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from elbert_stream.config import KafkaSettings
from elbert_stream.errors import BadMessage
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.memory import Trimmer
from elbert_stream.stream.offsets import CommitCadence, OffsetTracker, TopicPartition
from elbert_stream.stream.pipeline import Budget, Channel, DeadLetter, StageClock, keep_current
from elbert_stream.stream.records import InputMessage, decode_input
from elbert_stream.stream.sink import KafkaSink
from elbert_stream.stream.source import KafkaSource

log = logging.getLogger(__name__)
LAG_EVERY_S = 1.0
IntakeItem = Any  # tuple[InputMessage, str] | DeadLetter | sync_jobs.SyncJob


class Intake:
    """Poll + decode + commit on the consumer-owning thread (see the module doc)."""

    def __init__(self, settings: KafkaSettings, source: KafkaSource, sink: KafkaSink, tracker: OffsetTracker,
                 budget: Budget, out: Channel[IntakeItem], loop: LoopStats, *,
                 stopping: threading.Event, aborted: threading.Event, downstream_done: threading.Event,
                 take_revoked: Callable[[], set[TopicPartition]],
                 fail: Callable[[BaseException], None]) -> None:
        """``fail(error)``: the worker's abort, called before this stage closes sink and source (so the
        others stop at once, and the error is the one recorded)."""
        self.settings = settings
        self.source = source
        self.sink = sink
        self.tracker = tracker
        self.budget = budget
        self.out = out
        self.loop = loop
        self.stopping = stopping
        self.aborted = aborted
        self.downstream_done = downstream_done
        self.take_revoked = take_revoked
        self.fail = fail
        self.clock = StageClock()
        self.cadence = CommitCadence(settings.commit_interval_s)
        self.trimmer = Trimmer()  # large values' freed pages back to the OS (stream/memory.py)

    def run(self) -> None:
        """Until stop (then drain: see the module doc) or a failure anywhere (then only close)."""
        try:
            while not (self.stopping.is_set() or self.aborted.is_set()):
                self.iteration()
            self.out.close()
            if not self.aborted.is_set():
                self._await_downstream()
            if not self.aborted.is_set():
                self.commit(force=True)
        except BaseException as e:
            self.fail(e)
            raise
        finally:
            self.out.close()
            self._close()

    def iteration(self) -> None:
        source = self.source
        source.hold(self.sink.blocked())
        self._apply_revokes()
        room = self.budget.available()
        if room <= 0:
            source.pause()
            if source.joining:  # no sleep between polls: a join answered between two is lost
                msgs = source.poll(self.settings.poll_timeout_ms)
            else:
                self.budget.wait_for_room(self.settings.poll_timeout_ms / 1000)
                msgs = source.poll(0)  # paused: nothing comes, but a rebalance that starts is taken up
        else:
            source.resume()
            msgs = source.poll(self.settings.poll_timeout_ms,
                               max_records=min(room, self.settings.max_poll_records))
        if msgs:
            self.clock.start()
            self._apply_revokes()
            msgs, dropped = keep_current(msgs, lambda m: m, self.tracker.is_current)
            self.clock.dropped_revoked += dropped
            if msgs:
                self.budget.take(len(msgs))
                self.loop.arrived(len(msgs))
                self.out.put(self.decode(msgs))
            self.clock.stop(len(msgs))
        self.commit()
        self._refresh_lag()
        self.trimmer.maybe_trim()

    def decode(self, msgs: list[InputMessage]) -> list[IntakeItem]:
        """(message, text) per decodable record, a ``DeadLetter`` per other one; JSON ids set on the
        messages."""
        k = self.settings
        fmt, max_bytes, max_chars = k.input_format, k.max_message_bytes, k.max_text_chars
        out: list[IntakeItem] = []
        for m in msgs:
            if m.value is not None:
                self.trimmer.saw(len(m.value))
            try:
                d = decode_input(m.value, input_format=fmt, max_message_bytes=max_bytes,
                                 max_text_chars=max_chars)
            except BadMessage as e:
                self.sink.shed_value(m)  # a 10 MB value must not wait in the output's queue
                out.append(DeadLetter(m, e))
                continue
            m.id = d.id
            out.append((m, d.text))
        return out

    def commit(self, force: bool = False) -> None:
        """On the cadence (or now): the sink commits offsets alone, or in exactly_once one transaction
        of outputs and offsets."""
        if self.cadence.due(force):
            self.sink.commit(self.source, blocking=force)

    def _apply_revokes(self) -> None:
        """Revoked partitions (recorded by the rebalance listener): nothing of them is parked any more.
        Their buffered work is dropped by each stage through the tracker's epochs."""
        tps = self.take_revoked()
        if tps:
            self.sink.parking.release(tps)

    def _await_downstream(self) -> None:
        """Drain: the other stages finish (the worker's deadline bounds them); commit meanwhile."""
        while not self.downstream_done.wait(0.05):
            if self.aborted.is_set():
                return
            self.commit()

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if (now - self.loop.lag_at >= LAG_EVERY_S
                or len(self.source.consumer.assignment()) != len(self.loop.lag())):
            self.loop.set_lag(self.source.lag(), self.source.total_partitions(), now)

    def _close(self) -> None:
        for closer in (self.sink.close, self.source.close):
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing must not mask the loop's error
                log.exception("error while closing %s", closer)
