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

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from elbert_stream.config import MODEL_EXIT_DEFAULTS, ExitSettings
from elbert_stream.engine.model import normalised_entropy
from elbert_stream.errors import ConfigError

POLICIES = ("confidence_window", "entropy", "patience", "none")
# the thresholds each rule reads (the others are carried but ignored)
USES: dict[str, tuple[str, ...]] = {
    "confidence_window": ("tau", "window", "require_rising", "min_depth"),
    "entropy": ("tau", "min_depth"),
    "patience": ("patience", "min_depth"),
    "none": (),
}

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

    def rows(self, idx: torch.Tensor | slice) -> ExitState:
        """Those rows: views for a slice, gathered copies for an index tensor."""
        return ExitState(self.pred[idx], self.top[idx], self.streak[idx], self.rising[idx])

    def assign(self, idx: torch.Tensor | slice, other: ExitState) -> None:
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

    reason: torch.Tensor  # integer REASON codes (NO_EXIT where not exiting)
    pred: torch.Tensor  # long, argmax label at this depth
    top: torch.Tensor  # float32, top probability
    entropy: torch.Tensor  # float32, H(p)/log K
    state: ExitState

    @property
    def exit(self) -> torch.Tensor:
        """``[B]`` bool: the rows that exit at this depth."""
        return self.reason != NO_EXIT


@dataclass(frozen=True)
class ExitPolicy:
    """An exit rule for a model of ``num_layers`` depths: ``settings`` with every threshold set.
    Immutable: swap the object to change thresholds live. ``for_model`` resolves user settings
    against a model's saved defaults; ``of`` is the shorthand tests and threshold grids use."""

    settings: ExitSettings
    num_layers: int

    def __post_init__(self) -> None:
        if self.settings.unset():
            raise ConfigError(f"exit settings {self.settings.model_dump()} leave {self.settings.unset()} "
                              "unset; resolve them with ExitPolicy.for_model(settings, num_layers, defaults)")
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if not 1 <= self.min_depth <= self.num_layers:
            raise ConfigError(f"min_depth must be in [1, {self.num_layers}], got {self.min_depth}")

    @classmethod
    def for_model(cls, settings: ExitSettings, num_layers: int,
                  defaults: ExitSettings = MODEL_EXIT_DEFAULTS) -> ExitPolicy:
        """``settings`` over ``defaults`` (a model's saved ``extras.exit``) field by field, ``min_depth``
        capped at ``num_layers``."""
        resolved = settings.over(defaults)
        if resolved.min_depth is not None and resolved.min_depth > num_layers:
            resolved = resolved.model_copy(update={"min_depth": num_layers})
        return cls(resolved, num_layers)

    @classmethod
    def of(cls, name: str, num_layers: int, **thresholds: Any) -> ExitPolicy:
        """``ExitPolicy.of("entropy", 12, tau=0.2)``; thresholds not given take ``MODEL_EXIT_DEFAULTS``."""
        try:
            settings = ExitSettings.model_validate({**MODEL_EXIT_DEFAULTS.model_dump(), "policy": name,
                                                    **thresholds})
        except ValidationError as e:
            raise ConfigError(f"bad exit policy {name!r} {thresholds}: {e.errors()[0]['msg']}; policies: "
                              f"{POLICIES}") from e
        return cls(settings, num_layers)

    @property
    def name(self) -> str:
        return str(self.settings.policy)

    @property
    def tau(self) -> float:
        return float(self.settings.tau)  # type: ignore[arg-type]  # set: checked in __post_init__

    @property
    def window(self) -> int:
        return int(self.settings.window)  # type: ignore[arg-type]

    @property
    def patience(self) -> int:
        return int(self.settings.patience)  # type: ignore[arg-type]

    @property
    def require_rising(self) -> bool:
        return bool(self.settings.require_rising)

    @property
    def min_depth(self) -> int:
        return int(self.settings.min_depth)  # type: ignore[arg-type]

    def with_params(self, **changes: Any) -> ExitPolicy:
        """The same rule with some thresholds changed (validated as in ``of``)."""
        thresholds = {**self.describe(), **changes}
        return ExitPolicy.of(thresholds.pop("policy"), self.num_layers, **thresholds)

    def describe(self) -> dict[str, Any]:
        return self.settings.model_dump()

    def thresholds(self) -> dict[str, Any]:
        """Only the thresholds this rule reads (``USES``), for reports."""
        return {k: getattr(self.settings, k) for k in USES[self.name]}

    def decide(self, probs: torch.Tensor, depth: torch.Tensor, state: ExitState) -> ExitDecision:
        """probs ``[B, K]`` at each row's ``depth`` ``[B]`` (1-based), state for those rows.

        Device ops only, thresholds as Python scalars: no host sync, ~17 aten ops (docs/engine.md)."""
        if probs.dtype != torch.float32:
            probs = probs.float()
        top, pred = probs.max(-1)  # [B], [B]
        ent = normalised_entropy(probs)  # [B]
        same = pred == state.pred  # [B]
        streak = state.streak * same + 1  # [B] int32: reset to 1 where the label changed
        rising = state.rising * (same & (top >= state.top)) + 1  # [B] int32
        reason = self._reason(depth, ent, streak, rising)
        return ExitDecision(reason=reason, pred=pred, top=top, entropy=ent,
                            state=ExitState(pred=pred, top=top, streak=streak, rising=rising))

    def _reason(self, depth: torch.Tensor, ent: torch.Tensor, streak: torch.Tensor,
                rising: torch.Tensor) -> torch.Tensor:
        """Reason codes ``[B]`` long, lowest priority first: max depth, window/patience, entropy;
        nothing before ``min_depth`` (<= L, so depth L always exits)."""
        reason = torch.where(depth >= self.num_layers, EXIT_MAX_DEPTH, NO_EXIT)
        if self.name == "confidence_window":
            held = (rising if self.require_rising else streak) >= self.window
            reason = torch.where(held, EXIT_WINDOW, reason)
        elif self.name == "patience":
            reason = torch.where(streak >= self.patience + 1, EXIT_PATIENCE, reason)
        if self.name in ("confidence_window", "entropy") and self.tau > 0.0:
            reason = torch.where(ent < self.tau, EXIT_ENTROPY, reason)
        if self.min_depth > 1:
            reason = torch.where(depth >= self.min_depth, reason, NO_EXIT)
        return reason


def exit_depths_offline(
    policy: ExitPolicy, probs_by_depth: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a policy to precomputed probabilities ``[L, N, K]`` (evaluation, threshold search).

    Returns (exit depth ``[N]`` 1-based, reason code ``[N]``). Equals what the engine decides.
    """
    num_layers, n, _ = probs_by_depth.shape
    state = ExitState.empty(n, probs_by_depth.device)
    depth_out = torch.zeros(n, dtype=torch.long, device=probs_by_depth.device)
    reason_out = torch.zeros(n, dtype=torch.long, device=probs_by_depth.device)
    done = torch.zeros(n, dtype=torch.bool, device=probs_by_depth.device)
    for d in range(1, num_layers + 1):
        dec = policy.decide(probs_by_depth[d - 1], torch.full((n,), d, device=probs_by_depth.device), state)
        new = dec.exit & ~done
        depth_out[new] = d
        reason_out[new] = dec.reason[new]
        done |= dec.exit
        state = dec.state
    return depth_out, reason_out
