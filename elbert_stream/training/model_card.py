"""``MODEL_CARD.md`` for a trained ELBERT dir: config, recipe, per-depth accuracy, exit trade-offs."""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from elbert_stream.engine.model import ElbertModel
from elbert_stream.engine.policy import ExitPolicy
from elbert_stream.training.scoring import (
    choose_exit_defaults,
    depth_accuracy,
    score_policy,
)


def _tradeoff_rows(model: ElbertModel, probs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Per-policy: the setting chosen on val (within 0.5 / 1.0 points), scored on val and test."""
    rows = [
        "| policy | loss budget (val) | thresholds | val acc | test acc | test mean depth | test speedup |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("confidence_window", "entropy", "patience"):
        for budget in (0.5, 1.0):
            d, val_score = choose_exit_defaults(*probs["val"], max_loss_points=budget, policy=name)
            policy = ExitPolicy.for_model(d, model.num_layers)
            s = score_policy(policy, *probs["test"])
            params = policy.thresholds()
            rows.append(
                f"| {name} | {budget} pt | `{params}` | {val_score.accuracy * 100:.1f} | "
                f"{s.accuracy * 100:.1f} | {s.mean_exit_depth:.2f} | {s.speedup:.2f}x |"
            )
    return rows


def write_model_card(
    out: Path,
    cfg: Any,
    model: ElbertModel,
    probs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    train_seconds: float,
    steps: int,
    data_note: str = "",
) -> Path:
    """Write ``out/MODEL_CARD.md``; ``probs``: ``val``/``test`` -> (``[L, N, K]`` probs, ``[N]`` labels);
    ``data_note`` says where each split came from."""
    acc = {k: depth_accuracy(*v) for k, v in probs.items()}
    d = model.extras.exit
    default = ExitPolicy.for_model(d, model.num_layers)
    test_default = score_policy(default, *probs["test"])
    weights = " ".join(f"{w:.3f}" for w in model.depth_weights().tolist())
    c = model.config
    lines = [
        f"# {model.extras.name} (version {model.extras.version})",
        "",
        "An ELBERT classifier: ALBERT with ONE shared transformer layer applied "
        f"{model.num_layers} times and a shared exit head after every application.",
        "",
        "## Config",
        "",
        f"- labels ({model.num_labels}): {', '.join(model.label_names)}",
        f"- hidden {c.hidden_size}, embedding {c.embedding_size}, heads {c.num_attention_heads}, "
        f"intermediate {c.intermediate_size}, vocab {c.vocab_size}, depths {model.num_layers}, "
        f"pooling {model.extras.pooling}, max length {cfg.max_length} tokens",
        f"- learned ELBERT loss weights w_1..w_L: {weights}",
        f"- exit defaults (chosen on validation): `{d.model_dump()}`",
        "",
        "## Recipe",
        "",
        "```",
        *(f"{k} = {v}" for k, v in asdict(cfg).items()),
        "```",
        "",
        f"Trained {steps} steps in {train_seconds:.0f} s wall ({train_seconds / 60:.1f} min) with "
        f"{torch.get_num_threads()} torch thread(s) on {platform.machine()} CPU "
        f"(training loop incl. per-epoch validation, resumed runs included), torch {torch.__version__}. "
        f"Data (`split.json`): {data_note}.",
        "",
        "## Accuracy per depth (%)",
        "",
        "| split | n | " + " | ".join(str(i + 1) for i in range(model.num_layers)) + " |",
        "| --- | --- | " + " | ".join("---" for _ in range(model.num_layers)) + " |",
        *(
            f"| {k} | {v[1].numel()} | " + " | ".join(f"{a * 100:.1f}" for a in acc[k]) + " |"
            for k, v in probs.items()
        ),
        "",
        "## Exit trade-off (thresholds chosen on validation, scored on test)",
        "",
        f"Defaults on test: accuracy {test_default.accuracy * 100:.1f}% "
        f"vs full depth {acc['test'][-1] * 100:.1f}%, "
        f"mean exit depth {test_default.mean_exit_depth:.2f}, layer speedup {test_default.speedup:.2f}x.",
        "",
        *_tradeoff_rows(model, probs),
        "",
    ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
