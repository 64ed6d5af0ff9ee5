"""What a training run starts from: its configuration (``TrainConfig``, the named ``RECIPES`` and
small ALBERT configs), the initial model and tokenizer (``init_model``), and the optimizer with its
learning-rate groups and schedule (``make_optimizer``). The run itself is ``train.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AlbertConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.errors import ConfigError
from elbert_stream.training.data import DEFAULT_SEED

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


def _opt(default: Any, help: str) -> Any:
    """A ``TrainConfig`` field with its ``--flag`` help text (documented once, here)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint and the model card). Each field
    is a ``train`` flag (``--text-column`` for ``text_column``) whose help is the field's text."""

    out: str = _opt("elbert-out", "output dir: the trained model, split.json, MODEL_CARD.md")
    init: str = _opt("albert-tiny", "start from: an ALBERT checkpoint dir, albert-tiny|albert-small "
                     "(random init), or minilm (MiniLM-L6 layer as the shared layer)")
    tokenizer: str | None = _opt(None, "dir with tokenizer files (default: the init's, or a "
                                 "SentencePiece model trained on the training split)")
    data: str | None = _opt("bbc", "one labelled set split 80/10/10 (or by --split-column): bbc, "
                            "tweets, FILE.jsonl|.csv|.parquet, a datasets save_to_disk dir, hf:NAME")
    train: str | None = _opt(None, "training file (JSONL/CSV/Parquet/datasets dir); replaces --data")
    val: str | None = _opt(None, "validation file (exit thresholds, per-epoch accuracy); default: "
                           "10%% of --train, stratified")
    test: str | None = _opt(None, "test file (the model card's numbers); default: 10%% of --train")
    split_column: str | None = _opt(None, "column naming each row's split (train, val|validation|"
                                    "dev, test) in the --data file")
    text_column: str = _opt("text", "column holding the text")
    label_column: str = _opt("label", "column holding the label (a name or an integer)")
    split_seed: int = _opt(DEFAULT_SEED, "seed of the stratified split")
    seed: int = _opt(0, "seed of the initialisation, batch order and dropout")
    num_layers: int = _opt(12, "depths: how often the shared layer is applied (one exit per depth)")
    minilm_layer: int = _opt(2, "--init minilm: which MiniLM layer (0-based) becomes the shared one")
    pooling: str = _opt("cls", "exit head pooling: cls or mean")
    max_length: int = _opt(128, "tokens per text (longer texts are truncated)")
    epochs: int = _opt(3, "passes over the training split")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = _opt(16, "texts per step; each batch is padded to its own longest text")
    lr: float = _opt(1e-4, "encoder learning rate (linear warmup, then linear decay)")
    head_lr: float = _opt(1e-3, "exit head learning rate")
    depth_lr: float = _opt(1e-2, "learning rate of the depth logits t (constant: the authors' way)")
    depth_with_encoder: bool = _opt(False, "t follows the encoder's warmup/decay and gradient clip "
                                    "(the pre-#12 way)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (encoder and head weights)")
    warmup: float = _opt(0.06, "fraction of the steps spent warming up")
    trim_vocab: bool = _opt(False, "drop the word pieces no text can ever produce (punctuation or "
                            "CJK inside a longer piece, [unused*]); every text tokenizes as before")
    new_head: bool = _opt(False, "--init DIR: a fresh classifier (no head, or one for other labels)")
    save_dtype: str = _opt("float16", "dtype of the saved weights: float16, bfloat16 or float32")
    max_loss_points: float = _opt(0.5, "exit defaults: the fastest setting within this many accuracy "
                                  "points of full depth on validation")
    threads: int | None = _opt(None, "torch CPU threads (1 is fastest on a busy machine)")
    keep_checkpoint: bool = _opt(False, "keep OUT/checkpoint after a finished run")
    checkpoint_every: int = _opt(50, "checkpoint every this many steps (and at every epoch end)")
    name: str | None = _opt(None, "the model's name (in its config, outputs and card); default: the "
                            "--out dir's name")
    version: str = _opt("0", "the model's version string")

    @property
    def model_name(self) -> str:
        """``name``, else the output dir's name (a run is named after what the user called it)."""
        return self.name or Path(self.out).resolve().name


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
        version="1",
    ),
}


def _sentencepiece(texts: list[str], out: Path) -> PreTrainedTokenizerBase:
    from elbert_stream.training.convert import train_sentencepiece

    return train_sentencepiece(texts, out)


# ---- initialisation ---------------------------------------------------------------------------
def init_model(
    cfg: TrainConfig, names: list[str], train_texts: list[str]
) -> tuple[ElbertModel, PreTrainedTokenizerBase]:
    """The model + tokenizer a run starts from, for labels ``names`` (deterministic in cfg and data;
    ``train_texts`` only train a SentencePiece tokenizer where one is needed)."""
    if cfg.init == "minilm":
        from elbert_stream.training.convert import bert_to_elbert, minilm_dir, trim_vocab

        model, tok = bert_to_elbert(minilm_dir(), cfg.minilm_layer, cfg.num_layers, names, cfg.pooling)
        if cfg.trim_vocab:
            tok = trim_vocab(model, tok)
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
    model.extras.name, model.extras.version = cfg.model_name, cfg.version
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
