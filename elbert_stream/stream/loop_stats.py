"""The worker loop's rate, exit-depth and lag bookkeeping: written by the loop thread, read by any
thread (``/stats``, telemetry, the autoscaler). No Kafka client and no torch here."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any

from elbert_stream.adaptive import LoadSignals
from elbert_stream.load import pending_layer_work
from elbert_stream.stream.offsets import TopicPartition
from elbert_stream.telemetry.summary import StatsSnapshot
from elbert_stream.types import Prediction

RATE_WINDOW_S = 1.0
RECENT_HALF_LIFE_MSGS = 500  # the autoscaler's exit histogram forgets with this half-life (messages)


class LoopStats:
    """Rates, the engine snapshot and lag, written by the loop thread and read by any thread."""

    def __init__(self, num_layers: int) -> None:
        self._lock = threading.Lock()
        self.num_layers = num_layers
        self.engine_at = 0.0
        self.lag_at = 0.0
        self._arrived = 0
        self._finished = 0
        self._recent_exits = [0.0] * num_layers  # exit-depth histogram decayed per finished message
        self._decay = 0.5 ** (1.0 / RECENT_HALF_LIFE_MSGS)
        self._engine: dict[str, Any] = {}
        self._lag: dict[TopicPartition, int | None] = {}
        self._total_partitions = 0
        self._window = (time.monotonic(), 0, 0, 0, 0.0)  # start, arrived, finished, layer rows, busy s
        self._rates = {"arrival_rate_msgs_per_s": 0.0, "finished_rate_msgs_per_s": 0.0,
                       "layer_steps_per_s": 0.0, "engine_busy_fraction": 0.0,
                       "layer_steps_per_busy_s": 0.0}

    def arrived(self, n: int) -> None:
        with self._lock:
            self._arrived += n

    def finished(self, preds: list[Prediction], *, default_gear: bool = True) -> None:
        """Count finished predictions; only those made at the default exit gear (``adaptive.py``) feed
        the recent exit-depth histogram, so the autoscaler counts pending work at the default gear's
        depths while a looser gear is active (adapting exits never hides the load)."""
        with self._lock:
            self._finished += len(preds)
            if not default_gear:
                return
            # each exit ages the histogram by one message: O(L + n) per batch, not O(L n)
            recent, n = self._recent_exits, len(preds)
            age = self._decay ** n
            for i in range(len(recent)):
                recent[i] *= age
            for k, p in enumerate(preds):
                recent[min(max(p.exit_depth, 1), len(recent)) - 1] += self._decay ** (n - 1 - k)

    def set_engine(self, stats: Any, now: float, busy_s: float = 0.0) -> None:
        """The engine's counters at ``now``; ``busy_s``: the engine thread's cumulative seconds of
        work (feeding and stepping the engine, not waiting for input). Per window they give
        ``engine_busy_fraction`` (busy seconds / wall seconds) and ``layer_steps_per_busy_s`` (what
        the engine does per second while it runs: its capacity at the batch occupancy it had)."""
        eng = asdict(stats)
        with self._lock:
            self.engine_at = now
            self._engine = eng
            start, arrived, finished, rows, busy = self._window
            dt = now - start
            if dt >= RATE_WINDOW_S:
                d_rows, d_busy = eng["num_layer_rows"] - rows, max(0.0, busy_s - busy)
                self._rates = {
                    "arrival_rate_msgs_per_s": (self._arrived - arrived) / dt,
                    "finished_rate_msgs_per_s": (self._finished - finished) / dt,
                    "layer_steps_per_s": d_rows / dt,
                    "engine_busy_fraction": min(1.0, d_busy / dt),
                    "layer_steps_per_busy_s": d_rows / d_busy if d_busy > 0 else 0.0,
                }
                self._window = (now, self._arrived, self._finished, eng["num_layer_rows"], busy_s)

    def set_lag(self, lag: dict[TopicPartition, int | None], total_partitions: int, now: float) -> None:
        with self._lock:
            self.lag_at = now
            self._lag = dict(lag)
            self._total_partitions = total_partitions

    def lag(self) -> dict[TopicPartition, int | None]:
        with self._lock:
            return dict(self._lag)

    def load_signals(self, backlog: int, backlog_head_s: float | None) -> LoadSignals:
        """What the exit-gear controller reads (``adaptive.LoadSignals``); ``backlog``: polled requests
        not yet in the engine, ``backlog_head_s``: the oldest one's arrival (monotonic)."""
        with self._lock:
            lags = [v for v in self._lag.values() if v is not None]
            queued = backlog + int(self._engine.get("num_waiting", 0))
            rate, busy = self._rates["finished_rate_msgs_per_s"], int(self._engine.get("num_busy", 0))
        oldest = None if backlog_head_s is None else time.monotonic() - backlog_head_s
        return LoadSignals(queued, sum(lags) if lags else None, oldest, rate, busy)

    def telemetry_snapshot(self, backlog: int, parked: int, held: int, gear: int) -> StatsSnapshot:
        """The ``telemetry.StatsSnapshot``: pending layer work at the default gear's exit depths
        (``finished``), the gauges, the exit gear in force."""
        s = self.snapshot()
        lag = {(tp.topic, tp.partition): v for tp, v in self.lag().items() if v is not None}
        pending = pending_layer_work(s["busy_depth_counts"], s["recent_exit_depth_counts"], s["num_waiting"],
                                     sum(lag.values()) if lag else None)
        return StatsSnapshot(busy_slots=s["num_busy"], queue_depth=s["num_waiting"] + backlog,
                             pending_layer_work=pending, layer_steps=s["engine"].get("num_layer_rows", 0),
                             consumer_lag=lag, parked_records=parked, held_partitions=held, exit_gear=gear)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            eng = dict(self._engine)
            zeros = [0] * self.num_layers
            return {
                **self._rates,
                "num_arrived": self._arrived,
                "num_finished": self._finished,
                "exit_depth_counts": list(eng.get("exit_depth_counts", zeros)),
                "recent_exit_depth_counts": list(self._recent_exits),
                "busy_depth_counts": list(eng.get("busy_depth_counts", zeros)),
                "num_busy": eng.get("num_busy", 0),
                "num_waiting": eng.get("num_waiting", 0),
                "max_slots": eng.get("max_slots", 0),
                "lag_per_partition": {f"{t}[{p}]": v for (t, p), v in sorted(self._lag.items())},
                "num_partitions_assigned": len(self._lag),
                "total_input_partitions": self._total_partitions,
                "engine": eng,
            }

