"""Exit rules compared under budgets chosen on validation: PCEE-style exits, the budget choice,
paired bootstrap intervals, comparable grids."""

from __future__ import annotations

import pytest
import torch
from tiny_elbert import torch_threads

from elbert_stream.training.compare import (
    RULES,
    Outcome,
    bootstrap_ci,
    choose,
    compare_rules,
    outcome,
    pcee_exit_depths,
    rule_grid,
)


def _probs(top: list[list[float]], preds: list[list[int]] | None = None) -> torch.Tensor:
    """Two-class probs ``[L, N, 2]`` from the top probability per depth and text (class 0 unless
    ``preds`` says otherwise)."""
    t = torch.tensor(top).T  # [L, N]
    p = torch.zeros(*t.shape, 2)
    cls = torch.zeros_like(t, dtype=torch.long) if preds is None else torch.tensor(preds).T
    p.scatter_(2, cls[..., None], t[..., None])
    p.scatter_(2, 1 - cls[..., None], 1 - t[..., None])
    return p


def test_pcee_exits_after_patience_consecutive_low_entropy_depths() -> None:
    # text 0: confident at depths 1, 3, 4 (a break at 2); text 1: never confident
    probs = _probs([[0.999, 0.6, 0.999, 0.999, 0.999], [0.6] * 5])
    assert pcee_exit_depths(probs, tau=0.1, patience=1, min_depth=1).tolist() == [1, 5]
    assert pcee_exit_depths(probs, tau=0.1, patience=2, min_depth=1).tolist() == [4, 5]  # 3 and 4
    assert pcee_exit_depths(probs, tau=0.1, patience=3, min_depth=1).tolist() == [5, 5]
    assert pcee_exit_depths(probs, tau=0.1, patience=1, min_depth=2).tolist() == [3, 5]
    assert pcee_exit_depths(probs, tau=1.0, patience=1, min_depth=1).tolist() == [1, 1]


def test_grids_are_comparable_and_span_each_rules_range() -> None:
    sizes = {r: len(rule_grid(r, 12)) for r in RULES}
    assert sizes == {"confidence_window": 128, "entropy": 120, "patience": 66, "pcee": 120}
    taus = [s.params["tau"] for s in rule_grid("entropy", 12)]
    assert max(taus) == 1.0 and min(taus) == 0.025
    assert {s.params["patience"] for s in rule_grid("patience", 12)} == set(range(1, 12))


def _outcome(depths: list[int], correct: list[bool]) -> Outcome:
    return Outcome(torch.tensor(depths), torch.tensor(correct), torch.tensor(correct))


def test_layer_and_loss_budgets_choose_on_validation() -> None:
    scores = [_outcome([1, 1], [True, False]), _outcome([2, 6], [True, True]), _outcome([6, 6], [True, True])]
    assert choose(scores, ("layers", 4.0), 12, 1.0) == 0  # mean depth <= 3: only the first fits
    assert choose(scores, ("layers", 3.0), 12, 1.0) == 1  # <= 4: the second is more accurate
    assert choose(scores, ("layers", 2.0), 12, 1.0) == 1  # <= 6: as accurate as the third, shallower
    assert choose(scores, ("layers", 24.0), 12, 1.0) is None  # <= 0.5: none
    assert choose(scores, ("loss", 0.5), 12, 1.0) == 1  # the fastest within 0.5 points of 100%
    assert choose(scores, ("loss", 60.0), 12, 1.0) == 0


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_n() -> None:
    g = torch.Generator().manual_seed(0)
    small, big = torch.rand(100, generator=g) < 0.8, torch.rand(4000, generator=g) < 0.8
    ci_small = bootstrap_ci(small, torch.randint(100, (1000, 100), generator=g))
    ci_big = bootstrap_ci(big, torch.randint(4000, (1000, 4000), generator=g))
    assert ci_small[0] < small.float().mean() < ci_small[1]
    assert ci_big[1] - ci_big[0] < (ci_small[1] - ci_small[0]) / 3


def test_compare_rules_is_chosen_on_val_and_paired_on_test() -> None:
    """Validation says depth 1 is right; on test depth 1 is wrong for half the texts, so the
    budget's pick is scored honestly (no test oracle), and a rule equal to the window differs by 0."""
    n = 40
    val = (_probs([[0.99] * 3] * n), torch.zeros(n, dtype=torch.long))  # all right at every depth
    test_preds = [[1, 0, 0] if i % 2 else [0, 0, 0] for i in range(n)]  # odd texts wrong at depth 1
    test = (_probs([[0.99] * 3] * n, test_preds), torch.zeros(n, dtype=torch.long))
    with torch_threads(1):
        cmp = compare_rules(val, test, seed=1)
    three_x = next(b for b in cmp["budgets"] if b["label"] == "3x fewer layers")
    assert three_x["rules"]["patience"] is None  # PABEE cannot exit before depth 2: no setting fits
    for rule in ("confidence_window", "entropy", "pcee"):
        e = three_x["rules"][rule]
        assert e["val_accuracy"] == 1.0 and e["mean_exit_depth"] == pytest.approx(1.0)
        assert e["accuracy"] == pytest.approx(0.5) and e["consistency"] == pytest.approx(0.5)
        lo, hi = e["ci95"]
        assert lo < 0.5 < hi
    assert three_x["rules"]["entropy"]["minus_window_points"] == 0.0
    assert three_x["rules"]["entropy"]["minus_window_ci95_points"] == [0.0, 0.0]
    assert cmp["full_depth"]["accuracy"] == 1.0
    assert all(cmp["curves"][r] for r in RULES)


def test_outcome_reads_the_label_at_the_exit_depth() -> None:
    probs = _probs([[0.6, 0.99]], [[1, 0]])  # one text: class 1 at depth 1, class 0 at depth 2
    settings = {s.params["tau"]: s for s in rule_grid("entropy", 2) if s.params["min_depth"] == 1}
    label = torch.tensor([0])
    early, late = outcome(settings[1.0], probs, label), outcome(settings[0.1], probs, label)
    assert early.depth.tolist() == [1] and not early.correct.item() and not early.agrees.item()
    assert late.depth.tolist() == [2] and late.correct.item() and late.agrees.item()
