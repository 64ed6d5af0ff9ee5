"""Exit-depth autoscaling, controller side: scale Serve replicas on *layer work*, not request counts.

Ray Serve's default policy counts HTTP requests; our replicas pull from Kafka and receive none.
Each replica reports its exit-depth load (``elbert_stream.load``: pending layer work, arriving layer
work, measured capacity) through Ray's custom-metrics channel. :class:`ExitDepthPolicy` is the
``autoscaling_config.policy.policy_function`` (a class, so Ray forwards ``policy_kwargs`` to its
constructor); it reads the per-replica reports from ``AutoscalingContext.aggregated_metrics`` and
returns ``(replicas, policy_state)``.

The sizing, hysteresis and clamping are pure functions over plain numbers (:func:`required_replicas`,
:func:`apply_hysteresis`, :func:`decide_replicas`), so unit tests need no Ray. The formula is
documented in ``docs/autoscaling.md``. This module imports Ray only for type checking.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from elbert_stream.config import AutoscalingSettings
from elbert_stream.errors import ConfigError
from elbert_stream.load import (
    CAPACITY,
    LAYER_WORK_ARRIVAL_RATE,
    PARTITIONS_TOTAL,
    PENDING_LAYER_WORK,
)

if TYPE_CHECKING:  # pragma: no cover
    from ray.serve.config import AutoscalingContext

logger = logging.getLogger(__name__)

# Our keys in Ray's policy_state (Ray keeps its own delay-counter keys in the same dict).
_STATE_LOW_SINCE = "elbert_low_since_s"
_STATE_LOW_PEAK = "elbert_low_peak_replicas"


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
    fixed_capacity: float | None = None,
) -> tuple[int, dict[str, Any]]:
    """The whole decision on plain numbers: sizing, hysteresis, clamping.

    ``fixed_capacity`` (benchmarked per replica, pinned in the config) replaces the replicas'
    measurements; ``fallback_capacity`` is used only until a replica has measured one. Without
    either and without a measurement (no replica's engine has run yet), the count is held, except
    that a deployment with no load at all may fall back to ``min_replicas`` (through the same
    scale-down delay).
    """
    capacity = fixed_capacity or load.capacity_layers_per_s or fallback_capacity
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
    """``autoscaling_config.policy.policy_function: elbert_stream.serve.autoscaling:ExitDepthPolicy``.

    Ray instantiates a class policy once with ``policy_kwargs`` (the :class:`AutoscalingSettings`
    fields, plus optional ``fallback_capacity_layer_steps_per_s`` / ``capacity_layer_steps_per_s``) and
    calls it every control loop tick with an ``AutoscalingContext``; it returns
    ``(num_replicas, policy_state)``.
    Hysteresis state travels in ``ctx.policy_state`` (Ray persists the returned dict).
    """

    def __init__(self, fallback_capacity_layer_steps_per_s: float | None = None,
                 capacity_layer_steps_per_s: float | None = None, **settings: Any) -> None:
        try:
            self.settings = AutoscalingSettings(**settings)
        except Exception as exc:  # pydantic ValidationError; quote the bad kwargs
            raise ConfigError(f"bad ExitDepthPolicy policy_kwargs {settings!r}: {exc}") from exc
        unknown = set(settings) - set(AutoscalingSettings.model_fields)
        if unknown:
            raise ConfigError(f"unknown ExitDepthPolicy policy_kwargs {sorted(unknown)}")
        for name, value in (("fallback_capacity_layer_steps_per_s", fallback_capacity_layer_steps_per_s),
                            ("capacity_layer_steps_per_s", capacity_layer_steps_per_s)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"ExitDepthPolicy {name} must be a number > 0 (layer steps/s per replica), "
                                  f"got {value!r}")
        self.fallback_capacity = fallback_capacity_layer_steps_per_s
        self.fixed_capacity = capacity_layer_steps_per_s

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        load = summarize_reports(ctx.aggregated_metrics)
        now_s = ctx.current_time if ctx.current_time is not None else time.time()
        state = dict(ctx.policy_state or {})
        replicas, own_state = decide_replicas(
            load, self.settings, ctx.target_num_replicas,
            ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas,
            now_s, state, self.fallback_capacity, self.fixed_capacity,
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
"""Default-settings instance: ``policy_function: elbert_stream.serve.autoscaling:exit_depth_policy``."""
