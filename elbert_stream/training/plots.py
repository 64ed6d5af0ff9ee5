"""PNG plots for ``elbert-stream evaluate`` (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from elbert_stream.engine.model import normalised_entropy
from elbert_stream.training.data import Dataset

COLORS = {
    "confidence_window": "tab:blue",
    "entropy": "tab:orange",
    "patience": "tab:green",
    "pcee": "tab:red",
    "none": "tab:gray",
}


def write_plots(
    report: dict[str, Any], test_probs: torch.Tensor, test_set: Dataset, out: Path, num_trajectories: int = 6
) -> list[Path]:
    """Accuracy vs mean exit depth per rule, exit-depth histogram and confidence trajectories; returns
    the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [
        _accuracy_vs_depth(plt, report, out / "accuracy_vs_depth.png"),
        _histogram(plt, report, out / "exit_depth_histogram.png"),
        _trajectories(
            plt, report, test_probs, test_set, out / "confidence_trajectories.png", num_trajectories
        ),
    ]
    return paths


def _accuracy_vs_depth(plt: Any, report: dict[str, Any], path: Path) -> Path:
    """Test accuracy against test mean exit depth, one curve per rule: each point is the setting a
    layer budget picks on validation (``compare.compare_rules``' curves); the 2x/3x/4x picks starred."""
    cmp = report["comparison"]
    num_layers = report["num_layers"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in cmp["curves"].items():
        pts = sorted(pts, key=lambda q: q["mean_exit_depth"])
        ax.plot([q["mean_exit_depth"] for q in pts], [q["accuracy"] * 100 for q in pts], marker=".",
                color=COLORS[name], label=name)
        chosen = [b["rules"][name] for b in cmp["budgets"] if b["budget"] == "layers" and b["rules"][name]]
        ax.scatter([e["mean_exit_depth"] for e in chosen], [e["accuracy"] * 100 for e in chosen], marker="*",
                   s=120, color=COLORS[name], edgecolor="k", zorder=5)
    full = report["full_depth_accuracy"] * 100
    ax.axhline(full, color="k", ls="--", lw=1, label=f"full depth {full:.1f}%")
    ax.axhline(full - 1.0, color="k", ls=":", lw=1, label="full depth - 1 point")
    for speedup in (2, 3, 4):
        ax.axvline(num_layers / speedup, color="0.8", lw=1, zorder=0)
    ax.set_xlabel(f"test mean exit depth (of L={num_layers}); grey lines: 4x, 3x, 2x fewer layers")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0.0, full - 15), min(100.5, full + 5))
    ax.set_title(f"{report['model']}: thresholds chosen on validation per layer budget (stars: 2x, 3x, 4x)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _histogram(plt: Any, report: dict[str, Any], path: Path) -> Path:
    num_layers = report["num_layers"]
    names = [n for n in report["policies"] if n != "none"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        hist = report["policies"][name]["exit_depth_histogram"]
        ax.bar(
            [d + 1 + (i - (len(names) - 1) / 2) * width for d in range(num_layers)],
            hist,
            width=width,
            color=COLORS[name],
            label=f"{name} (mean {report['policies'][name]['mean_exit_depth']:.2f})",
        )
    ax.set_xticks(range(1, num_layers + 1))
    ax.set_xlabel("exit depth")
    ax.set_ylabel("test samples")
    ax.set_title("exit-depth histogram at the thresholds chosen on validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _trajectories(
    plt: Any, report: dict[str, Any], probs: torch.Tensor, test_set: Dataset, path: Path, count: int
) -> Path:
    """Top-class probability and normalised entropy per depth for a few test texts (one per label first)."""
    labels = report["labels"]
    picks: list[int] = []
    for k in range(len(labels)):  # the first test example of each label, then the hardest by final confidence
        picks += [i for i, y in enumerate(test_set.labels) if y == k][:1]
    hardest = probs[-1].max(-1).values.argsort().tolist()
    picks += [i for i in hardest if i not in picks][: max(0, count - len(picks))]
    depths = list(range(1, probs.shape[0] + 1))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i in picks[:count]:
        traj = probs[:, i]  # [L, K]
        true = test_set.labels[i]
        name = f"{test_set.examples[i].id} ({labels[true]})"
        a1.plot(depths, traj[:, true].tolist(), marker=".", label=name)
        a2.plot(depths, normalised_entropy(traj).tolist(), marker=".", label=name)
    a1.set_title("probability of the true label per depth")
    a2.set_title("normalised entropy H(p)/log K per depth")
    for a in (a1, a2):
        a.set_xlabel("depth")
        a.set_xticks(depths)
    a1.set_ylim(0, 1.02)
    a2.set_ylim(0, 1.02)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
