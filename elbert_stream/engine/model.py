"""ELBERT on transformers' ALBERT modules, split into the three steps continuous batching needs.

ALBERT applies ONE shared transformer layer ``L`` times. ELBERT puts one shared exit head (the
pooler + classifier) after every application. This module exposes:

* ``embed(input_ids, attention_mask)``   -> hidden ``[B, T, H]`` (embeddings + projection E->H)
* ``layer(hidden, attention_mask)``      -> hidden ``[B, T, H]``: ONE application of the shared layer
* ``classify(hidden, attention_mask)``   -> logits ``[B, K]``: the shared exit head

Rows of a batch may sit at different depths: ``layer`` does not know or care, because every depth
uses the same weights. ``forward`` runs all depths (training / evaluation).

Checkpoints are ordinary Hugging Face ALBERT directories (``AlbertModel`` or
``AlbertForSequenceClassification`` weights + tokenizer files). ELBERT's extras (learned depth
weights, pooling, exit defaults, model name/version) live in ``config.json`` under ``"elbert"``.
Nothing here touches the network (``local_files_only=True``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import ValidationError
from torch import nn
from transformers import AlbertConfig, AlbertForSequenceClassification, AutoTokenizer
from transformers.models.albert.modeling_albert import AlbertLayerGroup
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.config import MODEL_EXIT_DEFAULTS, ExitSettings, model_dir
from elbert_stream.errors import ModelLoadError

log = logging.getLogger(__name__)

DEPTH_LOGIT_INIT = 4.0

Pooling = Literal["cls", "mean"]


@dataclass
class ElbertExtras:
    """What ELBERT adds to an ALBERT config; stored as ``config.elbert``."""

    pooling: Pooling = "cls"
    depth_logits: list[float] | None = None  # t_1..t_{L-1}; None = init 4.0
    exit: ExitSettings = field(default_factory=MODEL_EXIT_DEFAULTS.model_copy)  # every threshold set
    name: str = "elbert"
    version: str = "0"

    @classmethod
    def from_config(cls, config: AlbertConfig) -> ElbertExtras:
        raw: dict[str, Any] = dict(getattr(config, "elbert", None) or {})
        exit_raw = raw.pop("exit", {}) or {}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            log.warning("ignoring unknown keys in config.elbert: %s", sorted(unknown))
        try:
            exit_defaults = ExitSettings.model_validate({**MODEL_EXIT_DEFAULTS.model_dump(), **exit_raw})
        except ValidationError as e:
            raise ModelLoadError(f"config.elbert.exit is not a valid exit setting ({e.errors()[0]['msg']}: "
                                 f"{exit_raw!r}); fix it or remove the block to use the defaults") from e
        return cls(exit=exit_defaults, **{k: v for k, v in raw.items() if k in known})

    def to_config(self) -> dict[str, Any]:
        """The ``config.elbert`` block (JSON-ready)."""
        return {**asdict(self), "exit": self.exit.model_dump()}


def check_albert_config(config: AlbertConfig) -> None:
    """ELBERT needs exactly one shared layer: one hidden group with one inner layer."""
    if config.num_hidden_groups != 1 or config.inner_group_num != 1:
        raise ModelLoadError(
            "ELBERT needs one shared layer; got num_hidden_groups="
            f"{config.num_hidden_groups}, inner_group_num={config.inner_group_num}"
        )
    if (config.num_labels or 0) < 2:
        raise ModelLoadError(f"ELBERT classifies into K >= 2 classes; got num_labels={config.num_labels}")


class ElbertModel(nn.Module):
    """An ALBERT classifier whose shared layer and exit head can be called one depth at a time."""

    def __init__(self, config: AlbertConfig, hf: AlbertForSequenceClassification | None = None) -> None:
        super().__init__()
        check_albert_config(config)
        if hf is None:
            config._attn_implementation = "sdpa"
            hf = AlbertForSequenceClassification(config)
        self.config = config = hf.config  # ONE config (transformers may load a copy): what save writes
        self.extras = ElbertExtras.from_config(config)
        albert = hf.albert
        self.embeddings: nn.Module = albert.embeddings
        self.mapping_in: nn.Module = albert.encoder.embedding_hidden_mapping_in
        group = cast(AlbertLayerGroup, albert.encoder.albert_layer_groups[0])
        self.shared_layer: nn.Module = group.albert_layers[0]
        if albert.pooler is None:
            raise ModelLoadError("checkpoint has no pooler; ELBERT's exit head needs one")
        self.pooler: nn.Linear = albert.pooler
        self.dropout: nn.Module = hf.dropout
        self.classifier: nn.Linear = hf.classifier
        self._hf = [hf]  # kept out of the module tree: same parameters, for save/parity
        num_layers = config.num_hidden_layers
        init = self.extras.depth_logits or [DEPTH_LOGIT_INIT] * (num_layers - 1)
        if len(init) != num_layers - 1:
            raise ModelLoadError(
                f"config.elbert.depth_logits has {len(init)} values, expected {num_layers - 1}")
        # t_i for i < L; w_L is derived (see depth_weights)
        self.depth_logits = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels or 0)

    @property
    def label_names(self) -> list[str]:
        id2label = cast(dict[int, str], self.config.id2label)
        return [str(id2label[i]) for i in range(self.num_labels)]

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.weight.dtype

    # ---- the three steps -----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask ``[B, T]`` -> hidden ``[B, T, H]`` before the first layer."""
        del attention_mask  # ALBERT's embeddings ignore the mask; kept for a uniform contract
        emb = self.embeddings(input_ids)  # [B, T, E]
        return self.mapping_in(emb)  # [B, T, H]

    def layer(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ONE application of the shared layer to every row, whatever depth each row is at."""
        bias = attention_bias(attention_mask, hidden.dtype)  # [B, 1, 1, T]
        return self.shared_layer(hidden, bias)  # [B, T, H]

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The shared exit head: hidden ``[B, T, H]`` -> logits ``[B, K]``."""
        if self.extras.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            count = attention_mask.sum(1, keepdim=True).clamp_min(1).to(torch.float32)  # [B, 1] exact
            first = ((hidden * m).sum(1).float() / count).to(hidden.dtype)  # [B, H]
        else:
            first = hidden[:, 0]  # [B, H]  the [CLS] position
        pooled = torch.tanh(self.pooler(first))  # [B, H]
        return self.classifier(self.dropout(pooled))  # [B, K]

    # ---- all depths ----------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_layers: int | None = None
    ) -> torch.Tensor:
        """Logits at every depth: ``[L, B, K]`` (row ``d-1`` is depth ``d``)."""
        hidden = self.embed(input_ids, attention_mask)
        bias = attention_bias(attention_mask, hidden.dtype)
        out = []
        for _ in range(num_layers or self.num_layers):
            hidden = self.shared_layer(hidden, bias)
            out.append(self.classify(hidden, attention_mask))
        return torch.stack(out)  # [L, B, K]

    def depth_weights(self) -> torch.Tensor:
        """ELBERT's loss weights: w_i = sigmoid(t_i) for i < L, w_L = L - sum(w_i). Shape ``[L]``."""
        w = torch.sigmoid(self.depth_logits)  # [L-1]
        return torch.cat([w, (self.num_layers - w.sum()).reshape(1)])

    # ---- persistence ---------------------------------------------------------------------------
    @property
    def hf_model(self) -> AlbertForSequenceClassification:
        return self._hf[0]

    def save_pretrained(self, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """Save as an ordinary HF ALBERT classifier dir plus ``config.elbert``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.extras.depth_logits = [float(x) for x in self.depth_logits.detach().cpu()]
        self.config.elbert = self.extras.to_config()
        hf = self.hf_model
        if dtype is not None and dtype != self.dtype:
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in hf.state_dict().items()}
            hf.save_pretrained(path, state_dict=state)
        else:
            hf.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    @staticmethod
    def config_of(path: str | Path | None = None) -> AlbertConfig:
        """The ALBERT config of a checkpoint dir (None = the shipped model); ModelLoadError if none."""
        path = Path(path) if path is not None else shipped_model_dir()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"no config.json in model dir {str(path)!r}")
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            config = AlbertConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ModelLoadError(f"cannot read ALBERT config from {str(path)!r}: {e}") from e
        if model_type != "albert":
            raise ModelLoadError(f"{str(path)!r} holds a {model_type!r} checkpoint; elbert-stream runs "
                                 "ALBERT checkpoints (model_type 'albert', the albert-base-v2 layout)")
        return config

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        label_names: list[str] | None = None,
        new_head: bool = False,
        allow_missing_head: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ElbertModel:
        """Load any ALBERT checkpoint dir (None = the shipped BBC model).

        Serving needs a trained classifier: a checkpoint without one (a plain ``AlbertModel``) is
        refused unless ``allow_missing_head`` (training), which initialises a fresh one with a warning;
        ``label_names`` then sets K and the label names. A head trained for other labels than
        ``label_names`` is refused unless ``new_head``, which replaces it with a fresh one.
        """
        path = Path(path) if path is not None else shipped_model_dir()
        config = cls.config_of(path)
        if label_names is not None:
            saved = [v for _, v in sorted((config.id2label or {}).items(), key=lambda kv: int(kv[0]))]
            if saved and saved != list(label_names) and not new_head and _has_head(path):
                raise ModelLoadError(f"the classifier in {str(path)!r} predicts {saved}, the data has "
                                     f"{list(label_names)}; train a fresh head (--new-head) or use "
                                     "data with the checkpoint's labels")
            config.num_labels = len(label_names)
            config.id2label = dict(enumerate(label_names))
            config.label2id = {n: i for i, n in enumerate(label_names)}
        check_albert_config(config)
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per replica start is log noise
        try:
            loaded: Any = AlbertForSequenceClassification.from_pretrained(
                path, config=config, local_files_only=True, attn_implementation="sdpa",
                output_loading_info=True, dtype=torch.float32, ignore_mismatched_sizes=new_head,
            )
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot load ALBERT weights from {str(path)!r}: {e}") from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        hf: AlbertForSequenceClassification = loaded[0]
        info: dict[str, list[str]] = loaded[1]
        missing = [k for k in info.get("missing_keys", [])
                   if not k.startswith("albert.embeddings.position_ids")]
        head_missing = [k for k in missing if k.startswith("classifier")]
        if head_missing and not (new_head or allow_missing_head):
            absent = ", ".join(sorted(head_missing))
            raise ModelLoadError(f"checkpoint {str(path)!r} has no classifier ({absent}): it cannot "
                                 "classify; fine-tune it first: elbert-stream train --init DIR --data ...")
        if new_head or head_missing:
            hf.classifier.weight.data.normal_(0.0, config.initializer_range)
            hf.classifier.bias.data.zero_()
            log.warning("checkpoint %s: classifier %s, initialised at random for %d labels; fine-tune it",
                        path, "absent" if head_missing else "replaced", config.num_labels)
        other = [k for k in missing if not k.startswith("classifier")]
        if other:
            raise ModelLoadError(f"checkpoint {str(path)!r} lacks weights: {sorted(other)[:8]}")
        model = cls(config, hf)
        model.eval()
        return model.to(device=device, dtype=dtype)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` 1/0 mask -> additive ``[B, 1, 1, T]`` bias (0 where attended, dtype-min elsewhere)."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)  # [B, T]
    return bias.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]  # no upload


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) / log K for ``[..., K]`` probabilities -> ``[...]`` in [0, 1]."""
    p = probs if probs.dtype == torch.float32 else probs.float()
    return torch.special.entr(p).sum(-1).mul_(1.0 / math.log(probs.shape[-1]))  # entr(0) = 0


def shipped_model_dir() -> Path:
    """The BBC News ELBERT model shipped inside the package."""
    path = model_dir(None)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the shipped model is missing at {str(path)!r}; run `make model`")
    return path


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.txt", "sentencepiece.bpe.model")


def _has_head(path: Path) -> bool:
    """Whether the checkpoint's weights include a classifier (safetensors header or torch state)."""
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            if any(k.startswith("classifier.") for k in f.keys()):  # noqa: SIM118 - not a dict
                return True
    return False


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint (None = the shipped model's). Never downloads. A dir
    without tokenizer files is refused (transformers would build an empty tokenizer: every word
    ``<unk>``)."""
    path = Path(path) if path is not None else shipped_model_dir()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer files in {str(path)!r} (one of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer the model was trained with beside it "
                             "(tokenizer.save_pretrained(DIR))")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r}: {e}") from e


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
