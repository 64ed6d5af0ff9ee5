"""MiniLM (BERT) -> ELBERT conversion and vocabulary trimming."""

from __future__ import annotations

import torch
from tiny_elbert import tiny_model, tiny_tokenizer
from transformers import BertModel

from elbert_stream.training.convert import bert_to_elbert, minilm_dir, trim_vocab


def test_shared_layer_is_the_chosen_bert_layer_on_bert_embeddings() -> None:
    torch.manual_seed(0)
    model, tok = bert_to_elbert(minilm_dir(), layer_index=2, num_layers=3, label_names=["a", "b"])
    bert = BertModel.from_pretrained(minilm_dir(), local_files_only=True, attn_implementation="eager").eval()
    enc = tok(
        ["Shares rose sharply.", "The film won an award at the festival"], padding=True, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model.eval()
    with torch.no_grad():
        ours = model.layer(model.embed(ids, mask), mask)  # [B, T, H]
        emb = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        ref = bert.encoder.layer[2](emb, attention_mask=bias)
        ref = ref[0] if isinstance(ref, tuple) else ref
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    assert model.extras.pooling == "mean" and model.label_names == ["a", "b"]


def test_trim_vocab_keeps_tokenization_and_embedding_rows() -> None:
    model, tok = tiny_model(num_layers=2), tiny_tokenizer()
    texts = ["market shares", "a vote"]
    before = {p: model.embeddings.word_embeddings.weight[i].clone() for p, i in tok.get_vocab().items()}
    new_tok = trim_vocab(model, tok, texts)
    vocab = new_tok.get_vocab()
    assert "film" not in vocab and "market" in vocab and "##q" in vocab and "[PAD]" in vocab
    assert model.config.vocab_size == len(vocab) == model.embeddings.word_embeddings.num_embeddings
    assert new_tok.convert_ids_to_tokens(new_tok("market shares film")["input_ids"]) == [
        "[CLS]",
        "market",
        "shares",
        "f",
        "##i",
        "##l",
        "##m",
        "[SEP]",
    ]
    for piece, i in vocab.items():
        torch.testing.assert_close(model.embeddings.word_embeddings.weight[i], before[piece])
