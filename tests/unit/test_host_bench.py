"""``bench host``'s report from a made-up result document (the measurements need a broker: they run in
``elbert-stream bench host --quick``); the arithmetic and the table cannot rot unseen."""

from __future__ import annotations

from bench import host_bench as H
from elbert_stream.cli import build_parser


def _doc() -> dict:
    stage = {"busy_s": 0.5, "items": 100, "dropped_revoked": 0}
    run = {"msgs_per_s": 50.0, "seconds": 2.0, "engine_step_s": 1.0, "engine_steps": 10, "stages": {}}
    row = {"bare": {"msgs_per_s": 100.0, "seconds": 1.0, "busy_s": {"poll": 0.5, "produce": 0.25}},
           "worker_tiny": {**run, "stages": {"engine": stage}}, "worker_shipped": run,
           "worker_instant": {**run, "msgs_per_s": 90.0},
           "engine_alone": {"msgs_per_s": 40.0, "msgs_per_s_with_tokenize": 38.0},
           "engine_alone_tiny": {"msgs_per_s": 80.0}}
    row["ratios"] = {"worker_tiny/bare": 0.5, "worker_shipped/engine_alone": 1.25,
                     "worker_tiny/engine_alone_tiny": 0.625, "worker_instant/bare": 0.9}
    return {"command": "elbert-stream bench host", "rounds": [row], "median": row["ratios"],
            "targets": H.TARGETS, "tiny_engine": {"max_slots": 256},
            "machine": {"note": "test", "torch_threads": 1, "device": "cpu", "partitions": 4}}


def test_instant_engine_answers_everything_at_its_first_step() -> None:
    from elbert_stream.types import Request

    engine = H.InstantEngine(lambda texts, **_: {"input_ids": [[1, 2]] * len(texts)}, max_queue=2)
    assert engine.tokenize(["a", "b"]) == [[1, 2], [1, 2]]
    assert engine.add(Request([1], meta="m0")) and engine.add(Request([1])) and not engine.add(Request([1]))
    preds = engine.step()
    assert [p.meta for p in preds] == ["m0", None] and not engine.has_work()
    assert engine.stats().num_steps == 1 and engine.stats().exit_depth_counts[0] == 2


def test_report_has_every_part_ratio_target_and_stage() -> None:
    md = H.markdown(_doc())
    assert "| 0 | 100.0 | 90.0 | 50.0 | 80.0 | 50.0 | 40.0 | 0.50 | 1.25 | 0.62 | 0.90 |" in md
    assert "**worker_tiny/bare = 0.50** (target >= 0.5)" in md
    assert "| worker_tiny | 2.00 | engine | 0.50 | 25% | 100 |" in md
    assert "| worker_shipped | 2.00 | engine step | 1.00 | 50% | 10 |" in md  # no stages: the step time
    assert "| (a) bare | 1.00 | poll | 0.50 | 50% | - |" in md


def test_host_is_a_bench_part() -> None:
    args = build_parser("bench").parse_args(["bench", "host", "--quick", "--rounds", "2"])
    assert args.rounds == 2 and args.quick and args.tiny_slots == 256
