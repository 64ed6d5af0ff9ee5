"""Exit policies: hand-computed cases for every stage, and properties over random probabilities."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elbert_stream.engine.policy import (
    EXIT_ENTROPY,
    EXIT_MAX_DEPTH,
    EXIT_PATIENCE,
    EXIT_WINDOW,
    NO_EXIT,
    POLICIES,
    USES,
    ExitPolicy,
    ExitState,
    exit_depths_offline,
)
from elbert_stream.errors import ConfigError


def _traj(*rows: list[float]) -> torch.Tensor:
    """One sample's probabilities per depth -> ``[L, 1, K]``."""
    return torch.tensor(rows, dtype=torch.float32)[:, None, :]


# K = 2: H([0.99, 0.01]) / log 2 = 0.0808; H([0.9, 0.1]) / log 2 = 0.469; H([0.6, 0.4]) / log 2 = 0.971
SURE, FAIRLY, UNSURE = [0.99, 0.01], [0.9, 0.1], [0.6, 0.4]
FLIP = [0.4, 0.6]


def test_hand_computed_entropies() -> None:
    h = lambda p: -sum(x * math.log(x) for x in p) / math.log(2)
    assert h(SURE) == pytest.approx(0.0808, abs=1e-4) and h(FAIRLY) == pytest.approx(0.469, abs=1e-3)


def test_stage1_entropy_exits_when_confident() -> None:
    probs = _traj(UNSURE, SURE, SURE, SURE)
    depth, reason = exit_depths_offline(ExitPolicy.of("confidence_window", 4, tau=0.1, window=4), probs)
    assert depth.tolist() == [2] and reason.tolist() == [EXIT_ENTROPY]
    depth, _ = exit_depths_offline(ExitPolicy.of("entropy", 4, tau=0.08), probs)  # 0.0808 is not < 0.08
    assert depth.tolist() == [4]


def test_stage2_window_exits_on_a_stable_label() -> None:
    # labels 0, 1, 0, 0, 0: the streak of label 0 reaches 3 at depth 5
    probs = _traj(UNSURE, FLIP, UNSURE, FAIRLY, UNSURE, UNSURE)
    depth, reason = exit_depths_offline(ExitPolicy.of("confidence_window", 6, tau=0.0, window=3), probs)
    assert depth.tolist() == [5] and reason.tolist() == [EXIT_WINDOW]
    # with require_rising the top prob fell at depth 5 (0.9 -> 0.6): the rising run restarts there
    depth, _ = exit_depths_offline(
        ExitPolicy.of("confidence_window", 6, tau=0.0, window=3, require_rising=True), probs
    )
    assert depth.tolist() == [6]


def test_stage1_wins_over_stage2_and_reason_is_entropy() -> None:
    probs = _traj(SURE, SURE, SURE)
    depth, reason = exit_depths_offline(ExitPolicy.of("confidence_window", 3, tau=0.2, window=1), probs)
    assert depth.tolist() == [1] and reason.tolist() == [EXIT_ENTROPY]


def test_patience_needs_patience_repeats_after_the_first() -> None:
    probs = _traj(UNSURE, FLIP, FLIP, FLIP, FLIP)
    depth, reason = exit_depths_offline(ExitPolicy.of("patience", 5, patience=2), probs)
    assert depth.tolist() == [4] and reason.tolist() == [EXIT_PATIENCE]


def test_none_exits_only_at_max_depth_and_min_depth_holds() -> None:
    probs = _traj(SURE, SURE, SURE, SURE)
    depth, reason = exit_depths_offline(ExitPolicy.of("none", 4), probs)
    assert depth.tolist() == [4] and reason.tolist() == [EXIT_MAX_DEPTH]
    depth, _ = exit_depths_offline(ExitPolicy.of("entropy", 4, tau=0.5, min_depth=3), probs)
    assert depth.tolist() == [3]


