"""Exit rules compared as a user would pick them: thresholds chosen on VALIDATION under a budget, then
scored on TEST, with paired bootstrap 95 % intervals. No number here is chosen on the test set.

Rules and their grids (``rule_grid``; ``scoring.policy_grid`` for the engine's rules: comparable
sizes, each spanning the rule's whole range):

* ``confidence_window`` (ELBERT): tau {0, .1, .2, .3, .4, .5, .6, .8} x window 2..5 x require_rising
  x min_depth {1, 3}: 128 settings (with tau 0 it is patience-like: the window contains PABEE).
* ``entropy`` (DeeBERT): tau 0.025..1.0 in steps of 0.025 x min_depth 1..3: 120.
* ``patience`` (PABEE): patience 1..L-1 x min_depth 1..6: 66 for L = 12 (all it has).
* ``pcee`` (PCEE-BERT-style patience over confidence): exit once H(p)/log K < tau at ``patience``
  consecutive depths; tau {.05, .1, .2, .3, .4, .5, .6, .8} x patience 1..5 x min_depth 1..3: 120.
  Offline only: the engine's policies (``engine/policy.py``) do not include it.

Budgets: a LAYER budget ``Nx`` (2x, 3x, 4x) takes the setting most accurate on validation whose
validation mean exit depth is at most ``L / N``; a LOSS budget takes the fastest setting within that
many points of full-depth validation accuracy. Each chosen setting is scored once on test: accuracy
with its bootstrap interval, mean exit depth, consistency (the share of texts whose label equals the
full-depth label) and the paired difference to the confidence window with its interval (the same
resampled texts for both rules). ``curves`` sweeps the layer budget from 1 to L depths: one test
point per budget and rule, the PNG of accuracy against mean exit depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from elbert_stream.engine.model import normalised_entropy
from elbert_stream.engine.policy import ExitPolicy, exit_depths_offline
from elbert_stream.training.scoring import policy_grid

RULES = ("confidence_window", "entropy", "patience", "pcee")
LAYER_BUDGETS = (2.0, 3.0, 4.0)  # speedups
LOSS_BUDGETS = (0.5, 1.0)  # accuracy points below full depth on validation
NUM_BOOTSTRAP = 1000
PCEE_TAUS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


def pcee_exit_depths(probs: torch.Tensor, tau: float, patience: int, min_depth: int) -> torch.Tensor:
    """``[L, N, K]`` probabilities -> exit depth ``[N]``: the first depth >= ``min_depth`` at which the
    normalised entropy has been below ``tau`` at ``patience`` consecutive depths (else L)."""
    num_layers = probs.shape[0]
    low = normalised_entropy(probs) < tau  # [L, N]
    run = torch.zeros(probs.shape[1], dtype=torch.long)
    depth = torch.full((probs.shape[1],), num_layers, dtype=torch.long)
    done = torch.zeros(probs.shape[1], dtype=torch.bool)
    for d in range(1, num_layers + 1):
        run = torch.where(low[d - 1], run + 1, torch.zeros_like(run))
        now = ~done & (run >= patience) & (d >= min_depth)
        depth[now], done = d, done | now
    return depth


@dataclass(frozen=True)
class Setting:
    """One rule with one set of thresholds; ``depths`` maps ``[L, N, K]`` probs to exit depths ``[N]``."""

    rule: str
    params: dict[str, Any]
    depths: Callable[[torch.Tensor], torch.Tensor]


def _setting(policy: ExitPolicy) -> Setting:
    return Setting(policy.name, policy.thresholds(), lambda probs: exit_depths_offline(policy, probs)[0])


def rule_grid(rule: str, num_layers: int) -> list[Setting]:
    """Every setting of ``rule`` that is compared: the engine rules' ``scoring.policy_grid``, and
    ``pcee``'s grid (see the module doc)."""
    if rule in ("confidence_window", "entropy", "patience"):
        return [_setting(p) for p in policy_grid(rule, num_layers)]
    if rule == "pcee":
        mins = [m for m in (1, 2, 3) if m <= num_layers]
        return [Setting(rule, {"tau": t, "patience": p, "min_depth": m},
                        functools.partial(pcee_exit_depths, tau=t, patience=p, min_depth=m))
                for t in PCEE_TAUS for p in range(1, 6) for m in mins]
    raise ValueError(f"unknown rule {rule!r}; one of {RULES}")


