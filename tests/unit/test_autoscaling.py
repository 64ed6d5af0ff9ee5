"""Exit-depth autoscaling: pure math, replica report, and the policy on synthetic contexts.

The policy tests build Ray's real ``AutoscalingContext`` (no cluster) and also run the policy
through Ray's own wrapper (``_apply_autoscaling_config``) so the returned state merges as Ray
expects. Time is simulated: each tick passes ``current_time``.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from elbert_stream import load
from elbert_stream.config import AutoscalingSettings
from elbert_stream.errors import ConfigError
from elbert_stream.serve import autoscaling as asc

L = 12
TICK_S = 2.0


# --------------------------------------------------------------------------- pure math


def _samples_remaining(counts: list[int], depth: int) -> float:
    """Reference: expand the histogram (plus the one pseudo-count at L) into samples."""
    samples = [i + 1 for i, c in enumerate(counts) for _ in range(c)] + [len(counts)]
    beyond = [d - depth for d in samples if d > depth]
    return sum(beyond) / len(beyond)


def test_empty_histogram_assumes_full_depth() -> None:
    assert load.expected_remaining_layers([0] * L, 0) == L
    assert load.expected_remaining_layers([0] * L, 5) == L - 5
    assert load.expected_remaining_layers([0] * L, L) == 0.0


@given(st.lists(st.integers(0, 50), min_size=2, max_size=24), st.data())
@settings(max_examples=60, deadline=None)
def test_expected_remaining_matches_sample_mean(counts: list[int], data: st.DataObject) -> None:
    depth = data.draw(st.integers(0, len(counts) - 1))
    assert load.expected_remaining_layers(counts, depth) == pytest.approx(_samples_remaining(counts, depth))


def test_shallow_histogram_is_cheap_and_conditioning_raises_remaining() -> None:
    shallow = [1000, 0, 0] + [0] * (L - 3)  # everything exits at depth 1
    assert load.mean_exit_depth(shallow) == pytest.approx((1000 * 1 + L) / 1001)
    # a slot still busy at depth 1 did not exit there: only the prior (depth L) is left
    assert load.expected_remaining_layers(shallow, 1) == pytest.approx(L - 1)


def test_bad_histogram_arguments_raise() -> None:
    with pytest.raises(ConfigError, match=r"\[\]"):
        load.expected_remaining_layers([], 0)
    with pytest.raises(ConfigError, match="-1"):
        load.expected_remaining_layers([1, 2], -1)


def test_pending_layer_work_sums_slots_queue_and_trusted_lag() -> None:
    exits = [0, 0, 30, 0] + [0] * (L - 4)  # typical exit at depth 3
    busy = [2, 1, 0, 4] + [0] * (L - 4)  # 2 fresh, 1 at depth 1, 4 past the typical exit
    per_msg = load.mean_exit_depth(exits)
    remaining = load.expected_remaining_layers
    in_flight = 2 * per_msg + remaining(exits, 1) + 4 * remaining(exits, 3)
    assert load.expected_remaining_layers(exits, 3) == pytest.approx(L - 3)  # only the prior survives
    no_lag = load.pending_layer_work(busy, exits, num_waiting=5, lag_messages=None)
    assert no_lag == pytest.approx(in_flight + 5 * per_msg)
    with_lag = load.pending_layer_work(busy, exits, num_waiting=5, lag_messages=100)
    assert with_lag - no_lag == pytest.approx(100 * per_msg)


def test_required_replicas_formula() -> None:
    # steady: 700 layers/s at 70% of 1000 -> 1 replica; backlog 30000 over 30 s adds 1 replica of work
    assert asc.required_replicas(700, 0, 1000, 0.7, 30) == pytest.approx(1.0)
    assert asc.required_replicas(700, 30_000, 1000, 0.7, 30) == pytest.approx(1.7)
    with pytest.raises(ConfigError, match="0"):
        asc.required_replicas(1, 1, 0, 0.7, 30)


# --------------------------------------------------------------------------- replica report


def _worker_stats(msgs_per_s: float, exits: list[int], *, waiting: int = 0, busy: list[int] | None = None,
                  steps_per_s: float = 0.0, lag: dict | None = None, partitions: int = 8) -> dict:
    busy = busy if busy is not None else [0] * L
    return {
        "busy_depth_counts": busy, "exit_depth_counts": exits, "num_waiting": waiting,
        "num_busy": sum(busy), "max_slots": 64, "arrival_rate_msgs_per_s": msgs_per_s,
        "layer_steps_per_s": steps_per_s, "lag_per_partition": lag,
        "num_partitions_assigned": 2, "total_input_partitions": partitions,
    }


def test_report_keys_types_and_values() -> None:
    exits = [0, 10, 0, 0] + [0] * (L - 4)
    report = load.build_replica_report(_worker_stats(50, exits, lag={0: 10, 1: None, 2: -5}), 900.0)
    assert set(report) == set(load.REPORT_KEYS)
    assert all(type(v) is float for v in report.values())  # Ray accepts only int/float values
    per_msg = (10 * 2 + L) / 11
    assert report[load.LAYER_WORK_ARRIVAL_RATE] == pytest.approx(50 * per_msg)
    assert report[load.PENDING_LAYER_WORK] == pytest.approx(10 * per_msg)  # only the trusted lag
    assert report[load.CAPACITY] == 900.0 and report[load.PARTITIONS_TOTAL] == 8.0


def test_backlog_counts_as_waiting_and_pause_as_saturation() -> None:
    exits = [0] * L
    stats = _worker_stats(1, exits)
    base = load.build_replica_report(stats, 0.0)[load.PENDING_LAYER_WORK]
    with_backlog = load.build_replica_report({**stats, "backlog": 7}, 0.0)[load.PENDING_LAYER_WORK]
    assert with_backlog - base == pytest.approx(7 * L)
    assert not load.is_saturated(stats)
    assert load.is_saturated({**stats, "backlog": 1}) and load.is_saturated({**stats, "paused": True})


def test_report_names_missing_worker_stats() -> None:
    with pytest.raises(ConfigError, match="layer_steps_per_s"):
        load.build_replica_report({"busy_depth_counts": [0], "exit_depth_counts": [1], "num_waiting": 0,
                                  "arrival_rate_msgs_per_s": 1.0}, 0.0)


def test_capacity_is_measured_only_while_saturated() -> None:
    reporter = load.ReplicaReporter.create(alpha=0.5)
    exits = [0] * L
    idle = reporter.report(_worker_stats(1, exits, steps_per_s=100.0))
    assert idle[load.CAPACITY] == 0.0  # an idle engine says nothing about its capacity
    first = reporter.report(_worker_stats(1, exits, waiting=3, steps_per_s=1000.0))
    assert first[load.CAPACITY] == 1000.0
    full_table = reporter.report(_worker_stats(1, exits, busy=[64] + [0] * (L - 1), steps_per_s=2000.0))
    assert full_table[load.CAPACITY] == pytest.approx(1500.0)  # EWMA alpha 0.5
    after = reporter.report(_worker_stats(1, exits, steps_per_s=10.0))
    assert after[load.CAPACITY] == pytest.approx(1500.0)  # kept when no longer saturated


def test_a_replica_that_keeps_up_is_not_saturated_and_its_capacity_is_not_its_arrival_rate() -> None:
    """A replica answering 100 layer steps/s of traffic with its engine busy 10 % of the time has a
    few just-polled messages waiting at most instants. Taking those as saturation measured the arrival
    rate as "capacity" (100), so the policy asked for 100 / (0.7 x 100) = 2 replicas, and each new
    replica measured its own smaller share the same way: steady light load ratcheted up to
    max_replicas. Its capacity is at least what the engine does per busy second."""
    exits = [10] + [0] * (L - 1)
    keeping_up = {**_worker_stats(100, exits, waiting=3, steps_per_s=100.0),
                  "backlog": 5, "engine_busy_fraction": 0.1, "layer_steps_per_busy_s": 1000.0}
    assert not load.is_saturated(keeping_up)
    assert load.is_saturated({**keeping_up, "engine_busy_fraction": 0.95})
    assert load.is_saturated({**keeping_up, "paused": True})
    reporter = load.ReplicaReporter.create(alpha=0.5)
    report = reporter.report(keeping_up)
    assert report[load.CAPACITY] == pytest.approx(1000.0)
    cfg = AutoscalingSettings(target_utilization=0.7, drain_time_s=30.0)
    replicas, _ = asc.decide_replicas(asc.summarize_reports({k: {"r1": v} for k, v in report.items()}),
                                      cfg, 1, 1, 8, 0.0, {})
    assert replicas == 1
    # a saturated window measures the real throughput; a lighter unsaturated one never lowers it
    full = reporter.report({**keeping_up, "engine_busy_fraction": 1.0, "layer_steps_per_s": 3000.0,
                            "layer_steps_per_busy_s": 3000.0})
    assert full[load.CAPACITY] == pytest.approx(2000.0)  # EWMA alpha 0.5
    light = reporter.report({**keeping_up, "layer_steps_per_busy_s": 400.0})
    assert light[load.CAPACITY] == pytest.approx(2000.0)


def test_a_pinned_capacity_replaces_the_measured_one_and_a_bad_one_is_refused() -> None:
    cfg = AutoscalingSettings(target_utilization=0.5, drain_time_s=30.0)
    measured = asc.DeploymentLoad(arrival_layers_per_s=600.0, backlog_layers=0.0,
                                  capacity_layers_per_s=2000.0, num_partitions=8, num_reporting=1)
    assert asc.decide_replicas(measured, cfg, 1, 1, 8, 0.0, {})[0] == 1  # 600 / (0.5 x 2000)
    assert asc.decide_replicas(measured, cfg, 1, 1, 8, 0.0, {}, fixed_capacity=300.0)[0] == 4  # 600 / 150
    assert asc.ExitDepthPolicy(capacity_layer_steps_per_s=300).fixed_capacity == 300
    for bad in (0, -5, "fast"):
        with pytest.raises(ConfigError, match="capacity_layer_steps_per_s must be a number > 0"):
            asc.ExitDepthPolicy(capacity_layer_steps_per_s=bad)


# --------------------------------------------------------------------------- the policy


class Sim:
    """Drives a policy tick by tick with Ray's real AutoscalingContext; the target follows it."""

    def __init__(self, policy, *, min_replicas: int = 1, max_replicas: int = 16, target: int = 1,
                 through_ray_wrapper: bool = False) -> None:
        self.config = AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas,
                                        upscale_delay_s=0, downscale_delay_s=0)
        if through_ray_wrapper:
            from ray.serve.autoscaling_policy import _apply_autoscaling_config
            policy = _apply_autoscaling_config(policy)
        self.policy, self.target, self.state, self.now = policy, target, {}, 1000.0
        self.history: list[int] = []

    def tick(self, reports: list[dict[str, float]]) -> int:
        metrics: dict[str, dict[str, float]] = {}
        for i, report in enumerate(reports):
            for key, value in report.items():
                metrics.setdefault(key, {})[f"replica-{i}"] = value
        ctx = AutoscalingContext(
            deployment_id=None, deployment_name="ElbertWorker", app_name="elbert",
            current_num_replicas=self.target, target_num_replicas=self.target, running_replicas=[],
            total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=metrics,
            raw_metrics={}, capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=dict(self.state),
            last_scale_up_time=None, last_scale_down_time=None, current_time=self.now, config=self.config,
        )
        decision, self.state = self.policy(ctx)
        self.target = max(self.config.min_replicas, min(self.config.max_replicas, math.ceil(decision)))
        self.history.append(self.target)
        self.now += TICK_S
        return self.target