def test_decide_is_per_row_and_state_carries() -> None:
    policy = ExitPolicy.of("confidence_window", 12, tau=0.1, window=2)
    state = ExitState.empty(2)
    probs = torch.tensor([UNSURE, SURE])  # [B, K]
    dec = policy.decide(probs, torch.tensor([1, 7]), state)
    assert dec.exit.tolist() == [False, True] and dec.reason.tolist() == [NO_EXIT, EXIT_ENTROPY]
    dec2 = policy.decide(torch.tensor([UNSURE, UNSURE]), torch.tensor([2, 8]), dec.state)
    assert dec2.state.streak.tolist() == [2, 2] and dec2.reason.tolist() == [EXIT_WINDOW, EXIT_WINDOW]


def test_bad_thresholds_raise_config_error() -> None:
    for kwargs in ({"name": "fastest"}, {"tau": 1.5}, {"window": 0}, {"min_depth": 13}):
        with pytest.raises(ConfigError):
            ExitPolicy.of(**{"name": "entropy", "num_layers": 12, **kwargs})


# ---- properties ---------------------------------------------------------------------------------
@st.composite
def prob_tensors(draw: st.DrawFn) -> torch.Tensor:
    num_layers, n, k = draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    sharp = draw(st.floats(0.1, 8.0))
    logits = torch.randn(num_layers, n, k, generator=torch.Generator().manual_seed(seed)) * sharp
    return logits.softmax(-1)  # [L, N, K]


policies = st.builds(
    lambda name, tau, window, patience, rising, min_frac: (name, tau, window, patience, rising, min_frac),
    st.sampled_from(["confidence_window", "entropy", "patience", "none"]),
    st.floats(0.0, 1.0),
    st.integers(1, 6),
    st.integers(1, 6),
    st.booleans(),
    st.floats(0.0, 1.0),
)


def _make(spec: tuple, num_layers: int) -> ExitPolicy:
    name, tau, window, patience, rising, min_frac = spec
    min_depth = 1 + int(min_frac * (num_layers - 1))
    return ExitPolicy.of(
        name,
        num_layers,
        tau=tau,
        window=window,
        patience=patience,
        require_rising=rising,
        min_depth=min_depth,
    )


@settings(max_examples=80, deadline=None)
@given(probs=prob_tensors(), spec=policies)
def test_exit_depth_within_min_depth_and_max(probs: torch.Tensor, spec: tuple) -> None:
    policy = _make(spec, probs.shape[0])
    depth, reason = exit_depths_offline(policy, probs)
    assert ((depth >= policy.min_depth) & (depth <= policy.num_layers)).all()
    assert (reason != NO_EXIT).all()
    if policy.name == "none":
        assert (depth == policy.num_layers).all()


@settings(max_examples=80, deadline=None)
@given(
    probs=prob_tensors(),
    spec=policies,
    d_tau=st.floats(0.0, 1.0),
    d_win=st.integers(0, 3),
    d_min=st.integers(0, 3),
    add_rising=st.booleans(),
)
def test_stricter_thresholds_never_exit_earlier(
    probs: torch.Tensor, spec: tuple, d_tau: float, d_win: int, d_min: int, add_rising: bool
) -> None:
    loose = _make(spec, probs.shape[0])
    strict = loose.with_params(
        tau=loose.tau * (1 - d_tau),
        window=loose.window + d_win,
        patience=loose.patience + d_win,
        require_rising=loose.require_rising or add_rising,
        min_depth=min(loose.num_layers, loose.min_depth + d_min),
    )
    d_loose, _ = exit_depths_offline(loose, probs)
    d_strict, _ = exit_depths_offline(strict, probs)
    assert (d_strict >= d_loose).all()


def test_thresholds_name_only_what_the_rule_reads() -> None:
    """Changing a threshold a rule does not list in USES never changes its exits."""
    probs = torch.tensor([[UNSURE, SURE], [SURE, UNSURE], [UNSURE, UNSURE], [SURE, SURE]])  # [L=4, N=2, K]
    changes = {"tau": 0.9, "window": 1, "patience": 1, "require_rising": True, "min_depth": 2}
    for name in POLICIES:
        base = ExitPolicy.of(name, 4, tau=0.05, window=3, patience=3, require_rising=False, min_depth=1)
        assert set(base.thresholds()) == set(USES[name])
        for key, value in changes.items():
            if key in USES[name]:
                continue
            d0, _ = exit_depths_offline(base, probs)
            d1, _ = exit_depths_offline(base.with_params(**{key: value}), probs)
            assert torch.equal(d0, d1), (name, key)
