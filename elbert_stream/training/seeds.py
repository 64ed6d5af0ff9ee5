"""Headline numbers over several training seeds: ``elbert-stream evaluate --model A --model B ...``.

Each model (one training run per seed, say) is evaluated on its own held-out split as usual, its
report in ``OUT/<model name>/``; ``summarise(reports)`` then gives, for every budget and rule of
``compare.compare_rules``, the mean, standard deviation, min and max over the models of the test
accuracy and mean exit depth, and in how many models each rule was the most accurate.
``accuracy_seeds.{json,md}`` in ``OUT`` hold it. Every per-model number is chosen on validation.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per budget and rule: accuracy and mean exit depth over ``reports`` (``evaluate``'s), counting
    only the models where the budget picked a setting (``n``)."""
    first = reports[0]["comparison"]
    rows = []
    for k, budget in enumerate(first["budgets"]):
        per_model = [r["comparison"]["budgets"][k] for r in reports]
        rules: dict[str, Any] = {}
        for rule in first["rules"]:
            picked = [b["rules"][rule] for b in per_model if b["rules"][rule]]
            rules[rule] = None if not picked else {
                "n": len(picked),
                "accuracy": _stats([e["accuracy"] for e in picked]),
                "mean_exit_depth": _stats([e["mean_exit_depth"] for e in picked]),
                "most_accurate_in": sum(b["most_accurate_on_test"] == rule for b in per_model),
            }
        rows.append({"label": budget["label"], "rules": rules})
    return {
        "models": [f"{r['model']} v{r['model_version']}" for r in reports],
        "n_models": len(reports),
        "full_depth_accuracy": _stats([r["full_depth_accuracy"] for r in reports]),
        "budgets": rows,
    }


def summary_markdown(summary: dict[str, Any], command: str) -> str:
    """``summary`` as a markdown page: one row per budget, one column per rule."""
    rules = list(summary["budgets"][0]["rules"])
    full = summary["full_depth_accuracy"]

    def cell(e: dict[str, Any] | None) -> str:
        if e is None:
            return "-"
        a, d = e["accuracy"], e["mean_exit_depth"]
        return (f"{a['mean'] * 100:.1f} ± {a['sd'] * 100:.1f}% [{a['min'] * 100:.1f}, {a['max'] * 100:.1f}] "
                f"@ {d['mean']:.2f} (best in {e['most_accurate_in']}/{summary['n_models']}"
                + ("" if e["n"] == summary["n_models"] else f"; fits in {e['n']}") + ")")

    return "\n".join([
        f"# Exit rules over {summary['n_models']} models (training seeds)", "",
        f"Command: `{command}`", "",
        f"Models: {', '.join(summary['models'])}. Each model's thresholds are chosen on its own validation "
        "split and scored on its own test split (the per-model pages beside this one). Cells: mean ± sd "
        "of the test accuracy over the models [min, max] @ mean test exit depth (in how many models the "
        f"rule was the most accurate). Full depth: {full['mean'] * 100:.1f} ± {full['sd'] * 100:.1f}%.", "",
        "| budget | " + " | ".join(rules) + " |",
        "| --- |" + " --- |" * len(rules),
        *(f"| {b['label']} | " + " | ".join(cell(b["rules"][r]) for r in rules) + " |"
          for b in summary["budgets"]),
        "",
    ])
