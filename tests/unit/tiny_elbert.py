"""Tiny random ELBERT models, tokenizers and labelled files for fast CPU unit tests."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AlbertConfig, BertTokenizer

from elbert_stream.engine.model import ElbertModel

LABELS = ["alpha", "beta", "gamma"]
WORDS = ["market", "shares", "film", "music", "vote", "party", "goal", "match", "phone", "chip"]


def tiny_config(num_layers: int = 4, num_labels: int = 3, vocab_size: int = 99) -> AlbertConfig:
    """A random-weights ALBERT small enough to run in milliseconds."""
    return AlbertConfig(
        vocab_size=vocab_size,
        embedding_size=16,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        max_position_embeddings=64,
        num_labels=num_labels,
        id2label=dict(enumerate(LABELS[:num_labels])),
        label2id={n: i for i, n in enumerate(LABELS[:num_labels])},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
    )


def tiny_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over specials + letters + ##letters + a few words (any a-z text tokenizes)."""
    pieces = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *string.ascii_lowercase,
        *(f"##{c}" for c in string.ascii_lowercase),
        *WORDS,
    ]
    return BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}, do_lower_case=True)


def tiny_model(num_layers: int = 4, pooling: str = "cls", seed: int = 0) -> ElbertModel:
    torch.manual_seed(seed)
    config = tiny_config(num_layers, vocab_size=len(tiny_tokenizer().get_vocab()))
    config.elbert = {"pooling": pooling}
    return ElbertModel(config).eval()


def save_tiny_model_dir(path: Path, num_layers: int = 4, pooling: str = "cls") -> Path:
    """A saved tiny model + tokenizer dir, loadable with from_pretrained / load_tokenizer."""
    tiny_model(num_layers, pooling).save_pretrained(path, tokenizer=tiny_tokenizer())
    return path


def write_labelled_jsonl(
    path: Path, n: int = 30, seed: int = 0, text_key: str = "text", label_key: str = "label"
) -> Path:
    """``n`` short texts whose label is determined by their words (learnable, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % len(LABELS)
        words = [WORDS[(3 * label + int(j)) % len(WORDS)] for j in torch.randint(0, 3, (6,), generator=g)]
        rows.append({text_key: " ".join(words), label_key: LABELS[label]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextmanager
def torch_threads(num: int = 1) -> Iterator[None]:
    """Run with ``num`` torch threads (tiny tensors: one thread avoids OpenMP barriers that dominate
    on a busy 2-core machine), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)
