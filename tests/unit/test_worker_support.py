"""Pure pieces of the worker: per-text tokenizer failures, synchronous classify jobs, loop rates."""

from __future__ import annotations

import threading

import pytest

from elbert_stream.errors import BadMessage
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.offsets import TopicPartition
from elbert_stream.stream.sync_jobs import SyncJob, tokenize_each
from elbert_stream.types import EngineStats, Prediction


def fake_tokenize(texts: list[str]) -> list[list[int]]:
    if any("\x00" in t for t in texts):
        raise ValueError("NUL byte")
    return [[101, len(t), 102] for t in texts]


def test_tokenize_each_isolates_the_bad_text() -> None:
    out = tokenize_each(fake_tokenize, ["ab", "c\x00d", "efg"])
    assert out[0] == [101, 2, 102] and out[2] == [101, 3, 102]
    assert isinstance(out[1], BadMessage) and out[1].reason == "tokenizer_error" and "NUL" in out[1].detail
    assert tokenize_each(fake_tokenize, []) == []


def _pred(i: int, depth: int = 1) -> Prediction:
    return Prediction(request_id=f"r{i}", label="x", label_index=0, probabilities=[1.0], exit_depth=depth,
                      exit_reason="max_depth", trace=[], queue_s=0.0, compute_s=0.0)


def test_sync_job_waits_for_every_result_in_order() -> None:
    job = SyncJob(["a", "b"])
    threading.Timer(0.05, lambda: (job.set(1, _pred(1)), job.set(0, _pred(0)))).start()
    assert [p.request_id for p in job.wait(5)] == ["r0", "r1"]


def test_sync_job_failure_and_timeout() -> None:
    job = SyncJob(["a", "b"])
    job.fail(BadMessage("too_long", "3 ids"), 1)
    with pytest.raises(BadMessage, match="text 1: 3 ids"):
        job.wait(1)
    with pytest.raises(TimeoutError):
        SyncJob(["a"]).wait(0.01)


def test_loop_stats_rates_and_snapshot() -> None:
    loop = LoopStats(num_layers=3)
    start = loop.snapshot()
    assert start["exit_depth_counts"] == [0, 0, 0] and start["arrival_rate_msgs_per_s"] == 0.0
    loop.arrived(50)
    loop.finished([_pred(i) for i in range(20)])
    t0 = loop._window[0]
    stats = EngineStats(mode="continuous", max_slots=4, num_layer_rows=300, exit_depth_counts=[5, 10, 5],
                        busy_depth_counts=[1, 2, 0], num_busy=3, num_waiting=7)
    loop.set_engine(stats, t0 + 2.0, busy_s=0.5)
    loop.set_lag({TopicPartition("in", 1): 4, TopicPartition("in", 0): None}, 8, t0 + 2.0)
    snap = loop.snapshot()
    assert snap["arrival_rate_msgs_per_s"] == pytest.approx(25.0)
    assert snap["finished_rate_msgs_per_s"] == pytest.approx(10.0)
    assert snap["layer_steps_per_s"] == pytest.approx(150.0)
    assert snap["engine_busy_fraction"] == pytest.approx(0.25)  # 0.5 busy s in a 2 s window
    assert snap["layer_steps_per_busy_s"] == pytest.approx(600.0)  # 300 rows in 0.5 busy s
    assert snap["busy_depth_counts"] == [1, 2, 0] and snap["num_waiting"] == 7
    assert snap["lag_per_partition"] == {"in[0]": None, "in[1]": 4}
    assert (snap["num_partitions_assigned"], snap["total_input_partitions"]) == (2, 8)


def test_recent_exit_histogram_follows_a_policy_change() -> None:
    """The autoscaler's E[D] comes from the decayed histogram: after 2,000 depth-1 exits and then
    1,000 at depth 3, the cumulative mean is still 1.67 but the recent one is above 2.5."""
    from elbert_stream.load import build_replica_report, mean_exit_depth
    from elbert_stream.stream.loop_stats import RECENT_HALF_LIFE_MSGS

    loop = LoopStats(num_layers=3)
    loop.finished([_pred(i, 1) for i in range(2000)])
    recent = loop.snapshot()["recent_exit_depth_counts"]
    decay = 0.5 ** (1 / RECENT_HALF_LIFE_MSGS)  # a geometric sum of 2,000 weights
    assert recent[0] == pytest.approx((1 - decay ** 2000) / (1 - decay)) and recent[1:] == [0, 0]
    loop.finished([_pred(i, 3) for i in range(1000)])
    snap = loop.snapshot()
    assert mean_exit_depth(snap["recent_exit_depth_counts"]) > 2.5  # 2 half-lives: 80 % at depth 3
    assert mean_exit_depth([2000, 0, 1000]) < 1.7
    stats = {**snap, "exit_depth_counts": [2000, 0, 1000]}
    assert build_replica_report(stats, 0.0)["mean_exit_depth"] > 2.5
