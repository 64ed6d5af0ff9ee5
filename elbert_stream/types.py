"""Message types passed between the layers. Plain dataclasses; no torch here."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from elbert_stream.config import ExitSettings

Headers = list[tuple[str, bytes]]  # Kafka record headers: (key, value) pairs
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context, carried input -> output

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
    gear: int = 0  # exit gear of the step that made it (adaptive.py; the worker's engine stage sets it)

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


@dataclass
class EngineStats:
    """Counters since the engine started plus a snapshot of the slot table. Host data only."""

    mode: str
    max_slots: int
    num_steps: int = 0
    num_layer_rows: int = 0  # sum over steps of busy rows = shared-layer applications
    num_admitted: int = 0
    num_finished: int = 0
    num_rejected: int = 0  # add() returned False (queue full)
    num_busy: int = 0
    num_waiting: int = 0
    num_busy_tokens: int = 0  # token lengths of the busy slots now (the token budget's measure)
    num_tokens: int = 0  # sum over steps of the busy rows' real token counts
    num_padded_tokens: int = 0  # sum over steps of rows x step length (what the layer computed)
    step_time_s: float = 0.0  # wall time inside step(), including the host reads
    exit_depth_counts: list[int] = field(default_factory=list)  # [L]; index d-1 = exits at depth d
    busy_depth_counts: list[int] = field(default_factory=list)  # [L]; index d = busy rows with d layers done
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_exit_depth(self) -> float:
        n = sum(self.exit_depth_counts)
        return sum((d + 1) * c for d, c in enumerate(self.exit_depth_counts)) / n if n else 0.0

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / computed tokens (1.0 = no padding waste)."""
        return self.num_tokens / self.num_padded_tokens if self.num_padded_tokens else 1.0



class EngineLike(Protocol):
    """What the stream worker needs of an engine (``engine.Engine`` is one; ``stream/`` never imports
    it, so the Kafka side runs without torch in its imports). ``add``, ``has_work``, ``step`` and
    ``stats`` run on the worker's engine thread; ``tokenize`` on its tokenizer thread (it must not
    touch the slot table); ``set_exit_settings`` is thread-safe (it applies at the next step)."""

    max_length: int  # token ids per request, at most

    @property
    def num_layers(self) -> int: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    def tokenize(self, texts: list[str]) -> list[list[int]]: ...
    def add(self, request: Request) -> bool: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[Prediction]: ...
    def stats(self) -> EngineStats: ...
    def set_exit_settings(self, exit_settings: ExitSettings) -> None: ...
