"""Message types passed between the layers. Plain dataclasses; no torch here."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


def next_request_id() -> str:
    return f"r{next(_ids)}"


@dataclass(slots=True)
class Request:
    """One text to classify, already tokenized.

    ``meta`` is opaque to the engine and comes back on the Prediction (the Kafka source puts the
    record's topic/partition/offset/key/headers there). Times are ``time.monotonic()`` seconds.
    """

    input_ids: list[int]
    request_id: str = field(default_factory=next_request_id)
    text: str | None = None
    meta: Any = None
    arrival_s: float = field(default_factory=time.monotonic)
    admitted_s: float | None = None
    finished_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class DepthTrace:
    """What the shared exit head said at one depth (1-based shared-layer applications)."""

    depth: int
    label_index: int
    top_prob: float
    entropy: float  # normalised: H(p) / log K, in [0, 1]


EXIT_REASONS = ("entropy", "window", "patience", "max_depth")


@dataclass(slots=True)
class Prediction:
    """The result for one Request: label, how deep it went and why it stopped."""

    request_id: str
    label: str
    label_index: int
    probabilities: list[float]
    exit_depth: int
    exit_reason: str  # one of EXIT_REASONS
    trace: list[DepthTrace]
    queue_s: float  # arrival -> admitted into a slot
    compute_s: float  # admitted -> exited
    meta: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "label": self.label,
            "label_index": self.label_index,
            "probabilities": self.probabilities,
            "exit_depth": self.exit_depth,
            "exit_reason": self.exit_reason,
            "trace": [
                {"depth": t.depth, "label_index": t.label_index, "top_prob": t.top_prob, "entropy": t.entropy}
                for t in self.trace
            ],
            "queue_ms": self.queue_s * 1e3,
            "compute_ms": self.compute_s * 1e3,
        }
