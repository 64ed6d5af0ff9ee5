"""The tokenizer stage: decoded texts -> engine ``Request``s, one batch call per hand-off.

It owns the tokenizer (a fast tokenizer must not be called from two threads at once). It takes
everything the intake handed over, drops what belongs to a revoked assignment, tokenizes the rest in
one batch (``tokenize_each``: a failing batch is retried text by text so one bad text fails alone),
sends dead letters (decoding and tokenizer failures) on to the output stage and the requests to the
engine stage. Synchronous jobs (``Worker.classify``) come through the same channel, urgent, and go to
the engine ahead of Kafka work. The requests of Kafka messages stay counted in the ``Budget`` until
the engine queued them; dead letters and dropped messages give theirs back here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from elbert_stream.errors import BadMessage
from elbert_stream.stream.offsets import OffsetTracker
from elbert_stream.stream.pipeline import Budget, Channel, DeadLetter, StageClock, keep_current
from elbert_stream.stream.records import InputMessage
from elbert_stream.stream.sync_jobs import SyncJob, job_requests, tokenize_each
from elbert_stream.types import Request

Tokenize = Callable[[list[str]], list[list[int]]]
WAIT_S = 0.1


def _msg_of(item: Any) -> InputMessage | None:
    if isinstance(item, DeadLetter):
        return item.msg
    return item[0] if isinstance(item, tuple) else None


class TokenizeStage:
    """See the module doc. ``run`` is the thread's body; it ends when its input channel is closed
    and empty (then it closes the engine's channel) or aborted."""

    def __init__(self, tokenize: Tokenize, tracker: OffsetTracker, budget: Budget, inbox: Channel[Any],
                 to_engine: Channel[Request], to_output: Channel[Any], aborted: threading.Event) -> None:
        self.tokenize = tokenize
        self.tracker = tracker
        self.budget = budget
        self.inbox = inbox
        self.to_engine = to_engine
        self.to_output = to_output
        self.aborted = aborted
        self.clock = StageClock()

    def run(self) -> None:
        try:
            while not self.aborted.is_set():
                items = self.inbox.get(WAIT_S)
                if items is None:
                    break
                if items:
                    self.clock.start()
                    n = self.handle(items)
                    self.clock.stop(n)
        finally:
            self.to_engine.close()

    def handle(self, items: list[Any]) -> int:
        """One hand-off: jobs first, then the batch; returns how many Kafka messages it tokenized."""
        for job in (i for i in items if isinstance(i, SyncJob)):
            self.to_engine.put(job_requests(job, self.tokenize_checked), urgent=True)
        forgets = self.tracker.num_forgets
        kept, dropped = keep_current([i for i in items if not isinstance(i, SyncJob)], _msg_of,
                                     self.tracker.is_current)
        dead = [i for i in kept if isinstance(i, DeadLetter)]
        good: list[tuple[InputMessage, str]] = [i for i in kept if not isinstance(i, DeadLetter)]
        out: list[Any] = []
        for (m, _), ids in zip(good, self.tokenize_checked([t for _, t in good]), strict=True):
            out.append(DeadLetter(m, ids) if isinstance(ids, BadMessage)
                       else Request(ids, meta=m, arrival_s=m.polled_s))
        if self.tracker.num_forgets != forgets:  # a revoke while tokenizing: drop its work now
            out, late = keep_current(out, lambda r: r.msg if isinstance(r, DeadLetter) else r.meta,
                                     self.tracker.is_current)
            dropped += late
        self.clock.dropped_revoked += dropped
        dead += [i for i in out if isinstance(i, DeadLetter)]
        requests = [i for i in out if not isinstance(i, DeadLetter)]
        if dead:
            self.to_output.put(dead)
        self.budget.give(dropped + len(dead))
        if requests:
            self.to_engine.put(requests)
        return len(good)

    def tokenize_checked(self, texts: list[str]) -> list[list[int] | BadMessage]:
        return tokenize_each(self.tokenize, texts)
