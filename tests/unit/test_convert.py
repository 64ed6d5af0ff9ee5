"""MiniLM (BERT) -> ELBERT conversion and vocabulary trimming (which never changes how text tokenizes)."""

from __future__ import annotations

import random

import torch
from tiny_elbert import tiny_model, tiny_tokenizer
from transformers import BertModel, BertTokenizer

from elbert_stream.training.convert import bert_to_elbert, minilm_dir, producible, trim_vocab


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


UNSEEN = [  # text no vocabulary was trimmed to: accents, CJK, punctuation runs, emoji, urls, ## pieces
    "Héllo, wörld!!! 東京タワー is 333m tall...",
    "naïve café—déjà vu… #driverless @google http://t.co/qgqe2JoYMD",
    "[unused5] [UNK] ##ing ## # don't (won't) e.g. U.S.A. 3.14%",
    "Ｆｕｌｌｗｉｄｔｈ １２３ ☃ 😀 𝓯𝓪𝓷𝓬𝔂 İstanbul ΣΊΣΥΦΟΣ straße ǅ",
    "Shares in the bank fell sharply after the results; analysts expect a 12% cut",
]


def _assert_same_tokens_and_rows(base_tok, new_tok, base_rows, model, texts) -> None:
    for text in texts:
        ids, new_ids = base_tok(text)["input_ids"], new_tok(text)["input_ids"]
        assert new_tok.convert_ids_to_tokens(new_ids) == base_tok.convert_ids_to_tokens(ids), text
        torch.testing.assert_close(model.embeddings.word_embeddings.weight[new_ids], base_rows[ids])


def test_trim_vocab_drops_only_pieces_no_text_can_produce() -> None:
    model, tok = tiny_model(num_layers=2), tiny_tokenizer()
    vocab = dict(tok.get_vocab())
    for extra in ("a.b", "##.", "##x,", "[unused0]"):  # never looked up: punctuation inside a piece
        vocab[extra] = len(vocab)
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    model.hf_model.resize_token_embeddings(len(vocab))
    base_rows = model.embeddings.word_embeddings.weight.detach().clone()
    new_tok = trim_vocab(model, tok)
    kept = new_tok.get_vocab()
    assert set(vocab) - set(kept) == {"a.b", "##.", "##x,", "[unused0]"}  # the words stay, unseen or not
    assert model.config.vocab_size == len(kept) == model.embeddings.word_embeddings.num_embeddings
    _assert_same_tokens_and_rows(tok, new_tok, base_rows, model, [*UNSEEN, "a.b ##. x, film market"])


def test_trimmed_minilm_tokenizes_unseen_text_exactly_as_minilm() -> None:
    """The bbc-minilm recipe's trim: MiniLM's own tokenizer and the trimmed one split text the data
    never had into the same pieces, with the same embedding rows."""
    model, tok = bert_to_elbert(minilm_dir(), layer_index=2, num_layers=2, label_names=["a", "b"])
    base_rows = model.embeddings.word_embeddings.weight.detach().clone()
    new_tok = trim_vocab(model, tok)
    assert len(new_tok.get_vocab()) == 30522 - 1331
    _assert_same_tokens_and_rows(tok, new_tok, base_rows, model, UNSEEN)
    chars = [chr(c) for c in range(32, 0x3100)] + ["東", "京", "😀", "𝓯"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    _assert_same_tokens_and_rows(tok, new_tok, base_rows, model, texts)


def test_producible_pieces() -> None:
    assert producible("market") and producible("##ing") and producible(".") and producible("東")
    assert producible("##") is False and producible("#a") is False  # "#" is always a word of its own
    assert not producible("a.b") and not producible("##.") and not producible("[unused3]")
    assert not producible("東京") and producible("東京", cjk_isolated=False)
