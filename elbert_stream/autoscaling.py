"""Exit-depth autoscaling: scale Serve replicas on *layer work*, not on request counts.

Ray Serve's default policy counts HTTP requests; our replicas pull from Kafka and receive none.
An ELBERT message costs as many shared-layer applications as its exit depth ``D`` (1..L), so the
load unit here is the *layer step*: one shared-layer application to one sample.

Two halves, joined by Ray's custom-metrics channel:

* replica side (no Ray needed): :class:`ReplicaReporter` turns the worker's ``stats()`` dict
  into the flat ``dict[str, float]`` that ``ElbertWorker.record_autoscaling_stats()`` returns
  (keys in :data:`REPORT_KEYS`);
* controller side: :class:`ExitDepthPolicy` is the ``autoscaling_config.policy.policy_function``
  (a class, so Ray forwards ``policy_kwargs`` to its constructor); it reads the per-replica
  reports from ``AutoscalingContext.aggregated_metrics`` and returns ``(replicas, policy_state)``.

All arithmetic lives in pure functions over plain numbers (:func:`expected_remaining_layers`,
:func:`pending_layer_work`, :func:`required_replicas`, :func:`apply_hysteresis`), so unit tests
need no Ray. The formula is documented in ``docs/autoscaling.md``. This module imports Ray only
for type checking.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from elbert_stream.config import AutoscalingSettings
from elbert_stream.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ray.serve.config import AutoscalingContext

logger = logging.getLogger(__name__)

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

# Our keys in Ray's policy_state (Ray keeps its own delay-counter keys in the same dict).
_STATE_LOW_SINCE = "elbert_low_since_s"
_STATE_LOW_PEAK = "elbert_low_peak_replicas"

DEFAULT_PRIOR_COUNT = 1.0


# --------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------


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


def required_replicas(
    arrival_layers_per_s: float,
    backlog_layers: float,
    capacity_layers_per_s: float,
    target_utilization: float,
    drain_time_s: float,
) -> float:
    """Replicas (fractional) needed so that, with per-replica capacity ``c``:

    * arrivals alone use at most ``target_utilization`` of capacity: ``N >= A / (u c)``;
    * arrivals plus the backlog drain within ``drain_time_s`` at full capacity:
      ``N >= (A + W / T) / c``.
    """
    if capacity_layers_per_s <= 0:
        raise ConfigError(f"capacity_layers_per_s must be > 0, got {capacity_layers_per_s!r}")
    steady = arrival_layers_per_s / (target_utilization * capacity_layers_per_s)
    drain = (arrival_layers_per_s + backlog_layers / drain_time_s) / capacity_layers_per_s
    return max(0.0, steady, drain)


def clamp_replicas(desired: int, min_replicas: int, max_replicas: int, num_partitions: int | None) -> int:
    """Clamp to ``[min_replicas, min(max_replicas, num_partitions)]``; a replica beyond the
    partition count would own no partition and do nothing. ``min_replicas`` wins a conflict."""
    ceiling = max_replicas if not num_partitions else min(max_replicas, num_partitions)
    return max(min_replicas, min(desired, ceiling))


def apply_hysteresis(
    desired_up: int,
    desired_down: int,
    current_target: int,
    now_s: float,
    state: Mapping[str, Any],
    scale_down_delay_s: float,
) -> tuple[int, dict[str, Any]]:
    """Scale up at once; scale down late.

    ``desired_up`` is the count the load needs, ``desired_down`` the (larger or equal) count
    that keeps the load below the scale-down headroom. Up: ``desired_up > current_target`` is
    returned at once. Down: only after ``desired_down`` has stayed below ``current_target`` for
    ``scale_down_delay_s``, and then only to the highest ``desired_down`` seen during that low
    spell, so one quiet tick cannot drop capacity that a burst seconds earlier needed. Any tick
    that is not low restarts the spell (oscillating input never scales down).
    Returns ``(replicas, new_state)``; ``state`` holds only this function's keys.
    """
    cleared: dict[str, Any] = {_STATE_LOW_SINCE: None, _STATE_LOW_PEAK: None}
    if desired_up > current_target:
        return desired_up, cleared
    if desired_down >= current_target:
        return current_target, cleared
    low_since = state.get(_STATE_LOW_SINCE)
    low_peak = state.get(_STATE_LOW_PEAK)
    if low_since is None or low_peak is None:
        low_since, low_peak = now_s, desired_down
    else:
        low_peak = max(int(low_peak), desired_down)
    if now_s - float(low_since) + 1e-9 >= scale_down_delay_s:
        return int(low_peak), cleared
    return current_target, {_STATE_LOW_SINCE: low_since, _STATE_LOW_PEAK: low_peak}


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
# messages), max_slots (int), num_busy (int), backlog (int, polled but not yet in the engine: counted
# as waiting), paused (bool, consumer paused by backpressure: saturated), lag_per_partition
# ({partition: lag|None} | None), num_partitions_assigned (int), total_input_partitions (int).


def _total_lag(lag_per_partition: Mapping[Any, Any] | None) -> float | None:
    """Sum of trustworthy lags: None when unknown; negative / None entries are dropped."""
    if not lag_per_partition:
        return None
    values = [float(v) for v in lag_per_partition.values() if v is not None and float(v) >= 0]
    return sum(values) if values else None


def is_saturated(worker_stats: Mapping[str, Any]) -> bool:
    """The engine could not have gone faster: requests waiting, consumer paused, or every slot busy."""
    if _num_waiting(worker_stats) > 0 or worker_stats.get("paused"):
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
    """EWMA of layer steps/s over windows where the engine was saturated.

    Unsaturated windows say only "capacity >= observed", so they are ignored; the last measured
    value is kept. ``value`` is 0.0 until the first saturated window.
    """

    alpha: float = 0.3
    value: float = 0.0

    def update(self, layer_steps_per_s: float, saturated: bool) -> float:
        if saturated and layer_steps_per_s > 0:
            sample = float(layer_steps_per_s)
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
            float(worker_stats.get("layer_steps_per_s", 0.0)), is_saturated(worker_stats)
        )
        return build_replica_report(worker_stats, capacity, self.prior_count)


# --------------------------------------------------------------------------------------------
# Controller side: the policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentLoad:
    """Per-replica reports summed over the deployment (plain numbers)."""

    arrival_layers_per_s: float
    backlog_layers: float
    capacity_layers_per_s: float | None  # mean over replicas that measured one; None = none did
    num_partitions: int | None  # input partitions (max reported); None = unknown
    num_reporting: int


def summarize_reports(aggregated_metrics: Mapping[str, Mapping[Any, float]] | None) -> DeploymentLoad:
    """Fold ``AutoscalingContext.aggregated_metrics`` ({metric: {replica_id: value}})."""
    metrics = aggregated_metrics or {}

    def values(key: str) -> list[float]:
        return [float(v) for v in (metrics.get(key) or {}).values() if v is not None and math.isfinite(v)]

    capacities = [c for c in values(CAPACITY) if c > 0]
    partitions = [int(p) for p in values(PARTITIONS_TOTAL) if p > 0]
    return DeploymentLoad(
        arrival_layers_per_s=sum(values(LAYER_WORK_ARRIVAL_RATE)),
        backlog_layers=sum(values(PENDING_LAYER_WORK)),
        capacity_layers_per_s=sum(capacities) / len(capacities) if capacities else None,
        num_partitions=max(partitions) if partitions else None,
        num_reporting=len(metrics.get(PENDING_LAYER_WORK) or {}),
    )


def decide_replicas(
    load: DeploymentLoad,
    settings: AutoscalingSettings,
    current_target: int,
    min_replicas: int,
    max_replicas: int,
    now_s: float,
    state: Mapping[str, Any],
    fallback_capacity: float | None = None,
) -> tuple[int, dict[str, Any]]:
    """The whole decision on plain numbers: sizing, hysteresis, clamping.

    Without a capacity measurement (no replica has been saturated yet) and no
    ``fallback_capacity``, the count is held, except that a deployment with no load at all
    may fall back to ``min_replicas`` (through the same scale-down delay).
    """
    capacity = load.capacity_layers_per_s or fallback_capacity
    if load.num_reporting == 0:
        return current_target, dict(state)
    if capacity:
        raw = required_replicas(
            load.arrival_layers_per_s, load.backlog_layers, capacity,
            settings.target_utilization, settings.drain_time_s,
        )
        up, down = math.ceil(raw - 1e-9), math.ceil(raw / settings.scale_down_headroom - 1e-9)
    elif load.arrival_layers_per_s <= 0 and load.backlog_layers <= 0:
        up, down = 0, 0
    else:
        up, down = current_target, current_target
    def bound(n: int) -> int:
        return clamp_replicas(n, min_replicas, max_replicas, load.num_partitions)

    # clamp first, so the partition ceiling also pulls an over-target deployment down (with delay)
    return apply_hysteresis(bound(up), bound(down), current_target, now_s, state, settings.scale_down_delay_s)


class ExitDepthPolicy:
    """``autoscaling_config.policy.policy_function: elbert_stream.autoscaling:ExitDepthPolicy``.

    Ray instantiates a class policy once with ``policy_kwargs`` (the :class:`AutoscalingSettings`
    fields, plus optional ``fallback_capacity_layer_steps_per_s``) and calls it every control
    loop tick with an ``AutoscalingContext``; it returns ``(num_replicas, policy_state)``.
    Hysteresis state travels in ``ctx.policy_state`` (Ray persists the returned dict).
    """

    def __init__(self, fallback_capacity_layer_steps_per_s: float | None = None, **settings: Any) -> None:
        try:
            self.settings = AutoscalingSettings(**settings)
        except Exception as exc:  # pydantic ValidationError; quote the bad kwargs
            raise ConfigError(f"bad ExitDepthPolicy policy_kwargs {settings!r}: {exc}") from exc
        unknown = set(settings) - set(AutoscalingSettings.model_fields)
        if unknown:
            raise ConfigError(f"unknown ExitDepthPolicy policy_kwargs {sorted(unknown)}")
        self.fallback_capacity = fallback_capacity_layer_steps_per_s

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        load = summarize_reports(ctx.aggregated_metrics)
        now_s = ctx.current_time if ctx.current_time is not None else time.time()
        state = dict(ctx.policy_state or {})
        replicas, own_state = decide_replicas(
            load, self.settings, ctx.target_num_replicas,
            ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas,
            now_s, state, self.fallback_capacity,
        )
        state.update(own_state)
        if replicas != ctx.target_num_replicas:
            logger.info(
                "exit-depth policy %s: %d -> %d replicas (arrival %.1f layers/s, backlog %.0f layers, "
                "capacity %s layers/s/replica, partitions %s)",
                ctx.deployment_name, ctx.target_num_replicas, replicas, load.arrival_layers_per_s,
                load.backlog_layers, load.capacity_layers_per_s, load.num_partitions,
            )
        return replicas, state


exit_depth_policy = ExitDepthPolicy()
"""Default-settings instance: ``policy_function: elbert_stream.autoscaling:exit_depth_policy``."""
