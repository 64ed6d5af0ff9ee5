"""``elbert-stream evaluate``: exit policies over threshold grids.

Probabilities at every depth are computed once (``[L, N, K]``) for a validation and a test
set; every policy (confidence_window, entropy, patience, none) is scored over its threshold grid
with ``engine.policy.exit_depths_offline``. Per policy, the thresholds are chosen on VALIDATION (the
fastest setting within ``--max-loss`` accuracy points of full depth) and reported on test; and
``compare.compare_rules`` puts every rule (PCEE-style too) under equal layer and loss budgets chosen
on validation, with paired bootstrap intervals on test. No headline number is chosen on test (the
per-policy ``frontier`` over the test grid is kept in the JSON as a description only).
Baselines: full depth, and transformers' own ``AlbertForSequenceClassification`` on the same weights.
Writes ``accuracy.json``, ``accuracy.md`` and PNG plots to ``--out``.

``elbert-stream classify`` (one-off texts through the engine) is ``engine/classify.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from elbert_stream.engine.model import ElbertModel, load_tokenizer, shipped_model_dir
from elbert_stream.engine.policy import POLICIES, ExitPolicy
from elbert_stream.engine.step import PRECISIONS
from elbert_stream.training.compare import compare_rules, comparison_markdown
from elbert_stream.training.data import DataError, Dataset
from elbert_stream.training.files import Columns
from elbert_stream.training.scoring import (
    PolicyScore,
    agreement,
    all_depth_probs,
    choose_exit_defaults,
    depth_accuracy,
    encode,
    policy_grid,
    score_policy,
)
from elbert_stream.training.splits import evaluation_sets

log = logging.getLogger(__name__)


# ---- data -----------------------------------------------------------------------------------
def _labels_for(model: ElbertModel, ds: Dataset) -> torch.Tensor:
    """Dataset labels re-indexed to the model's label order (by name)."""
    names = model.label_names
    try:
        return torch.tensor([names.index(ds.label_names[y]) for y in ds.labels])
    except ValueError as e:
        unknown = sorted(set(ds.label_names) - set(names))
        raise DataError(f"data labels {unknown} are not among the model's labels {names}; evaluate on data "
                        "labelled with the model's label names") from e


# ---- evaluation -----------------------------------------------------------------------------
def frontier(scores: list[PolicyScore]) -> list[tuple[float, float]]:
    """Pareto frontier (mean exit depth ascending, accuracy strictly rising) of ``scores``."""
    points = sorted({(s.mean_exit_depth, s.accuracy) for s in scores}, key=lambda p: (p[0], -p[1]))
    out: list[tuple[float, float]] = []
    for depth, acc in points:
        if not out or acc > out[-1][1]:
            out.append((depth, acc))
    return out


def evaluate_policies(
    model: ElbertModel,
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    max_loss_points: float,
) -> dict[str, Any]:
    """Per policy: thresholds chosen on val, their test scores, and the test frontier over the grid."""
    out: dict[str, Any] = {}
    full = float((test[0][-1].argmax(-1) == test[1]).float().mean())
    for name in POLICIES:
        defaults, val_score = choose_exit_defaults(*val, max_loss_points=max_loss_points, policy=name)
        policy = ExitPolicy.for_model(defaults, model.num_layers)
        s = score_policy(policy, *test)
        grid = [score_policy(p, *test) for p in policy_grid(name, model.num_layers)]
        out[name] = {
            "thresholds": policy.thresholds(),
            "val_accuracy": val_score.accuracy,
            "val_mean_exit_depth": val_score.mean_exit_depth,
            "accuracy": s.accuracy,
            "mean_exit_depth": s.mean_exit_depth,
            "speedup": s.speedup,
            "accuracy_loss_points": (full - s.accuracy) * 100,
            "exit_depth_histogram": s.histogram,
            "exit_reasons": s.reasons,
            "grid_size": len(grid),
            "frontier": [{"mean_exit_depth": d, "accuracy": a} for d, a in frontier(grid)],
        }
    return out


def hf_baseline(
    model: ElbertModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, full_probs: torch.Tensor
) -> dict[str, Any]:
    """transformers' AlbertForSequenceClassification on the same weights (its pooling is [CLS])."""
    hf = model.hf_model.eval()
    logits, hidden = [], []
    with torch.no_grad():
        for s in range(0, ids.shape[0], 64):
            out = hf(input_ids=ids[s : s + 64], attention_mask=mask[s : s + 64], output_hidden_states=True)
            logits.append(out.logits.float())  # [b, K]
            last = out.hidden_states[-1]  # [b, T, H]
            hidden.append(model.classify(last, mask[s : s + 64]).float().softmax(-1))  # [b, K]
    hf_probs = torch.cat(hidden)
    return {
        "hf_albert_for_sequence_classification_accuracy": float(
            (torch.cat(logits).argmax(-1) == labels).float().mean()
        ),
        "hf_pooling": "cls",
        "elbert_pooling": model.extras.pooling,
        "hf_encoder_with_elbert_head_accuracy": float((hf_probs.argmax(-1) == labels).float().mean()),
        "hf_encoder_vs_full_depth_max_abs_prob_diff": float((hf_probs - full_probs).abs().max()),
    }


