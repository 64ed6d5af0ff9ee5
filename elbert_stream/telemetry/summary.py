"""The numbers a replica's telemetry reports, independent of OpenTelemetry: the stats snapshot the
worker hands over, latency histograms with OpenTelemetry's bucket rule, percentiles by PromQL's
``histogram_quantile``, and the ``TelemetrySummary`` behind ``GET /stats`` and the demo.
``telemetry.Telemetry`` feeds them; they are re-exported there."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# 1-1.5-2.5-4-6 per decade from 1 ms to 60 s, then 100 s: bucket edges at most x1.67 apart
LATENCY_BUCKETS_S: tuple[float, ...] = tuple(
    round(m * 10.0**e, 6) for e in range(-3, 2) for m in (1.0, 1.5, 2.5, 4.0, 6.0)
) + (100.0,)
LATENCY_METRICS = {  # summary key -> (histogram name, what it measures)
    "end_to_end": (
        "elbert_end_to_end_latency_seconds",
        "input record timestamp to output handed to producer",
    ),
    "queue": ("elbert_queue_time_seconds", "arrival to admission into an engine slot"),
    "compute": ("elbert_compute_time_seconds", "admission into an engine slot to exit"),
}


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """What the worker reports when metrics are collected. ``layer_steps`` is cumulative."""

    busy_slots: int = 0  # occupied engine slots
    queue_depth: int = 0  # requests waiting for a slot
    pending_layer_work: float = 0.0  # expected sample-layer applications still to run (queued + in flight)
    layer_steps: int = 0  # sample-layer applications since start (one per busy slot per engine step)
    consumer_lag: Mapping[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> lag
    parked_records: int = 0  # records that could not be written yet (sink.py), retried with backoff
    held_partitions: int = 0  # input partitions paused behind a parked record
    exit_gear: int = 0  # exit gear in force (adaptive.py): 0 = the default exit settings


StatsSource = Callable[[], StatsSnapshot]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Count, mean and percentiles in seconds; percentiles from the histogram buckets (PromQL rule)."""

    count: int
    mean_s: float | None
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None


@dataclass(frozen=True, slots=True)
class TelemetrySummary:
    """The replica's numbers as the metrics report them; ``to_dict()`` is JSON-ready."""

    replica_id: str
    messages: dict[str, int]  # outcome (ok, dead_letter, error) -> count
    reasons: dict[str, int]  # "outcome/reason" -> count, for dead_letter and error
    exit_depth_counts: list[int]  # index d-1 = messages that exited at depth d
    mean_exit_depth: float | None
    latency: dict[str, LatencySummary]  # end_to_end, queue, compute
    layer_steps: int
    busy_slots: int
    queue_depth: int
    pending_layer_work: float
    consumer_lag: dict[str, int]  # "topic[partition]" -> lag
    exit_gear: int = 0  # exit gear in force (0 = default; adaptive exit, docs/adaptive.md)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding rank q*N.

    ``counts`` are per bucket (not cumulative), ``len(bounds) + 1`` of them, the last being +Inf;
    the first bucket's lower edge is 0. None for an empty histogram; the highest finite bound when
    the rank falls in the +Inf bucket.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank, below = q * total, 0
    for i, c in enumerate(counts[: len(bounds)]):
        if c and below + c >= rank:
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / c
        below += c
    return float(bounds[-1])


class Hist:
    """Bucket counts with OpenTelemetry's explicit-bucket rule: bucket i holds (b[i-1], b[i]]."""

    __slots__ = ("bounds", "counts", "total", "n")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds, self.counts, self.total, self.n = list(bounds), [0] * (len(bounds) + 1), 0.0, 0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def latency(self) -> LatencySummary:
        mean = self.total / self.n if self.n else None
        p50, p95, p99 = (histogram_quantile(q, self.bounds, self.counts) for q in (0.5, 0.95, 0.99))
        return LatencySummary(self.n, mean, p50, p95, p99)
