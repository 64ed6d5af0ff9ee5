"""ELBERT fine-tuning: ``elbert-stream train``.

The loss is ELBERT's: ``sum_i w_i * CE_i`` over depths ``i = 1..L``, with ``w_i = sigmoid(t_i)`` for
``i < L`` and ``w_L = L - sum_{i<L} w_i`` (``ElbertModel.depth_weights``); ``t`` are learned, in their
own optimizer group with their own constant learning rate and outside the encoder's gradient clip,
as the ELBERT authors train them (``make_optimizer``, ``clipped_parameters``). Training is
deterministic in ``--seed``, pads each batch to its own longest text, shows progress with rate and
time left (a bar, and a log line every 20 steps), reports validation accuracy per depth after every
epoch, and checkpoints model + optimizer + step so ``--resume`` continues an interrupted run exactly.

Data (``training/splits.py``): ``--data`` (a corpus, a file, a ``datasets`` dir; split 80/10/10 or
by ``--split-column``) or ``--train`` [``--val``] [``--test``] files (JSONL, CSV, Parquet).

Initialisation (``--init``): an ALBERT checkpoint dir, a named small config trained from scratch
(``albert-tiny``/``albert-small``; tokenizer from ``--tokenizer`` or a SentencePiece model trained
on the training split), or ``--recipe bbc-minilm`` (MiniLM-L6 layer -> ALBERT shared layer).
At the end the model, named ``--name`` (default: the ``--out`` dir's name), is saved with exit
defaults chosen on validation, ``split.json`` and a model card.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.engine.model import ElbertModel
from elbert_stream.training.progress import RunProgress, progress_bar
from elbert_stream.training.recipe import (
    RECIPES,
    TrainConfig,
    clipped_parameters,
    init_model,
    make_optimizer,
)
from elbert_stream.training.scoring import (
    all_depth_probs,
    choose_exit_defaults,
    depth_accuracy,
    encode,
    pad_batch,
    tokenize,
)
from elbert_stream.training.splits import DataSpec, RunData, load_splits

log = logging.getLogger(__name__)

def elbert_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[L, B, K]``, labels ``[B]``, weights ``[L]`` -> (sum_i w_i CE_i, CE per depth ``[L]``)."""
    num_layers, b, k = logits.shape
    ce = nn.functional.cross_entropy(
        logits.reshape(-1, k).float(), labels.repeat(num_layers), reduction="none"
    )
    ce = ce.view(num_layers, b).mean(1)  # [L]
    return (weights * ce).sum(), ce.detach()


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: ElbertModel
    tokenizer: PreTrainedTokenizerBase
    val_depth_accuracy: list[float]
    train_seconds: float
    steps: int
    data: RunData


def _checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoint" / "state.pt"


def _save_checkpoint(
    cfg: TrainConfig, model: ElbertModel, opt: Any, sched: Any, step: int, elapsed: float
) -> None:
    path = _checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
            "config": asdict(cfg),
        },
        tmp,
    )
    tmp.replace(path)


