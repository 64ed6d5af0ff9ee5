"""``elbert-stream evaluate`` / ``classify`` on a tiny random model, and the frontier helpers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_elbert import LABELS, save_tiny_model_dir, write_labelled_jsonl

from elbert_stream.cli import main
from elbert_stream.config import EngineSettings
from elbert_stream.engine.classify import classify_texts
from elbert_stream.engine.engine import Engine
from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.engine.policy import POLICIES, ExitPolicy, exit_depths_offline
from elbert_stream.training.evaluate import frontier
from elbert_stream.training.scoring import PolicyScore, all_depth_probs, choose_exit_defaults, encode
from elbert_stream.types import Prediction


@pytest.fixture()
def tiny_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "model", num_layers=4, pooling="mean")


def test_evaluate_writes_required_json_markdown_and_plots(tiny_dir, tmp_path) -> None:
    test = write_labelled_jsonl(tmp_path / "test.jsonl", n=24, seed=1)
    val = write_labelled_jsonl(tmp_path / "val.jsonl", n=18, seed=2)
    out = tmp_path / "results"
    rc = main(
        ["evaluate", "--threads", "1", "--model", str(tiny_dir), "--data", str(test), "--val-data", str(val),
         "--out", str(out)]
    )
    assert rc == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert report["command"].startswith("elbert-stream ") and "evaluate" in report["command"]
    assert 0.0 <= report["full_depth_accuracy"] <= 1.0 and report["n_test"] == 24 and report["n_val"] == 18
    assert set(report["policies"]) == set(POLICIES)
    for name, p in report["policies"].items():
        assert {"thresholds", "accuracy", "mean_exit_depth", "speedup", "exit_depth_histogram"} <= set(p), (
            name
        )
        assert sum(p["exit_depth_histogram"]) == 24 and 1.0 <= p["mean_exit_depth"] <= 4.0
        assert p["speedup"] == pytest.approx(4 / p["mean_exit_depth"])
    assert report["policies"]["none"]["mean_exit_depth"] == 4.0
    assert report["policies"]["none"]["accuracy"] == report["full_depth_accuracy"]
    base = report["baselines"]
    assert base["hf_encoder_vs_full_depth_max_abs_prob_diff"] < 1e-5  # HF's encoder = our L applications
    assert "hf_albert_for_sequence_classification_accuracy" in base
    cmp = report["comparison"]
    assert [b["label"] for b in cmp["budgets"]][:3] == [f"{n}x fewer layers" for n in (2, 3, 4)]
    assert set(cmp["curves"]) == {"confidence_window", "entropy", "patience", "pcee"}
    assert "## Exit rules at equal budgets" in (out / "accuracy.md").read_text()
    assert "| confidence_window |" in (out / "accuracy.md").read_text()
    for png in ("accuracy_vs_depth.png", "exit_depth_histogram.png", "confidence_trajectories.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_hf_baseline_equals_full_depth_for_cls_pooling(tmp_path) -> None:
    from elbert_stream.training.evaluate import hf_baseline

    model = ElbertModel.from_pretrained(save_tiny_model_dir(tmp_path / "m", num_layers=3, pooling="cls"))
    ids, mask = encode(load_tokenizer(tmp_path / "m"), ["market shares", "a goal in the match today"], 16)
    probs = all_depth_probs(model, ids, mask)
    labels = probs[-1].argmax(-1)
    base = hf_baseline(model, ids, mask, labels, probs[-1])
    assert base["hf_albert_for_sequence_classification_accuracy"] == 1.0  # same predictions as ours


def test_classify_json_lines_from_stdin(tiny_dir, capsys, monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("market shares rose\n\nthe film music\n"))
    assert main(["classify", "--json", "--model", str(tiny_dir), "--policy", "none"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    for obj in lines:
        assert obj["label"] in LABELS and obj["exit_depth"] == 4 and obj["exit_reason"] == "max_depth"
        assert len(obj["trace"]) == 4 and len(obj["probabilities"]) == 3
        assert sum(obj["probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_classify_on_the_engine_matches_offline_policy(tiny_dir) -> None:
    """classify runs on the Engine: 2 slots for 3 texts (a slot is refilled), in input order."""
    model, tok = ElbertModel.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    texts = ["market shares vote", "goal match", "phone chip film music party"]
    probs = all_depth_probs(model, *encode(tok, texts, 32))  # [L, N, K]
    for policy in (
        ExitPolicy.of("patience", 4, patience=1),
        ExitPolicy.of("confidence_window", 4, tau=0.9, window=2),
    ):
        depth, _ = exit_depths_offline(policy, probs)
        engine = Engine(model, policy, EngineSettings(max_slots=2, max_queue=2), max_length=32, tokenizer=tok)
        preds = classify_texts(engine, texts)
        for i, pred in enumerate(preds):
            assert isinstance(pred, Prediction) and pred.meta == i
            assert pred.exit_depth == int(depth[i]) and len(pred.trace) == pred.exit_depth
            assert pred.label_index == int(probs[depth[i] - 1, i].argmax())
            assert pred.probabilities == pytest.approx(probs[depth[i] - 1, i].tolist(), abs=1e-5)


def test_classify_refuses_bad_exit_flags_with_a_message(tiny_dir, capsys) -> None:
    assert main(["classify", "--model", str(tiny_dir), "--tau", "1.5", "market shares"]) == 1
    err = capsys.readouterr().err
    assert "ConfigError" in err and "tau" in err


def test_classify_reads_the_model_path_from_settings(tiny_dir, tmp_path, capsys, monkeypatch) -> None:
    """Every command reads the same Settings: ELBERT_MODEL__PATH picks the model; a path that does
    not exist is refused, never answered by the shipped model."""
    monkeypatch.setenv("ELBERT_MODEL__PATH", str(tiny_dir))
    assert main(["classify", "--json", "market shares"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in LABELS  # the tiny model's labels, not BBC's
    monkeypatch.setenv("ELBERT_MODEL__PATH", str(tmp_path / "missing"))
    assert main(["classify", "market shares"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "ModelLoadError" in captured.err and "missing" in captured.err


def test_text_output_names_label_and_depth(tiny_dir, capsys) -> None:
    assert main(["classify", "--model", str(tiny_dir), "market shares"]) == 0
    out = capsys.readouterr().out
    assert "exit_depth=" in out and out.split("\t")[0] in LABELS


def test_frontier() -> None:
    def s(depth: float, acc: float) -> PolicyScore:
        return PolicyScore({}, acc, depth, 12 / depth, [], {})

    front = frontier([s(2, 0.8), s(3, 0.9), s(3, 0.85), s(4, 0.88), s(6, 0.95)])
    assert front == [(2, 0.8), (3, 0.9), (6, 0.95)]


def test_choose_exit_defaults_respects_loss_budget() -> None:
    # 3 depths, 4 samples: depth 1 confidently wrong on the last sample, depths 2-3 all right
    labels = torch.tensor([0, 1, 0, 1])
    probs = torch.zeros(3, 4, 2)
    probs[..., 0] = torch.tensor(
        [[0.95, 0.05, 0.95, 0.9], [0.95, 0.05, 0.95, 0.05], [0.95, 0.05, 0.95, 0.05]]
    )
    probs[..., 1] = 1 - probs[..., 0]
    _, strict = choose_exit_defaults(probs, labels, max_loss_points=0.0)
    assert strict.accuracy == 1.0 and strict.mean_exit_depth == pytest.approx(1.25)
    _, loose = choose_exit_defaults(probs, labels, max_loss_points=30.0)
    assert loose.mean_exit_depth == 1.0 and loose.accuracy == 0.75


def test_choose_exit_defaults_falls_back_to_most_accurate_when_budget_unreachable() -> None:
    # L=4; sample 2 is confidently wrong at depths 1-3 and right only at 4: every entropy setting
    # (min_depth <= 3) exits it early, so none is within 0 points of full depth (100%)
    labels = torch.tensor([0, 0])
    probs = torch.zeros(4, 2, 2)
    probs[..., 0] = torch.tensor([[0.9995, 0.0005], [0.9995, 0.0005], [0.9995, 0.0005], [0.9995, 0.9995]])
    probs[..., 1] = 1 - probs[..., 0]
    d, score = choose_exit_defaults(probs, labels, max_loss_points=0.0, policy="entropy")
    assert d.policy == "entropy" and score.accuracy == 0.5 and score.mean_exit_depth == 1.0


@pytest.fixture()
def trained_dir(tmp_path):
    """A tiny model dir with the split.json of a run on data.jsonl (60 rows: 48/6/6)."""
    from elbert_stream.training.splits import DataSpec, load_splits

    path = save_tiny_model_dir(tmp_path / "trained", num_layers=4, pooling="mean")
    data = write_labelled_jsonl(tmp_path / "data.jsonl", n=60, seed=5)
    load_splits(DataSpec(data=str(data))).write(path / "split.json", seed=1234)
    return path, data


def _evaluate(*args: str) -> int:
    return main(["evaluate", "--no-plots", "--threads", "1", *args])


def test_evaluate_defaults_to_the_models_own_held_out_split(trained_dir, tmp_path) -> None:
    model_dir, data = trained_dir
    for extra in ([], ["--data", str(data)]):  # the training file itself also means its held-out split
        assert _evaluate("--model", str(model_dir), "--out", str(tmp_path / "r"), *extra) == 0
        report = json.loads((tmp_path / "r" / "accuracy.json").read_text())
        assert report["n_test"] == 6 and report["n_val"] == 6
        assert report["data"]["test"].startswith("held-out test split of ")


def test_evaluate_refuses_rows_the_model_trained_on(trained_dir, tmp_path, capsys, caplog) -> None:
    model_dir, data = trained_dir
    val = write_labelled_jsonl(tmp_path / "val.jsonl", n=6, seed=99)
    args = ["--model", str(model_dir), "--data", str(data), "--val-data", str(val),
            "--out", str(tmp_path / "r")]
    assert _evaluate(*args) == 1
    err = capsys.readouterr().err
    assert "DataError" in err and "48 of the 60 test rows" in err and "--allow-training-rows" in err
    assert not (tmp_path / "r").exists()
    assert _evaluate(*args, "--allow-training-rows") == 0
    report = json.loads((tmp_path / "r" / "accuracy.json").read_text())
    assert report["data"]["training_rows_scored"]["test"] == 48 and "OVERSTATE" in caplog.text


def test_evaluate_without_data_needs_the_models_split(tiny_dir, tmp_path, capsys) -> None:
    assert _evaluate("--model", str(tiny_dir), "--out", str(tmp_path / "r")) == 1
    assert "has no split.json" in capsys.readouterr().err


def test_evaluate_without_matplotlib_skips_plots_with_a_warning(
    trained_dir, tmp_path, monkeypatch, caplog
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "r"
    assert main(["evaluate", "--threads", "1", "--model", str(trained_dir[0]), "--out", str(out)]) == 0
    assert (out / "accuracy.json").is_file() and (out / "accuracy.md").is_file()
    assert not list(out.glob("*.png")) and "matplotlib is not installed: no plots" in caplog.text


def test_evaluate_over_several_models_summarises_them(tmp_path) -> None:
    """One model per training seed: each evaluated on its own held-out split, then summarised."""
    from elbert_stream.training.splits import DataSpec, load_splits

    dirs = []
    for seed in (0, 1):
        path = tmp_path / f"seed{seed}"
        model = ElbertModel.from_pretrained(save_tiny_model_dir(path, num_layers=4, pooling="mean"))
        torch.manual_seed(seed)
        with torch.no_grad():  # another "training seed": another head
            model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
        model.extras.name = f"seed{seed}"
        model.save_pretrained(path, tokenizer=load_tokenizer(path))
        data = write_labelled_jsonl(tmp_path / f"data{seed}.jsonl", n=60, seed=5 + seed)
        load_splits(DataSpec(data=str(data))).write(path / "split.json", seed=1234)
        dirs += ["--model", str(path)]
    out = tmp_path / "r"
    assert _evaluate(*dirs, "--out", str(out)) == 0
    per = [json.loads((out / f"seed{s}" / "accuracy.json").read_text()) for s in (0, 1)]
    summary = json.loads((out / "accuracy_seeds.json").read_text())
    assert summary["n_models"] == 2 and summary["models"] == ["seed0 v0", "seed1 v0"]
    full = [r["full_depth_accuracy"] for r in per]
    assert summary["full_depth_accuracy"]["mean"] == pytest.approx(sum(full) / 2)
    assert summary["full_depth_accuracy"]["min"] == min(full)
    two_x = summary["budgets"][0]["rules"]["entropy"]
    accs = [r["comparison"]["budgets"][0]["rules"]["entropy"]["accuracy"] for r in per]
    assert two_x["n"] == 2 and two_x["accuracy"]["max"] == max(accs)
    assert "| 2x fewer layers |" in (out / "accuracy_seeds.md").read_text()


def test_evaluate_refuses_labels_the_model_does_not_have(tiny_dir, tmp_path, capsys) -> None:
    other = write_labelled_jsonl(tmp_path / "other.jsonl", n=20, seed=3, label_key="label")
    other.write_text(other.read_text().replace('"alpha"', '"omega"'))
    assert _evaluate("--model", str(tiny_dir), "--data", str(other), "--out", str(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "DataError: data labels ['omega'] are not among the model's labels" in err


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_evaluate_scores_a_layer_precision_against_float32(tiny_dir, tmp_path, precision: str) -> None:
    test = write_labelled_jsonl(tmp_path / "test.jsonl", n=24, seed=1)
    val = write_labelled_jsonl(tmp_path / "val.jsonl", n=18, seed=2)
    out = tmp_path / "results"
    rc = main(["evaluate", "--model", str(tiny_dir), "--data", str(test), "--val-data", str(val), "--out",
               str(out), "--no-plots", "--precision", precision])
    assert rc == 0
    report = json.loads((out / "accuracy.json").read_text())
    got = report["precision"]["model_defaults"]
    assert report["precision"]["mode"] == precision
    assert 0.0 < got["max_abs_prob_diff"] < 0.05  # the mode ran (not fp32) and stayed close
    assert 0.0 <= got["exit_depth_agreement"] <= got["exit_depth_within_one"] <= 1.0
    assert got["label_agreement"] >= 0.9 and 1.0 <= got["mean_exit_depth"] <= 4.0
    assert f"Layer precision {precision} vs float32" in (out / "accuracy.md").read_text()
