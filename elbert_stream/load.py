"""Exit-depth load: the layer work still ahead, the unit replicas are scaled on.

An ELBERT message costs as many shared-layer applications as its exit depth ``D`` (1..L), so the
load unit is the *layer step*: one shared-layer application to one sample. This module holds the
arithmetic over plain numbers (:func:`expected_remaining_layers`, :func:`pending_layer_work`) and the
replica side of autoscaling: :class:`ReplicaReporter` turns a worker's ``stats()`` dict into the flat
``dict[str, float]`` report (keys :data:`REPORT_KEYS`) that the Serve replica's
``record_autoscaling_stats()`` returns. The controller side, which reads those reports and decides a
replica count, is ``serve/autoscaling.py``. No Ray and no torch here; the formula is documented in
``docs/autoscaling.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from elbert_stream.errors import ConfigError

# Keys of the per-replica report (values are floats; units in the names / docs/autoscaling.md).
PENDING_LAYER_WORK = "pending_layer_work"  # layer steps still owed: busy slots + queue + lag
LAYER_WORK_ARRIVAL_RATE = "layer_work_arrival_rate"  # layer steps/s arriving (msgs/s x E[D])
CAPACITY = "capacity_layer_steps_per_s"  # measured while saturated (EWMA); 0 = not measured yet
PARTITIONS_ASSIGNED = "num_partitions_assigned"  # input partitions this replica consumes
PARTITIONS_TOTAL = "total_input_partitions"  # partitions of the input topic(s); 0 = unknown
MEAN_EXIT_DEPTH = "mean_exit_depth"  # E[D] from the live histogram (observability)
REPORT_KEYS = (
    PENDING_LAYER_WORK,
    LAYER_WORK_ARRIVAL_RATE,
    CAPACITY,
    PARTITIONS_ASSIGNED,
    PARTITIONS_TOTAL,
    MEAN_EXIT_DEPTH,
)


DEFAULT_PRIOR_COUNT = 1.0


def expected_remaining_layers(
    exit_depth_counts: Sequence[float], depth: int, prior_count: float = DEFAULT_PRIOR_COUNT
) -> float:
    """``E[D - depth | D > depth]`` from an exit-depth histogram.

    ``exit_depth_counts[i]`` is the number of messages that exited at depth ``i + 1``; its length
    is the model depth ``L``. ``depth`` is the number of layers already applied (0 = not started,
    giving ``E[D]``). A pseudo-count ``prior_count`` at depth ``L`` (the pessimistic "runs to the
    end" prior) keeps the estimate sane when the histogram is empty or sparse: an empty histogram
    gives ``L - depth``. Returns 0.0 once ``depth >= L``.
    """
    num_layers = len(exit_depth_counts)
    if num_layers == 0:
        raise ConfigError(f"exit_depth_counts must have one entry per depth, got {exit_depth_counts!r}")
    if depth < 0:
        raise ConfigError(f"depth must be >= 0, got {depth!r}")
    if depth >= num_layers:
        return 0.0
    mass = 0.0
    weighted = 0.0
    for index in range(depth, num_layers):  # exits at depth index+1 > depth
        count = max(0.0, float(exit_depth_counts[index]))
        if index == num_layers - 1:
            count += prior_count
        mass += count
        weighted += count * (index + 1 - depth)
    if mass <= 0.0:  # prior_count == 0 and nothing observed beyond depth
        return float(num_layers - depth)
    return weighted / mass


def mean_exit_depth(exit_depth_counts: Sequence[float], prior_count: float = DEFAULT_PRIOR_COUNT) -> float:
    """``E[D]``: the expected layer cost of one new message."""
    return expected_remaining_layers(exit_depth_counts, 0, prior_count)


def pending_layer_work(
    busy_depth_counts: Sequence[float],
    exit_depth_counts: Sequence[float],
    num_waiting: float,
    lag_messages: float | None,
    prior_count: float = DEFAULT_PRIOR_COUNT,
) -> float:
    """Layer steps still owed: ``sum_busy E[D-d|D>d] + (waiting + lag) * E[D]``.

    ``busy_depth_counts[d]`` = busy slots that have had ``d`` layers applied (d = 0..L-1; they
    have not exited, so ``D > d``). ``lag_messages`` is the not-yet-fetched backlog of the
    replica's partitions, or None where it is not trustworthy (then it is left out).
    """
    in_flight = sum(
        max(0.0, float(count)) * expected_remaining_layers(exit_depth_counts, depth, prior_count)
        for depth, count in enumerate(busy_depth_counts)
        if count
    )
    queued = max(0.0, float(num_waiting)) + (max(0.0, float(lag_messages)) if lag_messages else 0.0)
    return in_flight + queued * mean_exit_depth(exit_depth_counts, prior_count)


# --------------------------------------------------------------------------------------------
# Replica side: worker stats -> report
# --------------------------------------------------------------------------------------------

REQUIRED_WORKER_STATS = (
    "busy_depth_counts",  # list[int], index d = busy slots with d layers applied (0..L-1)
    "exit_depth_counts",  # list[int], index i = messages that exited at depth i+1 (length L)
    "num_waiting",  # int, requests queued in the engine, not yet in a slot
    "arrival_rate_msgs_per_s",  # float, messages/s taken from Kafka (recent window)
    "layer_steps_per_s",  # float, layer steps/s executed (recent window)
)
# Optional: recent_exit_depth_counts (list[float], the exit histogram decayed per message: used for E[D]
# instead of exit_depth_counts when present, so E[D] follows an exit-policy change within ~1,000
# messages; the worker feeds it only with exits at the DEFAULT exit gear, so while adaptive exit runs a
# looser gear the pending work is still counted at the default gear's depths), max_slots (int),
# num_busy (int), backlog (int, polled but not yet in the engine: counted
# as waiting), paused (bool, consumer paused by backpressure: saturated), engine_busy_fraction (float,
# share of the recent window the engine thread worked), layer_steps_per_busy_s (float, layer steps per
# second of that work), lag_per_partition
# ({partition: lag|None} | None), num_partitions_assigned (int), total_input_partitions (int).


def _total_lag(lag_per_partition: Mapping[Any, Any] | None) -> float | None:
    """Sum of trustworthy lags: None when unknown; negative / None entries are dropped."""
    if not lag_per_partition:
        return None
    values = [float(v) for v in lag_per_partition.values() if v is not None and float(v) >= 0]
    return sum(values) if values else None


SATURATED_BUSY_FRACTION = 0.9  # the engine worked this share of the window: it was the bottleneck


def is_saturated(worker_stats: Mapping[str, Any]) -> bool:
    """The engine could not have gone faster: it was busy for at least ``SATURATED_BUSY_FRACTION``
    of the window (``engine_busy_fraction``), or the consumer is paused by backpressure. Stats without
    a busy fraction (hand-built ones; every ``Worker`` reports it): requests waiting or every slot
    busy. Requests waiting alone do not prove saturation: a worker that keeps up has a few
    just-polled messages in its queue at most instants, and measuring "capacity" then would only
    measure the arrival rate."""
    if worker_stats.get("paused"):
        return True
    busy_fraction = worker_stats.get("engine_busy_fraction")
    if busy_fraction is not None:
        return float(busy_fraction) >= SATURATED_BUSY_FRACTION
    if _num_waiting(worker_stats) > 0:
        return True
    max_slots = float(worker_stats.get("max_slots") or 0)
    num_busy = worker_stats.get("num_busy", sum(worker_stats.get("busy_depth_counts", ())))
    return max_slots > 0 and float(num_busy) >= max_slots


def _num_waiting(worker_stats: Mapping[str, Any]) -> float:
    return float(worker_stats.get("num_waiting", 0)) + float(worker_stats.get("backlog") or 0)


def build_replica_report(
    worker_stats: Mapping[str, Any],
    capacity_layer_steps_per_s: float,
    prior_count: float = DEFAULT_PRIOR_COUNT,
) -> dict[str, float]:
    """The ``record_autoscaling_stats()`` dict (keys :data:`REPORT_KEYS`, all floats).

    ``worker_stats`` needs :data:`REQUIRED_WORKER_STATS`; ``capacity_layer_steps_per_s`` is the
    measured capacity (0 when never saturated), see :class:`CapacityEstimator`.
    """
    missing = [key for key in REQUIRED_WORKER_STATS if key not in worker_stats]
    if missing:
        raise ConfigError(f"worker stats lack {missing}; got keys {sorted(worker_stats)}")
    exits = list(worker_stats.get("recent_exit_depth_counts") or worker_stats["exit_depth_counts"])
    mean_depth = mean_exit_depth(exits, prior_count)
    pending = pending_layer_work(
        worker_stats["busy_depth_counts"],
        exits,
        _num_waiting(worker_stats),
        _total_lag(worker_stats.get("lag_per_partition")),
        prior_count,
    )
    return {
        PENDING_LAYER_WORK: float(pending),
        LAYER_WORK_ARRIVAL_RATE: max(0.0, float(worker_stats["arrival_rate_msgs_per_s"])) * mean_depth,
        CAPACITY: max(0.0, float(capacity_layer_steps_per_s)),
        PARTITIONS_ASSIGNED: float(worker_stats.get("num_partitions_assigned") or 0),
        PARTITIONS_TOTAL: float(worker_stats.get("total_input_partitions") or 0),
        MEAN_EXIT_DEPTH: float(mean_depth),
    }


@dataclass
class CapacityEstimator:
    """Layer steps/s one replica can do: an EWMA of the engine's throughput in saturated windows.

    An unsaturated window says only "capacity >= what the engine did per second *while it ran*"
    (``layer_steps_per_busy_s``: a lower bound, since a fuller batch does more rows per step), so it
    can raise the estimate but never lower it. ``value`` is 0.0 until the engine has run.
    """

    alpha: float = 0.3
    value: float = 0.0

    def update(self, layer_steps_per_s: float, saturated: bool, layer_steps_per_busy_s: float = 0.0) -> float:
        if saturated:  # per busy second when known (never below per wall second: busy <= wall)
            sample = float(layer_steps_per_busy_s or layer_steps_per_s)
        elif layer_steps_per_busy_s > self.value:
            sample = float(layer_steps_per_busy_s)
        else:
            return self.value
        if sample > 0:
            self.value = sample if self.value <= 0 else self.alpha * sample + (1 - self.alpha) * self.value
        return self.value


@dataclass
class ReplicaReporter:
    """What ``ElbertWorker.record_autoscaling_stats()`` delegates to: ``report(worker.stats())``."""

    estimator: CapacityEstimator
    prior_count: float = DEFAULT_PRIOR_COUNT

    @classmethod
    def create(cls, alpha: float = 0.3) -> ReplicaReporter:
        return cls(estimator=CapacityEstimator(alpha=alpha))

    def report(self, worker_stats: Mapping[str, Any]) -> dict[str, float]:
        capacity = self.estimator.update(
            float(worker_stats.get("layer_steps_per_s", 0.0)), is_saturated(worker_stats),
            float(worker_stats.get("layer_steps_per_busy_s") or 0.0),
        )
        return build_replica_report(worker_stats, capacity, self.prior_count)
