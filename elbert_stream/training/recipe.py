"""What a training run starts from: its configuration (``TrainConfig``, the named ``RECIPES`` and
small ALBERT configs), the initial model and tokenizer (``init_model``), and the optimizer with its
learning-rate groups and schedule (``make_optimizer``). The run itself is ``train.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AlbertConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.errors import ConfigError
from elbert_stream.training.data import DEFAULT_SEED, Dataset

SMALL_CONFIGS: dict[str, dict[str, int]] = {
    "albert-tiny": {
        "embedding_size": 128,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "albert-small": {
        "embedding_size": 128,
        "hidden_size": 384,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
}


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint and the model card)."""

    out: str = "elbert-out"
    init: str = "albert-tiny"  # ALBERT dir | SMALL_CONFIGS name | "minilm"
    tokenizer: str | None = None  # dir with tokenizer files; None = from init or SentencePiece
    data: str = "bbc"
    text_column: str = "text"
    label_column: str = "label"
    split_seed: int = DEFAULT_SEED
    seed: int = 0
    num_layers: int = 12
    minilm_layer: int = 2
    pooling: str = "cls"
    max_length: int = 128
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 1e-3
    depth_lr: float = 1e-2  # constant: no warmup/decay (the authors' way)
    depth_with_encoder: bool = False  # True: t follows the encoder's warmup/decay and clip (pre-#12)
    weight_decay: float = 0.01
    warmup: float = 0.06
    trim_vocab: bool = False
    new_head: bool = False  # --init DIR: a fresh classifier (no head, or one for other labels)
    save_dtype: str = "float16"
    max_loss_points: float = 0.5
    threads: int | None = None
    keep_checkpoint: bool = False
    checkpoint_every: int = 50  # steps; also at every epoch end
    name: str = "elbert"
    version: str = "0"


RECIPES: dict[str, dict[str, Any]] = {
    "bbc-minilm": dict(
        init="minilm",
        data="bbc",
        minilm_layer=2,
        pooling="mean",
        num_layers=12,
        epochs=2,
        batch_size=16,
        lr=1e-4,
        head_lr=1e-3,
        depth_lr=1e-2,
        max_length=128,
        trim_vocab=True,
        threads=1,
        name="bbc-elbert",
        version="1",
    ),
}


def _sentencepiece(texts: list[str], out: Path) -> PreTrainedTokenizerBase:
    from elbert_stream.training.convert import train_sentencepiece

    return train_sentencepiece(texts, out)


# ---- initialisation ---------------------------------------------------------------------------
def init_model(
    cfg: TrainConfig, data: Dataset, train_texts: list[str]
) -> tuple[ElbertModel, PreTrainedTokenizerBase]:
    """The model + tokenizer a run starts from (deterministic in cfg and data)."""
    names = data.label_names
    if cfg.init == "minilm":
        from elbert_stream.training.convert import bert_to_elbert, minilm_dir, trim_vocab

        model, tok = bert_to_elbert(minilm_dir(), cfg.minilm_layer, cfg.num_layers, names, cfg.pooling)
        if cfg.trim_vocab:
            tok = trim_vocab(model, tok, data.texts)
    elif cfg.init in SMALL_CONFIGS:
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else _sentencepiece(train_texts, Path(cfg.out))
        kwargs: dict[str, Any] = dict(
            vocab_size=len(tok),
            num_hidden_layers=cfg.num_layers,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            pad_token_id=tok.pad_token_id,
            max_position_embeddings=max(512, cfg.max_length),
            **SMALL_CONFIGS[cfg.init],
        )
        config = AlbertConfig(**kwargs)
        config.elbert = {"pooling": cfg.pooling}
        model = ElbertModel(config)
    elif Path(cfg.init).is_dir():
        model = ElbertModel.from_pretrained(cfg.init, label_names=names, new_head=cfg.new_head,
                                            allow_missing_head=True)
        model.extras.pooling = cfg.pooling  # type: ignore[assignment]
        tok = load_tokenizer(cfg.tokenizer or cfg.init)
    else:
        raise ConfigError(f"--init {cfg.init!r} is neither an ALBERT dir nor one of {sorted(SMALL_CONFIGS)}")
    model.extras.name, model.extras.version = cfg.name, cfg.version
    return model, tok


def make_optimizer(
    model: ElbertModel, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW: encoder (lr), exit head (head_lr), depth logits t (depth_lr, no decay), in that group order.

    Encoder and head: linear warmup over ``warmup * total_steps`` steps, then linear decay to 0. The
    depth logits keep ``depth_lr`` constant, as in the ELBERT authors' code (shakeley/ELBERT
    ``run_glue.py`` adds their group after the scheduler is built), unless ``depth_with_encoder``.
    """
    head = {id(p) for m in (model.pooler, model.classifier) for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
    for name, p in model.named_parameters():
        if name == "depth_logits":
            continue
        key = "head" if id(p) in head else ("no_decay" if p.ndim < 2 else "decay")
        groups[key].append(p)
    opt = torch.optim.AdamW(
        [
            {"params": groups["decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
            {"params": groups["head"], "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
            {"params": [model.depth_logits], "lr": cfg.depth_lr, "weight_decay": 0.0},
        ]
    )
    warm = max(1, int(cfg.warmup * total_steps))

    def warmup_decay(s: int) -> float:
        return min((s + 1) / warm, max(0.0, (total_steps - s) / max(1, total_steps - warm)))

    def constant(s: int) -> float:
        return 1.0

    depth = warmup_decay if cfg.depth_with_encoder else constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [warmup_decay, warmup_decay, warmup_decay, depth])
    return opt, sched


def clipped_parameters(model: ElbertModel, cfg: TrainConfig) -> list[nn.Parameter]:
    """The parameters whose gradient norm is clipped (to 1.0) together: all but the depth logits,
    whose gradient the authors leave unclipped, unless ``depth_with_encoder``."""
    if cfg.depth_with_encoder:
        return list(model.parameters())
    return [p for p in model.parameters() if p is not model.depth_logits]
