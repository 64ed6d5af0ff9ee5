"""Offline scoring shared by training and evaluation: tokenise, all-depth probabilities, threshold grids.

* ``encode(tokenizer, texts, max_length)`` -> ``input_ids``/``attention_mask`` ``[N, T]``
* ``tokenize`` / ``pad_batch``: unpadded token ids, padded per batch (training's batches)
* ``all_depth_probs(model, ids, mask[, precision])`` -> softmax probabilities at every depth ``[L, N, K]``
* ``agreement(policy, probs, reference)`` -> labels and exit depths of a precision mode vs float32
* ``policy_grid(name, L)`` -> the thresholds evaluated for each exit policy
* ``score_policy(policy, probs, labels)`` -> accuracy, mean exit depth, speedup, histogram
* ``choose_exit_defaults(probs, labels, max_loss_points)`` -> the fastest confidence-window setting
  whose accuracy is within ``max_loss_points`` of full depth (on the split given, i.e. validation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.config import ExitSettings
from elbert_stream.engine.model import ElbertModel
from elbert_stream.engine.policy import REASON_NAMES, ExitPolicy, exit_depths_offline
from elbert_stream.engine.step import StepCompute

log = logging.getLogger(__name__)

# threshold grids of comparable size, each spanning its rule's range (issue #14): entropy 120,
# confidence_window 128, patience 66 at L = 12 (every patience and min_depth up to 6 it has)
ENTROPY_TAUS = tuple(t / 40 for t in range(1, 41))  # 0.025 .. 1.0
WINDOW_TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
WINDOWS = (2, 3, 4, 5)
WINDOW_MIN_DEPTHS = (1, 3)
MIN_DEPTHS = (1, 2, 3)
PATIENCE_MAX_MIN_DEPTH = 6


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids, attention_mask), both ``[N, T]`` long, padded to the longest (<= max_length)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Texts -> token ids per text (with special tokens, truncated to ``max_length``), unpadded."""
    return [list(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask) ``[B, T]`` long, T = the longest in the batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def all_depth_probs(
    model: ElbertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64,
    precision: str | None = None,
) -> torch.Tensor:
    """Probabilities at every depth, ``[L, N, K]`` float32 on CPU, in input order (model put in eval
    mode). Texts run in batches of similar length, each cut to its longest text.

    ``precision`` None: ``model.forward`` (transformers' layer, the reference); a layer precision
    (``model``, ``bfloat16``, ``int8``): the engine's own step compute in that mode."""
    model.eval()
    compute = StepCompute(model, precision) if precision is not None else None
    order = attention_mask.sum(1).argsort(stable=True)  # [N] shortest first
    out = torch.empty(model.num_layers, input_ids.shape[0], model.num_labels)  # [L, N, K]
    for start in range(0, input_ids.shape[0], batch_size):
        rows = order[start : start + batch_size]
        keep = int(attention_mask[rows].sum(1).max())  # drop all-padding columns
        ids = input_ids[rows, :keep].to(model.device)  # [b, T]
        mask = attention_mask[rows, :keep].to(model.device)  # [b, T]
        if compute is None:
            probs = model(ids, mask).float().softmax(-1)  # [L, b, K]
        else:
            probs = compute.all_depths(model.embed(ids, mask), mask.sum(1), model.num_layers)
        out[:, rows] = probs.float().cpu()
    return out


def agreement(policy: ExitPolicy, probs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far ``probs`` (e.g. a precision mode) departs from ``reference`` (float32), both
    ``[L, N, K]``: label agreement at full depth and under ``policy``, exit-depth agreement."""
    n = probs.shape[1]
    full = probs[-1].argmax(-1) == reference[-1].argmax(-1)  # [N]
    depth, _ = exit_depths_offline(policy, probs)
    ref_depth, _ = exit_depths_offline(policy, reference)
    label = probs[depth - 1, torch.arange(n)].argmax(-1)
    ref_label = reference[ref_depth - 1, torch.arange(n)].argmax(-1)
    return {
        "full_depth_label_agreement": float(full.float().mean()),
        "label_agreement": float((label == ref_label).float().mean()),
        "exit_depth_agreement": float((depth == ref_depth).float().mean()),
        "exit_depth_within_one": float(((depth - ref_depth).abs() <= 1).float().mean()),
        "mean_exit_depth": float(depth.float().mean()),
        "reference_mean_exit_depth": float(ref_depth.float().mean()),
        "max_abs_prob_diff": float((probs - reference).abs().max()),
    }


def depth_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy at each depth: ``[L, N, K]`` probs, ``[N]`` labels -> L floats in [0, 1]."""
    return [float(x) for x in (probs.argmax(-1) == labels[None]).float().mean(1)]


def policy_grid(name: str, num_layers: int) -> list[ExitPolicy]:
    """Every threshold setting evaluated for policy ``name`` (the grids above)."""
    mins = [m for m in MIN_DEPTHS if m <= num_layers]
    if name == "none":
        return [ExitPolicy.of("none", num_layers)]
    if name == "entropy":
        return [ExitPolicy.of("entropy", num_layers, tau=t, min_depth=m) for t in ENTROPY_TAUS for m in mins]
    if name == "patience":
        top = min(PATIENCE_MAX_MIN_DEPTH, num_layers)
        return [ExitPolicy.of("patience", num_layers, patience=p, min_depth=m)
                for p in range(1, max(2, num_layers)) for m in range(1, top + 1)]
    return [
        ExitPolicy.of("confidence_window", num_layers, tau=t, window=w, require_rising=r, min_depth=m)
        for t in WINDOW_TAUS
        for w in WINDOWS
        for r in (False, True)
        for m in WINDOW_MIN_DEPTHS
        if m <= num_layers
    ]


@dataclass(frozen=True)
class PolicyScore:
    """One policy setting scored on one labelled set."""

    params: dict[str, Any]
    accuracy: float
    mean_exit_depth: float
    speedup: float
    histogram: list[int]  # count of samples exiting at depth 1..L
    reasons: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.params,
            "accuracy": self.accuracy,
            "mean_exit_depth": self.mean_exit_depth,
            "speedup": self.speedup,
            "exit_depth_histogram": self.histogram,
            "exit_reasons": self.reasons,
        }


def score_policy(policy: ExitPolicy, probs: torch.Tensor, labels: torch.Tensor) -> PolicyScore:
    """Apply ``policy`` to ``[L, N, K]`` probs and score its exits against ``[N]`` labels."""
    num_layers, n, _ = probs.shape
    depth, reason = exit_depths_offline(policy, probs)  # [N], [N]
    pred = probs[depth - 1, torch.arange(n)].argmax(-1)  # [N]
    mean_depth = float(depth.float().mean())
    hist = torch.bincount(depth - 1, minlength=num_layers).tolist()
    reasons = {REASON_NAMES[int(c)]: int((reason == c).sum()) for c in REASON_NAMES if (reason == c).any()}
    return PolicyScore(
        policy.describe(),
        float((pred == labels).float().mean()),
        mean_depth,
        num_layers / mean_depth,
        hist,
        reasons,
    )


def choose_exit_defaults(
    probs: torch.Tensor, labels: torch.Tensor, max_loss_points: float = 0.5, policy: str = "confidence_window"
) -> tuple[ExitSettings, PolicyScore]:
    """The setting of ``policy`` with the smallest mean exit depth whose accuracy is at most
    ``max_loss_points`` (percentage points) below full depth; ties -> higher accuracy. When no
    setting is within budget, the most accurate one (ties -> shallower)."""
    full = float((probs[-1].argmax(-1) == labels).float().mean())
    scores = [score_policy(p, probs, labels) for p in policy_grid(policy, probs.shape[0])]
    ok = [s for s in scores if s.accuracy >= full - max_loss_points / 100 - 1e-9]
    if ok:
        best = min(ok, key=lambda s: (s.mean_exit_depth, -s.accuracy))
    else:
        best = max(scores, key=lambda s: (s.accuracy, -s.mean_exit_depth))
        log.warning(
            "no %s setting within %.2f points of full depth (%.4f); most accurate: %.4f at depth %.2f",
            policy,
            max_loss_points,
            full,
            best.accuracy,
            best.mean_exit_depth,
        )
    fields = {k: v for k, v in best.params.items() if k != "policy"}
    return ExitSettings(policy=policy, **fields), best