def run_evaluation(
    model: ElbertModel,
    tokenizer: Any,
    val_set: Dataset,
    test_set: Dataset,
    max_length: int,
    max_loss_points: float,
    precision: str | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """All numbers for accuracy.json; also returns the test probabilities ``[L, N, K]``.

    ``precision`` (a layer precision mode): every score is of the engine's step compute in that mode,
    and ``report["precision"]`` compares it with the float32 reference on the test set."""
    v_ids, v_mask = encode(tokenizer, val_set.texts, max_length)
    t_ids, t_mask = encode(tokenizer, test_set.texts, max_length)
    val = (all_depth_probs(model, v_ids, v_mask, precision=precision), _labels_for(model, val_set))
    test = (all_depth_probs(model, t_ids, t_mask, precision=precision), _labels_for(model, test_set))
    policies = evaluate_policies(model, val, test, max_loss_points)
    d = model.extras.exit
    saved = ExitPolicy.for_model(d, model.num_layers)
    compared = None
    if precision is not None:
        reference = all_depth_probs(model, t_ids, t_mask)
        compared = {"mode": precision, "model_defaults": agreement(saved, test[0], reference),
                    "reference_full_depth_accuracy": depth_accuracy(reference, test[1])[-1]}
    report = {
        "model": model.extras.name,
        "model_version": model.extras.version,
        "num_layers": model.num_layers,
        "labels": model.label_names,
        "max_length": max_length,
        "max_loss_points": max_loss_points,
        "n_val": len(val_set),
        "n_test": len(test_set),
        "full_depth_accuracy": depth_accuracy(*test)[-1],
        "test_accuracy_per_depth": depth_accuracy(*test),
        "val_accuracy_per_depth": depth_accuracy(*val),
        "model_defaults": score_policy(saved, *test).to_dict(),
        "baselines": hf_baseline(model, t_ids, t_mask, test[1], test[0][-1]),
        "policies": policies,
        "comparison": compare_rules(val, test),
    }
    if compared is not None:
        report["precision"] = compared
    return report, test[0]


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """A short human summary of ``report``."""
    lines = [
        f"# Exit-policy accuracy ({report['model']} v{report['model_version']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Test n={report['n_test']}, val n={report['n_val']}; thresholds chosen on validation "
        f"(fastest within {report['max_loss_points']} points of full depth)."
        + (f" Test: {report['data']['test']}; val: {report['data']['val']}." if "data" in report else ""),
        "",
        f"Full-depth test accuracy: **{report['full_depth_accuracy'] * 100:.2f}%**",
        "",
        "| policy | thresholds (chosen on val) | test accuracy | loss (points) | mean exit depth "
        "| layer speedup |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in report["policies"].items():
        lines.append(
            f"| {name} | `{p['thresholds']}` | {p['accuracy'] * 100:.2f}% | "
            f"{p['accuracy_loss_points']:.2f} | {p['mean_exit_depth']:.2f} | {p['speedup']:.2f}x |"
        )
    md = report["model_defaults"]
    b = report["baselines"]
    lines += [
        "",
        f"Model's saved defaults on test: {md['accuracy'] * 100:.2f}%, mean exit depth "
        f"{md['mean_exit_depth']:.2f}, speedup {md['speedup']:.2f}x.",
        "",
        "Test accuracy per depth: " + " ".join(f"{a * 100:.1f}" for a in report["test_accuracy_per_depth"]),
        "",
        f"Baseline, transformers AlbertForSequenceClassification ([CLS] pooling) on the same weights: "
        f"{b['hf_albert_for_sequence_classification_accuracy'] * 100:.2f}%; its encoder with ELBERT's "
        f"{b['elbert_pooling']}-pooled head: {b['hf_encoder_with_elbert_head_accuracy'] * 100:.2f}% "
        f"(max |prob diff| vs ELBERT full depth {b['hf_encoder_vs_full_depth_max_abs_prob_diff']:.1e}).",
        "",
    ]
    lines += comparison_markdown(report["comparison"])
    lines += _precision_markdown(report)
    path.write_text("\n".join(lines) + "\n")


def _precision_markdown(report: dict[str, Any]) -> list[str]:
    if "precision" not in report:
        return []
    p = report["precision"]
    a = p["model_defaults"]
    pct = lambda x: f"{x * 100:.2f}%"  # noqa: E731
    return [
        "", f"## Layer precision {p['mode']} vs float32 (test set, model's saved exit policy)", "",
        f"Label agreement {pct(a['label_agreement'])} (full depth {pct(a['full_depth_label_agreement'])}); "
        f"same exit depth {pct(a['exit_depth_agreement'])} (within one {pct(a['exit_depth_within_one'])}); "
        f"mean exit depth {a['mean_exit_depth']:.3f} vs {a['reference_mean_exit_depth']:.3f}; "
        f"max |prob diff| {a['max_abs_prob_diff']:.2e}; "
        f"float32 full-depth accuracy {pct(p['reference_full_depth_accuracy'])}.",
    ]


def _evaluate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    command = args.command_line or getattr(args, "invocation", None) or \
        shlex.join(["elbert-stream", *sys.argv[1:]])
    dirs = [Path(m) for m in args.model] if args.model else [shipped_model_dir()]
    if len(dirs) == 1:
        _evaluate_one(dirs[0], args, Path(args.out), command)
        return 0
    from elbert_stream.training.seeds import summarise, summary_markdown

    reports, names = [], set()
    for i, model_dir in enumerate(dirs):
        name = ElbertModel.from_pretrained(model_dir).extras.name or "model"
        name = name if name not in names else f"{name}-{i + 1}"
        names.add(name)
        reports.append(_evaluate_one(model_dir, args, Path(args.out) / name, command))
    summary = {"command": command, **summarise(reports)}
    out = Path(args.out)
    (out / "accuracy_seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "accuracy_seeds.md").write_text(summary_markdown(summary, command))
    log.info("wrote %s/accuracy_seeds.{json,md} over %d models", out, len(reports))
    return 0


def _evaluate_one(model_dir: Path, args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    """Evaluate one model dir into ``out`` (accuracy.json, accuracy.md, PNGs); returns the report."""
    model = ElbertModel.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    sets = evaluation_sets(model_dir, args.data, args.val_data, Columns(args.text_column, args.label_column),
                           args.allow_training_rows)
    log.info("%s: thresholds on %s (%d rows); scored on %s (%d rows)", model_dir, sets.described["val"],
             len(sets.val), sets.described["test"], len(sets.test))
    t0 = time.perf_counter()
    report, test_probs = run_evaluation(model, tokenizer, sets.val, sets.test, args.max_length, args.max_loss,
                                        precision=args.precision)
    report["command"] = command
    report["data"] = {**sets.described, "training_rows_scored": sets.training_rows}
    report["eval_seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out / "accuracy.md")
    if not args.no_plots:
        _plots(report, test_probs, sets.test, out)
    log.info("wrote %s/accuracy.{json,md}: full depth %.4f", out, report["full_depth_accuracy"])
    return report


def _plots(report: dict[str, Any], test_probs: torch.Tensor, test_set: Dataset, out: Path) -> None:
    """The PNGs, or a warning when matplotlib is not installed (the numbers are written either way)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots written (pip install matplotlib, or "
                    "'elbert-stream[train]'); accuracy.json and accuracy.md are complete")
        return
    from elbert_stream.training.plots import write_plots

    write_plots(report, test_probs, test_set, out)


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score exit policies over threshold grids; write accuracy.json/md + plots",
        description="Score every exit policy on a model's held-out data: thresholds chosen on validation, "
                    "scored on test. Default: the model's own val/test split (its split.json).",
    )
    p.add_argument("--model", action="append",
                   help="model dir (default: the shipped BBC model); repeat it for several models (one "
                        "per training seed): each is evaluated into OUT/NAME/ and accuracy_seeds.{json,md} "
                        "summarise them")
    p.add_argument("--data", default=None,
                   help="test data: bbc | tweets | FILE.jsonl|.csv|.parquet | a datasets dir | "
                        "hf:NAME[:SPLIT] (default: the model's held-out test split from its "
                        "split.json; the file it was trained on also means that split)")
    p.add_argument("--val-data", help="labelled set to choose thresholds on (default: the model's validation "
                                      "split, or a stratified 10%% of --data)")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    p.add_argument("--allow-training-rows", action="store_true",
                   help="score rows the model trained on anyway (refused by default: such numbers "
                        "overstate the accuracy on unseen text)")
    p.add_argument("--max-length", type=int, default=128, help="tokens (default 128)")
    p.add_argument(
        "--max-loss", type=float, default=0.5, help="accuracy points below full depth allowed on val"
    )
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="score the engine's step in this layer precision (engine.layer_precision) and "
                        "compare labels and exit depths with float32 (default: transformers' layer, fp32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_evaluate)
