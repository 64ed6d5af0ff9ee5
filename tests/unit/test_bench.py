"""The engine benchmark's code on a tiny random model: seconds, so the benchmark cannot rot.

Timings are never asserted (they are what the benchmark measures); structure, exit-depth
bookkeeping, the replay rule and the virtual-time latency arithmetic are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_elbert import torch_threads

from bench import engine_bench as E
from bench import harness as H
from elbert_stream.cli import build_parser
from elbert_stream.engine.policy import EXIT_MAX_DEPTH, ExitState
from elbert_stream.errors import ConfigError
from elbert_stream.types import Prediction, Request

HIST = [1, 3, 2, 0, 0, 1]  # tiny model: L = 6


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def test_replay_sequence_matches_histogram_exactly() -> None:
    seq = H.replay_sequence([10, 0, 30, 60], 1000, seed=3)
    assert seq.shape == (1000,)
    assert torch.bincount(seq, minlength=5)[1:].tolist() == [100, 0, 300, 600]
    assert torch.bincount(seq[:100], minlength=5)[1:].tolist() == [10, 0, 30, 60]  # every block exact
    assert not torch.equal(seq, torch.sort(seq).values)  # shuffled, not sorted
    big = H.replay_sequence([1, 2] * 400, 600, block=512)  # blocks of 512 from a total of 1200
    assert torch.bincount(big[:512], minlength=801)[1:].sum() == 512


def test_replay_policy_exits_fresh_rows_at_their_drawn_depth() -> None:
    policy = H.ReplayPolicy([0, 1], num_layers=4)  # every request exits at depth 2
    probs = torch.full((3, 5), 0.2)
    state = ExitState.empty(3)
    first = policy.decide(probs, torch.tensor([1, 1, 1]), state)
    assert not first.exit.any()
    second = policy.decide(probs, torch.tensor([2, 2, 2]), first.state)
    assert second.exit.all()
    late = H.ReplayPolicy([0, 0, 0, 0, 0, 0, 1], num_layers=4)  # depth 7 is clipped to L = 4
    dec = late.decide(probs, torch.tensor([4, 4, 4]), ExitState.empty(3))
    assert dec.exit.all() and (dec.reason == EXIT_MAX_DEPTH).all()
    assert late.mean_depth == 4.0


def test_depth_histogram_file(tmp_path: Path) -> None:
    (tmp_path / "h.json").write_text(json.dumps({"exit_depth_histogram": [2, 5]}))
    assert H.load_depth_histogram(tmp_path / "h.json") == [2, 5]
    (tmp_path / "bad.json").write_text(json.dumps({"exit_depth_histogram": [-1]}))
    with pytest.raises(ConfigError, match="non-negative"):
        H.load_depth_histogram(tmp_path / "bad.json")


class OneAtATime:
    """A fake engine serving one request per step; each step takes 1 s on a fake clock."""

    def __init__(self) -> None:
        self.queue: list[Request] = []
        self.now = 0.0

    def add(self, request: Request) -> bool:
        self.queue.append(request)
        return True

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Prediction]:
        self.now += 1.0
        r = self.queue.pop(0)
        return [Prediction(r.request_id, "x", 0, [1.0], 1, "max_depth", [], 0.0, 0.0)]


def test_simulate_stream_latency_is_queueing_plus_steps() -> None:
    engine = OneAtATime()
    # all 99 requests arrive within nanoseconds: the i-th waits for i steps and takes one
    out = H.simulate_stream(engine, [[1]] * 99, rate_per_s=1e9, clock=lambda: engine.now)
    assert out["p50_ms"] == pytest.approx(50_000, abs=1)
    assert out["p99_ms"] == pytest.approx(98_020, abs=1)
    assert out["utilisation"] == pytest.approx(1.0, abs=1e-6)


def test_engine_bench_tiny_end_to_end(tmp_path: Path, one_thread: None) -> None:
    (tmp_path / "hist.json").write_text(json.dumps(HIST))
    opts = E.BenchOptions(size="tiny", replay=True, replay_from=str(tmp_path / "hist.json"), batches=[4],
                          max_length=24, min_samples=48, rounds=2, samples_per_slot=2, stream_requests=24,
                          full_depth_batches=6, single_samples=16, out_dir=tmp_path, command="test")
    unique = H.synthetic_token_ids(24, 120, (6, 20))
    doc = E.run_engine_bench(opts, unique=unique)
    saved = json.loads((tmp_path / "engine.json").read_text())
    assert saved["command"] == "test" and "Engine benchmark" in (tmp_path / "engine.md").read_text()
    v = saved["variants"]
    assert set(v) == set("abcdef") | {"f_bf16", "f_int8", "ort_fp32", "ort_int8"}
    assert v["ort_fp32"]["num_samples"] == v["ort_int8"]["num_samples"] == v["b"]["num_samples"] == 24
    agree = saved["runs"][0]["agreement"]
    assert agree["ort_fp32"]["label_agreement"] >= 0.9  # the same fp32 function as (b), exported
    for mode in ("f_bf16", "f_int8"):  # replayed exits: depths follow the replay, not the precision
        assert agree[mode]["num_inputs"] == 48 and agree[mode]["exit_depth_agreement"] == 1.0
    names = {t["name"] for t in doc["targets"]}
    assert any("ONNX Runtime int8" in n for n in names) and any("labels >= 98 %" in n for n in names)
    assert "| (ort_int8) | (b) |" in (tmp_path / "engine.md").read_text()
    assert v["a"]["mean_exit_depth"] == v["b"]["mean_exit_depth"] == 6
    assert (v["f"]["num_samples"], v["a"]["num_samples"], v["e"]["num_samples"]) == (48, 24, 16)
    mean = sum((d + 1) * c for d, c in enumerate(HIST)) / sum(HIST)
    for name in "cdf":  # replayed depths: an unbiased sample of 48 from the histogram (sd ~0.2)
        assert v[name]["mean_exit_depth"] == pytest.approx(mean, abs=0.6)
    assert v["c"]["layer_steps_per_s"] * v["c"]["elapsed_s"] >= 48 * v["c"]["mean_exit_depth"]  # naive wastes
    for load in ("50%", "80%"):
        for name in "cdf":
            s = saved["streaming"][load][name]
            assert 0 < s["p50_ms"] <= s["p99_ms"]
    assert {t["name"] for t in doc["targets"]} >= {"(f) >= 0.9 x ideal", "(f) >= 3 x (e)"}
    cost = doc["runs"][0]["layer_row_cost"]
    assert cost["ms_per_row_at_1"] > 0 and cost["ms_per_row_at_4"] > 0
    assert cost["batching_gain"] == pytest.approx(cost["ms_per_row_at_1"] / cost["ms_per_row_at_4"])
    assert "batching gain" in (tmp_path / "engine.md").read_text()


def test_random_model_without_replay_is_refused() -> None:
    with pytest.raises(ConfigError, match="--replay"):
        E.build_setup(E.BenchOptions(size="tiny"), unique=[[5, 6, 7]])


def test_bench_cli_parses_every_part() -> None:
    parser = build_parser("bench")
    args = parser.parse_args(["bench", "engine", "--quick", "--batch", "8,16", "--replay", "--size", "base"])
    args.command_line = "elbert-stream bench engine"
    opts = E.options_from_args(args)
    assert opts.batches == [8, 16] and opts.rounds == 1 and opts.size == "base"
    assert parser.parse_args(["bench", "all", "--quick"]).quick


def test_targets_compare_measured_ratios_with_the_bars() -> None:
    from bench import report as bench_report

    speeds = {"a": 10.0, "b": 11.0, "c": 20.0, "d": 50.0, "e": 30.0, "f": 60.0}
    run = {"variants": {v: {"samples_per_s": s} for v, s in speeds.items()}, "ideal_samples_per_s": 70.0,
           "streaming": {"80%": {"c": {"p99_ms": 400.0}, "d": {"p99_ms": 100.0}, "f": {"p99_ms": 80.0}}}}
    cpu = {t["name"]: (round(t["value"], 3), t["met"]) for t in bench_report.targets(run, "cpu")}
    assert cpu == {"(f) >= 0.9 x ideal": (0.857, False), "(f) >= 1.5 x (c)": (3.0, True),
                   "(f) >= 3 x (e)": (2.0, False), "p99 (f) <= 0.5 x p99 (c) at 80% load": (0.2, True),
                   "p99 (f) <= 0.5 x p99 (d) at 80% load": (0.8, False)}
    gpu = {t["name"]: t["met"] for t in bench_report.targets(run, "cuda")}
    assert gpu == {"(f) >= 1.3 x (d)": False, "(f) >= 0.8 x ideal": True}


def test_padding_bench_pads_the_same_tokens_two_ways() -> None:
    from bench.train_padding import _batches, _markdown

    seqs = [[101, 5, 102], [101, 5, 6, 7, 102], [101, 102], [101, 9, 9, 102]]
    batches = _batches(seqs, batch_size=2, pad_id=0, width=8)
    assert len(batches) == 2 and batches[0]["tokens"] == 8
    own, whole = batches[0]["batch"], batches[0]["set"]
    assert own[0].shape == (2, 5) and whole[0].shape == (2, 8)
    torch.testing.assert_close(whole[0][:, :5], own[0])  # the same ids, more padding
    assert whole[1].sum() == own[1].sum() == 8  # the same real tokens
    r = {"command": "x", "examples": 4, "batch_size": 2, "steps_each": 2, "threads": 1, "machine": "cpu",
         "median_step_s": {"batch": 1.0, "set": 2.0}, "mean_step_s": {"batch": 1.0, "set": 2.0},
         "token_slots": {"batch": 18, "set": 32}, "slot_use": {"batch": 0.8, "set": 0.5},
         "set_width_tokens": 8, "speedup_median": 2.0}
    assert "**2.00x** faster" in _markdown(r) and "shared with other agents" in _markdown(r)


def _adaptive_raw(gear: int, slow_ms: float) -> dict[str, Any]:
    """A synthetic run: 61 sent at 2/s, ids 20..39 (the burst) slow, id 60 lost, id 0 answered twice."""
    from types import SimpleNamespace

    def rec(i: int) -> SimpleNamespace:
        return SimpleNamespace(id=i, end_to_end_ms=slow_ms if 20 <= i < 40 else 10.0, label="a",
                               gear=gear if 20 <= i < 50 else 0, exit_depth=1,
                               produced_ms=(100 + i / 2) * 1e3)

    records = [rec(i) for i in range(60)] + [rec(0)]
    timeline = [{"t_s": k / 2, "outstanding": 50 if 20 <= k < 50 else 0, "gear": gear if 20 <= k < 50 else 0}
                for k in range(120)]
    return {"start_s": 100.0, "sent": {i: 100 + i / 2 for i in range(61)}, "records": records,
            "timeline": timeline, "dead_letters": 0, "error": None, "capacity": 10.0}


def test_adaptive_bench_figures_from_synthetic_runs(tmp_path: Path) -> None:
    """``bench adaptive``'s arithmetic: windows by send time, loss, return-to-default, targets, files."""
    from types import SimpleNamespace

    from bench import adaptive_report as A

    args = SimpleNamespace(base_s=10.0, burst_s=10.0, base_load=0.5)
    gold, full = ["a", "b"], ["a", "a"]
    fixed = A.summarise(_adaptive_raw(0, 900.0), gold, full, args)
    adaptive = A.summarise(_adaptive_raw(2, 100.0), gold, full, args)
    assert fixed["burst"]["messages"] == 20 and fixed["burst"]["p99_ms"] == 900.0
    assert fixed["lost"] == 1 and fixed["duplicates"] == 1
    assert fixed["overall"]["accuracy"] == 0.5 and fixed["overall"]["consistency"] == 1.0
    assert fixed["back_to_default_after_burst_s"] == 0.0 and adaptive["back_to_default_after_burst_s"] == 5.0
    assert adaptive["drained_after_burst_s"] == 5.0 and adaptive["burst"]["gears"] == {2: 20}
    settings = {**vars(args), "after_s": 5.0, "burst_load": 2.0, "rounds": 1}
    doc = {"command": "x", "capacity_msgs_per_s": 10.0, "phases": [], "settings": settings,
           "adaptive_settings": {"max_accuracy_loss_points": 1.5},
           "runs": {"fixed": [fixed], "adaptive": [adaptive]}}
    paths = A.write_results(doc, tmp_path)
    assert [t["met"] for t in doc["targets"]] == [True, True, False, True]  # p99, accuracy, lost, return
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| p99 end-to-end, burst (ms) | 900 | 100 | 0.11 |" in paths[1].read_text()
