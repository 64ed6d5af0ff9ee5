"""Load-adaptive exit without a model: the gear table and its budget, the controller driven by a fake
clock and synthetic signals, the worker-side ``ExitGears`` hook, and the default-gear load accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from elbert_stream.adaptive import (
    GEARS_FILE,
    UPDATE_EVERY_S,
    AdaptiveExit,
    ExitGears,
    Gear,
    GearController,
    GearTable,
    LoadSignals,
)
from elbert_stream.config import AdaptiveSettings, ExitSettings, Settings, model_dir
from elbert_stream.errors import ConfigError
from elbert_stream.load import pending_layer_work
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.records import OutputRecord
from elbert_stream.types import Prediction

DEFAULT = ExitSettings(policy="confidence_window", tau=0.2, window=3, patience=1, require_rising=True,
                       min_depth=1)


def _gear(tau: float, depth: float, acc: float, cons: float) -> Gear:
    return Gear(DEFAULT.model_copy(update={"tau": tau}), depth, acc, cons, [1, 1, 0, 0])


TABLE = GearTable((_gear(0.2, 1.7, 0.98, 0.99), _gear(0.4, 1.3, 0.975, 0.98), _gear(0.5, 1.15, 0.97, 0.96),
                   _gear(0.6, 1.05, 0.95, 0.93)), "m", "1")
SETTINGS = AdaptiveSettings(enabled=True, latency_target_ms=1000, max_accuracy_loss_points=None,
                            up_at=0.5, down_at=0.1, settle_s=5.0, min_dwell_s=1.0)
BURST = LoadSignals(queue_depth=900, consumer_lag=3000, oldest_wait_s=4.0, output_rate_msgs_per_s=100.0)
CALM = LoadSignals(queue_depth=0, consumer_lag=0, oldest_wait_s=None, output_rate_msgs_per_s=50.0)
FULL_SLOTS = LoadSignals(queue_depth=0, consumer_lag=0, oldest_wait_s=None, output_rate_msgs_per_s=32.0,
                        in_flight=64)  # 2 s in slots, none queued
BAND = LoadSignals(queue_depth=30, consumer_lag=0, oldest_wait_s=None, output_rate_msgs_per_s=100.0)  # 0.3 s


# ---- signals ------------------------------------------------------------------------------------------
def test_pressure_is_the_expected_or_oldest_wait_over_the_target() -> None:
    assert BURST.expected_wait_s() == pytest.approx(39.0)
    assert BAND.pressure(1.0) == pytest.approx(0.3)
    assert CALM.pressure(1.0) == 0.0
    woken = LoadSignals(queue_depth=50, consumer_lag=None, oldest_wait_s=0.2, output_rate_msgs_per_s=0.0)
    assert woken.pressure(1.0) == pytest.approx(0.2)  # nothing answered lately: the rate says nothing
    old = LoadSignals(queue_depth=1, consumer_lag=None, oldest_wait_s=2.5, output_rate_msgs_per_s=1000.0)
    assert old.pressure(1.0) == pytest.approx(2.5)
    assert FULL_SLOTS.pressure(1.0) == pytest.approx(2.0) and FULL_SLOTS.queue_pressure(1.0) == 0.0


def test_a_full_slot_table_shifts_up_before_any_queue_and_holds_until_the_latency_is_back() -> None:
    """On a CPU a burst waits in the slot table first (a step's cost grows with its rows): the expected
    latency counts the slots; the gear comes down only once nothing queues AND the latency is fine."""
    c = GearController(SETTINGS, num_gears=4)
    assert run(c, FULL_SLOTS, 0.0, 2.5)[-1] == 3
    assert set(run(c, FULL_SLOTS, 2.5, 30.0)) == {3}  # no queue, but the latency is over target: hold
    gears = run(c, CALM, 30.0, 50.0)
    assert gears[-1] == 0


# ---- the controller -----------------------------------------------------------------------------------
def run(controller: GearController, signals: LoadSignals, start_s: float, end_s: float,
        dt: float = 0.1) -> list[int]:
    out, t = [], start_s
    while t < end_s - 1e-9:
        out.append(controller.update(signals, t))
        t += dt
    return out


def test_goes_up_one_gear_per_dwell_under_a_backlog_and_stops_at_the_top() -> None:
    c = GearController(SETTINGS, num_gears=4)
    gears = run(c, BURST, 0.0, 10.0)
    assert gears[0] == 1  # reacts at once
    first = {g: gears.index(g) for g in (1, 2, 3)}
    assert first[2] - first[1] >= 10 and first[3] - first[2] >= 10  # >= min_dwell_s apart (0.1 s ticks)
    assert max(gears) == 3 and gears[-1] == 3


def test_hysteresis_holds_the_gear_in_the_band_and_needs_unbroken_calm_to_come_down() -> None:
    c = GearController(SETTINGS, num_gears=4)
    run(c, BURST, 0.0, 3.0)
    assert c.gear == 3
    assert set(run(c, BAND, 3.0, 30.0)) == {3}  # between down_at and up_at: hold
    t = 30.0
    for _ in range(10):  # calm spells shorter than settle_s, broken by the band: never down
        run(c, CALM, t, t + 4.0)
        run(c, BAND, t + 4.0, t + 4.5)
        t += 4.5
    assert c.gear == 3


def test_returns_to_default_within_the_settle_time_per_gear_after_the_burst() -> None:
    c = GearController(SETTINGS, num_gears=4)
    run(c, BURST, 0.0, 20.0)
    gears = run(c, CALM, 20.0, 60.0)
    back = gears.index(0) * 0.1
    assert back == pytest.approx(3 * SETTINGS.settle_s, abs=0.15)  # one gear per settle_s of calm
    assert gears[-1] == 0 and sorted(set(gears), reverse=True) == [3, 2, 1, 0]


def test_a_single_gear_table_never_moves() -> None:
    c = GearController(SETTINGS, num_gears=1)
    assert set(run(c, BURST, 0.0, 5.0)) == {0}


def test_band_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="down_at"):
        AdaptiveSettings(up_at=0.2, down_at=0.2)
    assert Settings().adaptive.enabled is False  # off by default


# ---- the gear table -----------------------------------------------------------------------------------
def test_budget_cuts_the_table_by_loss_points_and_consistency() -> None:
    assert len(TABLE.within_budget(None, None)) == 4
    assert len(TABLE.within_budget(1.0, None)) == 3  # gear 3 is 3 points below gear 0
    assert len(TABLE.within_budget(0.4, None)) == 1
    assert len(TABLE.within_budget(None, 0.97)) == 2
    assert len(TABLE.within_budget(0.0, 1.0)) == 1  # gear 0 always stays
    assert TABLE.loss_points(3) == pytest.approx(3.0)


def test_table_round_trip_and_refusals(tmp_path: Path) -> None:
    path = TABLE.save(tmp_path / GEARS_FILE)
    assert GearTable.load(path) == TABLE
    with pytest.raises(ConfigError, match="elbert-stream gears"):
        GearTable.load(tmp_path / "missing" / GEARS_FILE)
    doc = json.loads(path.read_text())
    doc["gears"] = doc["gears"][::-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="deepest to the shallowest"):
        GearTable.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="regenerate"):
        GearTable.load(path)


def test_the_shipped_model_has_a_gear_table_starting_at_its_saved_exit_settings() -> None:
    table = GearTable.for_model(None)
    saved = json.loads((model_dir(None) / "config.json").read_text())["elbert"]["exit"]
    assert table.gears[0].exit == ExitSettings.model_validate(saved)
    assert len(table) >= 3 and table.source["split"] == "val"
    depths = [g.mean_exit_depth for g in table.gears]
    assert depths == sorted(depths, reverse=True) and depths[-1] < depths[0]
    assert all(table.loss_points(i) <= 1.5 for i in range(len(table.within_budget(1.5, None))))


def test_adaptive_exit_refuses_exit_settings_that_are_not_gear_0(tmp_path: Path) -> None:
    TABLE.save(tmp_path / GEARS_FILE)
    assert AdaptiveExit.from_settings(AdaptiveSettings(), str(tmp_path), ExitSettings()) is None  # off
    assert AdaptiveExit.from_settings(SETTINGS, str(tmp_path), ExitSettings(tau=0.2)) is not None
    with pytest.raises(ConfigError, match="gear table's default"):
        AdaptiveExit.from_settings(SETTINGS, str(tmp_path), ExitSettings(tau=0.35))


# ---- the worker hook ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_exit_gears_applies_shifts_and_falls_back_when_turned_off(tmp_path: Path) -> None:
    TABLE.save(tmp_path / GEARS_FILE)
    clock = Clock()
    applied: list[ExitSettings] = []
    gears = ExitGears(applied.append, ExitSettings(), SETTINGS, str(tmp_path), clock=clock)
    for _ in range(40):  # 4 s of burst at 0.1 s ticks
        gears.update(lambda: BURST)
        clock.t += UPDATE_EVERY_S
    assert gears.gear == 3 and [a.tau for a in applied] == [0.4, 0.5, 0.6]
    assert gears.describe()["gear"] == 3 and [t["gear"] for t in gears.describe()["trace"]] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="adaptive exit is on"):
        gears.set_exit(ExitSettings(tau=0.3))
    gears.configure(SETTINGS.model_copy(update={"max_accuracy_loss_points": 1.0}))  # gear 3 now excluded
    assert gears.gear == 2 and applied[-1].tau == 0.5
    gears.configure(AdaptiveSettings(enabled=False))
    assert gears.gear == 0 and applied[-1] == ExitSettings()
    assert gears.describe() == {"enabled": False, "gear": 0}
    gears.set_exit(ExitSettings(tau=0.3))  # by hand again, now that adaptive exit is off
    assert applied[-1].tau == 0.3


def test_a_bad_reconfigure_changes_nothing(tmp_path: Path) -> None:
    applied: list[ExitSettings] = []
    gears = ExitGears(applied.append, ExitSettings(), AdaptiveSettings(), str(tmp_path))  # no gears.json
    with pytest.raises(ConfigError, match="no gear table"):
        gears.configure(SETTINGS)
    assert gears.adaptive is None and gears.gear == 0 and applied == []


# ---- load accounting and the output record ------------------------------------------------------------
def _pred(depth: int) -> Prediction:
    return Prediction(request_id="r", label="a", label_index=0, probabilities=[1.0], exit_depth=depth,
                      exit_reason="window", trace=[], queue_s=0.0, compute_s=0.0)


def test_pending_work_is_counted_at_the_default_gears_depths_while_a_looser_gear_runs() -> None:
    stats = LoopStats(num_layers=12)
    stats.finished([_pred(3)] * 200)  # default gear: depth 3
    before = stats.snapshot()["recent_exit_depth_counts"]
    stats.finished([_pred(1)] * 500, default_gear=False)  # a looser gear exits at depth 1
    after = stats.snapshot()
    assert after["recent_exit_depth_counts"] == before and after["num_finished"] == 700
    work = pending_layer_work([0] * 12, after["recent_exit_depth_counts"], 100, None)
    assert work == pytest.approx(100 * 3, rel=0.1)  # 100 waiting x E[D] at the default gear, not x 1
    snap = stats.telemetry_snapshot(backlog=0, parked=0, held=0, gear=2)
    assert snap.exit_gear == 2


def test_output_records_say_their_gear_and_old_records_read_as_gear_0() -> None:
    base = {"topic": "in", "partition": 0, "offset": 1, "key": None, "label": "a", "label_index": 0,
            "probabilities": [1.0], "exit_depth": 1, "exit_reason": "entropy", "trace": [], "model_name": "m",
            "model_version": "1", "queue_ms": 0.0, "compute_ms": 0.0, "worker_ms": 0.0, "end_to_end_ms": None,
            "replica_id": "r", "produced_ms": 0}
    assert OutputRecord.model_validate({"schema_version": 1, **base}).gear == 0
    assert OutputRecord.model_validate({"schema_version": 1, **base, "gear": 2}).gear == 2


# ---- the table from probabilities (training/gears.py, no model) ----------------------------------------
def test_gear_table_from_validation_probabilities() -> None:
    from elbert_stream.training.gears import gear_table, spread

    assert spread([1.6, 1.5, 1.4, 1.3, 1.2, 1.1], 3) == [2, 3, 5]  # aims 1.43, 1.27, 1.1
    assert spread([1.6, 1.5, 1.4, 1.3, 1.2, 1.1], 2, start=2.1) == [0, 5]  # aims 1.6, 1.1
    assert spread([1.6, 1.5], 5) == [0, 1] and spread([1.6], 0) == []
    torch.manual_seed(0)
    num_layers, n, k = 6, 200, 4
    labels = torch.randint(0, k, (n,))
    sharp = torch.linspace(0.5, 4.0, num_layers)[:, None, None]  # [L, 1, 1]: surer with depth
    logits = torch.randn(num_layers, n, k) + sharp * torch.nn.functional.one_hot(labels, k)  # [L, N, K]
    probs = logits.softmax(-1)
    table = gear_table(DEFAULT, num_layers, (probs, labels), max_gears=4, model_name="t", model_version="0")
    assert table.gears[0].exit == DEFAULT and 2 <= len(table) <= 4
    depths = [g.mean_exit_depth for g in table.gears]
    assert depths == sorted(depths, reverse=True) and len(set(depths)) == len(depths)
    accs = [g.accuracy for g in table.gears[1:]]
    assert accs == sorted(accs, reverse=True)  # frontier: a faster gear is never more accurate than a slower
    assert all(0 <= g.consistency <= 1 for g in table.gears) and table.source["n"] == n