@dataclass(frozen=True)
class Outcome:
    """One setting applied to one labelled set: per-text exit depth, correctness, agreement."""

    depth: torch.Tensor  # [N] long, 1-based
    correct: torch.Tensor  # [N] bool
    agrees: torch.Tensor  # [N] bool: the exit label is the full-depth label

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())

    @property
    def mean_depth(self) -> float:
        return float(self.depth.float().mean())


def outcome(setting: Setting, probs: torch.Tensor, labels: torch.Tensor) -> Outcome:
    preds = probs.argmax(-1)  # [L, N]
    depth = setting.depths(probs)
    pred = preds.gather(0, (depth - 1)[None]).squeeze(0)  # [N]
    return Outcome(depth, pred == labels, pred == preds[-1])


def choose(scores: Sequence[Outcome], budget: tuple[str, float], num_layers: int, full: float) -> int | None:
    """Index of the setting a budget picks on validation ``scores`` (None: no setting fits)."""
    kind, value = budget
    if kind == "layers":
        ok = [i for i, s in enumerate(scores) if s.mean_depth <= num_layers / value + 1e-9]
        return max(ok, key=lambda i: (scores[i].accuracy, -scores[i].mean_depth), default=None)
    ok = [i for i, s in enumerate(scores) if s.accuracy >= full - value / 100 - 1e-9]
    return min(ok, key=lambda i: (scores[i].mean_depth, -scores[i].accuracy), default=None)


def bootstrap_ci(values: torch.Tensor, idx: torch.Tensor) -> list[float]:
    """95 % percentile interval of the mean of ``values`` ``[N]`` over resamples ``idx`` ``[B, N]``."""
    means = values.float()[idx].mean(1)  # [B]
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def _entry(setting: Setting, on_val: Outcome, on_test: Outcome, window: Outcome | None, idx: torch.Tensor,
           num_layers: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "params": setting.params,
        "val_accuracy": on_val.accuracy,
        "val_mean_exit_depth": on_val.mean_depth,
        "accuracy": on_test.accuracy,
        "ci95": bootstrap_ci(on_test.correct, idx),
        "mean_exit_depth": on_test.mean_depth,
        "speedup": num_layers / on_test.mean_depth,
        "consistency": float(on_test.agrees.float().mean()),
    }
    if window is not None and setting.rule != "confidence_window":
        diff = on_test.correct.float() - window.correct.float()  # [N], paired: the same texts
        entry["minus_window_points"] = float(diff.mean()) * 100
        entry["minus_window_ci95_points"] = [x * 100 for x in bootstrap_ci(diff, idx)]
    return entry


def _budget_row(budget: tuple[str, float], grids: dict[str, list[Setting]],
                on_val: dict[str, list[Outcome]], test: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor,
                full_val: float) -> dict[str, Any]:
    num_layers = test[0].shape[0]
    picked = {r: choose(on_val[r], budget, num_layers, full_val) for r in RULES}
    outs = {r: outcome(grids[r][i], *test) for r, i in picked.items() if i is not None}
    window = outs.get("confidence_window")
    rules = {r: None if i is None else _entry(grids[r][i], on_val[r][i], outs[r], window, idx, num_layers)
             for r, i in picked.items()}
    scored = {r: e for r, e in rules.items() if e}
    kind, value = budget
    return {
        "budget": kind,
        "value": value,
        "label": f"{value:g}x fewer layers" if kind == "layers" else f"<= {value:g} pt loss on val",
        "rules": rules,
        "most_accurate_on_test": max(scored, key=lambda r: scored[r]["accuracy"], default=None),
        "significantly_above_window": [r for r, e in scored.items()
                                       if e.get("minus_window_ci95_points", [0, 0])[0] > 0],
        "significantly_below_window": [r for r, e in scored.items()
                                       if e.get("minus_window_ci95_points", [0, 0])[1] < 0],
    }


def _curves(grids: dict[str, list[Setting]], on_val: dict[str, list[Outcome]],
            test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, list[dict[str, float]]]:
    """Per rule: the test point of the setting each layer budget (1 to L depths, step 0.25) picks."""
    num_layers = test[0].shape[0]
    out: dict[str, list[dict[str, float]]] = {}
    for r in RULES:
        seen: dict[int, dict[str, float]] = {}
        for k in range(4 * (num_layers - 1) + 1):
            i = choose(on_val[r], ("layers", num_layers / (1 + k / 4)), num_layers, 0.0)
            if i is not None and i not in seen:
                o = outcome(grids[r][i], *test)
                seen[i] = {"budget_depth": 1 + k / 4, "mean_exit_depth": o.mean_depth, "accuracy": o.accuracy}
        out[r] = list(seen.values())
    return out