def train(cfg: TrainConfig, resume: bool = False, stop_at_step: int | None = None) -> TrainResult:
    """Run (or resume) training; returns the trained model with validation accuracy per depth.

    ``stop_at_step`` ends the run early (checkpointed) as an interruption would; ``resume`` goes on.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_splits(DataSpec.of(cfg))
    train_set, val_set = data.parts["train"], data.parts["val"]
    log.info("data: %s", ", ".join(f"{s} {len(d)} ({data.sources[s]})" for s, d in data.parts.items()))
    model, tok = init_model(cfg, data.label_names, train_set.texts)
    seqs = tokenize(tok, train_set.texts, cfg.max_length)  # N lists of token ids, padded per batch
    labels = torch.tensor(train_set.labels)  # [N]
    val_ids, val_mask = encode(tok, val_set.texts, cfg.max_length)
    val_labels = torch.tensor(val_set.labels)
    per_epoch = -(-len(train_set) // cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * per_epoch
    opt, sched = make_optimizer(model, cfg, total)
    step, elapsed = 0, 0.0
    if resume and _checkpoint_path(cfg).is_file():
        state = torch.load(_checkpoint_path(cfg), weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        log.info("resumed from %s at step %d", _checkpoint_path(cfg), step)
    elif resume:
        log.warning("--resume: no checkpoint at %s; starting fresh", _checkpoint_path(cfg))
    val_acc = _loop(
        cfg,
        model,
        (seqs, labels, int(tok.pad_token_id or 0)),
        (val_ids, val_mask, val_labels),
        opt,
        sched,
        step,
        min(total, stop_at_step or total),
        total,
        elapsed,
    )
    return TrainResult(model, tok, val_acc[0], val_acc[1], total, data)


def _step(cfg: TrainConfig, model: ElbertModel, opt: Any, sched: Any, batch: tuple, step: int) -> tuple:
    """One optimizer step on ``batch`` = (ids, mask, labels); returns (loss, CE per depth ``[L]``)."""
    ids, mask, labels = (t.to(model.device) for t in batch)
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks: resumable
    logits = model(ids, mask)  # [L, b, K]
    loss, ce = elbert_loss(logits, labels, model.depth_weights())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(clipped_parameters(model, cfg), 1.0)
    opt.step()
    sched.step()
    return loss.detach(), ce


def _loop(
    cfg: TrainConfig,
    model: ElbertModel,
    train_t: tuple,
    val_t: tuple,
    opt: Any,
    sched: Any,
    step: int,
    stop: int,
    total: int,
    elapsed: float,
) -> tuple[list[float], float]:
    """Steps ``step..stop-1`` (of ``total``) over ``train_t`` = (token id lists, labels ``[N]``, pad
    id), each batch padded to its longest text; validation + checkpoint at each epoch end."""
    seqs, labels, pad_id = train_t
    n, per_epoch = len(seqs), -(-len(seqs) // cfg.batch_size)
    val_acc: list[float] = []
    start = time.perf_counter() - elapsed
    progress = RunProgress(total, step, cfg.batch_size)
    with progress_bar() as bar:
        task = bar.add_task("", total=total, completed=step, rate=progress.rate_text())
        while step < stop:
            epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            model.train()
            for b in range(offset, min(per_epoch, offset + stop - step)):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                batch = (*pad_batch([seqs[i] for i in idx.tolist()], pad_id), labels[idx])
                loss, ce = _step(cfg, model, opt, sched, batch, step)
                step += 1
                progress.advance()
                bar.update(task, advance=1, rate=progress.rate_text(),
                           description=f"loss {loss.item():.3f} ce@L {ce[-1].item():.3f}")
                if step % cfg.checkpoint_every == 0 and step < stop:
                    _save_checkpoint(cfg, model, opt, sched, step, time.perf_counter() - start)
                if step % 20 == 0 or step == progress.start_step + 1:
                    log.info("%s; loss %.4f CE first/last %.3f/%.3f w_L %.3f", progress.summary(),
                             loss.item(), ce[0].item(), ce[-1].item(), model.depth_weights()[-1].item())
            val_acc = _validate(model, val_t, epoch, step)
            _save_checkpoint(cfg, model, opt, sched, step, time.perf_counter() - start)
    return val_acc, time.perf_counter() - start


def _validate(model: ElbertModel, val_t: tuple, epoch: int, step: int) -> list[float]:
    """Validation accuracy per depth on ``val_t`` = (ids, mask, labels), logged."""
    val_acc = depth_accuracy(all_depth_probs(model, *val_t[:2]), val_t[2])
    log.info("epoch %d (step %d) val accuracy per depth: %s", epoch + 1, step,
             " ".join(f"{a * 100:.1f}" for a in val_acc))
    return val_acc


def finish(cfg: TrainConfig, result: TrainResult) -> Path:
    """Round the weights to ``save_dtype``, choose exit defaults on validation, save the model dir
    (+ ``split.json``, ``MODEL_CARD.md``); the card's numbers are those of the saved weights."""
    from elbert_stream.training.model_card import write_model_card

    data, model, tok = result.data, result.model, result.tokenizer
    dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.save_dtype]
    with torch.no_grad():  # score exactly the weights that will be saved
        for param in model.parameters():
            param.copy_(param.to(dtype).to(param.dtype))
    probs = {}
    for name in ("val", "test"):
        part = data.parts[name]
        probs[name] = (
            all_depth_probs(model, *encode(tok, part.texts, cfg.max_length)),
            torch.tensor(part.labels),
        )
    defaults, score = choose_exit_defaults(*probs["val"], max_loss_points=cfg.max_loss_points)
    model.extras.exit = defaults
    log.info(
        "exit defaults chosen on validation: %s (val acc %.4f, mean depth %.2f)",
        defaults,
        score.accuracy,
        score.mean_exit_depth,
    )
    out = Path(cfg.out)
    model.save_pretrained(out, tokenizer=tok, dtype=dtype)
    data.write(out / "split.json", cfg.split_seed)
    note = ", ".join(f"{s} {len(d)} rows of {data.sources[s]}" for s, d in data.parts.items())
    write_model_card(out, cfg, model, probs, result.train_seconds, result.steps,
                     f"{note} (split seed {cfg.split_seed})")
    if not cfg.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return out


# ---- CLI ----------------------------------------------------------------------------------------
TRAIN_EPILOG = """examples:
  elbert-stream train --recipe bbc-minilm --train train.jsonl --val val.jsonl --test test.jsonl --out mine
  elbert-stream train --recipe bbc-minilm --data all.csv --split-column split --label-column topic --out mine
  elbert-stream train --recipe bbc-minilm --data tweets --out tweets-elbert --epochs 1
Files: JSONL, CSV (UTF-8, header row), Parquet, or a dir saved by datasets' save_to_disk. Labels are
names or integers; a split not given is carved from the training rows (10% per class). The model is
named after --out unless --name is given; evaluate it with: elbert-stream evaluate --model mine"""


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune an ELBERT model on your data (ELBERT loss, learned depth weights)",
        description="Fine-tune an ELBERT model with the ELBERT loss; save it with exit defaults chosen "
                    "on validation, split.json and MODEL_CARD.md.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named recipe: its values replace the defaults below; flags given override it")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/state.pt")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            conv = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=conv, default=None, help=text)
    p.set_defaults(func=_run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe's config (or the defaults) with every flag given on top; ``--train`` files replace
    the recipe's ``--data``."""
    cfg = TrainConfig(**RECIPES[args.recipe]) if args.recipe else TrainConfig()
    given = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None
    }
    if given.get("train") and "data" not in given:
        given["data"] = None
    return replace(cfg, **given)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    log.info("training with %s", cfg)
    result = train(cfg, resume=args.resume)
    out = finish(cfg, result)
    log.info("saved %s; training took %.1f s (%d steps)", out, result.train_seconds, result.steps)
    return 0
