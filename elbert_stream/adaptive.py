"""Load-adaptive exit: the gear table saved with a model and the controller that shifts gears.

A **gear** is one exit setting (``config.ExitSettings``) with what it costs and what it is worth on
the model's validation split: mean exit depth, accuracy against the gold labels and consistency with
the full-depth label. A model's ``gears.json`` lists them from gear 0 (the model's saved defaults,
the most accurate) to the fastest; ``training/gears.py`` computes it (``elbert-stream gears``).
An accuracy budget (``AdaptiveSettings.max_accuracy_loss_points`` / ``min_consistency``) cuts the
table: gears beyond it are never used.

The **controller** (:class:`GearController`) turns load signals (:class:`LoadSignals`: queue depth,
consumer lag, the oldest waiting message's age, the output rate) into a gear, with hysteresis: one
gear up when the pressure (expected wait / latency target) reaches ``up_at`` (at most every
``min_dwell_s``), one gear down after the pressure stayed at or below ``down_at`` for ``settle_s``.
:class:`AdaptiveExit` is what a worker holds: the budget-cut table plus the controller, rate-limited,
returning the exit settings to apply when the gear changes. Plain Python: no torch, no Kafka, no Ray
(a worker of any shape drives it with one call per loop iteration). See docs/adaptive.md.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from elbert_stream.config import AdaptiveSettings, ExitSettings, model_dir
from elbert_stream.errors import ConfigError

GEARS_FILE = "gears.json"
GEARS_FORMAT = 1
UPDATE_EVERY_S = 0.1  # AdaptiveExit.update reads the signals at most this often
TRACE_LEN = 256  # gear changes kept for /stats


# ---- the gear table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Gear:
    """One exit setting and its validation figures (``accuracy``, ``consistency`` in [0, 1])."""

    exit: ExitSettings  # every field set
    mean_exit_depth: float
    accuracy: float  # vs the gold labels
    consistency: float  # share of labels equal to the full-depth label
    exit_depth_histogram: list[int]  # samples exiting at depth 1..L

    def to_dict(self) -> dict[str, Any]:
        return {"exit": self.exit.model_dump(), "mean_exit_depth": self.mean_exit_depth,
                "accuracy": self.accuracy, "consistency": self.consistency,
                "exit_depth_histogram": list(self.exit_depth_histogram)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Gear:
        return cls(ExitSettings.model_validate(doc["exit"]), float(doc["mean_exit_depth"]),
                   float(doc["accuracy"]), float(doc["consistency"]),
                   [int(c) for c in doc["exit_depth_histogram"]])


@dataclass(frozen=True)
class GearTable:
    """Gears from the default (index 0) to the fastest; ``source`` says which data scored them."""

    gears: tuple[Gear, ...]
    model_name: str
    model_version: str
    source: dict[str, Any] = field(default_factory=dict)  # split, n, full-depth accuracy, command

    def __post_init__(self) -> None:
        if not self.gears:
            raise ConfigError("a gear table needs at least the default gear")
        if any(g.exit.unset() for g in self.gears):
            raise ConfigError("every gear's exit settings must be fully set (gears.json is corrupt?)")
        depths = [g.mean_exit_depth for g in self.gears]
        if any(b > a + 1e-9 for a, b in zip(depths, depths[1:], strict=False)):
            raise ConfigError(f"gears must go from the deepest to the shallowest mean exit depth, "
                              f"got {depths}")

    def __len__(self) -> int:
        return len(self.gears)

    def loss_points(self, index: int) -> float:
        """Validation accuracy points gear ``index`` gives up against gear 0."""
        return (self.gears[0].accuracy - self.gears[index].accuracy) * 100

    def within_budget(self, max_loss_points: float | None, min_consistency: float | None) -> GearTable:
        """The leading gears that respect both limits (gear 0 always stays)."""
        keep = 1
        for i in range(1, len(self.gears)):
            if max_loss_points is not None and self.loss_points(i) > max_loss_points + 1e-9:
                break
            if min_consistency is not None and self.gears[i].consistency < min_consistency - 1e-9:
                break
            keep = i + 1
        return GearTable(self.gears[:keep], self.model_name, self.model_version, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"format": GEARS_FORMAT, "model_name": self.model_name, "model_version": self.model_version,
                "source": self.source, "gears": [g.to_dict() for g in self.gears]}

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> GearTable:
        """Read ``gears.json``; ConfigError saying how to make one when it is missing or bad."""
        if not path.is_file():
            raise ConfigError(f"no gear table at {str(path)!r}: adaptive exit needs one; make it with "
                              f"`elbert-stream gears --model {path.parent}` (or set adaptive.enabled=false)")
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != GEARS_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {GEARS_FORMAT}")
            gears = tuple(Gear.from_dict(g) for g in doc["gears"])
            return cls(gears, str(doc["model_name"]), str(doc["model_version"]), dict(doc.get("source", {})))
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as e:
            raise ConfigError(f"cannot read the gear table {str(path)!r}: {e}; regenerate it with "
                              f"`elbert-stream gears --model {path.parent}`") from e

    @classmethod
    def for_model(cls, path: str | None) -> GearTable:
        """The table saved beside the checkpoint ``ModelSettings.path`` names (None = shipped model)."""
        return cls.load(model_dir(path) / GEARS_FILE)


# ---- the controller ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSignals:
    """What the controller reads, measured by the worker (counts in messages)."""

    queue_depth: int  # taken from Kafka, not yet in an engine slot
    consumer_lag: int | None  # not yet fetched from the replica's partitions; None = unknown
    oldest_wait_s: float | None  # age of the oldest message waiting for a slot; None = unknown / none
    output_rate_msgs_per_s: float  # recent messages/s answered (turns a backlog into a wait)
    in_flight: int = 0  # in engine slots now

    def _over_rate(self, messages: float) -> float:
        """``messages`` / output rate; 0 when nothing was answered lately (after an idle spell the rate
        says nothing about the capacity: the oldest wait speaks then)."""
        rate = self.output_rate_msgs_per_s
        return messages / rate if messages > 0 and rate > 0 else 0.0

    def expected_wait_s(self) -> float:
        """How long a message arriving now waits for a slot: the queue and lag over the output rate."""
        return self._over_rate(self.queue_depth + (self.consumer_lag or 0))

    def expected_latency_s(self) -> float:
        """How long a message arriving now takes to be answered (Little's law): everything ahead of it,
        in slots included, over the output rate. On a CPU a full slot table is where a burst waits
        first (a step's cost grows with its rows), before any queue forms."""
        return self._over_rate(self.queue_depth + (self.consumer_lag or 0) + self.in_flight)

    def pressure(self, latency_target_s: float) -> float:
        """Up-shift measure: the worse of the expected latency and the oldest wait, over the target."""
        return max(self.expected_latency_s(), self.oldest_wait_s or 0.0) / latency_target_s

    def queue_pressure(self, latency_target_s: float) -> float:
        """Down-shift measure: the worse of the expected wait for a slot and the oldest wait, over the
        target (0 = nothing waits for a slot: the replica keeps up)."""
        return max(self.expected_wait_s(), self.oldest_wait_s or 0.0) / latency_target_s


@dataclass
class GearController:
    """Hysteresis over ``num_gears`` gears (0 = default); ``update(signals, now_s)`` -> the gear."""

    settings: AdaptiveSettings
    num_gears: int
    gear: int = 0
    _last_shift_s: float = -math.inf
    _calm_since_s: float | None = None

    def update(self, signals: LoadSignals, now_s: float) -> int:
        """Up when ``pressure >= up_at``; down after ``settle_s`` of calm: ``queue_pressure <= down_at``
        (nothing waits for a slot) with ``pressure`` below ``up_at`` (the latency is inside target)."""
        s = self.settings
        target_s = s.latency_target_ms / 1e3
        pressure = signals.pressure(target_s)
        if pressure >= s.up_at:
            self._calm_since_s = None
            if self.gear < self.num_gears - 1 and now_s - self._last_shift_s >= s.min_dwell_s:
                self._shift(+1, now_s)
        elif signals.queue_pressure(target_s) <= s.down_at:
            if self._calm_since_s is None:
                self._calm_since_s = now_s
            calm_from = max(self._calm_since_s, self._last_shift_s)
            if self.gear > 0 and now_s - calm_from >= s.settle_s:
                self._shift(-1, now_s)
        else:
            self._calm_since_s = None
        return self.gear

    def _shift(self, by: int, now_s: float) -> None:
        self.gear += by
        self._last_shift_s = now_s


@dataclass(frozen=True)
class GearChange:
    """A shift the worker must apply: ``engine.set_exit_settings(exit)`` and stamp ``index``."""

    index: int
    exit: ExitSettings


class AdaptiveExit:
    """A worker's gear state: the budget-cut table and the controller (see the module doc).

    ``update`` belongs to the worker's loop thread; ``describe`` may be read from any thread.
    """

    def __init__(self, settings: AdaptiveSettings, table: GearTable, *, gear: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.full_table = table
        self.table = table.within_budget(settings.max_accuracy_loss_points, settings.min_consistency)
        self.clock = clock
        start = min(max(gear, 0), len(self.table) - 1)
        self.controller = GearController(settings, len(self.table), gear=start)
        self._checked_at = -math.inf
        self.trace: deque[tuple[float, int]] = deque([(clock(), self.controller.gear)], maxlen=TRACE_LEN)
        self.num_shifts = 0

    @classmethod
    def from_settings(cls, settings: AdaptiveSettings, model_path: str | None, exit_settings: ExitSettings,
                      *, gear: int = 0, clock: Callable[[], float] = time.monotonic) -> AdaptiveExit | None:
        """None when disabled; else the model's table, refused when the configured exit settings are
        not its gear 0 (the gears' figures are relative to it)."""
        if not settings.enabled:
            return None
        table = GearTable.for_model(model_path)
        default = table.gears[0].exit
        if exit_settings.over(default) != default:
            set_here = {k: v for k, v in exit_settings.model_dump().items() if v is not None}
            raise ConfigError(f"adaptive exit starts from the gear table's default {default.model_dump()}, "
                              f"but the exit settings set {set_here}; unset them (ELBERT_EXIT__*), or "
                              "regenerate gears.json for this model, or set adaptive.enabled=false")
        return cls(settings, table, gear=gear, clock=clock)

    @property
    def gear(self) -> int:
        return self.controller.gear

    def exit_of(self, gear: int) -> ExitSettings:
        return self.table.gears[gear].exit

    def update(self, signals: Callable[[], LoadSignals]) -> GearChange | None:
        """At most every ``UPDATE_EVERY_S``: read ``signals()``, step the controller; the change to
        apply when the gear moved, else None."""
        now = self.clock()
        if now - self._checked_at < UPDATE_EVERY_S:
            return None
        self._checked_at = now
        before = self.controller.gear
        after = self.controller.update(signals(), now)
        if after == before:
            return None
        self.num_shifts += 1
        self.trace.append((now, after))
        return GearChange(after, self.exit_of(after))

    def describe(self) -> dict[str, Any]:
        """For ``/stats``: the gear now, the usable gears and the recent shifts (monotonic seconds)."""
        return {
            "enabled": True, "gear": self.gear, "num_shifts": self.num_shifts,
            "gears": [{**g.to_dict(), "loss_points": self.table.loss_points(i)}
                      for i, g in enumerate(self.table.gears)],
            "excluded_by_budget": len(self.full_table) - len(self.table),
            "trace": [{"at_s": t, "gear": g} for t, g in list(self.trace)],
        }


class ExitGears:
    """A worker's exit gear: its fixed exit settings (gear 0), or an :class:`AdaptiveExit` shifting
    gears. ``apply`` is the engine's ``set_exit_settings`` (takes effect at its next step). ``update``
    is the loop thread's hook (call it before each engine step: then ``gear`` is the gear of that step);
    ``set_exit``, ``configure`` and ``describe`` may be called from any thread."""

    def __init__(self, apply: Callable[[ExitSettings], None], exit_settings: ExitSettings,
                 settings: AdaptiveSettings, model_path: str | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._apply, self._exit, self._model_path, self._clock = apply, exit_settings, model_path, clock
        self._lock = threading.Lock()
        self.adaptive = AdaptiveExit.from_settings(settings, model_path, exit_settings, clock=clock)
        self.gear = 0

    def set_exit(self, exit_settings: ExitSettings) -> None:
        """New fixed exit settings; ConfigError while adaptive exit is on (it sets them)."""
        with self._lock:
            if self.adaptive is not None:
                raise ConfigError("adaptive exit is on and sets the exit thresholds (its gears); turn it off "
                                  "(adaptive.enabled=false) before setting exit thresholds by hand")
            self._apply(exit_settings)
            self._exit = exit_settings

    def configure(self, settings: AdaptiveSettings) -> None:
        """Adaptive exit on, off or retuned (target, budget) live; a gear the new budget excludes
        falls back to the fastest one left, off falls back to gear 0. Raises ConfigError as
        ``AdaptiveExit.from_settings`` does (then nothing changes)."""
        with self._lock:
            new = AdaptiveExit.from_settings(settings, self._model_path, self._exit, gear=self.gear,
                                             clock=self._clock)
            self.adaptive = new
            self._shift(new.gear if new is not None else 0)

    def update(self, signals: Callable[[], LoadSignals]) -> None:
        """The loop's hook: one (rate-limited) controller update; a new gear is applied at once."""
        adaptive = self.adaptive
        change = adaptive.update(signals) if adaptive is not None else None
        if change is not None:
            with self._lock:
                if adaptive is self.adaptive:  # not replaced by configure meanwhile
                    self._shift(change.index)

    def _shift(self, gear: int) -> None:
        if gear != self.gear or self.adaptive is None:
            self._apply(self.adaptive.exit_of(gear) if self.adaptive is not None else self._exit)
        self.gear = gear

    def describe(self) -> dict[str, Any]:
        adaptive = self.adaptive
        return adaptive.describe() if adaptive is not None else {"enabled": False, "gear": 0}
