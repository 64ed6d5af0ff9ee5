"""``elbert-stream gears``: the gear table of a model (``gears.json`` beside its files).

Gear 0 is the model's saved exit settings. The looser gears come from the evaluate machinery: the
default policy's threshold grid (``scoring.policy_grid``) scored on the VALIDATION split
(``scoring.score_policy``), its accuracy / mean-exit-depth frontier (``evaluate.frontier``), and of
the frontier points shallower than gear 0 at most ``max_gears - 1``, spread evenly over depth and
always including the fastest. Each gear carries its mean exit depth, its accuracy against the gold
labels and its consistency with the full-depth label (the same scoring against ``probs[-1].argmax``).
Test-split figures are added for the record (``test``), never used to choose.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from elbert_stream.adaptive import GEARS_FILE, Gear, GearTable
from elbert_stream.config import ExitSettings, model_dir
from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.engine.policy import ExitPolicy
from elbert_stream.training.evaluate import _labels_for, frontier
from elbert_stream.training.files import Columns
from elbert_stream.training.scoring import PolicyScore, all_depth_probs, encode, policy_grid, score_policy
from elbert_stream.training.splits import evaluation_sets

log = logging.getLogger(__name__)

DEFAULT_MAX_GEARS = 5


def _gear(policy: ExitPolicy, probs: torch.Tensor, labels: torch.Tensor) -> Gear:
    gold = score_policy(policy, probs, labels)
    agree = score_policy(policy, probs, probs[-1].argmax(-1))  # "accuracy" against the full-depth label
    return Gear(policy.settings, gold.mean_exit_depth, gold.accuracy, agree.accuracy, gold.histogram)


def spread(depths: list[float], count: int, start: float | None = None) -> list[int]:
    """Indices of at most ``count`` of the descending ``depths``, nearest to ``count`` depths evenly
    spaced from ``start`` (default: the first depth; not itself a target) to the last, so always
    the last (shallowest) one."""
    if count <= 0 or not depths:
        return []
    if len(depths) <= count:
        return list(range(len(depths)))
    top, bottom = depths[0] if start is None else start, depths[-1]
    picked: list[int] = []
    for k in range(1, count + 1):
        aim = top - (top - bottom) * k / count
        best = min(range(len(depths)), key=lambda i: (abs(depths[i] - aim), i))
        if best not in picked:
            picked.append(best)
    return sorted(picked)


def looser_settings(default: ExitPolicy, probs: torch.Tensor, labels: torch.Tensor,
                    max_looser: int) -> list[ExitPolicy]:
    """Frontier settings of the default's policy that exit earlier than ``default``, deepest first."""
    base = score_policy(default, probs, labels).mean_exit_depth
    grid = policy_grid(default.name, default.num_layers)
    scores: list[tuple[PolicyScore, ExitPolicy]] = [(score_policy(p, probs, labels), p) for p in grid]
    chosen: list[tuple[float, ExitPolicy]] = []
    for depth, acc in reversed(frontier([s for s, _ in scores])):  # deepest first
        if depth < base - 1e-6:
            policy = next(p for s, p in scores if (s.mean_exit_depth, s.accuracy) == (depth, acc))
            chosen.append((depth, policy))
    return [chosen[i][1] for i in spread([d for d, _ in chosen], max_looser, start=base)]


def gear_table(default: ExitSettings, num_layers: int, val: tuple[torch.Tensor, torch.Tensor], *,
               max_gears: int = DEFAULT_MAX_GEARS, model_name: str = "", model_version: str = "",
               source: dict[str, Any] | None = None) -> GearTable:
    """The table from validation probabilities ``[L, N, K]`` and labels ``[N]`` (no model needed)."""
    policy = ExitPolicy.for_model(default, num_layers)
    looser = looser_settings(policy, *val, max_gears - 1)
    gears = tuple(_gear(p, *val) for p in [policy, *looser])
    full = float((val[0][-1].argmax(-1) == val[1]).float().mean())
    about = {"split": "val", "n": int(val[1].numel()), "full_depth_accuracy": full, **(source or {})}
    return GearTable(gears, model_name, model_version, about)


def _probs(model: ElbertModel, tokenizer: Any, ds: Any, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encode(tokenizer, ds.texts, max_length)
    return all_depth_probs(model, ids, mask), _labels_for(model, ds)


def _gears(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    model = ElbertModel.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    sets = evaluation_sets(path, args.data, args.val_data, Columns(args.text_column, args.label_column))
    val_set, test_set = sets.val, sets.test
    val = _probs(model, tokenizer, val_set, args.max_length)
    command = args.command_line or shlex.join(["elbert-stream", *sys.argv[1:]])
    table = gear_table(model.extras.exit, model.num_layers, val, max_gears=args.max_gears,
                       model_name=model.extras.name, model_version=model.extras.version,
                       source={"data": sets.described["val"], "max_length": args.max_length,
                               "command": command})
    test = _probs(model, tokenizer, test_set, args.max_length)
    table.source["test"] = [_gear(ExitPolicy(g.exit, model.num_layers), *test).to_dict() for g in table.gears]
    out = Path(args.out) if args.out else path / GEARS_FILE
    table.save(out)
    for i, g in enumerate(table.gears):
        log.info("gear %d: depth %.2f, val accuracy %.4f (-%.2f points), consistency %.4f: %s", i,
                 g.mean_exit_depth, g.accuracy, table.loss_points(i), g.consistency, g.exit.model_dump())
    log.info("wrote %s", out)
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("gears", help="compute a model's gear table (gears.json) for adaptive exit")
    p.add_argument("--model", help="model dir (default: the shipped BBC model)")
    p.add_argument("--data", default=None, help="labelled data (as `evaluate --data`; default: the model's "
                                                "held-out split from its split.json)")
    p.add_argument("--val-data", help="labelled set to score the gears on (default: the model's validation "
                                      "split, or a stratified 10%% of --data)")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    p.add_argument("--max-gears", type=int, default=DEFAULT_MAX_GEARS, help="gears including the default")
    p.add_argument("--max-length", type=int, default=128, help="tokens (default 128)")
    p.add_argument("--out", help="where to write (default: <model dir>/gears.json)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_gears)
