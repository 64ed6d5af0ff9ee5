"""``elbert-stream evaluate``: exit policies over threshold grids.

Probabilities at every depth are computed once (``[L, N, K]``) for a validation and a test
set; every policy (confidence_window, entropy, patience, none) is scored over its threshold grid
with ``engine.policy.exit_depths_offline``. Per policy, the thresholds are chosen on VALIDATION (the
fastest setting within ``--max-loss`` accuracy points of full depth) and reported on test.
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

from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.engine.policy import POLICIES, ExitPolicy
from elbert_stream.engine.step import PRECISIONS
from elbert_stream.training.data import (
    Dataset,
    load_bbc,
    load_dataset,
    read_split,
    split_dataset,
    stratified_split,
)
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

log = logging.getLogger(__name__)

COMPARE_DEPTHS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


# ---- data -----------------------------------------------------------------------------------
def eval_sets(
    model_dir: Path | None,
    data: str,
    val_data: str | None,
    text_column: str = "text",
    label_column: str = "label",
) -> tuple[Dataset, Dataset]:
    """(validation, test). ``bbc``: the split saved with the model (``split.json``) or the default
    stratified split. A file: ``val_data`` if given, else the file's own stratified val/test halves."""
    if data == "bbc":
        full = load_bbc()
        split_file = (model_dir / "split.json") if model_dir else None
        parts = read_split(split_file, full) if split_file and split_file.is_file() else split_dataset(full)
        return parts["val"], parts["test"]
    test = load_dataset(data, text_column, label_column)
    if val_data:
        return load_dataset(val_data, text_column, label_column), test
    split = stratified_split(test.labels)
    rest = sorted(split["train"] + split["test"])
    log.warning(
        "no --val-data: choosing thresholds on %d of the %d examples of %s, testing on the rest",
        len(split["val"]),
        len(test),
        data,
    )
    return test.subset(split["val"]), test.subset(rest)


def _labels_for(model: ElbertModel, ds: Dataset) -> torch.Tensor:
    """Dataset labels re-indexed to the model's label order (by name)."""
    names = model.label_names
    try:
        return torch.tensor([names.index(ds.label_names[y]) for y in ds.labels])
    except ValueError as e:
        raise ValueError(f"data labels {ds.label_names} do not match the model's {names}") from e


# ---- evaluation -----------------------------------------------------------------------------
def frontier(scores: list[PolicyScore]) -> list[tuple[float, float]]:
    """Pareto frontier (mean exit depth ascending, accuracy strictly rising) of ``scores``."""
    points = sorted({(s.mean_exit_depth, s.accuracy) for s in scores}, key=lambda p: (p[0], -p[1]))
    out: list[tuple[float, float]] = []
    for depth, acc in points:
        if not out or acc > out[-1][1]:
            out.append((depth, acc))
    return out


def interpolate(front: list[tuple[float, float]], depth: float) -> float | None:
    """Best accuracy reachable at mean exit depth ``depth`` (linear between frontier points)."""
    if not front or depth < front[0][0]:
        return None
    for (d0, a0), (d1, a1) in zip(front, front[1:], strict=False):
        if d0 <= depth <= d1:
            return a0 + (a1 - a0) * (depth - d0) / (d1 - d0) if d1 > d0 else max(a0, a1)
    return front[-1][1]


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


def equal_depth_comparison(policies: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy of each policy's frontier interpolated at equal mean exit depths."""
    fronts = {
        n: [(p["mean_exit_depth"], p["accuracy"]) for p in policies[n]["frontier"]]
        for n in ("confidence_window", "entropy", "patience")
    }
    rows = []
    for depth in COMPARE_DEPTHS:
        acc = {n: interpolate(f, depth) for n, f in fronts.items()}
        cw = acc["confidence_window"]
        others = [a for n, a in acc.items() if n != "confidence_window" and a is not None]
        rows.append(
            {
                "mean_exit_depth": depth,
                **acc,
                "confidence_window_at_least_as_accurate": None
                if cw is None or not others
                else all(cw >= a - 1e-9 for a in others),
            }
        )
    verdicts = [
        r["confidence_window_at_least_as_accurate"]
        for r in rows
        if r["confidence_window_at_least_as_accurate"] is not None
    ]
    return {"rows": rows, "confidence_window_wins_or_ties": sum(verdicts), "compared": len(verdicts)}


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
        "equal_depth_comparison": equal_depth_comparison(policies),
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
        f"(fastest within {report['max_loss_points']} points of full depth).",
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
        "## Equal mean exit depth (test frontier over each grid, linear interpolation)",
        "",
        "| mean exit depth | confidence_window | entropy | patience | cw >= both |",
        "| --- | --- | --- | --- | --- |",
    ]
    fmt = lambda a: "-" if a is None else f"{a * 100:.2f}%"
    for r in report["equal_depth_comparison"]["rows"]:
        lines.append(
            f"| {r['mean_exit_depth']} | {fmt(r['confidence_window'])} | {fmt(r['entropy'])} | "
            f"{fmt(r['patience'])} | {r['confidence_window_at_least_as_accurate']} |"
        )
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
    model_dir = Path(args.model) if args.model else None
    model = ElbertModel.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    val_set, test_set = eval_sets(model_dir, args.data, args.val_data, args.text_column, args.label_column)
    t0 = time.perf_counter()
    report, test_probs = run_evaluation(model, tokenizer, val_set, test_set, args.max_length, args.max_loss,
                                        precision=args.precision)
    report["command"] = (
        args.command_line or getattr(args, "invocation", None) or shlex.join(["elbert-stream", *sys.argv[1:]])
    )
    report["eval_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out / "accuracy.md")
    if not args.no_plots:
        from elbert_stream.training.plots import write_plots

        write_plots(report, test_probs, test_set, out)
    log.info("wrote %s/accuracy.{json,md}: full depth %.4f", out, report["full_depth_accuracy"])
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score exit policies over threshold grids; write accuracy.json/md + plots"
    )
    p.add_argument("--model", help="model dir (default: the shipped BBC model)")
    p.add_argument("--data", default="bbc", help="bbc (test split) | file.jsonl | file.csv | hf:NAME[:SPLIT]")
    p.add_argument("--val-data", help="labelled set to choose thresholds on (default: bbc val split)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128, help="tokens (default 128)")
    p.add_argument(
        "--max-loss", type=float, default=0.5, help="accuracy points below full depth allowed on val"
    )
    p.add_argument("--out", default="bench/results", help="output folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="score the engine's step in this layer precision (engine.layer_precision) and "
                        "compare labels and exit depths with float32 (default: transformers' layer, fp32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_evaluate)