def compare_rules(val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                  seed: int = 0) -> dict[str, Any]:
    """Every rule under every budget, chosen on ``val`` and scored on ``test`` (``[L, N, K]`` probs,
    ``[N]`` labels each); bootstrap resamples of the test texts are deterministic in ``seed``."""
    num_layers, n = test[0].shape[0], test[1].numel()
    grids = {r: rule_grid(r, num_layers) for r in RULES}
    on_val = {r: [outcome(s, *val) for s in g] for r, g in grids.items()}
    full_val = float((val[0][-1].argmax(-1) == val[1]).float().mean())
    idx = torch.randint(n, (NUM_BOOTSTRAP, n), generator=torch.Generator().manual_seed(seed))  # [B, N]
    full = test[0][-1].argmax(-1) == test[1]
    budgets = [("layers", b) for b in LAYER_BUDGETS] + [("loss", b) for b in LOSS_BUDGETS]
    return {
        "rules": list(RULES),
        "grid_sizes": {r: len(g) for r, g in grids.items()},
        "num_bootstrap": NUM_BOOTSTRAP,
        "bootstrap_seed": seed,
        "full_depth": {"accuracy": float(full.float().mean()), "ci95": bootstrap_ci(full, idx)},
        "budgets": [_budget_row(b, grids, on_val, test, idx, full_val) for b in budgets],
        "curves": _curves(grids, on_val, test),
    }


def _cell(e: dict[str, Any] | None) -> str:
    if e is None:
        return "- (no setting fits on val)"
    lo, hi = e["ci95"]
    return (f"{e['accuracy'] * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}] @ {e['mean_exit_depth']:.2f} "
            f"({e['speedup']:.1f}x, agrees {e['consistency'] * 100:.0f}%)")


def _diff(e: dict[str, Any] | None) -> str:
    if e is None or "minus_window_points" not in e:
        return "-"
    lo, hi = e["minus_window_ci95_points"]
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{e['minus_window_points']:+.1f} [{lo:+.1f}, {hi:+.1f}]{mark}"


def comparison_markdown(cmp: dict[str, Any]) -> list[str]:
    """The budget tables of ``compare_rules``' result, as markdown lines."""
    rules, others = cmp["rules"], [r for r in cmp["rules"] if r != "confidence_window"]
    lo, hi = cmp["full_depth"]["ci95"]
    grids = ", ".join(f"{r} {n}" for r, n in cmp["grid_sizes"].items())
    full = cmp["full_depth"]["accuracy"] * 100
    lines = [
        "## Exit rules at equal budgets (thresholds chosen on validation, scored on test)",
        "",
        f"Grids: {grids} settings. A layer budget Nx takes "
        "the setting most accurate on validation with validation mean exit depth <= L/N; a loss budget the "
        "fastest within that many points of full depth on validation. Cells: test accuracy [95% paired "
        f"bootstrap interval, {cmp['num_bootstrap']} resamples] @ test mean exit depth (speedup, share of "
        f"texts whose label equals the full-depth label). Full depth: {full:.1f}% "
        f"[{lo * 100:.1f}, {hi * 100:.1f}]. `pcee` is evaluated offline only (the engine does not serve it).",
        "",
        "| budget | " + " | ".join(rules) + " | most accurate on test |",
        "| --- |" + " --- |" * (len(rules) + 1),
        *(f"| {b['label']} | " + " | ".join(_cell(b["rules"][r]) for r in rules)
          + f" | {b['most_accurate_on_test'] or '-'} |" for b in cmp["budgets"]),
        "",
        "Test accuracy minus the confidence window's, in points, on the same texts [95% paired bootstrap "
        "interval] (* = the interval excludes 0):",
        "",
        "| budget | " + " | ".join(f"{r} - window" for r in others) + " |",
        "| --- |" + " --- |" * len(others),
        *(f"| {b['label']} | " + " | ".join(_diff(b["rules"][r]) for r in others) + " |"
          for b in cmp["budgets"]),
        "",
    ]
    for b in cmp["budgets"]:
        above, below, best = b["significantly_above_window"], b["significantly_below_window"], \
            b["most_accurate_on_test"]
        if best not in (None, "confidence_window"):
            lines.append(f"- {b['label']}: the window is not the most accurate ({best} is)"
                         + (f"; significantly above it: {', '.join(above)}" if above else
                            "; no rule is significantly above it") + ".")
        elif below:
            lines.append(f"- {b['label']}: the window is significantly above {', '.join(below)}.")
    return lines + [""]
