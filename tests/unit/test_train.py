"""ELBERT loss, depth weights, and a tiny deterministic / resumable training run."""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny_elbert import LABELS, save_tiny_model_dir, tiny_model, write_labelled_jsonl

from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.errors import ConfigError
from elbert_stream.training.recipe import RECIPES, TrainConfig
from elbert_stream.training.train import (
    add_cli,
    config_from_args,
    elbert_loss,
    finish,
    train,
)


def test_depth_weights_formula() -> None:
    model = tiny_model(num_layers=4)
    t = torch.tensor([4.0, 0.0, -1.0])
    with torch.no_grad():
        model.depth_logits.copy_(t)
    w = model.depth_weights()
    expected = [1 / (1 + torch.exp(-x)).item() for x in t]
    assert w[:3].tolist() == pytest.approx(expected, abs=1e-6)
    assert w[3].item() == pytest.approx(4 - sum(expected), abs=1e-6)
    assert w.sum().item() == pytest.approx(4.0, abs=1e-5)


def test_depth_logits_init_and_own_learning_rate() -> None:
    from elbert_stream.training.recipe import make_optimizer

    model = tiny_model(num_layers=5)
    assert model.depth_logits.tolist() == [4.0] * 4
    opt, _ = make_optimizer(model, TrainConfig(lr=1e-4, head_lr=1e-3, depth_lr=0.05), total_steps=10)
    groups = [g for g in opt.param_groups if any(p is model.depth_logits for p in g["params"])]
    assert len(groups) == 1 and len(groups[0]["params"]) == 1 and groups[0]["lr"] == pytest.approx(0.05 / 1)


def test_elbert_loss_is_weighted_sum_of_per_depth_ce_and_reaches_t() -> None:
    model = tiny_model(num_layers=3).train()
    ids = torch.randint(5, 60, (4, 7))
    mask = torch.ones_like(ids)
    labels = torch.tensor([0, 1, 2, 1])
    logits = model(ids, mask)  # [L, B, K]
    weights = model.depth_weights()
    loss, ce = elbert_loss(logits, labels, weights)
    manual = [torch.nn.functional.cross_entropy(logits[d], labels) for d in range(3)]
    assert ce.tolist() == pytest.approx([m.item() for m in manual], abs=1e-6)
    assert loss.item() == pytest.approx(
        sum(w * m for w, m in zip(weights.tolist(), ce.tolist(), strict=True)), abs=1e-5
    )
    loss.backward()
    grad = model.depth_logits.grad
    assert grad is not None and grad.abs().sum() > 0
    # dL/dt_i = sigmoid'(t_i) * (CE_i - CE_L)
    s = torch.sigmoid(model.depth_logits.detach())
    torch.testing.assert_close(grad, s * (1 - s) * (ce[:-1] - ce[-1]), atol=1e-6, rtol=1e-4)


def _tiny_cfg(tmp_path, **kw) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_labelled_jsonl(tmp_path / "data.jsonl", n=30)
    init = save_tiny_model_dir(tmp_path / "init", num_layers=3)
    return TrainConfig(
        out=str(tmp_path / "out"),
        init=str(init),
        data=str(data),
        num_layers=3,
        max_length=16,
        batch_size=8,
        epochs=2,
        lr=1e-3,
        head_lr=1e-2,
        save_dtype="float32",
        threads=1,
        checkpoint_every=2,
        **kw,
    )


def test_training_is_deterministic_and_resume_continues_exactly(tmp_path) -> None:
    cfg_a = _tiny_cfg(tmp_path / "a")
    straight = train(cfg_a)
    cfg_b = _tiny_cfg(tmp_path / "b")
    train(cfg_b, stop_at_step=3)  # "interrupted" mid-epoch 2 (3 steps per epoch)
    resumed = train(cfg_b, resume=True)
    assert straight.steps == resumed.steps == 6
    for (name, p), q in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=f"{name} differs after resume")
    assert len(straight.val_depth_accuracy) == 3
    assert not torch.equal(straight.model.depth_logits.detach(), torch.full((2,), 4.0))  # t learned


def test_finish_saves_a_loadable_dir_with_split_card_and_exit_defaults(tmp_path) -> None:
    cfg = _tiny_cfg(tmp_path, max_steps=2)
    out = finish(cfg, train(cfg))
    model = ElbertModel.from_pretrained(out)
    assert model.label_names == sorted(LABELS) and model.num_layers == 3
    assert model.extras.exit.policy == "confidence_window"
    assert load_tokenizer(out)("market")["input_ids"]
    assert (out / "split.json").is_file() and "Accuracy per depth" in (out / "MODEL_CARD.md").read_text()
    assert not (out / "checkpoint").exists()


def test_cli_flags_override_recipe_and_bad_init_is_a_config_error(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "--recipe", "bbc-minilm", "--epochs", "1", "--no-trim-vocab", "--out", "x"]
    )
    cfg = config_from_args(args)
    assert cfg.epochs == 1 and cfg.trim_vocab is False and cfg.out == "x"
    assert cfg.pooling == RECIPES["bbc-minilm"]["pooling"] == "mean" and cfg.init == "minilm"
    bad = _tiny_cfg(tmp_path)
    bad.init = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="nope"):
        train(bad)


def test_sentencepiece_tokenizer_from_training_texts(tmp_path) -> None:
    from elbert_stream.training.convert import train_sentencepiece

    texts = [
        f"the market for {w} shares rose {i} points" for i, w in enumerate(["film", "chip", "vote"] * 40)
    ]
    tok = train_sentencepiece(texts, tmp_path, vocab_size=60)
    assert (tmp_path / "spiece.model").is_file()
    ids = tok("the market rose")["input_ids"]
    assert len(ids) > 3 and tok.unk_token_id not in ids[1:-1]
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")("the market rose")["input_ids"] == ids
