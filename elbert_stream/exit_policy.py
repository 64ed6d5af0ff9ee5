"""Exit rules, vectorised over a batch of slots that may each sit at a different depth.

A policy is a pure function of (this depth's probabilities, the slot's depth, a small per-slot
state carried from the previous depth). The state is O(1) per slot, so the engine keeps it on the
device for every slot and never replays a history:

* ``pred``   label predicted at the previous depth (-1 before the first)
* ``top``    top-class probability at the previous depth
* ``streak`` how many consecutive depths, up to and including this one, predicted the same label
* ``rising`` the same, but also requiring the top probability never to fall along the streak

Policies (``depth`` is 1-based; depth ``L`` always exits with reason ``max_depth``):

* ``confidence_window`` (ELBERT, two stages). Stage 1: exit when H(p)/log K < ``tau``.
  Stage 2: exit when the predicted label has been the same at the last ``window`` depths
  (``streak >= window``), and with ``require_rising`` its probability never fell over them.
  This is the K-class, any-batch generalisation of the paper's two-class, batch-1 rule.
* ``entropy`` (DeeBERT / FastBERT): stage 1 only.
* ``patience`` (PABEE): the same prediction ``patience`` times in a row after the first,
  i.e. ``streak >= patience + 1``.
* ``none``: full depth.

No policy exits before ``min_depth``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from elbert_stream.config import ExitSettings
from elbert_stream.errors import ConfigError
from elbert_stream.model import ExitDefaults, normalised_entropy

POLICIES = ("confidence_window", "entropy", "patience", "none")

# reason codes, kept as small ints on the device; names in REASON_NAMES
NO_EXIT, EXIT_ENTROPY, EXIT_WINDOW, EXIT_PATIENCE, EXIT_MAX_DEPTH = 0, 1, 2, 3, 4
REASON_NAMES = {EXIT_ENTROPY: "entropy", EXIT_WINDOW: "window", EXIT_PATIENCE: "patience",
                EXIT_MAX_DEPTH: "max_depth"}


@dataclass
class ExitState:
    """Per-slot state a policy carries between depths; every tensor is ``[S]``."""

    pred: torch.Tensor  # long
    top: torch.Tensor  # float32
    streak: torch.Tensor  # int32
    rising: torch.Tensor  # int32

    @classmethod
    def empty(cls, num_slots: int, device: torch.device | str = "cpu") -> ExitState:
        return cls(
            pred=torch.full((num_slots,), -1, dtype=torch.long, device=device),
            top=torch.zeros(num_slots, dtype=torch.float32, device=device),
            streak=torch.zeros(num_slots, dtype=torch.int32, device=device),
            rising=torch.zeros(num_slots, dtype=torch.int32, device=device),
        )

    def rows(self, idx: torch.Tensor) -> ExitState:
        return ExitState(self.pred[idx], self.top[idx], self.streak[idx], self.rising[idx])

    def assign(self, idx: torch.Tensor, other: ExitState) -> None:
        self.pred[idx] = other.pred
        self.top[idx] = other.top
        self.streak[idx] = other.streak
        self.rising[idx] = other.rising

    def reset(self, idx: torch.Tensor) -> None:
        self.pred[idx] = -1
        self.top[idx] = 0.0
        self.streak[idx] = 0
        self.rising[idx] = 0


@dataclass(frozen=True)
class ExitDecision:
    """What one depth decided for each row (all ``[B]``) plus the next state."""

    exit: torch.Tensor  # bool
    reason: torch.Tensor  # int8, REASON codes (NO_EXIT where not exiting)
    pred: torch.Tensor  # long, argmax label at this depth
    top: torch.Tensor  # float32, top probability
    entropy: torch.Tensor  # float32, H(p)/log K
    state: ExitState


@dataclass(frozen=True)
class ExitPolicy:
    """An exit rule with its thresholds. Immutable: swap the object to change thresholds live."""

    name: str
    num_layers: int
    tau: float = 0.0
    window: int = 2
    patience: int = 1
    require_rising: bool = False
    min_depth: int = 1

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ConfigError(f"unknown exit policy {self.name!r}; choose one of {POLICIES}")
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau is a normalised entropy in [0, 1], got {self.tau}")
        if self.window < 1 or self.patience < 1:
            raise ConfigError(f"window and patience must be >= 1, got {self.window}, {self.patience}")
        if not 1 <= self.min_depth <= self.num_layers:
            raise ConfigError(f"min_depth must be in [1, {self.num_layers}], got {self.min_depth}")

    @classmethod
    def from_settings(cls, settings: ExitSettings, defaults: ExitDefaults, num_layers: int) -> ExitPolicy:
        """Settings override the model's saved defaults field by field (None = keep default)."""
        def pick(name: str) -> Any:
            value = getattr(settings, name)
            return getattr(defaults, name) if value is None else value

        return cls(
            name=settings.policy, num_layers=num_layers, tau=pick("tau"), window=pick("window"),
            patience=pick("patience"), require_rising=pick("require_rising"),
            min_depth=min(pick("min_depth"), num_layers),
        )

    def with_params(self, **changes: Any) -> ExitPolicy:
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "tau": self.tau, "window": self.window, "patience": self.patience,
                "require_rising": self.require_rising, "min_depth": self.min_depth}

    def decide(self, probs: torch.Tensor, depth: torch.Tensor, state: ExitState) -> ExitDecision:
        """probs ``[B, K]`` at each row's ``depth`` ``[B]`` (1-based), state for those rows."""
        probs = probs.float()
        top, pred = probs.max(-1)  # [B], [B]
        ent = normalised_entropy(probs)  # [B]
        same = pred == state.pred  # [B]
        streak = torch.where(same, state.streak + 1, torch.ones_like(state.streak))
        rising = torch.where(same & (top >= state.top), state.rising + 1, torch.ones_like(state.rising))
        allowed = depth >= self.min_depth  # [B]
        reason = torch.zeros_like(depth, dtype=torch.int8)
        if self.name in ("confidence_window", "entropy"):
            reason = torch.where(allowed & (ent < self.tau), EXIT_ENTROPY, reason)
        if self.name == "confidence_window":
            held = (rising if self.require_rising else streak) >= self.window
            reason = torch.where((reason == NO_EXIT) & allowed & held, EXIT_WINDOW, reason)
        elif self.name == "patience":
            held = streak >= self.patience + 1
            reason = torch.where((reason == NO_EXIT) & allowed & held, EXIT_PATIENCE, reason)
        reason = torch.where((reason == NO_EXIT) & (depth >= self.num_layers), EXIT_MAX_DEPTH, reason)
        reason = reason.to(torch.int8)
        return ExitDecision(
            exit=reason != NO_EXIT, reason=reason, pred=pred, top=top, entropy=ent,
            state=ExitState(pred=pred, top=top, streak=streak.to(torch.int32), rising=rising.to(torch.int32)),
        )


def exit_depths_offline(
    policy: ExitPolicy, probs_by_depth: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a policy to precomputed probabilities ``[L, N, K]`` (evaluation, threshold search).

    Returns (exit depth ``[N]`` 1-based, reason code ``[N]``). Equals what the engine decides.
    """
    num_layers, n, _ = probs_by_depth.shape
    state = ExitState.empty(n, probs_by_depth.device)
    depth_out = torch.zeros(n, dtype=torch.long, device=probs_by_depth.device)
    reason_out = torch.zeros(n, dtype=torch.int8, device=probs_by_depth.device)
    done = torch.zeros(n, dtype=torch.bool, device=probs_by_depth.device)
    for d in range(1, num_layers + 1):
        dec = policy.decide(probs_by_depth[d - 1], torch.full((n,), d, device=probs_by_depth.device), state)
        new = dec.exit & ~done
        depth_out[new] = d
        reason_out[new] = dec.reason[new]
        done |= dec.exit
        state = dec.state
    return depth_out, reason_out