CAP = 1000.0  # layer steps/s one replica sustains
SHALLOW = [900, 50, 30, 20] + [0] * (L - 4)  # mostly exits at depth 1
DEEP = [0] * (L - 2) + [100, 900]  # mostly runs to the end


def _report(msgs_per_s: float, exits: list[int], *, waiting: int = 0, partitions: int = 16) -> dict:
    stats = _worker_stats(msgs_per_s, exits, waiting=waiting, partitions=partitions)
    return load.build_replica_report(stats, CAP)


def _fleet(n: int, total_msgs_per_s: float, exits: list[int], waiting_total: int = 0, partitions: int = 16):
    return [_report(total_msgs_per_s / n, exits, waiting=waiting_total // n, partitions=partitions)
            for _ in range(n)]


def _policy(**kwargs) -> asc.ExitDepthPolicy:
    base = {"target_utilization": 0.7, "drain_time_s": 30.0, "scale_down_delay_s": 60.0,
            "scale_down_headroom": 0.8}
    return asc.ExitDepthPolicy(**{**base, **kwargs})


def test_burst_scales_up_at_once_to_the_formula() -> None:
    sim = Sim(_policy())
    assert sim.tick(_fleet(1, 50, SHALLOW)) == 1
    backlog_msgs = 100_000
    reports = _fleet(sim.target, 50, SHALLOW, waiting_total=backlog_msgs)
    work = sum(r[load.PENDING_LAYER_WORK] for r in reports)
    arrival = sum(r[load.LAYER_WORK_ARRIVAL_RATE] for r in reports)
    expected = math.ceil(max(arrival / (0.7 * CAP), (arrival + work / 30.0) / CAP))
    assert expected >= 3
    assert sim.tick(reports) == expected  # one tick, no upscale delay


def test_back_down_after_drain_only_after_the_delay() -> None:
    sim = Sim(_policy(), through_ray_wrapper=True)
    sim.tick(_fleet(1, 50, SHALLOW, waiting_total=200_000))
    high = sim.target
    assert high > 2
    quiet_ticks = 0
    while sim.target == high:
        sim.tick(_fleet(sim.target, 50, SHALLOW))
        quiet_ticks += 1
        assert quiet_ticks < 100
    assert (quiet_ticks - 1) * TICK_S >= 60.0 - 1e-6  # held for scale_down_delay_s
    assert (quiet_ticks - 1) * TICK_S <= 60.0 + TICK_S
    assert sim.target == 1  # 50 msgs/s of shallow work fits one replica with headroom
    assert sim.history == sorted(sim.history, reverse=True)  # one way down, no bouncing


def _oscillate(delay_s: float) -> list[int]:
    sim = Sim(_policy(scale_down_delay_s=delay_s), through_ray_wrapper=True)
    for i in range(300):  # 10 minutes: 10 s of burst, 10 s of quiet, repeated
        burst = (i // 5) % 2 == 0
        sim.tick(_fleet(sim.target, 600 if burst else 20, SHALLOW, waiting_total=2000 if burst else 0))
    return sim.history


def _changes(history: list[int]) -> int:
    return sum(1 for a, b in zip(history, history[1:], strict=False) if a != b)


def test_oscillating_input_does_not_flap() -> None:
    history = _oscillate(60.0)
    assert _changes(history) <= 2, history
    assert min(history[10:]) == max(history[10:]) > 1  # settled at the burst size
    assert _changes(_oscillate(0.0)) > 20  # control: the same input flaps without the delay


def test_never_more_replicas_than_partitions() -> None:
    sim = Sim(_policy(), max_replicas=16)
    assert sim.tick(_fleet(1, 5000, DEEP, waiting_total=500_000, partitions=4)) == 4
    assert sim.tick(_fleet(4, 5000, DEEP, waiting_total=500_000, partitions=4)) == 4


def test_same_message_rate_deeper_texts_need_more_replicas() -> None:
    shallow, deep = Sim(_policy()), Sim(_policy())
    for _ in range(3):
        shallow.tick(_fleet(shallow.target, 300, SHALLOW))
        deep.tick(_fleet(deep.target, 300, DEEP))
    # a message-count autoscaler would size both the same: 300 msgs/s
    assert deep.target > shallow.target
    assert deep.target == math.ceil(300 * load.mean_exit_depth(DEEP) / (0.7 * CAP))
    assert shallow.target == math.ceil(300 * load.mean_exit_depth(SHALLOW) / (0.7 * CAP))


def test_without_a_capacity_measurement_the_count_is_held() -> None:
    sim = Sim(_policy(scale_down_delay_s=0.0), target=3)
    unmeasured = [load.build_replica_report(_worker_stats(100, SHALLOW), 0.0) for _ in range(3)]
    assert sim.tick(unmeasured) == 3
    idle = [load.build_replica_report(_worker_stats(0, SHALLOW), 0.0) for _ in range(3)]
    assert sim.tick(idle) == 1  # no load at all: back to min_replicas
    assert sim.tick([]) == 1  # no reports: hold


def test_policy_loads_through_ray_policy_config() -> None:
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    policy = AutoscalingPolicy(policy_function="elbert_stream.serve.autoscaling:ExitDepthPolicy",
                               policy_kwargs={"target_utilization": 0.5, "scale_down_delay_s": 5.0})
    instance = _resolve_policy_callable(policy)
    assert instance.settings.target_utilization == 0.5 and instance.settings.scale_down_delay_s == 5.0
    default = _resolve_policy_callable(AutoscalingPolicy(
        policy_function="elbert_stream.serve.autoscaling:exit_depth_policy"))
    assert default.settings.target_utilization == 0.7


def test_bad_policy_kwargs_are_rejected_with_the_value() -> None:
    with pytest.raises(ConfigError, match="1.5"):
        asc.ExitDepthPolicy(target_utilization=1.5)
    with pytest.raises(ConfigError, match="drain_time"):
        asc.ExitDepthPolicy(drain_time=3)


def test_the_worker_snapshot_carries_what_the_report_needs() -> None:
    """Contract with the worker: its stats snapshot has every key build_replica_report reads."""
    from elbert_stream.stream.loop_stats import LoopStats

    snapshot = LoopStats(num_layers=L).snapshot()
    assert set(load.REQUIRED_WORKER_STATS) <= set(snapshot)
    report = load.ReplicaReporter.create().report(snapshot)
    assert report[load.PENDING_LAYER_WORK] == 0.0 and report[load.MEAN_EXIT_DEPTH] == L
