"""The engine stage: the loop that owns the engine and does engine work and nothing else.

Per iteration: take what the tokenizer stage handed over (waiting only while the engine is idle),
``Engine.add`` until the engine's queue is full (the rest waits here, still counted in the
``Budget``, so the intake pauses), the exit-gear hook (``adaptive.ExitGears.update``: may shift the
exit settings for the step about to run), ONE ``Engine.step``, and the step's predictions, stamped
with that step's gear (``Prediction.gear``), to the output stage (waiting while its channel is full:
backpressure). Synchronous requests (``Worker.classify``) go ahead of the Kafka requests waiting
here, and their results go straight back to the caller. A request ``add`` refuses as bad becomes a
dead letter (a synchronous job fails). After a revoke, the requests waiting here of the revoked
partitions are dropped; ones already in the engine finish and are dropped by the output stage. The
loop ends when its channel is closed and everything in it ran (drain), at the drain deadline, or
when the worker aborts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from elbert_stream.adaptive import ExitGears, LoadSignals
from elbert_stream.errors import BadMessage
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.offsets import OffsetTracker
from elbert_stream.stream.pipeline import Budget, Channel, DeadLetter, StageClock, keep_current
from elbert_stream.stream.sync_jobs import SyncRef
from elbert_stream.types import EngineLike, Prediction, Request

STATS_EVERY_S = 0.25  # engine stats snapshot refresh
IDLE_WAIT_S = 0.05


def _kafka_msg(req: Request) -> object | None:
    return None if isinstance(req.meta, SyncRef) else req.meta


class EngineStage:
    """See the module doc. ``run`` is the loop's body (the worker's own thread)."""

    def __init__(self, engine: EngineLike, tracker: OffsetTracker, budget: Budget, inbox: Channel[Request],
                 out: Channel[Prediction | DeadLetter], loop: LoopStats, gears: ExitGears, *,
                 aborted: threading.Event, stopping: threading.Event, deadline: Callable[[], float]) -> None:
        self.engine = engine
        self.tracker = tracker
        self.budget = budget
        self.inbox = inbox
        self.out = out
        self.loop = loop
        self.gears = gears
        self.aborted = aborted
        self.stopping = stopping
        self.deadline = deadline
        self.backlog: deque[Request] = deque()
        self.clock = StageClock()
        self._seen_forgets = 0
        self._inbox_done = False

    def run(self) -> None:
        try:
            while not self.aborted.is_set():
                if self.stopping.is_set() and time.monotonic() >= self.deadline():
                    break  # drain deadline: what is left stays uncommitted
                if not self.iteration():
                    break
        finally:
            self.out.close()

    def iteration(self) -> bool:
        """One round; False once the channel is closed and all work ran."""
        engine = self.engine
        got = None
        if self.backlog and (urgent := self.inbox.get_urgent()):
            self.backlog.extendleft(reversed(urgent))  # a caller waits: ahead of the Kafka work here
        if not self.backlog and not self._inbox_done:
            got = self.inbox.get(0.0 if engine.has_work() else IDLE_WAIT_S)
            if got is None:
                self._inbox_done = True
            else:
                self.backlog.extend(got)
        if got or self.tracker.num_forgets != self._seen_forgets:
            self._drop_revoked()
        self.clock.start()
        self.feed()
        self.gears.update(self.load_signals)  # may shift the exit gear for the step below
        gear = self.gears.gear
        preds = engine.step() if engine.has_work() else []
        if gear:
            for p in preds:
                p.gear = gear
        self.clock.stop(len(preds))
        kafka = self._answer_jobs(preds) if preds else preds
        if kafka and not self.out.put(kafka):
            return False
        self._refresh_stats()
        return not (self._inbox_done and not self.backlog and not engine.has_work())

    def feed(self) -> None:
        """Move waiting requests into the engine until its queue is full."""
        backlog, engine = self.backlog, self.engine
        queued = 0
        rejected: list[DeadLetter] = []
        while backlog:
            req = backlog[0]
            try:
                if not engine.add(req):
                    break
            except BadMessage as e:
                backlog.popleft()
                if isinstance(req.meta, SyncRef):
                    req.meta.job.fail(e, req.meta.index)
                else:
                    rejected.append(DeadLetter(req.meta, e))
                    queued += 1
                continue
            backlog.popleft()
            queued += not isinstance(req.meta, SyncRef)
        if rejected:
            self.out.put(rejected)
        self.budget.give(queued)

    def load_signals(self) -> LoadSignals:
        """What the exit-gear controller reads (this thread): polled messages not yet in the engine
        (the ``Budget``) plus the engine's queue, lag, the age of the oldest request waiting here."""
        head = self.backlog[0].arrival_s if self.backlog else None
        return self.loop.load_signals(self.budget.used, head)

    def _answer_jobs(self, preds: list[Prediction]) -> list[Prediction]:
        """Synchronous results straight to their callers (a caller never waits behind the output
        stage's produce calls: those may block up to ``max_block_ms``); the rest, for the output."""
        jobs = [p for p in preds if isinstance(p.meta, SyncRef)]
        if not jobs:
            return preds
        for p in jobs:
            p.meta.job.set(p.meta.index, p)
        self.loop.finished(jobs, default_gear=not any(p.gear for p in jobs))
        return [p for p in preds if not isinstance(p.meta, SyncRef)]

    def _drop_revoked(self) -> None:
        self._seen_forgets = self.tracker.num_forgets
        kept, dropped = keep_current(list(self.backlog), _kafka_msg, self.tracker.is_current)  # type: ignore[arg-type]
        if dropped:
            self.backlog = deque(kept)
            self.clock.dropped_revoked += dropped
            self.budget.give(dropped)

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self.loop.engine_at >= STATS_EVERY_S:
            self.loop.set_engine(self.engine.stats(), now, self.clock.busy_s)

    def pending_jobs(self) -> list[SyncRef]:
        """Synchronous requests still waiting here (to fail at close)."""
        return [r.meta for r in self.backlog if isinstance(r.meta, SyncRef)]
